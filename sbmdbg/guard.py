"""No traceback ever: what escapes a face becomes one line.

``SbmdbgError`` -> ``sbmdbg: error: <message>`` (exit 1).  A few library
exceptions that only bad input causes (a truncated ELF, a file nested too
deeply) are user errors too.  Anything else is a bug: ``sbmdbg: internal
error: <one line>; traceback written to <path>`` (exit 1), the traceback in a
log file, never on the terminal.  The gdb face uses ``one_line()`` and
``write_traceback()`` the same way (one gdb.GdbError line).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean


def user_error(exc: BaseException) -> str | None:
    """The message when *exc* is bad input rather than a bug, else None."""
    if isinstance(exc, SbmdbgError):
        return str(exc.args[0]) if exc.args else str(exc)
    name = type(exc).__name__
    mod = type(exc).__module__ or ""
    if mod.startswith("elftools"):
        return f"not a usable ELF file ({name}: {exc})"
    if isinstance(exc, RecursionError):
        return "input nested too deeply"
    if isinstance(exc, MemoryError):
        return "out of memory (input too large?)"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text: {exc}"
    if isinstance(exc, IsADirectoryError | NotADirectoryError | FileNotFoundError | PermissionError):
        return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
    return None


def log_dir() -> str:
    d = os.environ.get("SBMDBG_LOG_DIR")
    if not d:
        base = os.environ.get("SBMDBG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sbmdbg")
        d = os.path.join(base, "logs")
    try:
        os.makedirs(d, exist_ok=True)
        return d
    except OSError:
        return tempfile.gettempdir()


def write_traceback(exc: BaseException) -> str:
    """Write *exc*'s traceback to a new log file; its path (or '(not written: ...)')."""
    try:
        fd, path = tempfile.mkstemp(prefix=time.strftime("internal-%Y%m%d-%H%M%S-"), suffix=".log",
                                    dir=log_dir())
        with os.fdopen(fd, "w") as fh:
            fh.write(f"sbmdbg internal error, argv: {sys.argv!r}\n")
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=fh)
        return path
    except Exception as e:  # noqa: BLE001 - the message must still come out
        return f"(not written: {e})"


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of *exc* on one clean line."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return clean(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__, limit=limit)


def describe(exc: BaseException) -> tuple[str, bool]:
    """(the one line for *exc*, whether it is a user error)."""
    msg = user_error(exc)
    if msg is not None:
        return clean(msg, multiline=True, limit=4000), True
    return f"internal error: {one_line(exc)}; traceback written to {write_traceback(exc)}", False


def run_cli(fn) -> int:
    """Run a CLI command; its exit status, one stderr line for whatever escapes."""
    try:
        return fn()
    except KeyboardInterrupt:
        print("sbmdbg: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - no traceback ever
        line, user = describe(exc)
        print(f"sbmdbg: error: {line}" if user else f"sbmdbg: {line}", file=sys.stderr)
        detail = getattr(exc, "detail", "") if isinstance(exc, SbmdbgError) else ""
        if detail:
            print(clean(detail, multiline=True), file=sys.stderr)
        return 1


__all__ = ["user_error", "write_traceback", "one_line", "describe", "run_cli", "log_dir"]
