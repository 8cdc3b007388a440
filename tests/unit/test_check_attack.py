"""`transitions.attack` (issue 15): some event of the step names the attack;
the failure message lists what the events did name."""
from __future__ import annotations

import pytest

from sbmdbg.check import spec
from sbmdbg.check.transitions import check_transitions
from sbmdbg.errors import SbmdbgError

pytestmark = pytest.mark.unit

EVENTS = [
    {"seq": 1, "kind": "enter"},
    {"seq": 2, "kind": "irq", "vector": 236, "attack": "gs_base",
     "attack_evidence": ["GS base 0x0 at the interrupt: not the CPU's per-CPU base"]},
    {"seq": 3, "kind": "abort", "vector": 6, "attack": "syscall", "attack_insn": "syscall"},
    {"seq": 4, "kind": "exit", "error": -14},
]


def _t(body: str):
    return spec.loads(f'[[step]]\ndemo = "syscall"\ntransitions = {body}\n').steps[0].transitions


def test_attack_named_by_some_event():
    assert check_transitions(_t('{attack = "syscall", abort = {attack = "syscall"}}'), EVENTS) == []
    assert check_transitions(_t('{attack = "gs_base"}'), EVENTS) == []


def test_attack_missing_says_what_was_named():
    fails = check_transitions(_t('{attack = "int1"}'), EVENTS)
    assert fails == ["transitions: expected an event naming the attack 'int1', saw gs_base, syscall "
                     "(recorded: abort=1, enter=1, exit=1, irq=1)"]
    fails = check_transitions(_t('{attack = "int1"}'), EVENTS[:1])
    assert "saw none named" in fails[0]


def test_attack_must_be_a_string():
    with pytest.raises(SbmdbgError, match="attack"):
        _t("{attack = 3}")


INSNS = EVENTS + [{"seq": 5, "kind": "sandbox_insn", "insn": "wrfsbase", "bytes": "f3480faed0"},
                  {"seq": 6, "kind": "sandbox_insn", "insn": "popf", "bytes": "9d"}]


def test_insn_named_by_the_instruction_watch():
    assert check_transitions(_t('{level = "plugin", insn = "wrfsbase", insns = {op = ">=", value = 2}}'),
                             INSNS) == []
    fails = check_transitions(_t('{level = "plugin", insn = "wrgsbase"}'), INSNS)
    assert fails == ["transitions: expected the tracer to name the sandbox instruction 'wrgsbase', saw popf, "
                     "wrfsbase (recorded: abort=1, enter=1, exit=1, irq=1, sandbox_insn=2)"]
    assert "saw no sandbox instruction" in check_transitions(_t('{level = "plugin", insn = "cli"}'), EVENTS)[0]


def test_insn_needs_the_plugin_tracer():
    with pytest.raises(SbmdbgError, match='need level = "plugin"'):
        _t('{insn = "wrfsbase"}')
    with pytest.raises(SbmdbgError, match="insn"):
        _t('{level = "plugin", insn = 3}')


def _step(body: str):
    return spec.loads(f'[[step]]\n{body}\n').steps[0]


def test_nmi_storm_external_and_qmp_nmi_are_checked():
    st = _step('demo = "nmi_storm 100 external"\nqmp_nmi = true')
    assert st.qmp_nmi and st.demo == "nmi_storm 100 external"
    for bad in ('demo = "nmi_storm 100 internal"', 'demo = "nmi_storm x external"',
                'demo = "nmi_storm 1 external 2"'):
        with pytest.raises(SbmdbgError, match="nmi_storm N external"):
            _step(bad)
    with pytest.raises(SbmdbgError, match="qmp_nmi"):
        _step('demo = "ok"\nqmp_nmi = 1')
    with pytest.raises(SbmdbgError, match="qmp_nmi needs a command"):
        _step('break = "x86_sbm_exec"\nqmp_nmi = true')


def test_nmi_storm_sends_until_the_block_ends():
    import threading

    from sbmdbg.check.runner import NmiStorm

    class VM:
        def __init__(self, fail_after=None):
            self.n, self.fail_after, self.seen = 0, fail_after, threading.Event()

        def qmp(self, cmd):
            assert cmd == "inject-nmi"
            if self.fail_after is not None and self.n >= self.fail_after:
                raise SbmdbgError("QMP: connection closed")
            self.n += 1
            if self.n >= 3:
                self.seen.set()

    vm = VM()
    with NmiStorm(vm, pause_s=0) as s:
        assert vm.seen.wait(30)
    n = vm.n
    assert s.sent == n >= 3 and s.error is None
    with NmiStorm(vm, on=False) as off:
        pass
    assert off.sent == 0 and vm.n == n
    dead = VM(fail_after=2)
    with NmiStorm(dead, pause_s=0) as s:
        pass
    assert s.sent <= 2
    with NmiStorm(VM(fail_after=0), pause_s=0) as s:
        s._t.join(30)
    assert s.sent == 0 and s.error == "QMP: connection closed"
    # bounded: a slowed guest's command always ends (no storm-without-end feedback)
    capped = VM()
    with NmiStorm(capped, pause_s=0, max_sent=5) as s:
        s._t.join(30)
        assert not s._t.is_alive()
    assert s.sent == capped.n == 5 and s.error is None


def test_attack_and_insn_counts():
    evs = INSNS + [dict(INSNS[-2], seq=7), {"seq": 8, "kind": "exit", "attack": "syscall"}]
    t = _t('{level = "plugin", attack_counts = {syscall = 2, gs_base = {op = ">=", value = 1}}, '
           'insn_counts = {wrfsbase = 2, popf = 1, "int $0x80" = {op = "<", value = 1}}}')
    assert check_transitions(t, evs) == []
    fails = check_transitions(_t('{level = "plugin", attack_counts = {int1 = 40}, insn_counts = {wrfsbase = 3}}'), evs)
    assert fails == [
        "transitions: expected events naming the attack 'int1' == 40, saw 0 (named: gs_base=1, syscall=2)",
        "transitions: expected sandbox_insn events naming 'wrfsbase' == 3, saw 2 (named: popf=1, wrfsbase=2)"]
    with pytest.raises(SbmdbgError, match='need level = "plugin"'):
        _t('{insn_counts = {wrfsbase = 1}}')
    with pytest.raises(SbmdbgError, match="attack_counts"):
        _t('{attack_counts = 3}')
