"""``sbmdbg trace why FILE [EVENT]``: ``sbm why`` for an abort in a trace file.

The tracer's abort events carry vector, error code, CR2 and fault RIP, and
the tracer's label of the address (``cr2_region``: buffer, stack, section,
computed while the sandbox existed).  The instruction, source line and
inlined chain come from vmlinux (``--vmlinux``, or the path in the trace's
``trace_start`` when it still has the same build id) and the trace's slide.
The sandbox is gone: which page-table bit refused the access comes from the
error code, not from a walk.
"""
from __future__ import annotations

import os

from sbmdbg.errors import SbmdbgError
from sbmdbg.model.symbols import Symbols
from sbmdbg.sbm import why as W


def _int(v):
    if v is None:
        return None
    return v if isinstance(v, int) else int(str(v), 0)


def image_for(events: list[dict], vmlinux: str | None) -> W.OfflineImage:
    start = next((e for e in events if e.get("kind") == "trace_start"), {})
    path = vmlinux or start.get("vmlinux")
    if not path or not os.path.isfile(path):
        raise SbmdbgError("no vmlinux: give --vmlinux (the trace names none that exists)")
    syms = Symbols.from_elf(path)
    want = start.get("build_id")
    if want and syms.build_id and want != syms.build_id:
        raise SbmdbgError(f"{path} has build id {syms.build_id}, the trace was recorded on {want}")
    return W.OfflineImage(syms, _int(start.get("slide")) or 0)


def aborts(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("kind") == "abort"]


def explain_event(img, ev: dict) -> dict:
    for k in ("fault_rip", "vector"):
        if ev.get(k) is None:
            raise SbmdbgError(f"event {ev.get('seq')} has no {k}")
    d = W.explain(img, rip=_int(ev["fault_rip"]), vector=_int(ev.get("vector")),
                  error_code=_int(ev.get("error_code")), cr2=_int(ev.get("cr2")),
                  region=ev.get("cr2_region"))
    d["event"] = {"seq": ev.get("seq"), "vcpu": ev.get("vcpu"), "sandbox": ev.get("sandbox"),
                  "pid": ev.get("pid"), "comm": ev.get("comm")}
    return d


def why(events: list[dict], vmlinux: str | None = None, seq: int | None = None) -> list[dict]:
    """Explanations of every abort (or of the abort with sequence number ``seq``)."""
    abs_ = aborts(events)
    if seq is not None:
        abs_ = [e for e in abs_ if e.get("seq") == seq]
        if not abs_:
            raise SbmdbgError(f"no abort event with seq {seq} in the trace")
    if not abs_:
        raise SbmdbgError("the trace has no abort event")
    img = image_for(events, vmlinux)
    return [explain_event(img, e) for e in abs_]
