"""The public GdbSession helpers and the one driver of the in-gdb tracer
(trace.live.GdbTracer), on a scripted stand-in for a gdb session."""
import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.trace.live import GdbTracer
from sbmdbg.vm.gdbmi import parse_json_object

pytestmark = pytest.mark.unit


def test_parse_json_object():
    assert parse_json_object('[Switching to thread 2]\n{"a": {"b": [1, 2]}}\n') == {"a": {"b": [1, 2]}}
    assert parse_json_object("warning: {not json}\n[1, 2]") == [1, 2]
    assert parse_json_object("no json here") is None


class FakeGdb:
    """Answers console commands from a script; records what was sent."""

    def __init__(self, running=False, stop_errors=0):
        self.running, self.sent, self.stop_errors = running, [], stop_errors
        self.last_stop = {}

    def alive(self):
        return True

    def poll(self, timeout=0.0):
        return []

    def mi(self, cmd, timeout=30.0):
        self.sent.append(cmd)
        if cmd.startswith("-exec-interrupt"):
            self.running = False
        return {}

    def wait_stopped(self, timeout=30.0):
        return {}

    def cont(self, timeout=30.0):
        self.sent.append("cont")
        self.running = True

    def console(self, cmd, timeout=30.0):
        return self.console_result(cmd, timeout)[0]

    def console_result(self, cmd, timeout=30.0):
        self.sent.append(cmd)
        if cmd.startswith("sbm trace stop"):
            if self.stop_errors:
                self.stop_errors -= 1
                return "", "sbm trace stop: the guest is running: interrupted it; run `sbm trace stop` again"
            return '{"events": 7, "file": "t.jsonl"}', None
        return "", None

    def sbm_json(self, cmd, timeout=120.0, fail_ok=False):
        self.sent.append(cmd)
        return {"file": "t.jsonl", "probes": [{"name": "x86_sbm_exec"}]}


def test_tracer_holds_before_interrupting_and_releases_before_continuing():
    g = FakeGdb(running=True)
    t = GdbTracer(g)
    info = t.start("/tmp/t.jsonl", "fast", ram="/dev/shm/x.ram", ram_size=512 << 20)
    assert info["probes"] and t.on
    assert g.sent[0].startswith("-exec-interrupt")          # not tracing yet: no hold
    assert g.sent[1] == "sbm target shm /dev/shm/x.ram 536870912"
    assert g.sent[2] == "sbm trace start --file /tmp/t.jsonl --level fast"
    t.resume()
    assert g.sent[-2:] == ["sbm trace release", "cont"]
    g.sent.clear()
    t.stop_guest()
    assert g.sent[:2] == ["sbm trace hold", "-exec-interrupt --all"]


def test_tracer_stop_retries_while_gdb_reports_the_guest_running():
    g = FakeGdb(running=True, stop_errors=2)
    t = GdbTracer(g)
    t.on = True
    assert t.stop(step=0.1) == {"events": 7, "file": "t.jsonl"}
    assert not t.on and g.sent.count("sbm trace stop --json") == 3
    g2 = FakeGdb(stop_errors=100)
    t2 = GdbTracer(g2)
    t2.on = True
    with pytest.raises(SbmdbgError, match="kept running"):
        t2.stop(step=0.01)
    assert not t2.on
