"""sbmdbg on a kernel with the v1 series' layout (issue 13): the v1-layout
test variant (fixtures/kernel/variants/v1-layout, on top of the reference
patches: kernel rsp at [exc_top-8] with the IRET frame below it, handlers of
sandbox exceptions on the entry stack, the kernel's rbp in the sandbox,
v1's entry/NMI/exit check shapes, a 4 KiB sandbox PGD with bit 12 set;
pti=off as v1 needs).  One VM for the module.

Each item the v1 port found wrong is checked against a source that is not
sbmdbg's model: plain gdb reading registers and memory (the stopped vCPU's
own view), QEMU's monitor (gva2gpa, xp, info registers), the kernel's own
arguments (handle_sbm_fault's regs) and the guest (/proc/cpuinfo, the demo
module's counters)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from demo_helpers import Stop, demo_stats, gdb_int, run_scenario, sbm_json, shm_gdb

pytestmark = [pytest.mark.live, pytest.mark.timeout(1800)]
REPO = Path(__file__).resolve().parents[2]
VARIANT = REPO / "fixtures" / "kernel" / "variants" / "v1-layout" / \
    "0001-test-only-v1-layout-frames-and-entry-exit-shapes.patch"
SBM_CS, USER_CS = 0x30, 0x33


@pytest.fixture(scope="module")
def v1vm():
    from sbmdbg.kernel.build import ensure_kernel
    from sbmdbg.vm import VM, VMOptions

    kb = ensure_kernel([VARIANT])
    vm = VM(VMOptions(smp=2, pti="off", kernel=str(kb.bzImage), vmlinux=str(kb.vmlinux), tree=str(kb.tree)))
    try:
        assert "# sandbox_mode: pass:" in vm.run("dmesg | grep '# sandbox_mode'").output
        with shm_gdb(vm) as g:
            yield vm, g
    finally:
        vm.close()


def _qemu_u64(vm, cpu: int, va: int) -> int:
    """[va] through QEMU alone: gva2gpa on that vCPU's CR3, then xp."""
    out = vm.hmp(f"gva2gpa {va:#x}", cpu_index=cpu)
    m = re.search(r"gpa: (0x[0-9a-f]+)", out)
    assert m, out
    x = vm.hmp(f"xp /1gx {m.group(1)}")
    return int(x.split(":")[1].split()[0], 16)


def _syms(frames) -> list[str]:
    return [f.get("symbol") or "" for f in frames]


def test_kernel_detects_v1_and_pti_off(v1vm):
    vm, g = v1vm
    flags = vm.run("grep -m1 '^flags' /proc/cpuinfo").output.split()
    g.interrupt()
    try:
        k = sbm_json(g, "sbm kernel")
        txt = g.console("sbm kernel")
    finally:
        g.cont()
    assert k["sbm_variant"] == "v1", k
    d = k["sbm_variant_detail"]
    assert d["exc_frame_gap"] == 8 and d["handler_stack"] == "entry_stack" and d["rbp_at_entry"] == "kernel"
    assert "jrcxz" in d["entry_check"]["shape"] and "cmpw" in d["exit_check"]["shape"]
    assert any("[exc_top-8]" in e for e in d["evidence"])
    # the guest's own view: no PTI (the kernel sets the "pti" cpu flag when it isolates)
    assert "pti" not in flags and k["pti"] is False, (k["pti"], k["pti_evidence"])
    assert "X86_FEATURE_PTI clear" in k["pti_evidence"]
    assert "sbm_variant" in txt and "v1" in txt and "kernel rsp at [exc_top-8]" in txt


