"""Plain-text output of the table commands without rich's layout engine.

rich measures, wraps and crops every cell through several layers of
renderables: ~1-2 ms for the 9-column ``sbm`` table, more than the model's
whole refresh.  Most outputs are the simple case: the default box
(HEAVY_HEAD), left-justified single-line cells, no colour, a table narrower
than the console.  ``render_plain`` lays those out itself, the same
characters rich prints (tests/unit/test_fasttable.py compares the two), and
returns None for anything else (the face then uses rich)."""
from __future__ import annotations

from rich import box
from rich._wrap import divide_line
from rich.cells import cell_len
from rich.markup import render as render_markup
from rich.table import Table

from sbmdbg.commands.render import Plain


def _plain(cell) -> str | None:
    """A cell's text: markup strings only (rich renderables: None).  The
    faces' consoles have emoji=False, so ``:name:`` stays as typed."""
    if not isinstance(cell, str):
        return None
    text = render_markup(cell, emoji=False).plain if "[" in cell else cell
    if "\n" in text or "\t" in text or "\r" in text:
        return None
    return text


def _simple(t: Table) -> bool:
    return (t.box is box.HEAVY_HEAD and t.safe_box is None and t.show_header and t.show_edge
            and not t.show_footer and not t.show_lines and not t.expand and t.width is None
            and t.min_width is None and t.padding == (0, 1, 0, 1) and t.pad_edge and not t.collapse_padding
            and t.leading == 0 and not t.row_styles and t.caption is None
            and (t.title is None or (isinstance(t.title, str) and t.title_justify == "left"))
            and all(not r.style and not r.end_section for r in t.rows)
            and all(c.justify == "left" and c.width is None and c.min_width is None and c.max_width is None
                    and c.ratio is None and not c.style and not c.header_style and not c.footer
                    and c.vertical == "top" for c in t.columns))


def _wrap(text: str | None, width: int) -> list[str] | None:
    """``text`` word-wrapped in ``width`` cells, each line padded to it, as
    rich wraps a table's title (its own line breaker); None for a word
    longer than the width (rich folds it)."""
    if text is None:
        return None
    if cell_len(text) <= width:
        return [text + " " * (width - cell_len(text))]
    if any(cell_len(w) > width for w in text.split()):
        return None
    cuts = [0] + divide_line(text, width, fold=False) + [len(text)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        line = text[a:b]
        if cell_len(line) > width:
            line = line.rstrip()
        out.append(line + " " * (width - cell_len(line)))
    return out


def _table(t: Table, width: int) -> list[str] | None:
    if not t.columns or not _simple(t):
        return None
    cols = []
    for c in t.columns:
        cells = [_plain(c.header)] + [_plain(x) for x in c._cells]
        if any(x is None for x in cells):
            return None
        cols.append(cells)
    widths = [max(map(cell_len, cells)) for cells in cols]
    total = sum(widths) + 3 * len(widths) + 1
    if total > width:
        return None                    # rich would shrink and wrap: let it
    lines = []
    if t.title is not None:
        title = _wrap(_plain(t.title), total)
        if title is None:
            return None
        lines += title
    seg = [w + 2 for w in widths]
    lines.append("┏" + "┳".join("━" * n for n in seg) + "┓")

    def row(i: int, edge: str) -> str:
        return edge + edge.join(f" {cells[i]}{' ' * (w - cell_len(cells[i]))} "
                                for cells, w in zip(cols, widths)) + edge
    lines.append(row(0, "┃"))
    lines.append("┡" + "╇".join("━" * n for n in seg) + "┩")
    for i in range(1, len(cols[0])):
        lines.append(row(i, "│"))
    lines.append("└" + "┴".join("─" * n for n in seg) + "┘")
    return lines


def render_plain(renderables, width: int) -> str | None:
    """The text rich would print for ``renderables`` (no colour, console
    ``width``), or None when one of them is not the simple case."""
    out = []
    for r in renderables:
        if isinstance(r, Plain):
            out.append(str(r))
        elif isinstance(r, Table):
            lines = _table(r, width)
            if lines is None:
                return None
            out += lines
        elif isinstance(r, str):
            text = _plain(r)
            if text is None or cell_len(text) > width:    # rich wraps long lines: let it
                return None
            out.append(text)
        else:
            return None
    return "".join(line + "\n" for line in out)
