"""The no-stop tracer (QEMU's exception log + the sbmtrace plugin) live:
against the demo module's own counters, the scenarios' known faults, the gdb
tracer (an independent mechanism: breakpoints), and QEMU dying mid-trace.
Each test boots its own VM and leaves no QEMU behind."""
import os
import signal

import pytest
from demo_helpers import FAULTS, demo_stats, run_scenario

from sbmdbg.trace.events import read_events, summarize, validate
from sbmdbg.trace.export import to_perfetto
from sbmdbg.trace.fast import PluginTracer, TraceLost
from sbmdbg.trace.live import TraceRecorder

pytestmark = pytest.mark.live


def _per_vcpu_well_formed(events):
    """enter, then irq/irq_return pairs, then return or abort, then exit: per vCPU."""
    state = {}
    for e in events:
        k, c = e["kind"], e.get("vcpu")
        if k in ("trace_start", "trace_stop"):
            continue
        s = state.get(c, "out")
        if k == "enter":
            assert s == "out", (s, e)
            state[c] = "in"
        elif k in ("irq", "nmi"):
            assert s == "in", (s, e)
            state[c] = "irq"
        elif k == "irq_return":
            assert s == "irq", (s, e)
            state[c] = "in"
        elif k in ("return", "abort"):
            assert s == "in", (s, e)
            state[c] = "ended"
        elif k == "exit":
            assert s == "ended", (s, e)
            state[c] = "out"


@pytest.mark.parametrize("pti,kaslr", [("on", True), ("off", False)])
def test_plugin_trace_counts_faults_and_context(shared_vm, tmp_path, pti, kaslr):
    vm = shared_vm(smp=2, pti=pti, kaslr=kaslr)
    path = tmp_path / "t.jsonl"
    before = demo_stats(vm)
    t = PluginTracer(vm, str(path))
    try:
        t.start()
        for sc in ["ok", "io", *FAULTS, "irq_in_sandbox"]:
            run_scenario(vm, sc)
        run_scenario(vm, "repeat 300")
        # both vCPUs at once
        out = vm.run("for i in 1 2; do (echo repeat 100 > /sys/kernel/debug/sbm_demo/run) & done; wait; "
                     "echo done", timeout=120).output
        assert "done" in out
        t.poll()
        st = t.stop()
    finally:
        t.close()
    after = demo_stats(vm)
    events = read_events(str(path), strict=True)
    assert validate(events) == []
    s = summarize(events)
    assert s["complete"], s
    assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(after, before)), \
        f"{s['kinds']} plugin={st['plugin']} bad_lines={st['log_bad_lines']}"
    assert set(s["vcpus"]) == {"0", "1"} or set(s["vcpus"]) == {0, 1}, s
    assert st["plugin"]["bad_reads"] == 0
    # QEMU's per-vCPU-thread logs: the plugin's lines only (no -d int), an enter and an exit a call at least
    assert st["log_files"] >= 1 and st["log_bytes"] > 100 * s["calls"], st
    assert st["source"] == "frames" and st["plugin"]["frames_lost"] == 0, st
    assert st["log_plugin_gaps"] == 0, st      # every line the plugin wrote was read
    _per_vcpu_well_formed(events)
    # the instruction watch under the frame source: the kernel's entry code and handlers that
    # run on a sandbox's vCPU (timer IRQs, the faults) are not the sandbox's instructions
    insns = [e for e in events if e["kind"] == "sandbox_insn"]
    assert insns == [] and st["insn_watch"]["sites"] > 0, (insns[:3], st["insn_watch"])
    enters = [e for e in events if e["kind"] == "enter"]
    assert all(e["pid"] and e["comm"] == "sh" and e["cr3_role"] == f"sandbox:{e['pid']}"
               and e["stack"] == "sbm_exception_stack" and e["mode"] == "transition"
               and (e["func_sym"] or "").startswith("__sbm_thunk_sbm_demo") for e in enters), enters[:2]
    rets = [e for e in events if e["kind"] == "return"]
    assert all(e["cpl"] == 3 and e["stack"] == "sbm_sandbox_stack" and e["ret"] is not None for e in rets)
    # the faults, in the order the scenarios ran
    aborts = [e for e in events if e["kind"] == "abort"]
    assert len(aborts) == len(FAULTS)
    for (sc, (vec, must, mustnot)), a in zip(FAULTS.items(), aborts):
        assert a["vector"] == vec, (sc, a)
        assert a["sbm_error"] == -14 and "sbm_demo" in (a["fault_sym"] or ""), (sc, a)
        if vec == 14:
            bits = set(a["error_bits"])
            assert must <= bits and not (mustnot & bits), (sc, a)
            assert a["cr2"] and a["cr2_region"], (sc, a)
    # timer interrupts arrived inside the sandbox and came back to it
    irqs = [e for e in events if e["kind"] == "irq"]
    backs = [e for e in events if e["kind"] == "irq_return"]
    assert irqs and len(irqs) == len(backs)
    assert all(i["cpl"] == 3 and i["cr3_role"] == f"sandbox:{i['pid']}" and i["mode"] == "sandbox"
               for i in irqs)
    assert all(b["to_rip"] for b in backs)
    # clocks move forward per vCPU, and the Perfetto export takes the trace
    for c in (0, 1):
        ns = [e["host_ns"] for e in events if e.get("vcpu") == c and e["kind"] != "trace_stop"]
        assert ns == sorted(ns)
    # one Perfetto slice per sandbox call, on the track of its vCPU
    doc = to_perfetto(events)
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == s["calls"] and {int(e["tid"]) for e in slices} == {0, 1}, \
        (len(slices), s["calls"], {e["tid"] for e in slices})
    assert sum(e["cat"] == "abort" for e in slices) == s["aborts"] == len(FAULTS)
    assert sum(e["ph"] == "i" and e["cat"] == "abort" for e in doc["traceEvents"]) == s["aborts"]


