"""Sandbox discovery on the running reference kernel (issue 17): ``sbm list``
looks only at each vCPU's current task (the kernel keeps a sandbox's task on
its CPU: arch_sbm_exec runs it under kernel_fpu_begin); the walk of every
task (``sbm list --all``) finds the same sandboxes, and the guest itself says
whose they are (the writer's pid, the busy shells' pids); two shells loop at once,
so stops catch sandboxes on both vCPUs, each named once."""
from __future__ import annotations

import time

import pytest
from demo_helpers import DEMO

pytestmark = pytest.mark.live


def brief(d):
    return [(s["pid"], s["comm"], s["state"], s["cpus"]) for s in d["sandboxes"]]


def test_list_at_the_first_sandbox_instruction(shared_vm, gdb_session):
    vm = shared_vm()
    g = gdb_session(vm)
    # the write waits 2 s: the breakpoint is in by then
    vm.serial.send(f"sh -c 'sleep 2; echo $$ > /tmp/sbm_writer; echo ok > {DEMO}/run'\n")
    cpu = int(g.break_and_wait("*__sbm_thunk_sbm_demo_compute").get("thread-id", "1")) - 1
    fast = g.sbm_json("sbm list")
    full = g.sbm_json("sbm list --all")
    assert fast["discovery"]["mode"] == "cpus", fast["discovery"]
    assert "kernel_fpu_begin" in fast["discovery"]["reason"]
    assert full["discovery"]["mode"] == "tasks"
    assert brief(fast) == brief(full)
    [sb] = fast["sandboxes"]
    assert sb["cpus"] == [cpu] and sb["comm"] == "sh"
    # `sbm` (status) names the same sandbox on that vCPU
    row = g.sbm_json("sbm")["cpus"][cpu]
    assert row["sandbox"] == sb["label"] and row["mode"] == "sandbox"
    g.cont()     # the shell runs the rest of `sh -c` before this command:
    assert vm.run("cat /tmp/sbm_writer; rm -f /tmp/sbm_writer").output.split() == [str(sb["pid"])]


def test_list_while_shells_loop_in_sandboxes(shared_vm, gdb_session):
    vm = shared_vm()
    # bounded loops (they end by themselves within 120 s even if the kill below is late):
    # the pool's guest is shared with the files after this one
    loop = (f"(end=$(($(date +%s) + 120)); while [ $(date +%s) -lt $end ]; do "
            f"echo irq_in_sandbox > {DEMO}/run; done) >/dev/null 2>&1 & echo $!")
    # two busy shells: sandboxes on both vCPUs at once (the serial shell still answers)
    out = vm.run(f"{loop}; {loop}", timeout=60).output
    busy = [int(x) for x in out.split()]
    assert len(busy) == 2
    g = gdb_session(vm)
    seen = []
    try:
        for _ in range(30):
            time.sleep(0.5)
            g.interrupt()
            fast, full = g.sbm_json("sbm list"), g.sbm_json("sbm list --all")
            assert fast["discovery"]["mode"] == "cpus"
            assert brief(fast) == brief(full)
            for s in fast["sandboxes"]:
                assert s["pid"] in busy, (s, busy)       # the guest's own view: a busy shell
                assert len(s["cpus"]) == 1
            # one sandbox per vCPU, one per task
            cpus = [s["cpus"][0] for s in fast["sandboxes"]]
            assert len(set(cpus)) == len(cpus), fast["sandboxes"]
            assert len({s["pid"] for s in fast["sandboxes"]}) == len(cpus)
            seen += [s["pid"] for s in fast["sandboxes"]]
            g.cont()
            if set(seen) == set(busy):
                break
        assert set(seen) == set(busy), f"stops saw sandboxes of {sorted(set(seen))}, not of both {busy}"
    finally:
        if not g.running:
            g.cont()
        g.close()
        # closing gdb leaves the guest running (a gdb that quit on SIGTERM while the guest ran
        # once left QEMU paused here: the shell below never answered)
        assert vm.qmp("query-status")["status"] == "running"
        vm.run("kill " + " ".join(map(str, busy)) + "; sleep 0.5; true", timeout=120)
        for pid in busy:     # gone before the next test takes the guest
            st = vm.run(f"cut -d' ' -f3 /proc/{pid}/stat 2>/dev/null || echo gone", timeout=60).output.split()
            assert st[-1] in ("gone", "Z"), (pid, st)       # exited (a zombie until the shell reaps it)
