"""The one argparse parser class of every face (``sbmdbg ...``, ``sbmdbg
inspect ... CMD``, gdb's ``sbm CMD``): it never exits the process; a bad
argument raises ``ArgError`` and ``--help`` raises ``HelpShown`` once the help
is printed, and each face reports them its own way (the CLI: usage + one
``sbmdbg: error:`` line, exit 2; gdb: one ``gdb.GdbError`` line)."""
from __future__ import annotations

import argparse


class ArgError(Exception):
    """A bad command line; ``parser`` is the (sub)parser that refused it."""

    def __init__(self, message: str, parser: argparse.ArgumentParser):
        super().__init__(message)
        self.parser = parser


class HelpShown(Exception):
    """``--help`` printed the help (sys.stdout: in gdb, gdb's own output)."""

    def __init__(self, status: int = 0):
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ArgError(message, self)

    def exit(self, status=0, message=None):
        if message:
            import sys
            sys.stderr.write(message)
        raise HelpShown(status)
