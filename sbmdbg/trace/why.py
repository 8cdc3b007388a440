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
    if isinstance(v, bool):
        raise SbmdbgError(f"bad number in the trace: {v!r}")
    if isinstance(v, int):
        return v
    try:
        return int(str(v)[:40], 0)
    except ValueError:
        raise SbmdbgError(f"bad number in the trace: {str(v)[:40]!r}") from None


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


# ---------------------------------------------------------------- fixtures
class FixtureImage(W.OfflineImage):
    """An image recorded for offline tests: the symbols around each fault,
    vmlinux's bytes there and the DWARF answers (``record_fixture``)."""

    def __init__(self, fx: dict):
        from sbmdbg.model.fixture import SnapshotSymbols
        table = {n: tuple(v) for n, v in fx["symbols"].items()}
        blobs = {int(a, 16): bytes.fromhex(b) for a, b in fx["code"].items()}
        super().__init__(SnapshotSymbols(table, fx.get("build_id", ""), blobs),
                         int(fx["slide"], 16))
        self.lines = {int(a, 16): v for a, v in fx["lines"].items()}

    def source_line(self, addr: int) -> dict:
        if addr not in self.lines:
            raise SbmdbgError(f"the fixture has no source line for {addr:#x}")
        return self.lines[addr]


def record_fixture(trace: str, vmlinux: str, out: str, max_aborts: int = 3) -> dict:
    """A small offline fixture from a recorded trace: trace_start and the
    first ``max_aborts`` aborts with their enter/exit, the image data
    ``FixtureImage`` needs, and gdb's own answers (``info line``, ``x/i``)
    for the tests to compare with."""
    import json
    import subprocess

    from sbmdbg.model import srcline
    from sbmdbg.trace.events import read_events

    evs = read_events(trace)
    start = next(e for e in evs if e.get("kind") == "trace_start")
    abs_ = aborts(evs)[:max_aborts]
    keep = {e["seq"] for e in abs_}
    for a in abs_:   # the enter before and the exit after, same vCPU
        enter = [e for e in evs if e["kind"] == "enter" and e["seq"] < a["seq"] and e["vcpu"] == a["vcpu"]]
        ex = [e for e in evs if e["kind"] == "exit" and e["seq"] > a["seq"] and e["vcpu"] == a["vcpu"]]
        keep |= {x["seq"] for x in enter[-1:] + ex[:1]}
    img = image_for(evs, vmlinux)
    slide = img.slide
    fx = {"build_id": img.symbols.build_id, "slide": hex(slide), "symbols": {}, "code": {},
          "lines": {}, "gdb": {}}
    for a in abs_:
        rip = int(a["fault_rip"], 16) - slide
        name, _off = img.symbols.lookup(rip)
        fx["symbols"][name] = list(img.symbols.table[name])
        fx["code"][hex(rip)] = (img.symbols.read_file_bytes(rip, 16) or b"").hex()
        fx["lines"][hex(rip)] = srcline.line_for(vmlinux, rip)
        g = subprocess.run(["gdb", "-batch", "-nx", "-ex", "set disassembly-flavor intel",
                            "-ex", f"info line *{rip:#x}", "-ex", f"x/2i {rip:#x}", vmlinux],
                           capture_output=True, text=True, timeout=120).stdout
        fx["gdb"][hex(rip)] = "\n".join(ln for ln in g.splitlines()
                                         if ln.startswith("Line ") or ln.lstrip().startswith("0x"))
    fx["events"] = [start] + [e for e in evs if e["seq"] in keep]
    with open(out, "w") as fh:
        json.dump(fx, fh, indent=1)
    return fx
