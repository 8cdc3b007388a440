"""gdb face: the ``sbm`` prefix command and one module per command group.

The only package that imports ``gdb`` (gdbtarget.py: the in-gdb Target source)."""
from __future__ import annotations

import gdb


class SbmPrefix(gdb.Command):
    """sbmdbg: SandBox Mode kernel debugging commands (bare `sbm`: per-vCPU status; sbm list,
show, stack, audit, diff, pcpu, vtop, pt, ptov, kernel, target, trace, time)."""

    def __init__(self):
        super().__init__("sbm", gdb.COMMAND_USER, prefix=True)

    def invoke(self, arg, from_tty):  # bare `sbm` [--json]: the per-vCPU status table
        from sbmdbg.gdbcmd.sbmcmds import bare_sbm
        bare_sbm(arg, from_tty)


SbmPrefix()

from sbmdbg.gdbcmd import state  # noqa: E402,F401  (cache invalidation hooks)
from sbmdbg.gdbcmd import targetcmd  # noqa: E402,F401  (sbm target)
from sbmdbg.gdbcmd import sbmcmds  # noqa: E402,F401  (the command table: status, list, ... kernel)
from sbmdbg.gdbcmd import trace  # noqa: E402,F401
from sbmdbg.gdbcmd import timing  # noqa: E402,F401  (sbm time: the benchmarks' in-gdb timer)