def test_stopped_in_thunk(v1vm):
    vm, g = v1vm
    s = Stop(vm, g, "__sbm_thunk_sbm_demo_compute", "ok")
    try:
        row = sbm_json(g, "sbm")["cpus"][s.cpu]
        assert row["mode"] == "sandbox" and row["cpl"] == 3, row
        sb = sbm_json(g, f"sbm show cpu{s.cpu} --no-map")["sandboxes"][0]
        f = sb["fields"]
        cr3 = gdb_int(g, "$cr3")
        assert cr3 == f["sbm_cr3"] and cr3 & 0x1000, hex(cr3)    # the case bit 12 must not mislead
        # PTI: still off on a vCPU whose CR3 has bit 12 set
        assert sbm_json(g, "sbm kernel")["pti"] is False
        # `sbm pcpu`: the SBM model's mode, though CPL alone says user
        assert gdb_int(g, "$cs") & 3 == 3
        pc = next(c for c in sbm_json(g, f"sbm pcpu {s.cpu}")["cpus"] if c["cpu"] == s.cpu)
        assert pc["vcpu"]["mode"] == "sandbox" and pc["vcpu"]["sandbox"] == sb["label"], pc["vcpu"]
        # `--root user` is the process's table (its mm's PGD), not the sandbox's
        # (the sandbox table does not map the mm: read it through the other vCPU with QEMU)
        other = 1 - s.cpu
        mm = _qemu_u64(vm, other, gdb_int(g, "&$lx_current().mm"))
        mm_pgd = _qemu_u64(vm, other, mm + gdb_int(g, "&((struct mm_struct *)0)->pgd"))
        pob = gdb_int(g, "page_offset_base")
        v = sbm_json(g, f"sbm vtop {mm_pgd:#x} --root user")
        assert v["root_label"] == "user" and v["root"] == mm_pgd - pob != f["sbm_cr3"] & ~0xFFF, v
        # `sbm stack`: the kernel rsp at [exc_top-8], the IRET frame x86_sbm_exec built below it
        stk = sbm_json(g, f"sbm stack {s.cpu}")["cpus"][0]
        pr = stk["exc_pt_regs"]
        exc_top = f["exc_stack"] + 8192
        assert pr["exc_top"] == exc_top and pr["kernel_rsp_slot"] == exc_top - 8
        want_ksp = gdb_int(g, f"*(unsigned long *){exc_top - 8:#x}")          # plain gdb
        assert want_ksp == _qemu_u64(vm, s.cpu, exc_top - 8) == pr["kernel_rsp"] == f["return_sp"]
        assert pr["kernel_rsp_is_return_sp"]
        r = pr["regs"]
        assert r["ip"] == gdb_int(g, "$pc") and r["cs"] == USER_CS == gdb_int(g, "$cs"), r
        assert r["sp"] == gdb_int(g, "$rsp") == f["stack"] + 16384 - 16
        for i, name in enumerate(("ip", "cs", "flags", "sp", "ss")):
            assert r[name] == _qemu_u64(vm, s.cpu, exc_top - 8 - 40 + 8 * i), name
        assert pr["valid"] and "IRET frame x86_sbm_exec built" in pr["cs_meaning"]
        txt = g.console(f"sbm stack {s.cpu}")
        assert "kernel rsp at [exc_top-8]" in txt and "= state->return_sp" in txt
        # rbp in the sandbox is the kernel's (v1 does not clear it): not a sandbox frame
        rbp = gdb_int(g, "$rbp")
        assert rbp and not f["stack"] <= rbp < f["stack"] + 16384
        bt = stk["backtrace"]
        syms = _syms(bt["frames"])
        assert syms[0].startswith("__sbm_thunk_sbm_demo_compute")
        ctx = [fr["context"] for fr in bt["frames"]]
        assert "boundary" in ctx and ctx.index("boundary") > ctx.index("sandbox")
        assert any(fr.get("boundary") and fr["sp"] == f["return_sp"] for fr in bt["frames"])
        for fn in ("arch_sbm_exec", "sbm_exec", "demo_run_one"):
            assert any(x.startswith(fn + "+") for x in syms[ctx.index("boundary"):]), (fn, syms)
    finally:
        out = s.finish()
    assert "scenario=ok" in out and "result=PASS" in out, out


