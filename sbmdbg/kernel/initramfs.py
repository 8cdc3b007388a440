"""A tiny busybox initramfs, written as a newc cpio archive in Python.

/init mounts proc, sysfs, devtmpfs and debugfs, installs the busybox applet
links, prints ``SBMDBG-READY`` and then keeps an interactive shell on the
serial console (restarted if it exits, so init never dies).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import cache_root

BUSYBOX = Path(os.environ.get("SBMDBG_BUSYBOX", "/bin/busybox"))
READY_MARKER = "SBMDBG-READY"
#: Bumped when the archive layout or the writer changes.
FORMAT_VERSION = "2"

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /root /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
hostname sbmdbg
# Keep kernel messages off the console (they would interleave with command
# output); dmesg still has them.  Boot with sbmdbg.loud to keep them.
grep -qw sbmdbg.loud /proc/cmdline || dmesg -n 1
cd /root
echo "{READY_MARKER} $(uname -r)"
while true; do
    setsid cttyhack sh
    sleep 1
done
"""


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, regular file, symlink or device node."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def newc_header(ino: int, mode: int, nlink: int, filesize: int, namesize: int,
                rdev: tuple[int, int] = (0, 0), mtime: int = 0) -> bytes:
    """The 110-byte ASCII header of a newc ("070701") member."""
    fields = [ino, mode, 0, 0, nlink, mtime, filesize, 0, 0, rdev[0], rdev[1], namesize, 0]
    return b"070701" + b"".join(f"{f:08X}".encode() for f in fields)


def write_newc(entries: list[Entry], out: io.BufferedIOBase) -> None:
    """Write *entries* and the trailer as a newc cpio archive."""
    offset = 0

    def emit(b: bytes) -> None:
        nonlocal offset
        out.write(b)
        offset += len(b)

    for ino, e in enumerate(entries + [Entry("TRAILER!!!", 0)], start=1):
        name = e.name.lstrip("/").encode() + b"\0"
        is_trailer = e.name == "TRAILER!!!"
        nlink = 2 if stat.S_ISDIR(e.mode) else 1
        emit(newc_header(0 if is_trailer else ino, e.mode, 0 if is_trailer else nlink,
                         len(e.data), len(name), e.rdev))
        emit(name)
        emit(b"\0" * _pad4(offset))
        emit(e.data)
        emit(b"\0" * _pad4(offset))
    # Pad the archive to a 512-byte block like cpio(1) does.
    emit(b"\0" * ((512 - offset % 512) % 512))


def read_newc(data: bytes) -> list[Entry]:
    """Parse a newc archive (for tests and checks); stops at the trailer."""
    entries: list[Entry] = []
    pos = 0
    while True:
        hdr = data[pos:pos + 110]
        if len(hdr) < 110 or hdr[:6] != b"070701":
            raise ValueError(f"bad newc header at offset {pos}")
        f = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = f[1], f[6], f[9], f[10], f[11]
        pos += 110
        name = data[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += _pad4(pos)
        if name == "TRAILER!!!":
            return entries
        body = data[pos:pos + filesize]
        pos += filesize
        pos += _pad4(pos)
        entries.append(Entry(name, mode, body, (rmaj, rmin)))


def initramfs_entries(busybox: bytes, init_script: str = INIT_SCRIPT) -> list[Entry]:
    d = stat.S_IFDIR | 0o755
    entries = [Entry(n, d) for n in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc",
                                     "proc", "sys", "dev", "tmp", "root")]
    entries += [
        Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        Entry("dev/ttyS0", stat.S_IFCHR | 0o600, rdev=(4, 64)),
        Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)),
        Entry("bin/busybox", stat.S_IFREG | 0o755, busybox),
        Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        Entry("init", stat.S_IFREG | 0o755, init_script.encode()),
        Entry("etc/passwd", stat.S_IFREG | 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
        Entry("etc/group", stat.S_IFREG | 0o644, b"root:x:0:\n"),
    ]
    return entries


def ensure_initramfs(busybox_path: Path = BUSYBOX) -> Path:
    """Build (or reuse) the initramfs; cached by the hash of its inputs."""
    try:
        busybox = busybox_path.read_bytes()
    except OSError as exc:
        raise SbmdbgError(f"cannot read {busybox_path} (apt-get install busybox-static): "
                          f"{exc.strerror}") from exc
    h = hashlib.sha256()
    for part in (FORMAT_VERSION.encode(), INIT_SCRIPT.encode(), busybox):
        h.update(str(len(part)).encode() + b"\0" + part)
    out = cache_root() / "initramfs" / f"{h.hexdigest()[:24]}.cpio"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write_newc(initramfs_entries(busybox), fh)
    tmp.rename(out)
    return out
