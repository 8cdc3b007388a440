"""The raw remote-protocol client used for the tracer's stop/resume floor."""
from __future__ import annotations

import socket
import threading

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.bench.stopfloor import RspClient, measure

pytestmark = pytest.mark.unit


def _stub(server: socket.socket, replies: dict[str, list[str]], seen: list[str]) -> None:
    conn, _ = server.accept()
    buf = b""
    with conn:
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"#" in buf and b"$" in buf:
                i = buf.index(b"$")
                j = buf.index(b"#", i)
                if len(buf) < j + 3:
                    break
                pkt, csum = buf[i + 1:j], buf[j + 1:j + 3]
                assert int(csum, 16) == sum(pkt) & 0xFF
                buf = buf[j + 3:]
                cmd = pkt.decode()
                seen.append(cmd)
                conn.sendall(b"+")
                for r in replies.get(cmd[:2], [""]):
                    conn.sendall(b"$%s#%02x" % (r.encode(), sum(r.encode()) & 0xFF))


def test_client_frames_acks_and_skips_stale_replies():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    seen: list[str] = []
    # '?' answers with a stale stop reply first; Z0 then gets a late T05 before its OK.
    replies = {"?": ["T02thread:01;"], "Z0": ["T05thread:01;", "OK"], "g": ["00" * 200]}
    t = threading.Thread(target=_stub, args=(server, replies, seen), daemon=True)
    t.start()
    c = RspClient(f"127.0.0.1:{server.getsockname()[1]}", timeout=1)
    assert c.cmd("?", lambda r: r.startswith("T")) == "T02thread:01;"
    assert c.cmd("Z0,ffffffff81000001,1", lambda r: r == "OK") == "OK"
    assert len(c.cmd("g", lambda r: len(r) > 300)) == 400
    with pytest.raises(SbmdbgError):
        c.cmd("qX", lambda r: r == "never")
    c.close()
    t.join(2)
    assert seen[:3] == ["?", "Z0,ffffffff81000001,1", "g"]
    server.close()


def test_measure_refuses_a_site_it_cannot_emulate():
    with pytest.raises(SbmdbgError, match="mov %rsp,%rbp"):
        measure(vm=None, addr=0, code=b"\x90\x90\x90", n=1)


def test_connect_error_is_one_line():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(SbmdbgError, match="cannot connect"):
        RspClient(f"127.0.0.1:{port}", timeout=1)
