"""The one QMP/HMP client (sbmdbg.vm.qmp.QmpClient) against a small QMP
server on a Unix socket: argument names, errors, a dropped connection."""
import json
import socket
import threading

import pytest

from sbmdbg.vm.qmp import QmpClient, QmpError

pytestmark = pytest.mark.unit
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}


class FakeQmp:
    """Answers QMP; ``drop_after``: close the connection after that many commands."""

    def __init__(self, path, drop_after=None):
        self.seen, self.connections, self.drop_after = [], 0, drop_after
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(4)
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.client, args=(c,), daemon=True).start()

    @staticmethod
    def messages(c):
        """The JSON objects a client sends (qemu.qmp does not end them with newlines)."""
        buf, dec = "", json.JSONDecoder()
        while True:
            data = c.recv(4096)
            if not data:
                return
            buf += data.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def client(self, c):
        f = c.makefile("wb")
        f.write(json.dumps(GREETING).encode() + b"\n")
        f.flush()
        n = 0
        for msg in self.messages(c):
            name, args = msg["execute"], msg.get("arguments", {})
            if name != "qmp_capabilities":
                self.seen.append((name, args))
                n += 1
            if name == "human-monitor-command":
                r = {"return": f"{args['command-line']} on cpu {args.get('cpu-index', '-')}"}
            elif name == "nosuch":
                r = {"error": {"class": "CommandNotFound", "desc": "The command nosuch has not been found"}}
            else:
                r = {"return": {"status": "running"}}
            if "id" in msg:
                r["id"] = msg["id"]
            f.write(json.dumps(r).encode() + b"\n")
            f.flush()
            if self.drop_after is not None and n >= self.drop_after:
                self.drop_after = None
                c.close()
                return


def test_commands_hmp_and_errors(tmp_path):
    srv = FakeQmp(tmp_path / "q.sock")
    q = QmpClient(str(tmp_path / "q.sock"), timeout=5)
    try:
        assert q.cmd("query-status") == {"status": "running"}
        assert q.hmp("info registers", cpu_index=1) == "info registers on cpu 1"
        assert q.hmp("info cpus") == "info cpus on cpu -"
        assert ("human-monitor-command", {"command-line": "info registers", "cpu-index": 1}) in srv.seen
        with pytest.raises(QmpError, match="QMP nosuch: The command nosuch has not been found"):
            q.cmd("nosuch")
        assert srv.connections == 1           # one connection kept open
    finally:
        q.close()


def test_reopens_a_dropped_connection_and_per_command_mode(tmp_path):
    srv = FakeQmp(tmp_path / "q.sock", drop_after=1)
    q = QmpClient(str(tmp_path / "q.sock"), timeout=5)
    try:
        assert q.cmd("query-status")["status"] == "running"
        assert q.cmd("query-status")["status"] == "running"   # the server dropped us: reopened
        assert srv.connections == 2
    finally:
        q.close()
    one = QmpClient(str(tmp_path / "q.sock"), keep_open=False)
    one.cmd("stop")
    one.cmd("cont")
    assert srv.connections == 4 and [n for n, _ in srv.seen[-2:]] == ["stop", "cont"]


def test_no_server(tmp_path):
    with pytest.raises(QmpError, match="cannot connect to QMP at"):
        QmpClient(str(tmp_path / "none.sock"), timeout=1).cmd("query-status")
