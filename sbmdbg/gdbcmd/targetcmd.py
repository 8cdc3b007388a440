"""sbm target: where physical memory comes from; sbm kernel: the model summary."""
from __future__ import annotations

from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE


class TargetCommand(SbmCommand):
    """Choose the physical-memory source: the gdbstub (default) or QEMU's RAM file.

Usage: sbm target [gdb | shm PATH [SIZE]] [--json]"""

    name = "target"

    def add_args(self, p):
        p.add_argument("source", nargs="?", choices=["gdb", "shm"])
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
        info = {"memory": "shm" if STATE.ram_file else "gdbstub", "ram_file": STATE.ram_file,
                "ram_size": STATE.ram_size}
        if args.json:
            self.emit_json(info)
        else:
            self.emit_rich(f"physical memory: {info['memory']}" + (f" ({STATE.ram_file})" if STATE.ram_file else ""))


class KernelCommand(SbmCommand):
    """Show what the kernel model found: root, paging levels, KASLR slide, bases.

Usage: sbm kernel [--json]"""

    name = "kernel"

    def run(self, args):
        k = STATE.get_kernel()
        s = k.summary()
        s["pti"] = k.pti_enabled()
        if args.json:
            self.emit_json(s)
        else:
            for key, v in s.items():
                self.emit_rich(f"{key:18} {v:#x}" if isinstance(v, int) and not isinstance(v, bool)
                               else f"{key:18} {v}")


TargetCommand()
KernelCommand()
