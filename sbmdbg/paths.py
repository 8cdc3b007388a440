"""Where things live: the repo, the build cache, the build lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """``$SBMDBG_CACHE`` or ``~/.cache/sbmdbg``, created on demand."""
    env = os.environ.get("SBMDBG_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "sbmdbg"
    root.mkdir(parents=True, exist_ok=True)
    return root


def build_lock_path() -> Path:
    """The machine-wide kernel build lock (shared with the lead's dev builds).

    Always ``~/.cache/sbmdbg/build.lock``, whatever ``SBMDBG_CACHE`` says:
    the point is that no two kernel builds ever run at once on this machine.
    """
    env = os.environ.get("SBMDBG_BUILD_LOCK")
    path = Path(env) if env else Path.home() / ".cache" / "sbmdbg" / "build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(path: Path, what: str = "lock", quiet: bool = False):
    """Exclusive ``flock`` on *path*; says so once on stderr if it has to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not quiet:
                print(f"sbmdbg: waiting for the {what} ({path})", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            if not quiet:
                print(f"sbmdbg: got the {what} after {time.monotonic() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def check_vmlinux(path: str) -> Path:
    """A --vmlinux argument: an ELF file we can read (SbmdbgError otherwise)."""
    from sbmdbg.errors import SbmdbgError

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise SbmdbgError(f"--vmlinux {path}: {exc.strerror}") from None
    if magic != b"\x7fELF":
        raise SbmdbgError(f"--vmlinux {path} is not an ELF file")
    return p
