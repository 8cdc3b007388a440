"""One sanitizer for every string that comes from the guest or from a file.

Guest memory (task comm, symbol names read from the guest, console lines) and
input files (scenario names, trace fields, QEMU logs) are hostile: a comm of
ESC ``]0;pwned`` BEL would retitle the user's terminal, ESC ``[2J`` would clear
it, OSC 52 would write the clipboard.  ``clean()`` is applied where such data
enters the model, so every face (terminal, rich, SVG, JSON, JUnit) gets text
with every C0/C1 control character and DEL shown visibly (``\\x1b``).  Markup
is still escaped by the faces that render with rich (``[red]`` stays text).

``xml_safe()`` additionally drops what XML 1.0 forbids (lone surrogates,
U+FFFE/U+FFFF), for the JUnit writer.

This module imports nothing from sbmdbg but errors (it sits below every layer).
"""
from __future__ import annotations

import re

# C0 (except TAB and, in multi-line text, LF), DEL, C1; plus the Unicode
# bidi overrides/isolates, which reorder what a terminal shows ("Trojan source").
_CTRL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_BAD_LINE = re.compile(f"[{_CTRL}\t\n]")
_BAD_TEXT = re.compile(f"[{_CTRL}]")
# Characters XML 1.0 forbids (after clean() only surrogates/U+FFFE/U+FFFF remain)
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_SURR = re.compile("[\ud800-\udfff]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    if c <= 0xFF:
        return f"\\x{c:02x}"
    return f"\\u{c:04x}"


def clean(s, *, multiline: bool = False, limit: int | None = None) -> str:
    """``s`` (str or bytes) with every control character shown visibly.

    bytes are decoded as UTF-8 with undecodable bytes escaped (``\\xff``).
    ``multiline`` keeps LF and TAB (console output, logs); otherwise they are
    shown too.  ``limit`` cuts the result at that many characters (+ '...')."""
    if isinstance(s, (bytes, bytearray, memoryview)):
        s = bytes(s).decode("utf-8", "backslashreplace")
    elif not isinstance(s, str):
        s = str(s)
    if limit is not None and len(s) > limit:
        s = s[:limit] + "..."
    s = (_BAD_TEXT if multiline else _BAD_LINE).sub(_visible, s)
    if _SURR.search(s):  # lone surrogates (from surrogateescape / JSON "\ud800")
        s = _SURR.sub(_visible, s)
    return s


def clean_line(s, limit: int | None = None) -> str:
    """One line of guest/file text (LF/TAB shown too)."""
    return clean(s, limit=limit)


def cstring(b: bytes) -> str:
    """A guest NUL-terminated char array as clean text."""
    return clean(bytes(b).split(b"\0", 1)[0])


def clean_tree(obj, depth: int = 0):
    """Every str inside dicts/lists (keys too) cleaned; other values kept."""
    if isinstance(obj, str):
        return clean(obj)
    if depth > 64:
        return obj
    if isinstance(obj, dict):
        return {(clean(k) if isinstance(k, str) else k): clean_tree(v, depth + 1)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean_tree(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clean_tree(v, depth + 1) for v in obj)
    return obj


def has_raw_control(s: str, *, allow: str = "\n\t") -> bool:
    """True when ``s`` holds a raw C0/C1 control character or DEL (tests, asserts)."""
    return any((ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) and c not in allow for c in s)


def xml_safe(s) -> str:
    """Text an XML 1.0 document may carry: controls shown visibly (LF/TAB/CR
    kept as XML allows them), forbidden code points replaced visibly."""
    s = clean(s, multiline=True)
    return _XML_BAD.sub(_visible, s)


__all__ = ["clean", "clean_line", "cstring", "clean_tree", "has_raw_control", "xml_safe"]
