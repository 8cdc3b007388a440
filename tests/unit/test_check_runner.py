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
