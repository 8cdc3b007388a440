"""gdb face: the ``sbm`` prefix command and one module per command group.

The only package that imports ``gdb`` (with sbmdbg.target.gdbtarget)."""
from __future__ import annotations

import gdb


class SbmPrefix(gdb.Command):
    """sbmdbg: SandBox Mode kernel debugging commands (sbm pcpu, vtop, pt, ptov, target, kernel)."""

    def __init__(self):
        super().__init__("sbm", gdb.COMMAND_USER, prefix=True)


SbmPrefix()

from sbmdbg.gdbcmd import state  # noqa: E402,F401  (cache invalidation hooks)
from sbmdbg.gdbcmd import pcpu  # noqa: E402,F401
from sbmdbg.gdbcmd import paging  # noqa: E402,F401
from sbmdbg.gdbcmd import targetcmd  # noqa: E402,F401
