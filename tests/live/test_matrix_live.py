"""The kernel matrix (issue 13): the reference 6.12 SBM kernel, 6.12 without
SBM (`--patches none`) and Debian's Linux 6.1 without SBM (`--source 6.1`),
each built once by the pipeline (`sbmdbg kernel build`), booted (2 vCPUs,
PTI on) and checked against scripts/gdb and QEMU:

* `sbm pcpu all --json` == what plain gdb reads through scripts/gdb: the
  fields of `$lx_per_cpu(pcpu_hot, N)` on 6.12, the per-CPU variables
  (`$lx_per_cpu("current_task", N)`, `__preempt_count`, `cpu_number`,
  `cpu_current_top_of_stack`, ...) on 6.1; the same logical fields on both;
  the current task == `$lx_current(N)`; `lx-ps` runs and lists the init shell;
* `sbm pt CR3 --raw` == QEMU `info tlb`; `sbm vtop` == QEMU `gva2gpa`;
  `sbm ptov` finds the VA back;
* the generic commands work (`sbm`, `sbm stack` with stack classes and a
  backtrace, `sbm kernel`, the dashboard's vCPU panel, `sbmdbg inspect` on a
  vmcore); on the kernels without SBM every SBM command, `$sbm_state` and
  both tracers say the one line "this kernel has no SandBox Mode: ...".

The three kernels share the 6.12 work tree / ccache; each is built at most
once (cache hits afterwards).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import KERNEL_FIXTURES
from sbmdbg.sbm.model import NO_SBM
from sbmdbg.target.qmp import info_tlb_flags as qemu_flags, parse_info_tlb

pytestmark = [pytest.mark.live, pytest.mark.timeout(3600)]
U64 = (1 << 64) - 1

BIG = {"config": [KERNEL_FIXTURES / "config", KERNEL_FIXTURES / "config-big"]}
# name -> (build_kernel kwargs, has SBM, per-CPU layout, uname prefix, vCPUs, RAM)
MATRIX = {
    "6.12-sbm": ({}, True, "pcpu_hot", "6.12", 2, "512M"),
    "6.12-nosbm": ({"patches": "none"}, False, "pcpu_hot", "6.12", 2, "512M"),
    "6.1-nosbm": ({"source": "6.1"}, False, "per-cpu variables", "6.1", 2, "512M"),
    # the reference series on a bigger config: ACPI + PCI + modules + -O2
    "6.12-sbm-big": (BIG, True, "pcpu_hot", "6.12", 4, "2G"),
}
# The logical fields on both layouts (the reference config has no call-depth tracking).
LOGICAL = {"current_task", "preempt_count", "cpu_number", "top_of_stack", "hardirq_stack_ptr",
           "softirq_pending", "hardirq_stack_inuse"}
# 6.1: logical field -> (per-CPU variable, member) as plain gdb names them
VARS_61 = {"current_task": ("current_task", ""), "preempt_count": ("__preempt_count", ""),
           "cpu_number": ("cpu_number", ""), "top_of_stack": ("cpu_current_top_of_stack", ""),
           "hardirq_stack_ptr": ("hardirq_stack_ptr", ""),
           "hardirq_stack_inuse": ("hardirq_stack_inuse", ""),
           "softirq_pending": ("irq_stat", ".__softirq_pending")}
SBM_COMMANDS = ["sbm list", "sbm show", "sbm audit", "sbm show cpu0",
                "sbm vtop 0xffffffff81000000 --root sandbox", "sbm pt sandbox",
                "sbm diff kernel sandbox", "sbm trace start --file /tmp/sbmdbg-matrix-no.jsonl"]


def sbm_json(g, cmd: str):
    out = g.console(cmd + " --json", timeout=120)
    return json.loads(out[out.index("{"):])


def gdb_int(g, expr: str) -> int:
    out = g.console(f"python print('V', int(gdb.parse_and_eval({expr!r}).cast("
                    f"gdb.lookup_type('unsigned long'))))")
    return int(out.split("V", 1)[1].strip()) & U64


@pytest.fixture(scope="module", params=list(MATRIX))
def booted(request, tmp_path_factory):
    """(name, KernelBuild, vm, gdb, before) for one kernel of the matrix;
    ``before`` holds what ran before gdb attached (dashboard, vmcore)."""
    from sbmdbg.kernel.build import build_kernel
    from sbmdbg.vm import VM, VMOptions
    from sbmdbg.vm.gdbmi import GdbSession

    name = request.param
    kwargs, has_sbm, layout, release, smp, mem = MATRIX[name]
    kb = build_kernel(**kwargs)
    opts = dict(kernel=str(kb.bzImage), vmlinux=str(kb.vmlinux), tree=str(kb.tree), smp=smp, mem=mem,
                pti="on")
    # the reference kernel's leg is the session's shared 2-vCPU PTI guest (same
    # kernel files and options: one boot); the other kernels boot their own
    pool = request.getfixturevalue("vm_pool") if not kwargs else None
    vm = pool.get(**opts) if pool is not None else VM(VMOptions(**opts))
    g = None
    try:
        assert vm.run("uname -r").output.strip().startswith(release)
        before = {"dashboard": _dashboard_once(vm, kb), "vmcore": _inspect_vmcore(vm, kb, tmp_path_factory)}
        g = GdbSession(kb.vmlinux, kb.tree, vm.info["gdb"])
        g.interrupt()
        yield name, kb, vm, g, before
    finally:
        if g is not None:
            g.close()
        if pool is None:
            vm.close()


def _dashboard_once(vm, kb) -> dict:
    """The dashboard's snapshot (--once --json) of the running guest, before gdb attaches."""
    info = vm.info
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dashboard", "--once", "--json",
                        "--gdb", info["gdb"], "--qmp", info["qmp"], "--vmlinux", str(kb.vmlinux),
                        "--ram", info["ram"], "--ram-size", str(info["ram_size"])],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    return json.loads(r.stdout[r.stdout.index("{"):])


