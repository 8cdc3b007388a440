"""Input validation shared by the faces: every argument checked before any work.

The ``arg_*`` factories return argparse ``type=`` callables: a bad value is
rejected at parse time (one ``sbmdbg: error: ...`` line, exit 2) before a VM
boots or a run starts.  The plain functions raise ``SbmdbgError`` (exit 1)
and serve callers that parse their own words (``sbm vtop ADDR``, ``--range``).
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean


def _q(s) -> str:
    return repr(clean(str(s), limit=80))


# ------------------------------------------------------------ numbers
def number(text, *, lo: float | None = None, hi: float | None = None, what: str = "value",
           integer: bool = False, lo_open: bool = False):
    """*text* as a finite int/float within [lo, hi] (lo excluded when lo_open)."""
    try:
        v = int(text, 0) if integer and isinstance(text, str) else (int(text) if integer else float(text))
    except (TypeError, ValueError, OverflowError):
        raise SbmdbgError(f"{what}: want {'an integer' if integer else 'a number'}, got {_q(text)}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise SbmdbgError(f"{what}: want a finite number, got {_q(text)}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise SbmdbgError(f"{what}: want {'>' if lo_open else '>='} {lo:g}, got {_q(text)}")
    if hi is not None and v > hi:
        raise SbmdbgError(f"{what}: want <= {hi:g}, got {_q(text)}")
    return v


def _argtype(fn, name: str):
    def conv(text):
        try:
            return fn(text)
        except SbmdbgError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    conv.__name__ = name   # argparse names the type in its messages
    return conv


def arg_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """argparse type: a finite float in range (nan, inf, out of range: exit 2)."""
    return _argtype(lambda t: number(t, lo=lo, hi=hi, lo_open=lo_open), "number")


def arg_int(lo: int | None = None, hi: int | None = None):
    """argparse type: an integer in range."""
    return _argtype(lambda t: number(t, lo=lo, hi=hi, integer=True), "integer")


def arg_choices(choices, sep: str = ","):
    """argparse type: a comma-separated list whose every item is one of *choices*."""
    choices = tuple(choices)

    def parse(text):
        items = [x.strip() for x in str(text).split(sep) if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise SbmdbgError(f"want a comma-separated list of {', '.join(choices)}; "
                              f"got {_q(bad[0] if bad else text)}")
        return items
    return _argtype(parse, "list")


# ------------------------------------------------------------ files
def out_file(path, what: str = "output file") -> Path:
    """A path we will write: its folder exists and is writable, it is not a directory."""
    try:
        return _out_file(path, what)
    except (OSError, ValueError) as e:   # ENAMETOOLONG, ELOOP, embedded NUL...
        raise SbmdbgError(f"{what} {_q(path)}: {getattr(e, 'strerror', None) or e}") from None


def _out_file(path, what: str) -> Path:
    if path is None or str(path) == "":
        raise SbmdbgError(f"{what}: empty path")
    p = Path(path)
    if "\0" in str(path):
        raise SbmdbgError(f"{what} {_q(path)}: NUL in path")
    if p.is_dir():
        raise SbmdbgError(f"{what} {_q(path)} is a directory")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise SbmdbgError(f"{what} {_q(path)}: folder {_q(parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SbmdbgError(f"{what} {_q(path)}: not writable")
    return p


def in_file(path, what: str = "input file") -> Path:
    """A path we will read: an existing, readable regular file."""
    try:
        return _in_file(path, what)
    except (OSError, ValueError) as e:
        raise SbmdbgError(f"{what} {_q(path)}: {getattr(e, 'strerror', None) or e}") from None


def _in_file(path, what: str) -> Path:
    p = Path(path)
    if "\0" in str(path) or not p.exists():
        raise SbmdbgError(f"{what} {_q(path)} not found")
    if p.is_dir():
        raise SbmdbgError(f"{what} {_q(path)} is a directory")
    if not os.access(p, os.R_OK):
        raise SbmdbgError(f"{what} {_q(path)}: not readable")
    return p


def arg_out_file(what: str = "output file"):
    return _argtype(lambda t: str(out_file(t, what)), "path")


def arg_in_file(what: str = "input file"):
    return _argtype(lambda t: str(in_file(t, what)), "path")


# ------------------------------------------------------------ addresses
def address(text, what: str = "address") -> int:
    """A 64-bit address: hex (0x..) or decimal; at most 64 bits."""
    s = str(text).strip().replace("_", "")
    try:
        v = int(s, 16) if s.lower().startswith("0x") else int(s, 0)
    except ValueError:
        try:
            v = int(s, 16)
        except ValueError:
            raise SbmdbgError(f"{what}: want a hex address like 0xffffffff81000000, got {_q(text)}") \
                from None
    if not 0 <= v < 1 << 64:
        raise SbmdbgError(f"{what}: {_q(text)} is not a 64-bit address")
    return v


def va_range(text, what: str = "--range") -> tuple[int, int]:
    """'START-END' (END exclusive, hex) -> (start, end) with start < end."""
    s = str(text).strip()
    lo, sep, hi = s.partition("-")
    if not sep or not lo or not hi:
        raise SbmdbgError(f"{what}: want START-END (hex, END exclusive), got {_q(text)}")
    a, b = address(lo, what), address(hi, what)
    if b <= a and b != 0:
        raise SbmdbgError(f"{what}: END {hi} is not above START {lo}")
    return a, (b or 1 << 64)


def arg_address(what: str = "address"):
    """argparse type: checks a 64-bit address, keeps the text (commands parse it)."""
    return _argtype(lambda t: (address(t, what), t)[1], "address")


def arg_range(what: str = "--range"):
    """argparse type: checks START-END, keeps the text."""
    return _argtype(lambda t: (va_range(t, what), t)[1], "range")


__all__ = ["arg_address", "arg_range", "number", "arg_float", "arg_int", "arg_choices", "out_file", "in_file", "arg_out_file",
           "arg_in_file", "address", "va_range"]
