"""The check runner must fail, not pass with a note, when it cannot check."""
from __future__ import annotations

import pytest

from sbmdbg.check import runner as R
from sbmdbg.check import spec
from sbmdbg.check.runner import Runner, StepResult

pytestmark = pytest.mark.unit


class FakeGdb:
    """Console commands recorded; `help sbm trace` answers *help*."""

    def __init__(self, help_text="sbm trace: start|stop"):
        self.help = help_text
        self.log: list[str] = []

    def console(self, cmd, timeout=None):
        self.log.append(cmd)
        if cmd == "help sbm trace":
            if self.help is None:
                raise R.SbmdbgError("gdb: Undefined sbm command: \"trace\"")
            return self.help
        return ""

    def interrupt(self, timeout=None):
        self.log.append("<interrupt>")

    def cont(self, timeout=None):
        self.log.append("<cont>")


class FakeMachine:
    def __init__(self, g):
        self.g = g
        self.trace_ok = None
        self.vm = type("VM", (), {"info": {}})()

    def gdb(self):
        return self.g


def _step(text):
    return spec.loads(text, "t.toml").steps[0]


def test_transitions_without_tracer_fail_the_step():
    st = _step('[[step]]\ndemo = "ok"\ntransitions = {enters = 1, returns = 1}\n')
    r = StepResult(st.index, st.name, st.line)
    m = FakeMachine(FakeGdb(help_text=None))
    hook = Runner()._trace_start(m, st, r)
    assert hook is None and m.trace_ok is False
    assert r.failures and "tracer not available" in r.failures[0], r


def test_a_failed_assert_is_not_replaced_by_a_second_read(monkeypatch):
    """A stale first answer fails the step even when a fresh model agrees."""
    st = _step('[[step]]\nbreak = "sbm_exec"\n'
               'assert = [{cmd = "sbm", path = "cpus[*].mode", op = "contains", value = "sandbox"}]\n')
    answers = iter([({"cpus": [{"mode": "user"}]}, None, ""),        # stale
                    ({"cpus": [{"mode": "sandbox"}]}, None, "")])    # fresh model
    monkeypatch.setattr(R, "gdb_json", lambda g, argv, timeout=120.0: next(answers))
    g = FakeGdb()
    r = StepResult(st.index, st.name, st.line)
    Runner()._asserts(g, st, r)
    assert len(r.failures) == 1 and 'saw ["user"]' in r.failures[0].replace("'", '"'), r.failures
    assert any("stale model cache" in n for n in r.notes), r.notes
    assert any(c == "sbm target reload" for c in g.log)


def test_a_passing_assert_is_read_once(monkeypatch):
    st = _step('[[step]]\nbreak = "sbm_exec"\n'
               'assert = [{cmd = "sbm", path = "cpus[*].mode", op = "contains", value = "sandbox"}]\n')
    calls = []
    monkeypatch.setattr(R, "gdb_json", lambda g, argv, timeout=120.0:
                        calls.append(argv) or ({"cpus": [{"mode": "sandbox"}]}, None, ""))
    r = StepResult(st.index, st.name, st.line)
    Runner()._asserts(FakeGdb(), st, r)
    assert r.failures == [] and r.checks == 1 and len(calls) == 1


class FakeGuest:
    """A VM for Runner._answers: alive or not, a QMP status, shell answers."""

    def __init__(self, alive=True, status="running", taint="262144", echo=True):
        self.id = "fake"
        self._alive, self.status, self.taint, self.echo = alive, status, taint, echo
        self.closed = False

    def alive(self):
        return self._alive

    def qmp(self, cmd, timeout=None):
        assert cmd == "query-status"
        return {"status": self.status}

    def run(self, cmd, timeout=30.0):
        if cmd.startswith("echo "):
            if not self.echo:
                raise R.SbmdbgError("guest command 'echo' did not finish in 20 s")
            return type("Res", (), {"status": 0, "output": cmd[5:] + "\n"})()
        assert cmd == "cat /proc/sys/kernel/tainted"
        return type("Res", (), {"status": 0, "output": self.taint + "\n"})()

    def close(self):
        self.closed = True


def _machine(vm, taint="262144"):
    m = R._Machine(vm, key=None, kernel={})
    m.taint = taint
    return m


@pytest.mark.parametrize("guest,kept", [
    (FakeGuest(), True),
    (FakeGuest(taint="262656"), False),            # a WARN since the checker took it
    (FakeGuest(alive=False), False),               # QEMU exited
    (FakeGuest(status="paused"), False),
    (FakeGuest(echo=False), False),                # the shell hangs
], ids=["answers", "tainted", "qemu-gone", "paused", "shell-hung"])
def test_a_failed_files_vm_is_kept_only_when_the_guest_answers_untainted(guest, kept):
    assert Runner(reuse_after_failure=True)._answers(_machine(guest)) is kept


def test_a_pool_vm_goes_back_to_its_owner_instead_of_being_stopped():
    handed = []
    vm = FakeGuest()
    m = R._Machine(vm, key=None, kernel={}, release=lambda v, healthy: handed.append((v, healthy)))
    m.healthy = False
    m.close()
    assert handed == [(vm, False)] and not vm.closed
    own = FakeGuest()
    R._Machine(own, key=None, kernel={}).close()
    assert own.closed
