"""One gdb command's wall clock through gdb/MI, read off gdb's own pipe.

``GdbSession.console`` (pygdbmi) polls gdb's output with a 10 ms "more
output?" wait, so any command costs >= ~10 ms there, whatever it does.  Here
the MI line is written to gdb's stdin and its output read with ``select``
until the result record of its token: what a front end that reads its pipe
pays (MI framing of the command's output included), the same way for every
command compared."""
from __future__ import annotations

import os
import select
import statistics
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg.vm.gdbmi import mi_quote


def _pipes(g):
    proc = getattr(getattr(g, "_gdb", None), "gdb_process", None)
    if proc is None or proc.stdin is None or proc.stdout is None:
        raise SbmdbgError("gdb session has no pipes")
    return proc


def mi_console_once(g, cmd: str, token: int, timeout: float = 60.0) -> tuple[float, int]:
    """Seconds from writing ``TOKEN-interpreter-exec console CMD`` to reading
    its ``TOKEN^`` result line; and the bytes gdb sent meanwhile."""
    proc = _pipes(g)
    g.poll(0)                                  # drain what came before
    fd = proc.stdout.fileno()
    line = f"{token}-interpreter-exec console {mi_quote(cmd)}\n".encode()
    want = f"\n{token}^".encode()
    buf = b"\n"
    t0 = time.perf_counter()
    proc.stdin.write(line)
    proc.stdin.flush()
    deadline = t0 + timeout
    while True:
        r, _, _ = select.select([fd], [], [], max(0.0, deadline - time.perf_counter()))
        if not r:
            raise SbmdbgError(f"gdb did not answer {cmd!r} in {timeout:g} s")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise SbmdbgError("gdb went away")
        buf += chunk
        i = buf.find(want)
        if i >= 0 and buf.find(b"\n", i + 1) >= 0:
            dt = time.perf_counter() - t0
            end = buf.find(b"\n", i + 1)
            if buf[i + 1 + len(str(token)) + 1:].startswith(b"error"):
                raise SbmdbgError(f"{cmd}: {buf[i:end].decode(errors='replace')[:200]}")
            return dt, len(buf) - 1


def mi_console_time(g, cmd: str, repeat: int, timeout: float = 60.0) -> dict:
    """Median/min seconds of ``cmd`` through MI (see mi_console_once)."""
    ts, size = [], 0
    base = 900_000 + (id(g) % 1000) * 1000
    for i in range(repeat):
        dt, size = mi_console_once(g, cmd, base + i, timeout)
        ts.append(dt)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "bytes": size, "repeat": repeat}
