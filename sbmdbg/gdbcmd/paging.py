"""sbm vtop / sbm pt / sbm ptov: page tables through an explicit root."""
from __future__ import annotations

from rich.table import Table

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.x86 import paging as pg

ROOT_HELP = "kernel (default) | user | sandbox[=N] | a CR3 value"


def gdb_write(text: str) -> None:
    import gdb
    gdb.write(text)


def _int(s: str, what: str) -> int:
    try:
        return int(s, 0) & ((1 << 64) - 1)
    except ValueError:
        pass
    try:
        import gdb
        return int(gdb.parse_and_eval(s)) & ((1 << 64) - 1)
    except Exception:  # noqa: BLE001
        raise SbmdbgError(f"bad {what} {s!r}") from None


def _root(k, spec):
    from sbmdbg.target.gdbtarget import _cpu_of
    import gdb
    th = gdb.selected_thread()
    return k.resolve_root(spec, cpu=_cpu_of(th) if th else 0)


def _range(s: str | None):
    if not s:
        return None
    a, sep, b = s.partition("-")
    if not sep or not a or not b:
        raise SbmdbgError(f"bad range {s!r}: want START-END")
    lo, hi = _int(a, "range start"), _int(b, "range end")
    if hi <= lo:
        raise SbmdbgError(f"empty range {s!r}")
    return lo, hi


def _perm(p: pg.Perms | None) -> str:
    if p is None:
        return "-"
    return ("r" + ("w" if p.w else "-") + ("x" if p.x else "-") + (" user" if p.u else " supv"))


def _size(n: int) -> str:
    for unit, sh in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{unit}"
    return str(n)


class VtopCommand(SbmCommand):
    """Translate a virtual address through a page-table root, showing every level.

Usage: sbm vtop VA [--root kernel|user|sandbox[=N]|CR3] [--json]"""

    name = "vtop"

    def add_args(self, p):
        p.add_argument("va", help="virtual address (number or gdb expression)")
        p.add_argument("--root", default="kernel", help=ROOT_HELP)

    def run(self, args):
        k = STATE.get_kernel()
        root = _root(k, args.root)
        va = _int(args.va, "address")
        tr = pg.translate(k._reader, root.pgd_pa, va, la57=k.la57, nxe=k.nxe)
        if args.json:
            d = tr.to_json()
            d["root_label"] = root.label
            self.emit_json(d)
            return
        # Plain text, not a rich Table: rendering one costs ~3 ms, more than
        # the translation (nothing here comes from guest strings).
        rows = [("level", "idx", "entry @pa", "value", "flags", "next / frame")]
        for e in tr.entries:
            flags = e.flags_str() if e.present else "not present"
            if e.leaf and e.present:
                flags += f" pkey={e.pkey} pat={e.cache_index}"
            if e.reserved_bits:
                flags += f" RSVD={e.reserved_bits:#x}"
            rows.append((e.name, str(e.index), f"{e.entry_pa:#x}", f"{e.raw:#018x}", flags,
                         f"{e.target:#x}" if e.present else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"{va:#x} via {root.label} root {root.pgd_pa:#x} ({tr.levels}-level)"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if tr.pa is not None:
            lines.append(f"pa = {tr.pa:#x}  ({_size(tr.page_size)} page, {_perm(tr.perms)}, "
                         f"global={bool(tr.leaf.raw & pg.G)})")
        else:
            lines.append(f"no translation: {tr.fault}")
        gdb_write("\n".join(lines) + "\n")


class PtCommand(SbmCommand):
    """Dump a page-table root as merged ranges (same attributes, contiguous VA and PA).

Usage: sbm pt [ROOT] [--range A-B] [--flags w,x,u,s,ro,nx,g,ng] [--raw] [--json]"""

    name = "pt"

    def add_args(self, p):
        p.add_argument("root", nargs="?", default="kernel", help=ROOT_HELP)
        p.add_argument("--range", help="START-END virtual range")
        p.add_argument("--flags", help="keep only mappings with these effective flags")
        p.add_argument("--raw", action="store_true", help="one line per page (no merging)")
        p.add_argument("--max-entries", type=int, default=4_000_000)

    def run(self, args):
        k = STATE.get_kernel()
        root = _root(k, args.root)
        maps, w = pg.walk(k._reader, root.pgd_pa, la57=k.la57, nxe=k.nxe, range=_range(args.range),
                          flags=pg.parse_flags(args.flags), merge_runs=not args.raw,
                          max_entries=args.max_entries, max_ranges=pg.OUTPUT_MAX_RANGES)
        if args.json:
            self.emit_json({"root": root.pgd_pa, "root_label": root.label,
                            "mappings": [m.to_json() for m in maps], **pg.truncation(w),
                            "findings": [f.to_json() for f in w.findings],
                            "stats": vars(w.stats)})
            return
        t = Table(title=f"{root.label} root {root.pgd_pa:#x}: {len(maps)} ranges", title_justify="left")
        for col in ("va", "end", "pa", "size", "page", "perms", "G", "pat", "pkey"):
            t.add_column(col)
        for m in maps[:pg.RENDER_MAX_ROWS]:
            t.add_row(f"{m.va:#x}", f"{m.end:#x}", f"{m.pa:#x}", _size(m.size), _size(m.page_size),
                      _perm(m.perms), "G" if m.g else "", str(m.cache_index), str(m.pkey))
        self.emit_rich(t)
        tr = pg.truncation(w, max(0, len(maps) - pg.RENDER_MAX_ROWS))
        line = pg.truncated_line(tr["more_ranges"], tr["truncated"])
        if line:
            self.emit_rich(line)
        for f in w.findings[:20]:
            self.emit_rich(f"finding: {f.kind}: {f.message}")


class PtovCommand(SbmCommand):
    """Find the virtual addresses that map a physical address under a root.

Usage: sbm ptov PA [--root kernel|user|sandbox[=N]|CR3] [--json]"""

    name = "ptov"

    def add_args(self, p):
        p.add_argument("pa", help="physical address")
        p.add_argument("--root", default="kernel", help=ROOT_HELP)

    def run(self, args):
        k = STATE.get_kernel()
        root = _root(k, args.root)
        pa = _int(args.pa, "physical address")
        hits, w = pg.ptov(k._reader, root.pgd_pa, pa, la57=k.la57, nxe=k.nxe)
        if args.json:
            self.emit_json({"pa": pa, "root": root.pgd_pa, "vas": [
                {"va": va, "perms": m.to_json()["perms"], "page_size": m.page_size} for va, m in hits]})
            return
        if not hits:
            self.emit_rich(f"{pa:#x} is not mapped under the {root.label} root")
        for va, m in hits:
            sym = k.lookup(va)
            s = f" <{sym[0]}+{sym[1]:#x}>" if sym and sym[1] < 1 << 24 else ""
            self.emit_rich(f"{va:#x}  {_perm(m.perms)}  {_size(m.page_size)}{s}")


VtopCommand()
PtCommand()
PtovCommand()
