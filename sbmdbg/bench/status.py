"""``sbmdbg bench status``: the per-stop refresh of ``sbm`` (every vCPU's mode,
task, stack class, sandbox) measured inside gdb on the shm target.

One refresh = drop every cache (what gdb does on resume: kernel.invalidate())
and rebuild the status table from the registers gdb already holds and guest
RAM read through the memory-backend-file.  Measured with one vCPU stopped
inside a sandbox (breakpoint on the demo's sandboxed function) and with the
guest idle."""
from __future__ import annotations

import threading


def _in_gdb(g, n: int) -> dict:
    """``sbm time``: the status compute, caches dropped before each run."""
    modes = [c["mode"] for c in g.sbm_json("sbm --json")["cpus"]]   # also builds the model (not timed)
    t = g.sbm_json(f"sbm time --json --cold --compute --repeat {n} sbm status")
    cold = g.sbm_json("sbm time --json --cold --compute --repeat 1 sbm status")
    return {"median_ms": t["median_ms"], "min_ms": t["min_ms"], "max_ms": t["max_ms"],
            "regs_refetch_ms": cold["median_ms"], "modes": modes}


def bench_status(opts, repeat: int = 50) -> dict:
    import time

    from sbmdbg.vm import VM
    from sbmdbg.vm.gdbmi import GdbSession

    res: dict = {"repeat": repeat, "smp": opts.smp}
    with VM(opts) as vm, GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"]) as g:
        g.interrupt()
        g.console(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}")
        res["idle"] = _in_gdb(g, repeat)
        t = threading.Thread(target=lambda: vm.run("echo ok > /sys/kernel/debug/sbm_demo/run", timeout=120),
                             daemon=True)
        g.mi("-break-insert -t __sbm_thunk_sbm_demo_compute")
        g.cont()
        t.start()
        g.wait_stopped(60)
        res["in_sandbox"] = _in_gdb(g, repeat)
        t0 = time.perf_counter()
        for _ in range(5):
            g.console("sbm --json")
        res["mi_roundtrip_ms"] = (time.perf_counter() - t0) / 5 * 1e3
        g.console("sbm target gdb")
        res["gdbstub_in_sandbox"] = _in_gdb(g, max(3, repeat // 10))
        g.cont()
        t.join(60)
    res["goal_ms"] = 20.0
    res["meets_goal"] = res["in_sandbox"]["median_ms"] <= 20.0 and res["idle"]["median_ms"] <= 20.0
    return res


def render(r: dict) -> str:
    def row(name, d):
        return (f"  {name:28} median {d['median_ms']:7.2f} ms  (min {d['min_ms']:.2f}, max {d['max_ms']:.2f}; "
                f"modes {', '.join(d['modes'])})")
    return "\n".join([
        f"per-stop refresh of `sbm` ({r['smp']} vCPUs, {r['repeat']} runs, caches dropped each time):",
        row("idle guest, shm", r["idle"]),
        row("a vCPU in a sandbox, shm", r["in_sandbox"]),
        row("in a sandbox, gdbstub phys", r["gdbstub_in_sandbox"]),
        f"  `sbm --json` over gdb/MI        {r['mi_roundtrip_ms']:7.2f} ms (wall, includes MI and JSON)",
        f"  goal <= {r['goal_ms']:.0f} ms on shm: {'met' if r['meets_goal'] else 'NOT met'}",
    ])
