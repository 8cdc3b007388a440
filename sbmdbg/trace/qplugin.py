"""Talking to the sbmtrace QEMU plugin (sbmdbg/vm/plugin/sbmtrace.c; the VM
harness builds and loads it, see sbmdbg.vm.qplugin) through its control
socket: the tracer arms probes, waits for them to apply, disarms.

    >>> ctl = PluginControl("/tmp/vm/sbmtrace.sock")
    >>> ctl.cmd("status")
    'ok status armed=0 applied=0 probes=0 hits=0 snapshots=0 bad_reads=0 ram=0'
"""
from __future__ import annotations

import os
import socket
import time

from sbmdbg.errors import SbmdbgError


class PluginControl:
    """A line-protocol client of the plugin's control socket."""

    def __init__(self, path: str | os.PathLike, timeout: float = 5.0):
        self.path = str(path)
        self.timeout = timeout
        self._s: socket.socket | None = None
        self._buf = b""

    def _connect(self) -> socket.socket:
        if self._s is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as e:
                s.close()
                raise SbmdbgError(f"the sbmtrace plugin is not listening on {self.path} ({e.strerror}): "
                                  "was the VM started with the trace plugin?") from None
            self._s = s
        return self._s

    def cmd(self, line: str) -> str:
        """Send one command, return its reply line; an ``error`` reply raises."""
        if "\n" in line:
            raise SbmdbgError("one command per call")
        s = self._connect()
        try:
            s.sendall(line.encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = s.recv(4096)
                if not chunk:
                    raise OSError("connection closed")
                self._buf += chunk
        except OSError as e:
            self.close()
            raise SbmdbgError(f"sbmtrace plugin: {line.split()[0]}: {e}") from None
        reply, _, self._buf = self._buf.partition(b"\n")
        text = reply.decode(errors="replace")
        if not text.startswith("ok"):
            raise SbmdbgError(f"sbmtrace plugin: {line.split()[0]}: {text}")
        return text

    def status(self) -> dict:
        words = self.cmd("status").split()[2:]
        return {k: int(v) for k, v in (w.split("=", 1) for w in words)}

    def wait_applied(self, timeout: float = 5.0) -> dict:
        """Wait until the last arm/disarm took effect (the translation cache
        is flushed from a vCPU thread: at its next translation or idle)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if st["applied"] == st["armed"]:
                return st
            if time.monotonic() > deadline:
                raise SbmdbgError(f"the sbmtrace plugin did not apply its probes within {timeout} s "
                                  f"({st}); is the guest running?")
            time.sleep(0.01)

    def close(self) -> None:
        if self._s is not None:
            try:
                self._s.close()
            finally:
                self._s = None
                self._buf = b""
