"""sbm target: where physical memory comes from; sbm kernel: the model summary."""
from __future__ import annotations

from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE


class TargetCommand(SbmCommand):
    """Choose the physical-memory source: QEMU's RAM file (found by default) or the gdbstub.

Usage: sbm target [gdb | shm PATH [SIZE] | auto] [--json]

By default the RAM file of a local QEMU (memory-backend-file, share=on) is
found from the gdbstub's port; ``gdb`` forces the gdbstub's physical mode,
``auto`` goes back to the default."""

    name = "target"

    def add_args(self, p):
        p.add_argument("source", nargs="?", choices=["gdb", "shm", "auto"])
        p.add_argument("path", nargs="?")
        p.add_argument("size", nargs="?")

    def run(self, args):
        if args.source == "gdb":
            STATE.set_ram_file(None)
        elif args.source == "shm":
            if not args.path:
                from sbmdbg.errors import SbmdbgError
                raise SbmdbgError("sbm target shm needs the RAM file path")
            STATE.set_ram_file(args.path, int(args.size, 0) if args.size else None)
            STATE.get_target()  # open now so errors show here
        elif args.source == "auto":
            STATE.set_ram_file(None)
            STATE.auto = True
        if args.source == "auto" or (args.source is None and STATE.target is None):
            try:
                STATE.get_target()
            except Exception:  # noqa: BLE001 - not connected yet: say what would be used
                pass
        info = STATE.memory_source()
        if args.json:
            self.emit_json(info)
        else:
            self.emit_rich(_memory_line(info))


def _memory_line(info: dict) -> str:
    if info["memory"] == "shm":
        return f"physical memory: shm {info['ram_file']} ({info['how']})"
    return f"physical memory: gdbstub physical mode ({info['how']})"


class KernelCommand(SbmCommand):
    """Show what the kernel model found: root, paging levels, KASLR slide, bases,
the per-CPU layout (pcpu_hot or per-cpu variables), whether it has SandBox Mode.

Usage: sbm kernel [--json]"""

    name = "kernel"

    def run(self, args):
        k = STATE.get_kernel()
        s = k.summary()
        s["pti"] = k.pti_enabled()
        from sbmdbg.model.percpu import percpu_layout
        from sbmdbg.sbm.model import no_sbm_reason
        s["percpu_layout"] = percpu_layout(k).kind   # pcpu_hot | per-cpu variables
        s["sbm"] = no_sbm_reason(k) is None
        s["memory"] = STATE.memory_source()
        if args.json:
            self.emit_json(s)
        else:
            mem = s.pop("memory")
            for key, v in s.items():
                self.emit_rich(f"{key:18} {v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                               else f"{key:18} {v}")
            self.emit_rich(f"{'memory':18} " + _memory_line(mem).partition(": ")[2])


TargetCommand()
KernelCommand()
