"""Transition expectations: a step's ``transitions`` table against the events
the tracer (sbmdbg.trace, ``sbm trace start/stop``) recorded during the step.

Offline and pure: ``check_transitions(spec, events)`` takes event dicts in
the tracer's JSON-lines schema (sbmdbg.trace.events, schema 1) and returns
failure messages.  The live side (``TraceHook``) drives ``sbm trace`` in the
runner's gdb session and reads the file back; if the tracer is not there
(``sbm trace`` unknown in gdb), the step's transition checks are skipped with
a note, never failed.
"""
from __future__ import annotations

import json
import os
import tempfile

from sbmdbg.check import known as K
from sbmdbg.check.expr import compare, short
from sbmdbg.check.spec import Transitions
from sbmdbg.errors import SbmdbgError


def count_kinds(events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ev in events:
        out[ev.get("kind", "?")] = out.get(ev.get("kind", "?"), 0) + 1
    return out


def _norm(field: str, v):
    """Trace fields are hex strings for addresses: compare them as numbers;
    error_bits as a set of bit names (order does not matter)."""
    return v


def _match(op: str, field: str, actual, expected) -> bool:
    if field == "error_bits" and op in ("==", "!=") and isinstance(expected, list) and isinstance(actual, list):
        same = sorted(map(str, actual)) == sorted(map(str, expected))
        return same if op == "==" else not same
    return compare(op, actual, expected)


def check_transitions(spec: Transitions, events: list[dict]) -> list[str]:
    """Failure messages ('expected ..., saw ...'); empty = all expectations hold."""
    evs = [e for e in events if e.get("kind") not in ("trace_start", "trace_stop")]
    kinds = count_kinds(evs)
    fails = []
    for e in spec.counts:
        kind = K.TRACE_COUNTS[e.key]
        n = kinds.get(kind, 0)
        if not compare(e.op, n, e.value):
            fails.append(f"transitions: expected {e.key} {e.op} {short(e.value)}, saw {n} "
                         f"(recorded: {_counts_text(kinds)})")
    if spec.attack is not None and not any(ev.get("attack") == spec.attack for ev in evs):
        named = sorted({str(ev["attack"]) for ev in evs if ev.get("attack")})
        fails.append(f"transitions: expected an event naming the attack {spec.attack!r}, "
                     f"saw {', '.join(named) or 'none named'} (recorded: {_counts_text(kinds)})")
    if spec.insn is not None and not any(ev.get("kind") == "sandbox_insn" and ev.get("insn") == spec.insn
                                         for ev in evs):
        seen = sorted({str(ev.get("insn")) for ev in evs if ev.get("kind") == "sandbox_insn"})
        fails.append(f"transitions: expected the tracer to name the sandbox instruction {spec.insn!r}, "
                     f"saw {', '.join(seen) or 'no sandbox instruction'} (recorded: {_counts_text(kinds)})")
    for exps, what, named in ((spec.attack_counts, "events naming the attack",
                               lambda ev: ev.get("attack")),
                              (spec.insn_counts, "sandbox_insn events naming",
                               lambda ev: ev.get("insn") if ev.get("kind") == "sandbox_insn" else None)):
        if not exps:
            continue
        seen: dict = {}
        for ev in evs:
            n = named(ev)
            if n is not None:
                seen[n] = seen.get(n, 0) + 1
        for e in exps:
            if not compare(e.op, seen.get(e.key, 0), e.value):
                fails.append(f"transitions: expected {what} {e.key!r} {e.op} {short(e.value)}, "
                             f"saw {seen.get(e.key, 0)} (named: {_counts_text(seen)})")
    for kind, exps in spec.per_kind.items():
        sel = [ev for ev in evs if ev.get("kind") == kind]
        if not sel:
            fails.append(f"transitions: expected {kind} events to check "
                         f"({', '.join(x.describe() for x in exps)}), saw none (recorded: {_counts_text(kinds)})")
            continue
        for x in exps:
            for ev in sel:
                if x.key not in ev and x.op != "exists":
                    fails.append(f"transitions: {kind} #{ev.get('seq')}: expected {x.describe()}, "
                                 f"saw no {x.key!r} field ({_event_text(ev)})")
                    break
                if x.op == "exists":
                    if x.key not in ev:
                        fails.append(f"transitions: {kind} #{ev.get('seq')}: expected a {x.key!r} field")
                        break
                    continue
                if not _match(x.op, x.key, ev[x.key], x.value):
                    fails.append(f"transitions: {kind} #{ev.get('seq')}: expected {x.describe()}, "
                                 f"saw {short(ev[x.key])} ({_event_text(ev)})")
                    break
    return fails


def _counts_text(kinds: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(kinds.items())) or "no events"


def _event_text(ev: dict) -> str:
    keys = ("vector_name", "error_code", "error_bits", "cr2", "cr2_region", "fault_sym", "ret", "error")
    return ", ".join(f"{k}={short(ev[k], 60)}" for k in keys if k in ev)


class TraceUnavailable(SbmdbgError):
    pass


class TraceHook:
    """Runs ``sbm trace`` in an attached GdbSession around one step."""

    def __init__(self, gdb, vm_info: dict, level: str = "fast"):
        from sbmdbg.trace.live import GdbTracer

        self.g = gdb
        self.tracer = GdbTracer(gdb)
        self.info = vm_info
        self.level = level
        fd, self.path = tempfile.mkstemp(prefix="sbmdbg-check-", suffix=".jsonl")
        os.close(fd)

    @staticmethod
    def available(gdb) -> bool:
        try:
            return "start" in gdb.console("help sbm trace")
        except SbmdbgError:
            return False

    def start(self) -> None:
        """Guest stopped or running: stops it, starts the trace, resumes it."""
        self.tracer.start(self.path, self.level, ram=self.info.get("ram"), ram_size=self.info.get("ram_size"))
        self.tracer.resume()

    def stop(self) -> list[dict]:
        from sbmdbg.trace.events import read_events

        try:
            self.tracer.stop(step=10.0)
        finally:
            self.g.cont()
        return read_events(self.path)

    def abandon(self) -> None:
        try:
            self.tracer.stop(step=5.0)
            self.g.cont()
        except SbmdbgError:
            pass

    def cleanup(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


class PluginHook:
    """Runs the no-stop tracer (sbmdbg.trace.fast.PluginTracer: QEMU's log
    and the sbmtrace plugin; ``level = "plugin"``) around one step: the only
    tracer that records the sensitive instructions a sandbox executes
    (``sandbox_insn``).  ``kernel``: an open kernel to reuse (opening one
    per step would reload the DWARF).  Its interrupts come from QEMU's
    ``-d int`` (``source="dint"``): an attack check needs the register
    evidence only QEMU's dump has (the GS base at the interrupt, which the
    entry code overwrites before the frame source can read it)."""

    def __init__(self, vm, kernel=None):
        from sbmdbg.trace.fast import PluginTracer

        fd, self.path = tempfile.mkstemp(prefix="sbmdbg-check-", suffix=".jsonl")
        os.close(fd)
        self.tracer = PluginTracer(vm, self.path, kernel=kernel, force=True, source="dint")

    @property
    def kernel(self):
        return self.tracer.k

    def start(self) -> None:
        self.tracer.start()

    def stop(self) -> list[dict]:
        from sbmdbg.trace.events import read_events

        self.tracer.stop()
        return read_events(self.path)

    def abandon(self) -> None:
        try:
            self.tracer.close()
        except SbmdbgError:
            pass

    cleanup = TraceHook.cleanup


def summary(events: list[dict]) -> str:
    return json.dumps(count_kinds([e for e in events if e.get("kind") not in ("trace_start", "trace_stop")]),
                      sort_keys=True)
