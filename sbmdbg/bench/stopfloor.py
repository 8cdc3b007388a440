"""The floor under any gdbstub-based tracer: what one breakpoint stop and
resume costs in QEMU itself, with no gdb and no single step.

A minimal GDB remote-protocol client (acks on, no XML) sets one breakpoint on
``mov %rsp,%rbp`` at ``x86_sbm_exec+1``, and at every stop reads the
registers (``g``), performs that instruction itself (``G``: rbp = rsp,
rip += 3) and continues (``vCont;c``): three packets per stop.  What is left
per stop is QEMU's own stop/resume of the VM (gdbstub stops every vCPU on a
breakpoint; QEMU 7.2 has no non-stop mode).  Used by ``sbmdbg bench trace``.
"""
from __future__ import annotations

import socket
import threading
import time

from sbmdbg.errors import SbmdbgError

#: Sizes of QEMU's x86_64 ``g`` block up to rip (16 GPRs of 8 bytes).
_RBP, _RSP, _RIP = 6, 7, 16
#: The probed instruction: mov %rsp,%rbp
_MOV_RSP_RBP = bytes.fromhex("4889e5")


class StubTimeout(SbmdbgError):
    """The gdbstub sent nothing within the socket's timeout."""


class RspClient:
    """GDB remote protocol over TCP: packets with checksums, acks on."""

    def __init__(self, addr: str, timeout: float = 10.0):
        host, _, port = addr.rpartition(":")
        try:
            self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError as exc:
            raise SbmdbgError(f"cannot connect to the gdbstub at {addr}: {exc}") from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: str) -> None:
        raw = data.encode()
        self.sock.sendall(b"$%s#%02x" % (raw, sum(raw) & 0xFF))

    def recv(self) -> str:
        while True:
            i = self.buf.find(b"$")
            j = self.buf.find(b"#", i) if i >= 0 else -1
            if j >= 0 and len(self.buf) >= j + 3:
                data, self.buf = self.buf[i + 1:j], self.buf[j + 3:]
                self.sock.sendall(b"+")
                return data.decode(errors="replace")
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError) as exc:
                raise StubTimeout("the gdbstub did not answer") from exc
            if not chunk:
                raise SbmdbgError("the gdbstub closed the connection")
            self.buf += chunk

    def cmd(self, data: str, want) -> str:
        """Send; return the first reply for which ``want(reply)`` holds (the
        stub may still owe a stop reply from before)."""
        self.send(data)
        for _ in range(8):
            r = self.recv()
            if want(r):
                return r
        raise SbmdbgError(f"no fitting reply to {data[:20]!r}")

    def close(self) -> None:
        self.sock.close()


def measure(vm, addr: int, code: bytes, n: int) -> dict:
    """Run ``repeat n`` in *vm* twice, untraced and with the raw breakpoint at
    *addr* (which must hold ``mov %rsp,%rbp``); time both."""
    if code[:3] != _MOV_RSP_RBP:
        raise SbmdbgError(f"x86_sbm_exec+1 is not mov %rsp,%rbp ({code[:3].hex()})")

    def repeat() -> float:
        t0 = time.perf_counter()
        vm.run(f"echo repeat {n} > /sys/kernel/debug/sbm_demo/run", timeout=60 + n)
        return time.perf_counter() - t0

    base = repeat()
    c = RspClient(vm.info["gdb"])
    done = threading.Event()
    result: dict = {}
    try:
        c.cmd("?", lambda r: r.startswith(("T", "S")))          # the stub stopped the VM
        c.cmd(f"Z0,{addr:x},1", lambda r: r == "OK")
        c.send("vCont;c")

        def guest():
            try:
                result["traced"] = repeat()
            finally:
                done.set()
        th = threading.Thread(target=guest, daemon=True)
        th.start()
        c.sock.settimeout(0.2)
        hits = 0
        while not done.is_set():
            try:
                rep = c.recv()
            except StubTimeout:
                continue
            if not rep.startswith("T"):
                continue
            tid = rep.split("thread:", 1)[1].split(";", 1)[0] if "thread:" in rep else None
            c.sock.settimeout(10)
            if tid:
                c.cmd(f"Hg{tid}", lambda r: r == "OK")
            raw = bytearray(bytes.fromhex(c.cmd("g", lambda r: len(r) > 300)))
            rip = int.from_bytes(raw[_RIP * 8:_RIP * 8 + 8], "little")
            if rip == addr:
                raw[_RBP * 8:_RBP * 8 + 8] = raw[_RSP * 8:_RSP * 8 + 8]
                raw[_RIP * 8:_RIP * 8 + 8] = (addr + 3).to_bytes(8, "little")
                c.cmd("G" + raw.hex(), lambda r: r == "OK")
                hits += 1
            c.send("vCont;c")
            c.sock.settimeout(0.2)
        th.join()
        c.sock.settimeout(10)
        c.sock.sendall(b"\x03")
        c.recv()
        c.cmd(f"z0,{addr:x},1", lambda r: r == "OK")
        c.send("D")
    finally:
        c.close()
    traced = result.get("traced", 0.0)
    return {"repeat": n, "untraced_s": round(base, 3), "traced_s": round(traced, 3), "stops": hits,
            "stops_per_s": round(hits / traced, 1) if traced else 0.0,
            "ms_per_stop": round((traced - base) / max(hits, 1) * 1e3, 2)}
