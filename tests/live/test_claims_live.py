"""Claims of the README that had no test, each against a source we did not
write: the `sbmdbg trace` CLI (the guest's own report lines, QEMU's -d int
log) and gdb's `sbm trace export`; a wrong vmlinux on a live VM (plain gdb
and pyelftools read the banners); the SBM model, audit and tracer under
5-level paging (QEMU's `info tlb`, the demo module's counters)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from demo_helpers import DEMO, demo_stats, run_scenario, sbm_json, stopped_in_sandbox

from sbmdbg.paths import REPO_ROOT
from sbmdbg.target.qmp import info_tlb_flags as qemu_flags, parse_info_tlb, parse_info_registers

pytestmark = pytest.mark.live


def _cli(*args, timeout=500):
    return subprocess.run([sys.executable, "-m", "sbmdbg.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=timeout, stdin=subprocess.DEVNULL)


def test_trace_cli_record_show_export_check(kernel_build, tmp_path):
    """`sbmdbg trace record --boot --via gdb` while the guest runs three
    scenarios; `show`, `export` and `check` on the file; gdb's `sbm trace
    export` writes the same Perfetto document as the CLI."""
    qlog, trace = tmp_path / "qemu.log", tmp_path / "t.jsonl"
    scen = ["ok", "write_kernel_data", "noncanonical"]
    run = "; ".join(f"echo {s} > {DEMO}/run; cat {DEMO}/run" for s in scen)
    r = _cli("vm", "start", "--detach", "--json", "--pti", "on", "--qemu-log", qlog)
    assert r.returncode == 0, r.stderr[-3000:]
    vm_id = json.loads(r.stdout)["id"]
    try:
        start = qlog.stat().st_size          # the KUnit suite's faults at boot are before this
        r = _cli("trace", "record", "--id", vm_id, "--via", "gdb", "--level", "full", "--file", trace,
                 "--run", run, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        stop = _cli("vm", "stop", vm_id)
    assert stop.returncode == 0, stop.stderr
    d = json.loads(r.stdout)
    # the guest's own report lines: what ran, and which ones aborted
    lines = re.findall(r"scenario=(\w+) ret=(-?\d+) sbm_error=(-?\d+) result=(\w+)", d["guest_output"])
    assert [x[0] for x in lines] == scen and all(x[3] == "PASS" for x in lines), d["guest_output"]
    guest_aborts = sum(1 for x in lines if int(x[2]) != 0)
    s = d["status"]["summary"]
    assert (s["calls"], s["returns"], s["aborts"]) == (len(scen), len(scen) - guest_aborts, guest_aborts)

    r = _cli("trace", "show", trace, "--json")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["summary"]["calls"], shown["summary"]["aborts"]) == (len(scen), guest_aborts)
    assert len(shown["events"]) == len(trace.read_text().splitlines())
    r = _cli("trace", "show", trace)
    assert r.returncode == 0 and f"{len(scen)} calls, {len(scen) - guest_aborts} returns, " \
        f"{guest_aborts} aborts" in r.stdout, r.stdout[-2000:]

    out = tmp_path / "cli.perfetto.json"
    r = _cli("trace", "export", trace, "--perfetto", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(slices) == len(scen) and sum(e["cat"] == "abort" for e in slices) == guest_aborts

    # QEMU's exception log: every traced fault is there, and no sandbox fault is missing
    r = _cli("trace", "check", trace, "--qemu-log", qlog, "--start-offset", start)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    chk = json.loads(r.stdout)
    assert chk["missing_from_log"] == [] and chk["missing_from_trace"] == []
    assert chk["logged_faults"] >= guest_aborts

    # gdb's `sbm trace export` (no target needed for a file)
    out2 = tmp_path / "gdb.perfetto.json"
    g = subprocess.run(["gdb", "-nx", "-batch", "-x", str(REPO_ROOT / "gdb_scripts" / "sbmdbg.py"),
                        "-ex", f"sbm trace export --perfetto {out2} {trace}"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out2.exists(), g.stdout + g.stderr
    assert json.loads(out2.read_text()) == doc


def _elf_bytes(path, symbol: str, n: int) -> bytes:
    """A symbol's bytes in an ELF file, read with pyelftools (not sbmdbg)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        elf = ELFFile(f)
        sym = elf.get_section_by_name(".symtab").get_symbol_by_name(symbol)[0]
        addr = sym["st_value"]
        for sec in elf.iter_sections():
            if sec["sh_addr"] <= addr < sec["sh_addr"] + sec["sh_size"] and sec["sh_type"] == "SHT_PROGBITS":
                off = sec["sh_offset"] + addr - sec["sh_addr"]
                f.seek(off)
                return off, f.read(n)
    raise AssertionError(f"{symbol} not in a PROGBITS section of {path}")


def test_wrong_vmlinux_on_a_live_vm(shared_vm, tmp_path):
    """A vmlinux whose linux_banner differs from the running kernel's: plain
    gdb shows the guest's banner is the reference vmlinux's and not the
    copy's; `sbm kernel` refuses with one line."""
    vm = shared_vm(pti="on")
    wrong = tmp_path / "vmlinux"
    shutil.copyfile(vm.info["vmlinux"], wrong)
    off, banner = _elf_bytes(wrong, "linux_banner", 48)
    assert banner.startswith(b"Linux version ")
    with open(wrong, "r+b") as f:        # "Linux version" -> "Linux versioN"
        f.seek(off + 12)
        f.write(b"N")
    from sbmdbg.vm.gdbmi import GdbSession

    g = GdbSession(str(wrong), vm.info["tree"], vm.info["gdb"])
    try:
        # the guest's bytes, read by plain gdb from the target (no KASLR: link
        # address = run address): the reference banner, not the copy's
        guest = g.console('printf "%s", linux_banner')
        assert guest[:40] == banner[:40].decode(), (guest, banner[:40])
        with pytest.raises(Exception) as ei:
            g.console("sbm kernel")
        msg = str(ei.value)
        assert "vmlinux does not match the running kernel" in msg and "linux_banner" in msg, msg
        assert "Traceback" not in msg and msg.count("\n") == 0, msg
    finally:
        g.close()


def test_sbm_model_audit_and_tracer_under_la57(shared_vm, gdb_session, tmp_path):
    """5-level paging: stopped in a sandbox, `sbm` sees the sandbox, the audit
    finds nothing above info, `sbm pt` of the sandbox root equals QEMU's
    `info tlb` of the stopped vCPU; the no-stop tracer counts what the demo
    module counts."""
    from sbmdbg.trace.events import read_events, summarize
    from sbmdbg.trace.fast import PluginTracer

    vm = shared_vm(pti="off", la57=True)
    assert parse_info_registers(vm.hmp("info registers", cpu_index=0))["cr4"] >> 12 & 1, \
        "5-level paging is not active in the guest"
    path = tmp_path / "t.jsonl"
    before = demo_stats(vm)
    t = PluginTracer(vm, str(path))
    try:
        t.start()
        for sc in ("ok", "write_kernel_data", "noncanonical", "read_null"):
            run_scenario(vm, sc)
        t.poll()
        t.stop()
    finally:
        t.close()
    s = summarize(read_events(str(path), strict=True))
    assert (s["calls"], s["returns"], s["aborts"]) == tuple(a - b for a, b in zip(demo_stats(vm), before))
    assert s["aborts"] == 3

    g = gdb_session(vm)
    with stopped_in_sandbox(vm, g, timeout=180) as (cpu, _):
        k = sbm_json(g, "sbm kernel")
        assert k["la57"] and k["levels"] == 5
        row = sbm_json(g, "sbm")["cpus"][cpu]
        assert row["mode"] == "sandbox" and row["cpl"] == 3, row
        sb = sbm_json(g, "sbm list")["sandboxes"]
        assert len(sb) == 1 and sb[0]["cpus"] == [cpu]
        audit = sbm_json(g, "sbm audit")
        assert not audit["above_info"], audit
        mine = sbm_json(g, f"sbm pt sandbox={sb[0]['pid']} --raw")
        assert not mine["stats"]["truncated"] and not mine["findings"]
        ours = [(m["va"], m["pa"], qemu_flags(m["leaf"], m["page_size"])) for m in mine["mappings"]]
        theirs = parse_info_tlb(vm.hmp("info tlb", cpu_index=cpu))
        assert len(theirs) > 10 and ours == theirs, next((a, b) for a, b in zip(ours, theirs) if a != b)
