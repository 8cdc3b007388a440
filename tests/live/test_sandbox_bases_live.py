"""`sbm` flags what a hostile sandbox did to its vCPU's bases (issue 15),
live: stopped in the sandbox right after the catalogue's `wrfsbase` (FS base
0x5bad000, not the caller's thread.fsbase) and after its `wrgsbase` (GS
base 0, not the CPU's per-CPU base; gs_selector's `mov %eax,%gs` is followed
by the instruction its control also runs, so it cannot be stopped after).  The breakpoint is
on the instruction after the attack's, found in vmlinux's bytes of the
sandboxed function (the positive control runs first and does not pass it)."""
from __future__ import annotations

import threading

import pytest
from demo_helpers import sbm_json, shm_gdb

pytestmark = pytest.mark.live

THUNK = "__sbm_thunk_sbm_demo_attack"


def _after(vmlinux: str, insn: bytes) -> int:
    """Link-time address of the instruction after ``insn`` in THUNK."""
    from elftools.elf.elffile import ELFFile

    with open(vmlinux, "rb") as fh:
        elf = ELFFile(fh)
        [sym] = elf.get_section_by_name(".symtab").get_symbol_by_name(THUNK)
        text = elf.get_section_by_name(".text")
        off = sym["st_value"] - text["sh_addr"]
        code = text.data()[off:off + sym["st_size"]]
    i = code.find(insn)
    assert i >= 0 and code.count(insn) == 1, f"{insn.hex()} not once in {THUNK}"
    return sym["st_value"] + i + len(insn)


@pytest.fixture(scope="module")
def guest(vm_pool):
    vm = vm_pool.get(smp=2, pti="off")
    with shm_gdb(vm) as g:
        yield vm, g


def _stop_in(vm, g, where: str, scenario: str):
    """Break at ``where``, run ``scenario`` in the background; (vCPU, thread, output dict)."""
    g.interrupt()
    g.mi(f"-break-insert -t {where}")
    g.cont()
    out = {}
    t = threading.Thread(target=lambda: out.update(r=vm.run(
        f"echo {scenario} > /sys/kernel/debug/sbm_demo/run; cat /sys/kernel/debug/sbm_demo/run",
        timeout=180)), daemon=True)
    t.start()
    stop = g.wait_stopped(90)
    assert stop.get("reason") == "breakpoint-hit", stop
    return int(stop["thread-id"]) - 1, t, out


def test_no_alarm_in_a_harmless_sandbox(guest):
    """In the `ok` sandbox the FS and GS bases are what the kernel expects."""
    vm, g = guest
    cpu, t, out = _stop_in(vm, g, "__sbm_thunk_sbm_demo_compute", "ok")
    try:
        row = sbm_json(g, "sbm")["cpus"][cpu]
        assert row["mode"] == "sandbox" and not row.get("attack_evidence"), row
    finally:
        g.cont()
        t.join(120)
    assert "result=PASS" in out["r"].output


@pytest.mark.parametrize("scenario, insn, says", [
    ("wrfsbase", b"\xf3\x48\x0f\xae\xd0", "FS base 0x5bad000 on cpu {cpu}: not "),
    ("wrgsbase", b"\xf3\x48\x0f\xae\xd8", "GS base 0x0 on cpu {cpu}: not its per-CPU base"),
])
def test_sbm_flags_the_base_a_sandbox_wrote(guest, scenario, insn, says):
    vm, g = guest
    cpu, t, out = _stop_in(vm, g, f"*{_after(vm.info['vmlinux'], insn):#x}", scenario)
    try:
        row = sbm_json(g, "sbm")["cpus"][cpu]
        assert row["mode"] == "sandbox" and row["cpl"] == 3, row
        ev = row.get("attack_evidence") or []
        assert any(e.startswith(says.format(cpu=cpu)) for e in ev), ev
        others = [r for r in sbm_json(g, "sbm")["cpus"] if r["cpu"] != cpu]
        assert all(not r.get("attack_evidence") for r in others), others     # no false alarm
    finally:
        g.cont()
        t.join(120)
    assert "result=PASS" in out["r"].output and "state=ok" in out["r"].output, out["r"].output
