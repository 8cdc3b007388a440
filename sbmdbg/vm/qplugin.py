"""The sbmtrace QEMU plugin (sbmdbg/vm/plugin/sbmtrace.c): building it.

The harness owns the plugin binary (it loads it into QEMU); the tracer only
talks to it (``sbmdbg.trace.qplugin.PluginControl``).  The plugin is compiled
on first use with the host's gcc into
``~/.cache/sbmdbg/plugin/sbmtrace-<hash of the source>.so`` (about 0.3 s) and
loaded by the VM harness with ``-plugin PATH,sock=WORKDIR/sbmtrace.sock``.
It sits idle (no probe, nothing instrumented) until a tracer arms it through
that socket; see the C file's header for the protocol.

    >>> so = plugin_path()                       # builds once, then cached
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from sbmdbg.errors import SbmdbgError

SOURCE = Path(__file__).with_name("plugin") / "sbmtrace.c"
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