def _inspect_vmcore(vm, kb, tmp_path_factory) -> dict:
    core = tmp_path_factory.mktemp("vmcore") / "vmcore.elf"
    from sbmdbg.inspect.offline import DUMP_TIMEOUT
    # 2 GiB of guest RAM take longer than QMP's default wait on a slow disk
    vm.qmp("dump-guest-memory", timeout=DUMP_TIMEOUT, paging=False, protocol=f"file:{core}")
    out = {}
    for cmd in ("pcpu", "status", "stack", "list", "audit"):
        r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "inspect", "--vmcore", str(core),
                            "--vmlinux", str(kb.vmlinux), "--json", cmd],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        out[cmd] = (r.returncode, r.stdout, r.stderr)
    core.unlink()
    return out


def test_pcpu_equals_plain_gdb(booted):
    name, kb, vm, g, _ = booted
    _, has_sbm, layout, _, ncpus, _ = MATRIX[name]
    got = sbm_json(g, "sbm pcpu all")
    assert got["layout"] == layout and len(got["cpus"]) == ncpus
    for row in got["cpus"]:
        cpu, f = row["cpu"], row["fields"]
        assert set(f) == LOGICAL, sorted(f)
        for field in sorted(f):
            if layout == "pcpu_hot":
                expr = f"$lx_per_cpu(pcpu_hot, {cpu}).{field}"
            else:
                var, member = VARS_61[field]
                expr = f'$lx_per_cpu("{var}", {cpu}){member}'
            assert int(f[field]) & U64 == gdb_int(g, expr), (name, cpu, field, expr)
        assert f["cpu_number"] == cpu
        # the current task, as scripts/gdb finds it on this kernel
        assert f["current_task"] == gdb_int(g, f"&$lx_current({cpu})")
        assert row["current"]["pid"] == gdb_int(g, f"$lx_current({cpu}).pid")
        assert row["vcpu"]["mode"] in ("kernel", "user"), row["vcpu"]
    ps = g.console("lx-ps", timeout=120)
    assert re.search(r"^\s*0x[0-9a-f]+\s+1\s+\S+", ps, re.M), ps[-2000:]  # pid 1 is listed


def test_pt_vtop_ptov_match_qemu(booted):
    name, kb, vm, g, _ = booted
    pc = sbm_json(g, "sbm pcpu")
    k = sbm_json(g, "sbm kernel")
    for cpu in range(len(pc["cpus"])):
        cr3 = pc["cpus"][cpu]["vcpu"]["cr3"]
        mine = sbm_json(g, f"sbm pt {cr3:#x} --raw")
        assert not mine["stats"]["truncated"]
        ours = [(m["va"], m["pa"], qemu_flags(m["leaf"], m["page_size"])) for m in mine["mappings"]]
        theirs = parse_info_tlb(vm.hmp("info tlb", cpu_index=cpu))
        assert len(theirs) > 100 and ours == theirs, next(((a, b) for a, b in zip(ours, theirs) if a != b), None)
    samples = [k["text"], pc["cpus"][1]["address"], pc["cpus"][1]["fields"]["top_of_stack"] - 8,
               pc["cpus"][0]["fields"]["current_task"], k["page_offset_base"] + 0x1234567]
    for va in samples:
        va &= U64
        mine = sbm_json(g, f"sbm vtop {va:#x}")
        m = re.search(r"gpa:\s*(0x[0-9a-f]+)", vm.hmp(f"gva2gpa {va:#x}", cpu_index=0))
        assert m and mine["pa"] == int(m.group(1), 16), (hex(va), mine.get("pa"))
        hits = sbm_json(g, f"sbm ptov {mine['pa']:#x}")
        assert va & ~0xFFF in [h["va"] & ~0xFFF for h in hits["vas"]], hex(va)


