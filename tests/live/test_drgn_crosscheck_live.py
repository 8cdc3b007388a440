"""sbmdbg against drgn, an implementation we did not write.

Stopped inside a sandbox (KASLR on, PTI on), gdb's `sbm pcpu`, `sbm list` and
`sbm stack` are compared with what drgn reads from a QEMU `dump-guest-memory`
vmcore taken at the same stop (drgn finds the KASLR offset in the VMCOREINFO
note that the guest wrote to QEMU's vmcoreinfo device through fw_cfg):
pcpu_hot of every CPU, the current task's thread_info.sbm_state, every field
of struct x86_sbm_state and struct sbm, the buffer lists, and the sandbox
stack's back-link word [tos-8].
"""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.live

import drgn  # noqa: E402  (in the test extra: a missing drgn is an error, not a skip)

from demo_helpers import U64, sbm_json  # noqa: E402


def test_sbm_model_equals_drgn_on_a_vmcore(shared_vm, gdb_session, tmp_path):
    from drgn.helpers.linux.percpu import per_cpu

    vm = shared_vm(smp=2, pti="on", kaslr=True)
    g = gdb_session(vm)
    kinfo = sbm_json(g, "sbm kernel")
    slide = kinfo.get("slide") or kinfo.get("kernel", {}).get("slide") or 0
    thunk = int(g.console('printf "%lu\\n", (unsigned long)&__sbm_thunk_sbm_demo_compute').split()[-1])
    g.mi(f"-break-insert -t *{(thunk + slide) & U64:#x}")
    g.cont()
    vm.serial.send("echo ok > /sys/kernel/debug/sbm_demo/run\n")
    stop = g.wait_stopped(90)
    assert stop.get("reason") == "breakpoint-hit", stop
    cpu = int(stop["thread-id"]) - 1

    pcpu = sbm_json(g, "sbm pcpu all")["cpus"]
    sandboxes = sbm_json(g, "sbm list")["sandboxes"]
    stacks = sbm_json(g, "sbm stack")["cpus"]
    core = tmp_path / "vmcore.elf"
    vm.qmp("dump-guest-memory", timeout=600, paging=False, protocol=f"file:{core}")

    prog = drgn.Program()
    prog.set_core_dump(str(core))
    prog.load_debug_info([vm.info["vmlinux"]])

    # pcpu_hot of every CPU.
    assert len(pcpu) == 2
    for row in pcpu:
        ph = per_cpu(prog["pcpu_hot"], row["cpu"])
        f = row["fields"]
        assert f["current_task"] == ph.current_task.value_()
        assert f["top_of_stack"] == ph.top_of_stack.value_()
        assert f["cpu_number"] == ph.cpu_number.value_()
        assert f["hardirq_stack_ptr"] == ph.hardirq_stack_ptr.value_()
        assert row["current"]["pid"] == ph.current_task.pid.value_()
        assert row["current"]["comm"] == ph.current_task.comm.string_().decode()

    # The sandbox of the stopped vCPU's task.
    task = per_cpu(prog["pcpu_hot"], cpu).current_task
    state = task.thread_info.sbm_state
    assert state.value_() != 0
    mine = [s for s in sandboxes if s["state"] == state.value_()]
    assert len(mine) == 1, sandboxes
    sb = mine[0]
    assert sb["pid"] == task.pid.value_() and cpu in sb["cpus"]
    for name in ("pgd", "stack", "exc_stack", "return_sp", "kernel_cr3", "sbm_cr3", "sbm"):
        assert sb["fields"][name] == state.member_(name).value_(), name
    sbm = state.sbm
    assert sb["sbm"]["error"] == sbm.error.value_() == 0
    assert sb["sbm"]["private"] == sbm.private.value_() == state.value_()
    drgn_bufs = []
    for direction in ("input", "output", "io"):
        b = sbm.member_(direction)
        while b.value_():
            drgn_bufs.append((direction, b.kern_ptr.value_(), b.sbm_ptr.value_(), b.size.value_()))
            b = b.next
    ours = [(b["direction"], b["kern_ptr"], b["sbm_ptr"], b["size"]) for b in sb["sbm"]["buffers"]]
    assert sorted(ours) == sorted(drgn_bufs) and len(ours) == 2

    # The back-link word at the sandbox stack top, read by drgn through its
    # own page-table walk of the kernel's vmalloc area.
    thread_size = 16 << 10   # THREAD_SIZE on x86_64 without KASAN (PAGE_SIZE << 2)
    tos = state.stack.value_() + thread_size
    backlink = int.from_bytes(prog.read(tos - 8, 8), "little")
    assert backlink == state.return_sp.value_()
    st = next(c for c in stacks if c["cpu"] == cpu)
    assert str(backlink) in json.dumps(st), \
        "sbm stack does not show the back-link"
    g.cont()
    # the scenario typed before the stop finishes (the shared VM's shell is free again)
    out = vm.run("cat /sys/kernel/debug/sbm_demo/run").output
    assert "scenario=ok" in out and "result=PASS" in out, out
