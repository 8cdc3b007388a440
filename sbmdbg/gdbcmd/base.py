"""Base class for ``sbm`` subcommands: argparse, --json, one-line errors."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import gdb

from sbmdbg import guard
from sbmdbg.commands.parser import ArgError, HelpShown, Parser
from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean
from sbmdbg.jsonutil import jsonable

to_jsonable = jsonable


def _json_default(obj):
    if isinstance(obj, bytes):
        return obj.hex()
    raise TypeError(type(obj).__name__)


def console_width() -> int:
    """gdb's width in 80..240; "unlimited" (MI, `set width 0`) is 240."""
    try:
        width = int(gdb.parameter("width") or 0) or 240
    except (gdb.error, RuntimeError, ValueError):
        width = 160
    return min(max(width, 80), 240)


def rich_console():
    from rich.console import Console
    color = os.environ.get("SBMDBG_COLOR")
    buf = io.StringIO()
    # emoji=False: a guest string like ":skull:" is shown as typed
    con = Console(file=buf, width=console_width(), force_terminal=color == "1",
                  color_system="standard" if color == "1" else None, highlight=False, emoji=False)
    return con, buf


class SbmCommand(gdb.Command):
    """Subclasses set ``name`` and a docstring, implement ``add_args`` and ``run``."""

    name = ""

    def __init__(self):
        super().__init__(f"sbm {self.name}", gdb.COMMAND_USER)
        self.parser = Parser(prog=f"sbm {self.name}", description=(self.__doc__ or "").strip(),
                              add_help=True, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.parser.add_argument("--json", action="store_true", help="machine-readable output")
        self.add_args(self.parser)
        # parse_intermixed_args formats the usage on every call unless it is set
        self.parser.usage = self.parser.format_usage().removeprefix("usage: ").rstrip("\n")

    def add_args(self, p: argparse.ArgumentParser) -> None:
        pass

    def parse_argv(self, argv: list[str]):
        """Options before positionals too (``parse_intermixed_args``)."""
        return self.parser.parse_intermixed_args(argv)

    def run(self, args) -> None:
        raise NotImplementedError

    def invoke(self, arg, from_tty):
        try:
            args = self.parse_argv(gdb.string_to_argv(arg))
        except HelpShown:
            return
        except ArgError as e:
            raise gdb.GdbError(clean(f"sbm {self.name}: {e} (see: sbm {self.name} --help)")) from None
        except Exception as e:  # noqa: BLE001 - a type= check that is not ours
            raise gdb.GdbError(f"sbm {self.name}: {guard.describe(e)[0]}") from None
        try:
            self.run(args)
        except gdb.GdbError as e:
            raise gdb.GdbError(clean(str(e), limit=2000)) from None
        except SbmdbgError as e:
            raise gdb.GdbError(clean(f"sbm {self.name}: {str(e).splitlines()[0]}", limit=2000)) from None
        except KeyboardInterrupt:
            raise gdb.GdbError(f"sbm {self.name}: interrupted") from None
        except Exception as e:  # noqa: BLE001 - one clear line, never a traceback
            if os.environ.get("SBMDBG_DEBUG"):
                import traceback
                traceback.print_exc(file=sys.stderr)
            # a user error (bad ELF, too deep) or "internal error: ...; traceback written to PATH"
            raise gdb.GdbError(f"sbm {self.name}: {guard.describe(e)[0].splitlines()[0]}") from None

    def complete(self, text, word):
        opts = [o for a in self.parser._actions for o in a.option_strings]
        if word and word.startswith("-"):
            return [o for o in opts if o.startswith(word)]
        return self.complete_positional(text, word)

    def complete_positional(self, text, word):
        return gdb.COMPLETE_NONE

    # output helpers
    def emit_json(self, obj) -> None:
        try:  # fast path: plain JSON types (int keys become strings, as in to_jsonable)
            text = json.dumps(obj, default=_json_default, separators=(",", ":"))
        except (TypeError, ValueError):
            text = json.dumps(to_jsonable(obj))
        gdb.write(text + "\n")

    def emit_rich(self, *renderables) -> None:
        """Print rich renderables / markup; ``Plain`` text goes out as is.
        Without colour, simple tables skip rich's layout (commands.fasttable)."""
        from sbmdbg.commands.render import Plain
        if os.environ.get("SBMDBG_COLOR") != "1":
            from sbmdbg.commands.fasttable import render_plain
            text = render_plain(renderables, console_width())
            if text is not None:
                gdb.write(text)
                return
        con = buf = None
        for r in renderables:
            if isinstance(r, Plain):
                if buf is not None:
                    gdb.write(buf.getvalue())
                    con = buf = None
                gdb.write(r + "\n")
                continue
            if con is None:
                con, buf = rich_console()
            con.print(r)
        if buf is not None:
            gdb.write(buf.getvalue())