def test_stopped_in_handle_sbm_fault(v1vm):
    vm, g = v1vm
    s = Stop(vm, g, "handle_sbm_fault", "write_kernel_data")
    try:
        row = sbm_json(g, "sbm")["cpus"][s.cpu]
        # the handler runs on the entry stack: below this CPU's TSS.sp0 (where the CPU
        # pushed the sandbox's frame), read by plain gdb from the per-CPU TSS
        rsp = gdb_int(g, "$rsp")
        sp0 = gdb_int(g, f"((struct tss_struct *)((unsigned long)&cpu_tss_rw + __per_cpu_offset[{s.cpu}]))"
                         "->x86_tss.sp0")
        assert sp0 - 4096 <= rsp < sp0, (hex(rsp), hex(sp0))
        assert row["stack"]["kind"] == "entry_stack" and row["cpl"] == 0
        assert row["mode"] == "sandbox (in kernel handler)", row
        pc = next(c for c in sbm_json(g, f"sbm pcpu {s.cpu}")["cpus"] if c["cpu"] == s.cpu)
        assert pc["vcpu"]["mode"] == "sandbox (in kernel handler)"
        stk = sbm_json(g, f"sbm stack {s.cpu}")["cpus"][0]
        pr = stk["exc_pt_regs"]
        # where the kernel's own handler has it: its regs argument
        assert pr["address"] == gdb_int(g, "$rdi") == gdb_int(g, "regs") and pr["stack"] == "entry_stack"
        assert pr["address"] == sp0 - gdb_int(g, "sizeof(struct pt_regs)") and pr["top"] == sp0
        assert pr["regs"]["cs"] == SBM_CS == gdb_int(g, "regs->cs") and pr["from_sandbox"]
        assert pr["regs"]["ip"] == gdb_int(g, "regs->ip")
        assert pr["ip_symbol"].startswith("__sbm_thunk_sbm_demo_write_data")
        txt = g.console(f"sbm stack {s.cpu}")
        assert "entry stack" in txt
        # `sbm why` reads the fault from that frame too
        w = sbm_json(g, "sbm why")["fault"]
        assert w["rip"] == gdb_int(g, "regs->ip") and w["cr2"] == gdb_int(g, "address"), w
        fr = stk["backtrace"]["frames"]
        syms = _syms(fr)
        assert syms[0].startswith("handle_sbm_fault")
        i = next(i for i, f in enumerate(fr) if f.get("pt_regs"))
        assert fr[i]["pt_regs"] == pr["address"] and fr[i + 1]["context"] == "sandbox"
        assert syms[i + 1].startswith("__sbm_thunk_sbm_demo_write_data")
        # the sandbox frame's rbp: the kernel's (v1); the walk stops at the boundary, not in sbm_exec
        rbp = gdb_int(g, "regs->bp")
        sb = sbm_json(g, f"sbm show cpu{s.cpu} --no-map")["sandboxes"][0]["fields"]
        assert not sb["stack"] <= rbp < sb["stack"] + 16384
        ctx = [f["context"] for f in fr]
        j = ctx.index("boundary")
        assert j > i and fr[j]["sp"] == sb["return_sp"]
        assert syms[j + 1].startswith("arch_sbm_exec+"), syms
        assert any(x.startswith("demo_run_one+") for x in syms[j:])
    finally:
        out = s.finish()
    assert "scenario=write_kernel_data" in out and "sbm_error=-14" in out and "PASS" in out, out


def test_tracers_on_v1(v1vm, tmp_path):
    """The gdb tracer finds its probes in v1's shapes; both tracers see the
    interrupts that return into the sandbox (irq_return) and agree."""
    from sbmdbg.trace.events import read_events, summarize
    from sbmdbg.trace.fast import PluginTracer
    from sbmdbg.trace.live import TraceRecorder

    vm, g = v1vm
    g.close()           # the tracers attach their own gdb / plugin
    scen = ["ok", "write_kernel_data", "irq_in_sandbox"]
    got = {}
    for via in ("gdb", "plugin"):
        path = str(tmp_path / f"{via}.jsonl")
        before = demo_stats(vm)
        rec = TraceRecorder(vm.info, path, "full") if via == "gdb" else PluginTracer(vm, path)
        try:
            meta = rec.start()
            for sc in scen:
                run_scenario(vm, sc)
            rec.stop()
        finally:
            rec.close()
        after = demo_stats(vm)
        ev = read_events(path)
        s = summarize(ev)
        assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(after, before)), s
        irqs = [e for e in ev if e["kind"] == "irq"]
        backs = [e for e in ev if e["kind"] == "irq_return"]
        assert irqs and len(backs) == len(irqs), (via, s["kinds"])
        assert all(b["to_rip"] for b in backs)
        if via == "plugin":
            assert meta["sbm_variant"] == "v1" and not meta["notes"], meta
        got[via] = [(e["kind"], e.get("vector")) for e in ev if e["kind"] in ("enter", "abort", "return")]
    assert got["gdb"] == got["plugin"] and len(got["gdb"]) == 2 * len(scen), got
