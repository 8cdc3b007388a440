"""commands.fasttable prints what rich prints (the gdb face's console: no
colour, emoji off) for the simple tables, and declines everything else."""
import io

import pytest
from rich.console import Console
from rich.table import Table

from sbmdbg.commands import render as R
from sbmdbg.commands.fasttable import render_plain
from sbmdbg.commands.render import Plain

pytestmark = pytest.mark.unit


def rich_text(renderables, width):
    """What the gdb face's rich console prints (Plain text verbatim)."""
    con = Console(file=io.StringIO(), width=width, force_terminal=False, color_system=None,
                  highlight=False, emoji=False)
    chunks = []
    for r in renderables:
        with con.capture() as cap:
            if not isinstance(r, Plain):
                con.print(r)
        chunks.append(r + "\n" if isinstance(r, Plain) else cap.get())
    return "".join(chunks)


def table(title="vCPUs", rows=(), cols=("cpu", "mode", "stack"), **kw):
    t = Table(title=title, title_justify="left", **kw)
    for c in cols:
        t.add_column(c, no_wrap=c != "stack")
    for r in rows:
        t.add_row(*r)
    return t


STATUS = {"sbm": True, "note": None, "cpus": [
    {"cpu": 0, "mode": "kernel", "cpl": 0, "cr3": 0x1614000, "cr3_role": "kernel", "rip": 0xFFFFFFFF81C3D2AB,
     "rip_symbol": {"text": "default_idle+0xb"}, "task": {"pid": 0, "comm": "swapper/0"},
     "stack": {"name": "thread"}, "sandbox": None},
    {"cpu": 1, "mode": "sandbox", "cpl": 3, "cr3": 0x3A2C000, "cr3_role": "sandbox:70", "rip": 0xFFFFFFFF81001000,
     "rip_symbol": None, "task": {"pid": 70, "comm": "[sh] é中 :skull:"}, "stack": {"name": "sbm_stack"},
     "sandbox": "sandbox:70", "attack_evidence": ["GS base 0x0 on cpu 1: [not] its base"]}]}


SIMPLE = [
    [table(rows=[("0", "kernel", "thread"), ("1", "sandbox", "é中x")])],
    [table(rows=[])],                                        # header only
    [table(title=None, rows=[("[bold]x[/bold]", r"\[esc]", ":smile:")])],
    ["[dim]a note: with markup[/dim]", Plain("[not markup]"), table(rows=[("0", "", "")])],
]
SIMPLE += [[table(title=title, rows=[("0", "kernel", "thread")])] for title in (
    "a title wider than the table itself is", "pcpu_hot (struct pcpu_hot per CPU, Linux 6.2-6.14), kernel root 0x1614000",
    "  leading and  double  spaces in a long title  ", "x" * 20 + " " + "y" * 20)]
PCPU = {"layout_description": "pcpu_hot (struct pcpu_hot per CPU, Linux 6.2-6.14)", "root": 0x1614000,
        "cpus": [{"cpu": 0, "vcpu": {"mode": "kernel"}, "current": {"pid": 0, "comm": "swapper/0"},
                  "fields": {"current_task": 0xFFFFFFFF81608AC0, "preempt_count": 0x80000000, "cpu_number": 0}}]}
SIMPLE.append(R.pcpu(PCPU))
WIDE = [R.status(STATUS), R.sandbox_list({"sandboxes": [], "discovery": {"mode": "cpus", "reason": "why: because"}})]


@pytest.mark.parametrize("renderables, width", [(r, w) for r in SIMPLE for w in (80, 160)]
                         + [(r, 160) for r in WIDE])   # 9-10 columns: wider than 80
def test_same_text_as_rich(renderables, width):
    fast = render_plain(renderables, width)
    assert fast is not None
    assert fast == rich_text(renderables, width)


@pytest.mark.parametrize("renderables", [
    [table(rows=[("0", "x" * 200, "y")])],                   # wider than the console: rich wraps
    R.status(STATUS),                                        # 9 columns in 80
    [table(rows=[("0", "two\nlines", "y")])],
    [table(rows=[("0", "1", "2")], show_lines=True)],
    [table(title="a_title_word_wider_than_the_table", rows=[("0", "1", "2")])],   # rich folds it
    [table(rows=[("0", "1", "2")], caption="c")],
    ["x" * 300],                                             # a long line: rich wraps it
])
def test_declines_what_it_does_not_lay_out(renderables):
    assert render_plain(renderables, 80) is None