def test_generic_commands(booted):
    name, kb, vm, g, before = booted
    _, has_sbm, layout, _, ncpus, _ = MATRIX[name]
    st = sbm_json(g, "sbm")
    assert st["sbm"] is has_sbm
    assert st["note"] == (None if has_sbm else NO_SBM)
    assert [c["mode"] for c in st["cpus"]] and all(c["mode"] in ("kernel", "user") for c in st["cpus"])
    stk = sbm_json(g, "sbm stack")
    for c in stk["cpus"]:
        assert c["rsp_class"]["kind"] in ("task_stack", "irq_stack", "entry_stack"), c["rsp_class"]
        assert c["backtrace"]["frames"] and c["backtrace"]["frames"][0]["symbol"]
        assert c["top_of_intr_stack"] == c["top_of_stack"] and not c["intr_stack_is_sbm"]
    assert gdb_int(g, "$top_of_intr_stack(0)") == stk["cpus"][0]["top_of_stack"] & U64
    # a clean boot: no warning, bug or oops (checked while the guest runs)
    g.cont()
    dmesg = vm.run("dmesg").output
    g.interrupt()
    assert not re.search(r"WARNING:|BUG:|Oops|Call Trace", dmesg), dmesg[-3000:]
    kern = sbm_json(g, "sbm kernel")
    assert kern["pti"] is True and kern["percpu_layout"] == layout and kern["sbm"] is has_sbm
    # the dashboard's vCPU panel (before gdb attached)
    snap = before["dashboard"]["snapshot"]
    assert snap["sbm"] is has_sbm and "cpus_error" not in snap, snap.get("cpus_error")
    assert len(snap["cpus"]) == ncpus
    for v in snap["cpus"]:
        assert v["mode"] in ("kernel", "user") and v["task"].get("comm"), v
        assert "stack_error" not in v and v["top_of_stack"] and v["top_of_intr_stack"] == v["top_of_stack"]
    # inspect on a vmcore: the generic commands work
    rc, out, err = before["vmcore"]["pcpu"]
    assert rc == 0, err
    d = json.loads(out)
    assert d["layout"] == layout and [c["fields"]["cpu_number"] for c in d["cpus"]] == list(range(ncpus))
    rc, out, err = before["vmcore"]["stack"]
    assert rc == 0 and all(c["backtrace"]["frames"] for c in json.loads(out)["cpus"]), err
    rc, out, err = before["vmcore"]["status"]
    assert rc == 0 and json.loads(out)["sbm"] is has_sbm, err


def test_sbm_commands(booted, tmp_path):
    """Kernels without SBM: every SBM command, `$sbm_state`, `sbmdbg inspect
    list/audit` and the plugin tracer say the one line.  SBM kernels: the same
    commands answer; stopped at the first sandbox instruction, `sbm pcpu` says
    "sandbox" for that vCPU (the SBM model's mode, not "user" from CPL 3),
    `sbm` agrees, and `sbm audit` finds nothing above info."""
    name, kb, vm, g, before = booted
    if MATRIX[name][1]:
        _sbm_kernel(vm, g)
        return
    for cmd in SBM_COMMANDS:
        with pytest.raises(SbmdbgError) as e:
            g.console(cmd)
        msg = str(e.value)
        assert msg.endswith(NO_SBM) and "\n" not in msg, (cmd, msg)
    with pytest.raises(SbmdbgError, match=re.escape(NO_SBM)):
        g.console("output $sbm_state(0)")
    if MATRIX[name][2] != "pcpu_hot":
        with pytest.raises(SbmdbgError, match="no struct pcpu_hot"):
            g.console("output $pcpu_hot(0)")
    for cmd in ("list", "audit"):  # sbmdbg inspect on a vmcore: one line, exit 1
        rc, out, err = before["vmcore"][cmd]
        assert rc == 1 and err.strip() == f"sbmdbg: error: {NO_SBM}", (cmd, err)
    from sbmdbg.trace.fast import PluginTracer
    with pytest.raises(SbmdbgError) as e:
        PluginTracer(vm, str(tmp_path / "t.jsonl")).start()
    assert str(e.value) == NO_SBM


def _sbm_kernel(vm, g) -> None:
    assert sbm_json(g, "sbm list")["sandboxes"] == []   # no sandbox is active now
    assert "x86_sbm_state" in g.console("output $sbm_state(0)")
    g.mi("-break-insert -t *__sbm_thunk_sbm_demo_compute")
    g.cont()
    vm.serial.send("echo ok > /sys/kernel/debug/sbm_demo/run\n")
    stop = g.wait_stopped(120)
    cpu = int(stop.get("thread-id", "1")) - 1
    pc = sbm_json(g, "sbm pcpu all")
    row = pc["cpus"][cpu]
    assert row["vcpu"]["cpl"] == 3 and row["vcpu"]["mode"] == "sandbox", row["vcpu"]
    assert row["vcpu"]["cr3_role"].startswith("sandbox:") and row["vcpu"]["sandbox"]
    st = sbm_json(g, "sbm")
    assert st["cpus"][cpu]["mode"] == "sandbox" and st["sandboxes"] == 1
    assert sbm_json(g, "sbm audit")["above_info"] is False
    g.cont()
    assert "result=PASS" in vm.run("cat /sys/kernel/debug/sbm_demo/run").output
    g.interrupt()