def test_frames_crosscheck_with_qemu_dint(shared_vm, tmp_path):
    """Issue 17: both sources in one run (QEMU logs -d int while the plugin
    reads the exception frames): every sandbox interrupt the same, field by
    field (vector, RIP, error code, CPL, CS, RSP, CR2, the saved registers,
    CR3), and the events count what the demo counted."""
    vm = shared_vm(smp=2, pti="on")
    path = tmp_path / "t.jsonl"
    before = demo_stats(vm)
    t = PluginTracer(vm, str(path), crosscheck=True)
    try:
        t.start()
        for sc in ["ok", *FAULTS, "irq_in_sandbox"]:
            run_scenario(vm, sc)
        run_scenario(vm, "repeat 100")
        out = vm.run("for i in 1 2; do (echo repeat 50 > /sys/kernel/debug/sbm_demo/run) & done; wait; "
                     "echo done", timeout=120).output
        assert "done" in out
        st = t.stop()
    finally:
        t.close()
    after = demo_stats(vm)
    cc = st["crosscheck"]
    assert cc["clean"] and cc["mismatches"] == [], cc
    events = read_events(str(path), strict=True)
    assert validate(events) == []
    s = summarize(events)
    assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(after, before)), s
    # every interrupt of a sandbox event was compared: returns, aborts, IRQs, spurious #PFs
    k = s["kinds"]
    assert cc["compared"] == cc["dint"] == cc["frames"] == sum(
        k.get(x, 0) for x in ("return", "abort", "irq", "nmi", "spurious")), (cc, k)
    assert cc["compared"] >= s["calls"] and cc["fields"] > 20 * cc["compared"], cc
    assert st["plugin"]["frames_lost"] == 0 and st["plugin"]["regs"] >= s["calls"], st
    assert st["frames_unknown"] == 0, st        # every entry's vector named from its handler


def test_plugin_trace_agrees_with_gdb_tracer(shared_vm, tmp_path):
    """The same scenarios traced by gdb breakpoints and by the QEMU log:
    the same calls, the same faults (vector, error code, where)."""
    vm = shared_vm(smp=2, pti="on")
    scen = ["ok", "write_kernel_data", "noncanonical", "write_stack", "irq_in_sandbox"]

    def key(events):
        out, func = [], None
        for e in events:
            if e["kind"] == "enter":
                func = e["func_sym"]
                out.append(("enter", func))
            elif e["kind"] == "abort":
                out.append(("abort", e["vector"], e.get("error_code"), e["fault_sym"]))
            elif e["kind"] == "return":
                # irq_in_sandbox returns the timer ticks it saw: timing, not logic
                out.append(("return", None if "spin" in (func or "") else e["ret"]))
        return out

    got = {}
    for via in ("gdb", "plugin"):
        path = str(tmp_path / f"{via}.jsonl")
        rec = TraceRecorder(vm.info, path, "full") if via == "gdb" else PluginTracer(vm, path)
        try:
            rec.start()
            for sc in scen:
                run_scenario(vm, sc)
            rec.stop()
        finally:
            rec.close()
        got[via] = key(read_events(path))
    assert got["plugin"] == got["gdb"], got
    assert len(got["plugin"]) == 2 * len(scen)


@pytest.mark.ends_vm
def test_plugin_trace_qemu_killed(end_vm, tmp_path):
    vm = end_vm(smp=2, pti="off")      # the pool's PTI-off guest, if idle: killed here
    path = tmp_path / "t.jsonl"
    t = PluginTracer(vm, str(path))
    try:
        t.start()
        run_scenario(vm, "repeat 20")
        os.kill(vm.pid, signal.SIGKILL)
        with pytest.raises(TraceLost) as ei:
            t.wait(10)
        assert "died" in str(ei.value)
    finally:
        t.close()
    events = read_events(str(path), strict=True)
    assert validate(events) == []
    assert events[-1]["kind"] == "trace_stop" and "died" in events[-1]["reason"]
    assert summarize(events)["calls"] == 20


def test_frame_source_names_a_sandboxed_wrfsbase(shared_vm, tmp_path):
    """The positive control of the no-false-positive check above: under the
    frame source (no handler stamps), the instruction watch still names what
    the sandbox itself executes -- the catalogue's wrfsbase (its attack call, not its control)."""
    vm = shared_vm(smp=2, pti="on", kaslr=True)
    path = tmp_path / "t.jsonl"
    t = PluginTracer(vm, str(path))
    try:
        t.start()
        out = run_scenario(vm, "wrfsbase")
        t.poll()
        st = t.stop()
    finally:
        t.close()
    assert out["scenario"] == "wrfsbase"   # run_scenario: result=PASS (the hardened kernel)
    events = read_events(str(path), strict=True)
    assert st["source"] == "frames"
    insns = [e["insn"] for e in events if e["kind"] == "sandbox_insn"]
    # the scenario's two calls: its positive control (no wrfsbase) and the attack
    assert summarize(events)["calls"] == 2 and insns == ["wrfsbase"], insns
