"""The sbmtrace QEMU plugin (sbmdbg/trace/plugin/sbmtrace.c): building it and
talking to it.

The plugin is compiled on first use with the host's gcc into
``~/.cache/sbmdbg/plugin/sbmtrace-<hash of the source>.so`` (about 0.3 s) and
loaded by the VM harness with ``-plugin PATH,sock=WORKDIR/sbmtrace.sock``.
It sits idle (no probe, nothing instrumented) until a tracer arms it through
that socket; see the C file's header for the protocol.

    >>> so = plugin_path()                       # builds once, then cached
    >>> ctl = PluginControl("/tmp/vm/sbmtrace.sock")
    >>> ctl.cmd("status")
    'ok status armed=0 applied=0 probes=0 hits=0 snapshots=0 bad_reads=0 ram=0'
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import TRACE_PLUGIN_SOURCE

SOURCE = TRACE_PLUGIN_SOURCE
SOCKET_NAME = "sbmtrace.sock"


def cache_dir() -> Path:
    return Path(os.environ.get("SBMDBG_CACHE") or Path.home() / ".cache" / "sbmdbg") / "plugin"


def plugin_path() -> Path:
    """The compiled plugin (built now if this source was never built)."""
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        raise SbmdbgError(f"plugin source {SOURCE} missing: {e.strerror}") from None
    out = cache_dir() / f"sbmtrace-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if out.exists():
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise SbmdbgError("no C compiler (gcc) to build the sbmtrace QEMU plugin: apt-get install gcc")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    res = subprocess.run([cc, "-O2", "-Wall", "-fPIC", "-shared", "-fvisibility=hidden",
                          "-o", str(tmp), str(SOURCE), "-lpthread"],
                         capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SbmdbgError(f"building the sbmtrace plugin failed: {res.stderr.strip()[-400:]}")
    os.replace(tmp, out)
    return out


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
