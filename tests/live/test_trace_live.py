"""The live tracer against things we did not write: QEMU's exception log
(-d int) and the demo module's own counters; plus failure handling (QEMU or
gdb killed mid-trace).  One VM per PTI setting (2 vCPUs, QEMU's -d int log
on: the session's ``logged_vms``, which the trace CLI test in
test_claims_live.py and the CLI test in test_harness_live.py use too); the
dying-peer tests end the PTI-off one and the pool's PTI guest, each its last
user (``ends_vm``); every gdb and QEMU started here is closed."""
import json
import os
import signal

import pytest
from demo_helpers import FAULTS as FAULT_KINDS
from demo_helpers import demo_stats, run_scenario

from sbmdbg.trace.events import read_events, summarize, validate
from sbmdbg.trace.export import to_perfetto
from sbmdbg.trace.live import TraceLost, TraceRecorder
from sbmdbg.trace.qemulog import cross_check, parse_log

pytestmark = pytest.mark.live

FAULTS = list(FAULT_KINDS)


@pytest.mark.parametrize("pti", ["on", "off"])
def test_trace_matches_qemu_log_and_stats(logged_vms, tmp_path, pti):
    vm, qlog = logged_vms(pti)
    trace = tmp_path / "t.jsonl"
    before = demo_stats(vm)
    rec = TraceRecorder(vm.info, str(trace), "full")
    try:
        rec.start()
        start_off = os.path.getsize(qlog)
        for sc in ["ok", "io"] + FAULTS + ["irq_in_sandbox"]:
            run_scenario(vm, sc)
        run_scenario(vm, "repeat 10")
        rec.poll()
        st = rec.stop()
    finally:
        rec.close()
    end_off = os.path.getsize(qlog)
    after = demo_stats(vm)
    events = read_events(str(trace), strict=True)
    assert validate(events) == []
    s = summarize(events)
    assert s["complete"] and not s["kinds"].get("error"), s
    # the demo's own counters
    assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(after, before))
    assert s["aborts"] == len(FAULTS)
    # x86_sbm_return confirms every return/abort (sbm->error read back)
    exits = [e for e in events if e["kind"] == "exit"]
    lone = [e for e in exits if e.get("agrees") is not True]     # unconfirmed or disagreeing
    assert len(exits) == s["calls"] and not lone, \
        [(e["seq"], e["vcpu"], e["rip"], e["cpl"], e["cr3_role"], e.get("sandbox"), e.get("ret"),
          e.get("agrees")) for e in lone]
    # every abort carries full context
    for e in (e for e in events if e["kind"] == "abort"):
        assert e["vector"] in (13, 14) and e["via"] in ("exc_page_fault", "exc_general_protection"), e
        assert e["fault_sym"].startswith(("__sbm_thunk_sbm_demo_", "sbm_demo_")), e
        assert e["pid"] and e["comm"] and e["sandbox"] and e["fault_stack"].startswith("sbm_sandbox"), e
        if e["vector"] == 14:
            assert e["cr2_region"] and "U" in e["error_bits"], e
    # interrupts arrived inside the sandbox and returned to it
    # (the trace stops after the last scenario returned: every irq is paired)
    assert s["kinds"].get("irq", 0) >= 1 and s["kinds"].get("irq_return", 0) == s["kinds"]["irq"], s["kinds"]
    regions = {json.dumps(e.get("cr2_region")) for e in events if e["kind"] == "abort"}
    assert any("NULL page" in r for r in regions) and any("guard" in r for r in regions), regions
    # QEMU's log: every traced fault is there (vector, error code, CR2, RIP), and
    # every sandbox exception QEMU delivered while tracing is in the trace
    log = parse_log(str(qlog), start_off, end_off)
    r = cross_check(events, log)
    assert r["missing_from_log"] == [] and r["missing_from_trace"] == [], r
    assert r["logged_faults"] == s["returns"] + s["aborts"] + s["kinds"].get("spurious", 0)
    assert r["irqs_missing_from_log"] == [], r
    # both vCPUs, one Perfetto track each
    doc = to_perfetto(events)
    tracks = {e["tid"] for e in doc["traceEvents"] if e["ph"] in ("X", "i")}
    assert tracks <= {0, 1} and sum(1 for e in doc["traceEvents"] if e["ph"] == "X") == s["calls"]
    assert st["level"] == "full"


@pytest.mark.ends_vm
@pytest.mark.parametrize("victim,pti", [("qemu", "on"), ("gdb", "off")])
def test_trace_survives_a_dying_peer(logged_vms, end_vm, tmp_path, victim, pti):
    # killed (QEMU) or left busy (gdb): stopped here.  PTI on: the pool's
    # guest (the detached PTI one ends in test_cli_detached_start_run_stop)
    vm = end_vm(smp=2, pti="on") if pti == "on" else logged_vms(pti, last=True)[0]
    trace = tmp_path / "t.jsonl"
    rec = TraceRecorder(vm.info, str(trace), "full")
    try:
        rec.start()
        run_scenario(vm, "repeat 5")
        n5 = len(read_events(str(trace)))
        # keep the guest busy in sandboxes while the peer dies: kill once the
        # trace shows that loop inside sandboxes
        vm.serial.send("echo repeat 100000 > /sys/kernel/debug/sbm_demo/run\n")
        busy = lambda: len(read_events(str(trace))) > n5 + 4  # noqa: E731
        rec.wait(120, until=busy)
        assert busy(), "the repeat loop never showed in the trace"
        n_before = len(read_events(str(trace)))
        if victim == "qemu":
            os.kill(vm.pid, signal.SIGKILL)
        else:
            os.kill(rec.g.pid, signal.SIGKILL)
        with pytest.raises(TraceLost) as ei:
            rec.wait(30)
    finally:
        rec.close()
        vm.stop()
    msg = str(ei.value)
    assert ("QEMU" in msg) if victim == "qemu" else ("gdb" in msg), msg
    events = read_events(str(trace), strict=True)       # every line is valid JSON
    assert validate(events) == []
    assert len(events) >= n_before and events[-1]["kind"] == "trace_stop", events[-1]
    assert summarize(events)["calls"] >= 5


def test_trace_under_kaslr(shared_vm, tmp_path):
    """KASLR on: the probes are relocated by the kernel model (slide found in
    guest memory), so every call and abort is still caught, with symbols."""
    vm = shared_vm(smp=2, pti="on", kaslr=True)
    trace = tmp_path / "k.jsonl"
    before = demo_stats(vm)
    rec = TraceRecorder(vm.info, str(trace), "fast")
    try:
        rec.start()
        run_scenario(vm, "ok")
        run_scenario(vm, "write_kernel_data")
        run_scenario(vm, "noncanonical")
        rec.poll()
        rec.stop()
    finally:
        rec.close()
    after = demo_stats(vm)
    events = read_events(str(trace), strict=True)
    assert validate(events) == []
    s = summarize(events)
    kinds = [(e.get("kind"), e.get("probe"), e.get("message") or e.get("error")) for e in events]
    assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(after, before)) == (3, 1, 2), kinds
    aborts = [e for e in events if e.get("kind") == "abort"]
    assert sorted(e.get("vector") for e in aborts) == [13, 14]
    enters = [e for e in events if e.get("kind") == "enter"]
    # symbols through the slide: each enter names the demo's sandboxed function
    assert len(enters) == 3 and all((e.get("func_sym") or "").startswith("__sbm_thunk_sbm_demo_")
                                    for e in enters), enters
