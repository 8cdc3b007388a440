"""``sbmdbg bench trace``: in one boot, time ``repeat N`` untraced, then
traced at each level (and with emulated step-over), and report transitions
recorded per second, probe stops per second, the slowdown, and whether the
trace's counts match the demo's own ``stats``.

Levels: ``plugin`` (the no-stop tracer, exception frames read from guest
RAM), ``plugin-dint`` (the same tracer on QEMU's ``-d int`` log, as before
issue 17), and the gdb tracer's ``full``/``fast``/``lean``.  Every traced
run starts after a warm-up ``repeat 5`` under the tracer (arming the plugin
flushes QEMU's translation cache: the guest's code is translated again
once), as the untraced runs do.  A plugin level runs ``RUNS`` rounds of
(untraced run, traced run) and its ``slowdown`` is the median of the rounds'
traced/untraced ratios (``ratio``: its inverse, the traced transition rate
against the untraced one): the machine is shared, and its load changes
between the start of a benchmark and its end, much less between two
neighbouring runs.  ``cpu_slowdown``/``cpu_ratio``: the same from the CPU
time the runs took (QEMU's threads + this process: the tracer), which other
jobs on the machine do not inflate.  A gdb level runs once, against the best
untraced run."""
from __future__ import annotations

import os
import re
import tempfile
import time

RUNS = 5
PLUGIN_LEVELS = {"plugin": "frames", "plugin-dint": "dint"}
STATS = re.compile(r"calls=(\d+) returns=(\d+) aborts=(\d+)")


def _stats(vm) -> tuple[int, int, int]:
    m = STATS.search(vm.run("cat /sys/kernel/debug/sbm_demo/stats").output)
    if not m:
        raise RuntimeError("no sbm_demo stats in the guest")
    return tuple(int(x) for x in m.groups())


def _repeat(vm, n: int) -> float:
    t0 = time.perf_counter()
    r = vm.run(f"echo repeat {n} > /sys/kernel/debug/sbm_demo/run && cat /sys/kernel/debug/sbm_demo/run",
               timeout=60 + n)
    dt = time.perf_counter() - t0
    if "result=PASS" not in r.output:
        raise RuntimeError(f"repeat {n} failed: {r.output.strip()}")
    return dt


