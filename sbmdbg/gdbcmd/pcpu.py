"""sbm pcpu: the hot per-CPU fields of every CPU (pcpu_hot or separate per-CPU
variables, whichever the kernel has), read through the kernel root."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.sbm import commands as C


def _hex(v) -> str:
    return f"{v & ((1 << 64) - 1):#x}" if isinstance(v, int) else str(v)


class PcpuCommand(SbmCommand):
    """Decode the hot per-CPU fields (current task, preempt count, stacks, softirqs)
of each CPU: struct pcpu_hot (Linux 6.2-6.14) or the separate per-CPU
variables (current_task, __preempt_count, cpu_current_top_of_stack, ...:
Linux 6.1 and 6.15+), whichever the kernel has; the title says which.

Usage: sbm pcpu [CPU|all] [--json]
The layout comes from DWARF and the symbol table; memory is read physically
through the kernel root, so this works with a vCPU stopped in user mode
under PTI.  "vCPU mode" is the SBM model's (sandbox, transition, ...)."""

    name = "pcpu"

    def add_args(self, p):
        p.add_argument("cpu", nargs="?", default="all", help="CPU number or 'all' (default)")

    def complete_positional(self, text, word):
        try:
            n = STATE.get_target().ncpus
        except Exception:  # noqa: BLE001
            n = 0
        return [c for c in ["all"] + [str(i) for i in range(n)] if c.startswith(word or "")]

    def run(self, args):
        k = STATE.get_kernel()
        out = C.pcpu(k, args)
        if args.json:
            self.emit_json(out)
            return
        rows = out["cpus"]
        t = Table(title=f"{out['layout_description']}, kernel root {k.root:#x}",
                  title_justify="left")
        t.add_column("field")
        for d in rows:
            t.add_column(f"cpu {d['cpu']}", no_wrap=True)
        names = []
        for d in rows:
            names += [n for n in d["fields"] if n not in names]

        t.add_row("vCPU mode", *[escape(str(d["vcpu"].get("mode") or "?")) for d in rows])
        for name in names:
            vals = []
            for d in rows:
                v = d["fields"].get(name)
                if isinstance(v, bool):
                    vals.append(str(int(v)))
                elif name == "preempt_count" and isinstance(v, int):
                    vals.append(f"{v & 0xFFFFFFFF:#x}")
                elif isinstance(v, int) and abs(v) < 4096:
                    vals.append(str(v))
                else:
                    vals.append(_hex(v))
            t.add_row(name, *vals)
            if name == "current_task":
                t.add_row("  pid", *[str((d.get("current") or {}).get("pid", "?")) for d in rows])
                t.add_row("  comm", *[escape(str((d.get("current") or {}).get("comm", "?"))) for d in rows])
        self.emit_rich(t)


PcpuCommand()
