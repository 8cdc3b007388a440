"""A guest shell that does not answer: the error says what QEMU sees (run
state, each vCPU's RIP/CPL/HLT, its APIC's in-service and pending vectors),
parsed from QEMU 7.2's own HMP text (recorded below)."""
from __future__ import annotations

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.vm.vm import VM

pytestmark = pytest.mark.unit

REGS = """RAX=0000000000000000 RBX=ffff8880001d2000 RCX=0000000000000046 RDX=0000000000000000
RIP=ffffffff8117c8fc RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
CR0=80050033 CR2=0000000000000000 CR3=0000000001614000 CR4=00350ef0
"""
LAPIC = """dumping local APIC state for CPU 0

ESR	 0x00000000
ISR	 (none)
IRR	 (none)

APR 0x00 TPR 0x10 DFR 0x0f LDR 0x00 PPR 0x10
"""


class FakeVM(VM):
    def __init__(self, status="running", isr="(none)", fail=None):
        self.status, self.isr, self.fail = status, isr, fail

    def qmp(self, cmd, timeout=None, **args):
        if self.fail:
            raise SbmdbgError(self.fail)
        return {"query-status": {"status": self.status},
                "query-cpus-fast": [{"cpu-index": 0}, {"cpu-index": 1}]}[cmd]

    def hmp(self, cmdline, cpu_index=None):
        if cmdline == "info lapic":
            return LAPIC.replace("ISR\t (none)", f"ISR\t {self.isr}") if cpu_index == 1 else LAPIC
        return REGS


def test_report_names_state_and_every_vcpu():
    rep = FakeVM(status="paused", isr="36").stuck_report().splitlines()
    assert rep[0] == "qemu status: paused"
    assert rep[1] == ("cpu 0: RIP=ffffffff8117c8fc RFL=00000246 CPL=0 HLT=1 CR3=0000000001614000 "
                      "ISR=(none) IRR=(none)")
    assert rep[2].startswith("cpu 1: ") and rep[2].endswith("ISR=36 IRR=(none)")
    assert len(rep) == 3


def test_report_never_fails_itself():
    rep = FakeVM(fail="QMP socket gone").stuck_report()
    assert rep == "(QEMU state unavailable: QMP socket gone)"


class StuckSerial:
    connected = True

    def run(self, cmd, timeout=30.0):
        raise SbmdbgError(f"guest command {cmd!r} did not finish in {timeout:g} s", detail="~ # ")


def test_run_timeout_carries_the_report():
    vm = FakeVM(status="debug")
    vm.serial = StuckSerial()
    with pytest.raises(SbmdbgError) as e:
        vm.run("kill 1", timeout=2)
    assert str(e.value).splitlines()[0] == "guest command 'kill 1' did not finish in 2 s"
    assert "~ # " in e.value.detail and "qemu status: debug" in e.value.detail
    assert "cpu 1: RIP=ffffffff8117c8fc" in e.value.detail
