"""Trace presentation: Chrome/Perfetto JSON and the rich terminal timeline.

Perfetto (``chrome://tracing``, ui.perfetto.dev "Open trace file"): one
process "guest", one thread (track) per vCPU.  A sandbox call is a complete
("X") slice from ``enter`` to its ``return``/``abort`` on the vCPU where it
was entered (a task preempted inside its sandbox may finish on the other
vCPU; the slice stays on the first track and its args say where it ended).
``call``/``arch_call``/``exit`` and faults, IRQs, NMIs, returns to the
sandbox and spurious faults are instants ("i", thread scope) on the track of
the vCPU that saw them.  Times are microseconds of host time since the
trace started.
"""
from __future__ import annotations

import json

from rich.markup import escape
from rich.table import Table
from rich.text import Text

KIND_STYLE = {
    "enter": "bold green", "return": "green", "exit": "dim green", "abort": "bold red",
    "irq": "yellow", "nmi": "bold yellow", "irq_return": "dim yellow", "spurious": "magenta",
    "call": "cyan", "arch_call": "dim cyan", "sandbox_insn": "bold magenta", "error": "red", "trace_start": "dim", "trace_stop": "dim",
}


def _t0(events: list[dict]) -> int:
    ts = [e["host_ns"] for e in events if "host_ns" in e]
    return min(ts) if ts else 0


def pair_calls(events: list[dict]) -> list[dict]:
    """Sandbox calls: each ``enter`` with the next ``return``/``abort`` of the
    same task (and sandbox).  Unfinished calls have ``end`` None."""
    open_: dict[tuple, dict] = {}
    calls = []
    for ev in events:
        k = ev.get("kind")
        key = (ev.get("task"), ev.get("sandbox"))
        if k == "enter":
            c = {"enter": ev, "end": None, "irqs": 0}
            open_[key] = c
            calls.append(c)
        elif k in ("return", "abort"):
            c = open_.pop(key, None)
            if c is not None:
                c["end"] = ev
        elif k in ("irq", "nmi", "spurious"):
            c = open_.get(key)
            if c is not None:
                c["irqs"] += 1
    return calls


def summary_line(ev: dict) -> str:
    """One line of text for an event (plain; the caller escapes it for rich)."""
    k = ev.get("kind")
    if k == "enter":
        return f"enter {ev.get('func_sym') or ev.get('func')}  sandbox {ev.get('sandbox')}"
    if k in ("call", "arch_call"):
        s = f"{ev.get('point')}({ev.get('func_sym') or ev.get('func')})"
        return s + (f" sticky error {ev['sticky_error']}" if ev.get("sticky_error") else "")
    if k == "return":
        return f"return ret={ev.get('ret')}  (#PF {ev.get('error_code') or 0:#x} at {ev.get('cr2')})"
    if k == "abort":
        err = ev.get("error_code")
        s = f"ABORT {ev.get('vector_name')}"
        if err is not None:
            s += f" err={err:#x}"
            if ev.get("error_bits"):
                s += f" [{'|'.join(ev['error_bits'])}]"
        if ev.get("cr2"):
            s += f" cr2={ev['cr2']} ({ev.get('cr2_region')})"
        return s + f" at {ev.get('fault_sym') or ev.get('fault_rip')}"
    if k == "exit":
        return f"exit ret={ev.get('ret')} sbm->error={ev.get('error')}" + \
            ("" if ev.get("agrees", True) else "  (disagrees with handle_sbm_fault!)")
    if k in ("irq", "nmi"):
        return f"{k} {ev.get('vector_name')} at {ev.get('fault_sym') or ev.get('fault_rip')}"
    if k == "irq_return":
        return f"back to sandbox at {ev.get('to_sym') or ev.get('to_rip')}" + \
            (f" (after {ev['vector_name']})" if ev.get("vector_name") else "")
    if k == "spurious":
        return f"spurious #PF err={ev.get('error_code') or 0:#x} cr2={ev.get('cr2')} resumed"
    if k == "sandbox_insn":
        return f"insn {ev.get('insn')} [{ev.get('bytes')}] at {ev.get('sym') or ev.get('rip')}"
    if k == "trace_start":
        return f"trace start (level {ev.get('level')}, {len(ev.get('probes', []))} probes)"
    if k == "trace_stop":
        return f"trace stop ({ev.get('reason')})"
    if k == "error":
        return f"tracer error at {ev.get('point')}: {ev.get('error')}"
    return k or "?"


