"""Live checks of the SBM model on the reference kernel (one VM for the module).

* stopped in a sandbox (breakpoint on the demo thunk, `echo ok > run`):
  `sbm` shows that vCPU in sandbox mode at CPL 3 with the right sandbox;
  `sbm show` agrees with the kernel's own view ($cr3 == sbm_cr3,
  $lx_current().thread_info.sbm_state == the state); the state page reads
  through the sandbox root and zeros through the kernel root; `sbm stack`
  puts rsp on the SBM sandbox stack and the backtrace reaches
  arch_sbm_exec / sbm_exec / demo_run_one; `sbm audit` finds nothing above
  info; a vmcore dumped at that stop gives the same JSON offline.
* stopped in handle_sbm_fault (write_kernel_data): the pt_regs frame is on
  the SBM exception stack ($rdi), CS = __SBM_CS, top_of_intr_stack =
  exc_stack + 8 KiB, and the backtrace crosses pt_regs -> sandbox -> kernel.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import types

import pytest
from demo_helpers import Stop, gdb_int, sbm_json, shm_gdb

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def guest(vm_pool):
    """The session's shared PTI-on VM, one gdb for the module."""
    vm = vm_pool.get(smp=2, pti="on")
    with shm_gdb(vm) as g:
        yield vm, g


def _info_mem(vm, cpu: int) -> list[tuple[int, int, str]]:
    """QEMU's `info mem` for *cpu*'s CR3: (start, end, "urw"-style perms)."""
    out = []
    for line in vm.hmp("info mem", cpu_index=cpu).splitlines():
        m = re.match(r"([0-9a-f]{16})-([0-9a-f]{16}) [0-9a-f]+ ([u-][r-][w-])$", line.strip())
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16), m.group(3)))
    assert out, "QEMU printed no `info mem` ranges"
    return out


def _merge(iv) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    pairs = [(x["va"], x["end"]) if isinstance(x, dict) else (x[0], x[1]) for x in iv]
    for lo, hi in sorted(pairs):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(x) for x in out]


def _minus(a, b) -> list[tuple[int, int]]:
    """Merged intervals of *a* not covered by *b*."""
    out, b = [], _merge(b)
    for lo, hi in _merge(a):
        for blo, bhi in b:
            if bhi <= lo or blo >= hi:
                continue
            if blo > lo:
                out.append((lo, blo))
            lo = max(lo, bhi)
        if lo < hi:
            out.append((lo, hi))
    return _merge(out)


def _perm_clash(a, b) -> list[tuple[int, int]]:
    """Where both map with different user/write bits (what `info mem` shows)."""
    out = []
    for alo, ahi, ap in a:
        for blo, bhi, bp in b:
            lo, hi = max(alo, blo), min(ahi, bhi)
            if lo < hi and ap != bp:
                out.append((lo, hi))
    return _merge(out)


