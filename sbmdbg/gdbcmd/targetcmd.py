"""sbm target: where physical memory comes from (sbm kernel is in the command table)."""
from __future__ import annotations

from sbmdbg.commands.render import memory_line
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE


class TargetCommand(SbmCommand):
    """Choose the physical-memory source: QEMU's RAM file (found by default) or the gdbstub.

Usage: sbm target [gdb | shm PATH [SIZE] | auto | flush | reload] [--json]

By default the RAM file of a local QEMU (memory-backend-file, share=on) is
found from the gdbstub's port; ``gdb`` forces the gdbstub's physical mode,
``auto`` goes back to the default.  ``flush`` drops every cache of the model
(as a resume does); ``reload`` rebuilds the target and the kernel model."""

    name = "target"

    def add_args(self, p):
        p.add_argument("source", nargs="?", choices=["gdb", "shm", "auto", "flush", "reload"])
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
        elif args.source == "flush":
            STATE.invalidate()
        elif args.source == "reload":
            STATE.forget()
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
            self.emit_rich(memory_line(info))


TargetCommand()