def to_perfetto(events: list[dict]) -> dict:
    t0 = _t0(events)

    def us(ev):
        return round((ev.get("host_ns", t0) - t0) / 1000, 3)

    start = next((e for e in events if e.get("kind") == "trace_start"), {})
    ncpus = start.get("ncpus") or (max((e.get("vcpu", 0) for e in events), default=0) + 1)
    out = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "guest (sbmdbg trace)"}}]
    for c in range(ncpus):
        out.append({"ph": "M", "pid": 1, "tid": c, "name": "thread_name", "args": {"name": f"vCPU {c}"}})
        out.append({"ph": "M", "pid": 1, "tid": c, "name": "thread_sort_index", "args": {"sort_index": c}})
    for c in pair_calls(events):
        en, end = c["enter"], c["end"]
        name = en.get("func_sym") or en.get("func") or "sandbox"
        args = {"sandbox": en.get("sandbox"), "pid": en.get("pid"), "comm": en.get("comm"),
                "func": en.get("func"), "seq": en.get("seq"), "irqs": c["irqs"]}
        if end is None:
            dur = max(us(events[-1]) - us(en), 0.001)
            args["result"] = "unfinished"
        else:
            dur = max(us(end) - us(en), 0.001)
            args.update(result=end["kind"], ret=end.get("ret"), end_vcpu=end.get("vcpu"))
            if end["kind"] == "abort":
                args.update(vector=end.get("vector_name"), error_code=end.get("error_code"),
                            cr2=end.get("cr2"), cr2_region=end.get("cr2_region"),
                            fault_rip=end.get("fault_sym") or end.get("fault_rip"))
        out.append({"ph": "X", "pid": 1, "tid": en.get("vcpu", 0), "ts": us(en), "dur": dur,
                    "name": name, "cat": "sandbox" if end is None or end["kind"] == "return" else "abort",
                    "args": args})
    for ev in events:
        k = ev.get("kind")
        if k in ("enter", "trace_start", "trace_stop", None) or "vcpu" not in ev:
            continue
        args = {key: v for key, v in ev.items() if key not in ("kind", "host_ns") and v is not None}
        out.append({"ph": "i", "s": "t", "pid": 1, "tid": ev["vcpu"], "ts": us(ev),
                    "name": summary_line(ev) if k in ("abort", "irq", "nmi", "spurious", "sandbox_insn") else k,
                    "cat": k, "args": args})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"source": "sbmdbg trace", "schema": start.get("schema"),
                          "level": start.get("level")}}


def write_perfetto(events: list[dict], path: str) -> int:
    doc = to_perfetto(events)
    with open(path, "w") as fh:
        json.dump(doc, fh)
    return len(doc["traceEvents"])


def timeline(events: list[dict], last: int | None = None, kinds: set[str] | None = None,
             vcpu: int | None = None) -> Table:
    """A rich table: one row per event, one column per vCPU (a lane), with
    nesting shown by indentation inside a sandbox call."""
    t0 = _t0(events)
    start = next((e for e in events if e.get("kind") == "trace_start"), {})
    ncpus = start.get("ncpus") or (max((e.get("vcpu", 0) for e in events), default=0) + 1)
    lanes = [vcpu] if vcpu is not None else list(range(ncpus))
    depth: dict[int, int] = {}
    rows = []
    for ev in events:
        k = ev.get("kind")
        c = ev.get("vcpu")
        if k == "enter" and c is not None:
            depth[c] = 1
        d = depth.get(c, 0) if c is not None else 0
        if k in ("return", "abort") and c is not None:
            depth[c] = 0
        if kinds and k not in kinds:
            continue
        if vcpu is not None and c != vcpu:
            continue
        rows.append((ev, d))
    if last:
        rows = rows[-last:]
    t = Table(title=f"sbm trace: {len(events)} events", title_justify="left", expand=False)
    t.add_column("seq", justify="right", style="dim")
    t.add_column("ms", justify="right")
    t.add_column("pid/comm", no_wrap=True)
    for c in lanes:
        t.add_column(f"vCPU {c}", overflow="fold")
    for ev, d in rows:
        text = Text("  " * (d if ev.get("kind") not in ("enter", "return", "abort") else 0)
                    + summary_line(ev), style=KIND_STYLE.get(ev.get("kind"), ""))
        cells = [text if ev.get("vcpu") == c or (c == lanes[0] and "vcpu" not in ev) else ""
                 for c in lanes]
        ms = f"{(ev.get('host_ns', t0) - t0) / 1e6:.3f}"
        who = f"{ev.get('pid')}/{escape(str(ev.get('comm')))}" if ev.get("pid") is not None else ""
        t.add_row(str(ev.get("seq")), ms, who, *cells)
    return t
