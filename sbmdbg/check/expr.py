"""JSON paths and comparison operators of scenario assertions.

Path syntax: dot-separated keys with optional indexes, e.g. ``cpus[*].mode``,
``audits[0].findings``, ``worst``, ``[*]``.  ``[N]`` indexes (negative from
the end), ``[*]`` fans out over every element (or every value of an object).

Semantics when the path fans out (contains a ``[*]``):

* ``contains`` / ``len==`` act on the collected list of values;
* ``exists`` needs at least one value;
* every other operator must hold for every collected value (and there must
  be at least one).

Without a fan-out the single value is compared; ``contains`` is substring on
strings, membership on lists, key membership on objects.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OPS = ("==", "!=", "<", "<=", ">", ">=", "contains", "matches", "exists", "len==")
_SEG = re.compile(r"([A-Za-z_$][\w$-]*)?((?:\[(?:\*|-?\d+)\])*)$")
_IDX = re.compile(r"\[(\*|-?\d+)\]")
_MISSING = object()


class PathError(ValueError):
    pass


@dataclass(frozen=True)
class Path:
    text: str
    parts: tuple  # str keys, int indexes, "*" fan-outs

    @property
    def first_key(self) -> str | None:
        return self.parts[0] if self.parts and isinstance(self.parts[0], str) and self.parts[0] != "*" \
            else None

    @property
    def fans_out(self) -> bool:
        return "*" in self.parts


def parse_path(text: str) -> Path:
    if not isinstance(text, str) or not text.strip():
        raise PathError("empty path")
    parts: list = []
    for seg in text.strip().split("."):
        m = _SEG.match(seg)
        if not seg or not m or (m.group(1) is None and not m.group(2)):
            raise PathError(f"bad path segment {seg!r} in {text!r} (want key, key[N] or key[*])")
        if m.group(1):
            parts.append(m.group(1))
        for idx in _IDX.findall(m.group(2)):
            parts.append("*" if idx == "*" else int(idx))
    return Path(text.strip(), tuple(parts))


def resolve(doc, path: Path) -> tuple[list, str | None]:
    """The values at *path* (a list; one element unless it fans out) and, if
    the path does not resolve, why (the first missing step)."""
    cur = [doc]
    walked = ""
    for p in path.parts:
        nxt = []
        for v in cur:
            if p == "*":
                if isinstance(v, list):
                    nxt.extend(v)
                elif isinstance(v, dict):
                    nxt.extend(v.values())
                else:
                    return [], f"{walked or '(top)'} is {_kind(v)}, not a list"
            elif isinstance(p, int):
                if not isinstance(v, list):
                    return [], f"{walked or '(top)'} is {_kind(v)}, not a list"
                if not -len(v) <= p < len(v):
                    return [], f"{walked or '(top)'} has {len(v)} element(s), no [{p}]"
                nxt.append(v[p])
            else:
                if not isinstance(v, dict):
                    return [], f"{walked or '(top)'} is {_kind(v)}, not an object"
                if p not in v:
                    keys = ", ".join(sorted(map(str, v))[:20])
                    return [], f"no key {p!r} in {walked or '(top)'} (keys: {keys})"
                nxt.append(v[p])
        walked += (f"[{p}]" if isinstance(p, int) or p == "*" else (f".{p}" if walked else p))
        cur = nxt
    return cur, None


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _num(v):
    """Numbers, and strings that are numbers (hex addresses), as numbers."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return None
    return None


def _eq(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b  # false is not 0
    na, nb = _num(a), _num(b)
    if na is not None and nb is not None:
        return na == nb
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_eq(x, y) for x, y in zip(a, b))
    return a == b


def compare(op: str, actual, expected) -> bool:
    """One value against the expectation."""
    if op == "==":
        return _eq(actual, expected)
    if op == "!=":
        return not _eq(actual, expected)
    if op in ("<", "<=", ">", ">="):
        a, b = _num(actual), _num(expected)
        if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
            return False
        return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
    if op == "contains":
        if isinstance(actual, str):
            return str(expected) in actual
        if isinstance(actual, list):
            return any(_eq(x, expected) for x in actual)
        if isinstance(actual, dict):
            return str(expected) in actual
        return False
    if op == "matches":
        return re.search(str(expected), actual if isinstance(actual, str) else str(actual)) is not None
    if op == "len==":
        return isinstance(actual, (list, dict, str)) and len(actual) == _num(expected)
    if op == "exists":
        return True
    raise ValueError(f"unknown operator {op!r}")


def check_path(doc, path: Path, op: str, expected) -> tuple[bool, str]:
    """Evaluate ``path op expected`` on *doc*; (ok, what was seen)."""
    values, why = resolve(doc, path)
    if why is not None:
        return False, why
    if op == "exists":
        return (bool(values), f"{len(values)} value(s)") if path.fans_out else (True, short(values[0]))
    if path.fans_out:
        if op in ("contains", "len=="):
            return compare(op, values, expected), short(values)
        if not values:
            return False, "no values (empty list)"
        bad = [v for v in values if not compare(op, v, expected)]
        return not bad, (short(values) if not bad else f"{short(bad)} (of {short(values)})")
    return compare(op, values[0], expected), short(values[0])


def short(v, limit: int = 200) -> str:
    import json
    try:
        s = json.dumps(v, default=str)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def check_value(op: str, actual, expected) -> bool:
    """A demo field or trace field (no path) against an expectation."""
    return compare(op, actual, expected)
