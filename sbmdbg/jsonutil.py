"""JSON helpers shared by every face: one conversion for ``--json``."""
from __future__ import annotations


def jsonable(obj):
    """bytes -> hex, dict keys -> str, tuples -> lists (recursively)."""
    if isinstance(obj, bytes):
        return obj.hex()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