def test_stopped_in_sandbox(guest, tmp_path):
    vm, g = guest
    s = Stop(vm, g, "__sbm_thunk_sbm_demo_compute", "ok")
    try:
        st = sbm_json(g, "sbm")
        row = st["cpus"][s.cpu]
        assert st["sbm"] and row["mode"] == "sandbox" and row["cpl"] == 3, row
        assert row["rip_symbol"]["symbol"] == "__sbm_thunk_sbm_demo_compute"
        assert row["stack"]["kind"] == "sbm_sandbox_stack"
        other = st["cpus"][1 - s.cpu]
        assert other["mode"] in ("kernel", "user")

        lst_doc = sbm_json(g, "sbm list")
        lst = lst_doc["sandboxes"]
        assert lst_doc["discovery"]["mode"] == "cpus"   # arch_sbm_exec under kernel_fpu_begin (issue 17)
        assert len(lst) == 1 and lst[0]["cpus"] == [s.cpu]
        sb = lst[0]
        assert row["sandbox"] == sb["label"] == f"sandbox:{sb['pid']}" and sb["comm"] == "sh"
        # the kernel's own view, through gdb (selected thread = the stopped vCPU)
        assert gdb_int(g, "$cr3") == sb["fields"]["sbm_cr3"]
        assert gdb_int(g, "$lx_current().thread_info.sbm_state") == sb["state"]
        assert gdb_int(g, f"$sbm_state({s.cpu})") == sb["state"]
        assert g.console(f"output $sbm_mode({s.cpu})").strip() == '"sandbox"'
        assert gdb_int(g, f"$pcpu_hot({s.cpu}).current_task") == sb["task"]
        show = sbm_json(g, f"sbm show cpu{s.cpu}")["sandboxes"][0]
        sp = show["state_page"]
        assert sp["sandbox_maps_state_page"] and sp["kernel_reads_zero"]
        assert sp["sandbox_root"]["pa"] == show["state_pa"] != sp["kernel_root"]["pa"]
        assert sp["sandbox_root"]["fields"] == show["fields"]
        assert sp["sandbox_root"]["global"] is False and sp["sandbox_root"]["user"] is False
        assert set(sp["kernel_root"]["fields"].values()) == {0}
        bufs = {b["direction"]: b for b in show["sbm"]["buffers"]}
        assert set(bufs) == {"input", "output"} and bufs["input"]["size"] == 64
        assert show["sbm"]["error"] == 0 and show["sbm"]["private"] == sb["state"]
        kinds = {r["kind"] for r in show["map"]}
        assert {"kernel_text", "entry_text", "state_page", "sandbox_stack", "exception_stack",
                "input_buffer", "output_buffer", "task_struct", "task_stack", "percpu",
                "tss", "gdt", "idt", "entry_stack", "ist_stack"} <= kinds
        assert "unknown" not in kinds
        # the sandbox root through the foundation commands (the SBM extension sbm.open_kernel attaches)
        st_va = show["state_page"]["va"]
        assert sbm_json(g, "sbm vtop &linux_banner")["va"] == gdb_int(g, "&linux_banner")  # a gdb expression
        v = sbm_json(g, f"sbm vtop {st_va:#x} --root sandbox={sb['pid']}")
        assert v["pa"] == show["state_pa"] and v["root_label"] == sb["label"]
        assert sbm_json(g, f"sbm vtop {st_va:#x}")["pa"] != show["state_pa"]

        stk = sbm_json(g, f"sbm stack {s.cpu}")["cpus"][0]
        assert stk["rsp_class"]["kind"] == "sbm_sandbox_stack"
        assert stk["top_of_intr_stack"] == show["fields"]["exc_stack"] + 8192
        assert gdb_int(g, f"$top_of_intr_stack({s.cpu})") == stk["top_of_intr_stack"]
        assert gdb_int(g, f"$top_of_instr_stack({s.cpu})") == stk["top_of_intr_stack"]
        syms = [f.get("symbol") or "" for f in stk["backtrace"]["frames"]]
        ctx = [f["context"] for f in stk["backtrace"]["frames"]]
        assert syms[0].startswith("__sbm_thunk_sbm_demo_compute")
        assert any(x.startswith("x86_sbm_return") for x in syms)
        for fn in ("arch_sbm_exec", "sbm_exec", "demo_run_one"):
            assert any(x.startswith(fn + "+") for x in syms), (fn, syms)
        assert ctx.index("boundary") > ctx.index("sandbox") and "kernel" in ctx[ctx.index("boundary"):]
        assert any(f.get("boundary") and f["sp"] == show["fields"]["return_sp"]
                   for f in stk["backtrace"]["frames"])

        out = g.console("sbm audit")
        assert "worst = info" in out and "error" not in out.lower(), out
        d = sbm_json(g, "sbm diff kernel sandbox")
        assert d["only_a"] and d["perms_differ"]       # the sandbox maps a subset, user text etc.
        assert any(r["va"] <= st_va < r["end"] for r in d["pa_differ"])   # the state page
        # `sbm diff` of the two vCPUs' roots against QEMU's `info mem` of each
        cr3 = {c["cpu"]: c["vcpu"]["cr3"] for c in sbm_json(g, "sbm pcpu")["cpus"]}
        other = 1 - s.cpu
        dq = sbm_json(g, f"sbm diff {cr3[other]:#x} {cr3[s.cpu]:#x}")
        qa, qb = _info_mem(vm, other), _info_mem(vm, s.cpu)
        assert _merge(dq["only_a"]) == _minus(qa, qb)
        assert _merge(dq["only_b"]) == _minus(qb, qa)
        clash = _perm_clash(qa, qb)
        assert clash and _minus(clash, dq["perms_differ"]) == [], (clash, dq["perms_differ"])

        # offline: a vmcore taken at this stop gives the same JSON
        want = {"status": st, "list": lst_doc, "show": sbm_json(g, "sbm show"),
                "stack": sbm_json(g, "sbm stack"), "audit": sbm_json(g, "sbm audit"),
                "pcpu": sbm_json(g, "sbm pcpu")}
        for cmd in ("diff kernel sandbox", f"vtop {st_va:#x} --root sandbox={sb['pid']}",
                    f"pt sandbox={sb['pid']} --raw"):
            want[cmd] = sbm_json(g, "sbm " + cmd)
        core = tmp_path / "vmcore"
        subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dump", "--qmp", vm.info["qmp"], "-o", str(core)],
                       check=True, timeout=300)
        r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "inspect", "--vmcore", str(core),
                            "--vmlinux", vm.info["vmlinux"], "--json", "status"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == want["status"]

        def inspect(*argv):
            r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "inspect", "--vmcore", str(core),
                                "--vmlinux", vm.info["vmlinux"], *argv], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, (argv, r.stderr)
            return r.stdout
        # the CLI's diff, vtop and pt give gdb's JSON (taken at the same stop)
        for cmd in ("diff kernel sandbox", f"vtop {st_va:#x} --root sandbox={sb['pid']}",
                    f"pt sandbox={sb['pid']} --raw"):
            got = json.loads(inspect("--json", *cmd.split()))
            for d in (got, want[cmd]):
                d.get("stats", {}).pop("seconds", None)       # a timing, not an answer
            assert got == want[cmd], cmd
        # the paging commands of the table: same JSON (vCPU 0's roots on both sides), and
        # `inspect pt` prints gdb's table, not JSON
        g.console("thread 1")
        text = gdb_int(g, "&_text")
        lo_hi = f"{text:#x}-{text + 0x400000:#x}"
        for cmd in (f"pt kernel --range {lo_hi}", f"pt sandbox --range {lo_hi}", f"vtop {text:#x} --root user",
                    f"vtop {st_va:#x} --root sandbox", f"ptov {want['pcpu']['root']:#x}", "pcpu 1"):
            gd, off = sbm_json(g, f"sbm {cmd}"), json.loads(inspect(*cmd.split(), "--json"))
            gd.get("stats", {}).pop("seconds", None), off.get("stats", {}).pop("seconds", None)
            assert off == gd, cmd
        k_gdb, k_off = sbm_json(g, "sbm kernel"), json.loads(inspect("--json", "kernel"))
        assert k_off.pop("memory")["memory"] == "vmcore" and k_gdb.pop("memory")["memory"] == "shm"
        assert k_off == k_gdb
        out_pt = inspect("pt", "kernel", "--range", lo_hi)
        assert out_pt == g.console(f"sbm pt kernel --range {lo_hi}", timeout=120), out_pt[:2000]
        assert "perms" in out_pt and "{" not in out_pt
        assert inspect("vtop", f"{text:#x}") == g.console(f"sbm vtop {text:#x}")
        from sbmdbg.commands import COMMANDS
        from sbmdbg.inspect.offline import open_vmcore
        k = open_vmcore(str(core), vm.info["vmlinux"])
        try:
            ns = types.SimpleNamespace
            for name, args in (("list", ns()), ("show", ns(sandbox=None, no_map=False)),
                               ("stack", ns(cpu="all")), ("audit", ns(sandbox=None)), ("pcpu", ns(cpu="all"))):
                assert json.loads(json.dumps(COMMANDS[name](k, args))) == want[name], name
        finally:
            k.target.close()
    finally:
        out = s.finish()
    assert "scenario=ok" in out and "result=PASS" in out, out