def _cpu_ns(pid: int) -> int:
    """On-CPU nanoseconds of every live thread of process ``pid`` (schedstat)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def _timed(vm, n: int) -> tuple[float, float]:
    """``repeat n``: (wall s, CPU s of QEMU and of this process, the tracer
    included, until it caught up).  CPU time is what a loaded machine does
    not inflate: on a machine shared with other jobs the wall time of a run
    moves by 2-5x, the CPU it needs hardly."""
    q0, p0 = _cpu_ns(vm.pid), time.process_time()
    wall = _repeat(vm, n)
    time.sleep(0.3)                     # the tracer reads what is left (every 20 ms)
    return wall, (_cpu_ns(vm.pid) - q0) / 1e9 + time.process_time() - p0


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def bench_trace(repeat: int = 100, pti: str = "on", levels=("plugin", "full", "lean"), emulate_too: bool = True,
                opts=None, floor: bool = True) -> dict:
    from sbmdbg.trace.live import TraceRecorder
    from sbmdbg.vm import VM, VMOptions

    if opts is None:
        opts = VMOptions(smp=2, pti=pti)  # kernel=None: the VM boots the reference kernel
    res: dict = {"repeat": repeat, "pti": opts.pti, "smp": opts.smp, "runs": []}
    with VM(opts) as vm, tempfile.TemporaryDirectory() as td:
        _repeat(vm, 5)                      # warm up the code paths
        base = [_repeat(vm, repeat) for _ in range(RUNS)]
        res["untraced_s"] = round(min(base), 3)
        res["untraced_runs_s"] = [round(x, 3) for x in base]
        variants = [(lv, False) for lv in levels]
        gdb_levels = [lv for lv in levels if lv not in PLUGIN_LEVELS]
        if emulate_too and gdb_levels:
            variants.append((gdb_levels[0], True))
        for level, emu in variants:
            demo = [0, 0, 0]            # the demo's own counts while traced
            plugin = level in PLUGIN_LEVELS
            sums = {k: 0 for k in ("calls", "returns", "aborts", "transitions", "events")}
            runs, paired, busy, log_bytes, hits = [], [], 0.0, 0, 0
            cpu_runs, cpu_paired = [], []
            for rnd in range(RUNS if plugin else 1):
                if plugin:
                    # paired: an untraced run right before each traced one (the load of a
                    # shared machine changes by the second); the tracer's stop flushed QEMU's
                    # translation cache, so each untraced run has its own warm-up too
                    _repeat(vm, 5)
                    wall, cpu = _timed(vm, repeat)
                    paired.append(wall)
                    cpu_paired.append(cpu)
                path = os.path.join(td, f"{level}-{int(emu)}-{rnd}.jsonl")
                if plugin:
                    from sbmdbg.trace.fast import PluginTracer
                    rec = PluginTracer(vm, path, source=PLUGIN_LEVELS[level])
                else:
                    rec = TraceRecorder(vm.info, path, level, emulate=emu)
                before = _stats(vm)
                rec.start()
                try:
                    _repeat(vm, 5)              # warm-up under the tracer (as untraced)
                    if plugin:
                        wall, cpu = _timed(vm, repeat)
                        cpu_runs.append(cpu)
                    else:
                        wall = _repeat(vm, repeat)
                    runs.append(wall)
                    st = rec.stop()
                finally:
                    rec.close()
                demo = [d + a - b for d, a, b in zip(demo, _stats(vm), before)]
                for k in sums:
                    sums[k] += st["summary"][k]
                busy += st.get("busy_s", 0) or 0
                log_bytes += st.get("log_bytes", 0) or 0
                hits += sum(st.get("hits", {}).values()) if not plugin else 0
            s = sums
            dt = min(runs)
            cpu = {}
            if plugin:   # the median of the paired ratios: each traced run against its neighbour
                slowdown = _median([t / u for t, u in zip(runs, paired)])
                cpu_slow = _median([t / u for t, u in zip(cpu_runs, cpu_paired)])
                cpu = {"cpu_untraced_s": [round(x, 3) for x in cpu_paired],
                       "cpu_traced_s": [round(x, 3) for x in cpu_runs],
                       "cpu_slowdown": round(cpu_slow, 3), "cpu_ratio": round(1 / cpu_slow, 3)}
            else:
                slowdown = dt / res["untraced_s"]
            n_runs = len(runs) * (repeat + 5)      # calls traced, warm-ups included
            res["runs"].append({
                "level": level, "traced_runs_s": [round(x, 3) for x in runs],
                "paired_untraced_s": [round(x, 3) for x in paired],
                "source": PLUGIN_LEVELS.get(level, "gdb"),
                "ratio": round(1 / slowdown, 3),
                "tracer_busy_s": round(busy, 3), "log_bytes": log_bytes,
                "step_over": "no stops" if plugin else "emulated" if emu else "gdb single-step",
                "traced_s": round(dt, 3), "slowdown": round(slowdown, 2),
                "transitions": s["transitions"], "events": s["events"],
                # the traces hold the warm-ups and every run: the rate is per run
                "transitions_per_s": round(s["transitions"] * repeat / n_runs / dt, 1),
                "events_per_s": round(s["events"] * repeat / n_runs / dt, 1),
                "stops": hits, "stops_per_s": round(hits / dt, 1),
                "ms_per_stop": round((dt - res["untraced_s"]) / max(hits, 1) * 1e3, 2),
                "tracer_busy_ms_per_stop": round(busy / max(hits, 1) * 1e3, 3),
                "calls": s["calls"], "returns": s["returns"], "aborts": s["aborts"],
                "demo_calls": demo[0], "demo_returns": demo[1], "demo_aborts": demo[2],
                "counts_match": [s["calls"], s["returns"], s["aborts"]] == demo,
                **cpu,
            })
        if floor:
            # What QEMU's own stop/resume costs, with no gdb and no single step.
            from sbmdbg.model.symbols import Symbols
            from sbmdbg.trace.points import function_code
            from sbmdbg.bench.stopfloor import measure
            addr, code = function_code(Symbols.from_elf(vm.info["vmlinux"]), "x86_sbm_exec")
            res["raw_rsp_floor"] = measure(vm, addr + 1, code[1:], repeat)
        res["untraced_calls_per_s"] = round(repeat / res["untraced_s"], 1)
        res["untraced_transitions_per_s"] = round(2 * repeat / res["untraced_s"], 1)
    return res


def render(r: dict) -> str:
    lines = [f"repeat {r['repeat']} on {r['smp']} vCPUs, pti={r['pti']} (TCG): untraced {r['untraced_s']} s "
             f"({r['untraced_calls_per_s']} calls/s = {r['untraced_transitions_per_s']} enter+exit transitions/s)",
             f"{'level':6} {'step-over':16} {'traced s':>8} {'slowdown':>8} {'trans/s':>8} {'events/s':>8} "
             f"{'stops/s':>8} {'ms/stop':>8} {'ours ms':>8}  counts vs stats"]
    for x in r["runs"]:
        if x["level"] in PLUGIN_LEVELS and "cpu_ratio" in x:
            lines.append(f"  {x['level']} ({x['source']}): median of {len(x['traced_runs_s'])} paired runs: "
                         f"transition rate {x['ratio']}x the untraced guest's (wall), "
                         f"{x['cpu_ratio']}x by CPU time (QEMU + tracer)")
        if x["level"] in PLUGIN_LEVELS:
            lines.append(f"{x['level']:6} {'(no stops)':16} {x['traced_s']:8} {x['slowdown']:8} "
                         f"{x['transitions_per_s']:8} {x['events_per_s']:8} {0:8} {'-':>8} {'-':>8}  "
                         f"{'match' if x['counts_match'] else 'MISMATCH'} "
                         f"({x['calls']}/{x['returns']}/{x['aborts']})")
            continue
        lines.append(f"{x['level']:6} {x['step_over']:16} {x['traced_s']:8} {x['slowdown']:8} "
                     f"{x['transitions_per_s']:8} {x['events_per_s']:8} {x['stops_per_s']:8} "
                     f"{x['ms_per_stop']:8} {x['tracer_busy_ms_per_stop']:8}  "
                     f"{'match' if x['counts_match'] else 'MISMATCH'} ({x['calls']}/{x['returns']}/{x['aborts']})")
    f = r.get("raw_rsp_floor")
    if f:
        lines.append(f"floor (raw RSP client, no gdb, no single step, 1 breakpoint): {f['stops']} stops in "
                     f"{f['traced_s']} s (untraced {f['untraced_s']} s) = {f['stops_per_s']} stops/s, "
                     f"{f['ms_per_stop']} ms per stop: QEMU's own stop/resume of the VM")
    return "\n".join(lines)
