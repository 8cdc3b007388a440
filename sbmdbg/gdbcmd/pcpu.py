"""sbm pcpu: pcpu_hot of every CPU, read through the kernel root."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.model.percpu import pcpu_hot, vcpu_state


def _hex(v) -> str:
    return f"{v & ((1 << 64) - 1):#x}" if isinstance(v, int) else str(v)


class PcpuCommand(SbmCommand):
    """Decode pcpu_hot (current task, preempt count, stacks, softirqs) of each CPU.

Usage: sbm pcpu [CPU|all] [--json]
The layout comes from DWARF; memory is read physically through the kernel
root, so this works with a vCPU stopped in user mode under PTI."""

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
        n = k.target.ncpus
        if args.cpu == "all":
            cpus = list(range(n))
        else:
            try:
                cpus = [int(args.cpu, 0)]
            except ValueError:
                raise SbmdbgError(f"bad CPU {args.cpu!r}: a number or 'all'") from None
            if not 0 <= cpus[0] < n:
                raise SbmdbgError(f"no CPU {cpus[0]} (the guest has {n})")
        rows = []
        for c in cpus:
            d = pcpu_hot(k, c)
            d["vcpu"] = vcpu_state(k, c)
            rows.append(d)
        if args.json:
            self.emit_json({"cpus": rows, "root": k.root, "slide": k.slide})
            return
        t = Table(title=f"pcpu_hot (kernel root {k.root:#x})", title_justify="left")
        t.add_column("field")
        for d in rows:
            t.add_column(f"cpu {d['cpu']}", no_wrap=True)
        names = []
        for d in rows:
            names += [n for n in d["fields"] if n not in names]

        def mode(d):
            cpl = d["vcpu"]["cpl"]
            return "user" if cpl == 3 else "kernel" if cpl == 0 else f"cpl{cpl}"
        t.add_row("vCPU mode", *[mode(d) for d in rows])
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