def test_stopped_in_handle_sbm_fault(guest):
    vm, g = guest
    s = Stop(vm, g, "handle_sbm_fault", "write_kernel_data")
    try:
        row = sbm_json(g, "sbm")["cpus"][s.cpu]
        assert row["mode"] == "sandbox (in kernel handler)" and row["cpl"] == 0, json.dumps(row)[:1500]
        assert row["stack"]["kind"] == "sbm_exception_stack"
        stk = sbm_json(g, f"sbm stack {s.cpu}")["cpus"][0]
        sb = sbm_json(g, f"sbm show cpu{s.cpu} --no-map")["sandboxes"][0]
        exc_top = sb["fields"]["exc_stack"] + 8192
        pr = stk["exc_pt_regs"]
        assert pr["address"] == gdb_int(g, "$rdi") == gdb_int(g, "regs")
        assert pr["top"] == exc_top == stk["top_of_intr_stack"] == gdb_int(g, f"$top_of_intr_stack({s.cpu})")
        assert pr["from_sandbox"] and pr["regs"]["cs"] == 0x30
        assert pr["ip_symbol"].startswith("__sbm_thunk_sbm_demo_write_data")
        assert stk["top_of_stack"] != stk["top_of_intr_stack"]
        fr = stk["backtrace"]["frames"]
        syms = [f.get("symbol") or "" for f in fr]
        assert syms[0].startswith("handle_sbm_fault")
        i_regs = next(i for i, f in enumerate(fr) if f.get("pt_regs"))
        assert fr[i_regs]["pt_regs"] == pr["address"] and fr[i_regs + 1]["context"] == "sandbox"
        assert any(x.startswith("arch_sbm_exec+") for x in syms[i_regs:])
        assert any(x.startswith("demo_run_one+") for x in syms[i_regs:])
    finally:
        out = s.finish()
    assert "scenario=write_kernel_data" in out and "sbm_error=-14" in out and "PASS" in out, out
