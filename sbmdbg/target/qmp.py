"""The QMP source: HMP ``info registers`` (with cpu-index) and ``pmemsave``/``xp``.

Built on an ``hmp(cmdline, cpu_index=None) -> str`` callable, so it can share
the harness's QMP connection (``vm.hmp``) — QEMU's QMP socket takes one
client.  ``QmpTarget.connect(path)`` opens its own connection instead (the
one QMP client, sbmdbg.vm.qmp.QmpClient).
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Callable

from sbmdbg.target.base import PAGE, Target, TargetError
from sbmdbg.target.shm import RamLayout

Hmp = Callable[..., str]

_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR) *=([0-9a-f]{4}) ([0-9a-f]{16})", re.M)
_REG = re.compile(r"\b(R[A-Z0-9]{1,2}|RIP|RFL|CR[0-4]|EFER|CPL) *=([0-9a-f]+)")


def parse_info_registers(text: str) -> dict:
    """Parse QEMU's ``info registers`` (x86_64) into our register dict."""
    regs: dict[str, int] = {}
    for name, val in _REG.findall(text):
        key = name.lower()
        if key == "rfl":
            key = "rflags"
        regs[key] = int(val, 16)
    for name, sel, base in _SEG.findall(text):
        n = name.lower()
        if n in ("ldt", "tr"):
            continue
        regs[n] = int(sel, 16)
        if n in ("fs", "gs"):
            regs[f"{n}_base"] = int(base, 16)
    if "cr3" not in regs or "rip" not in regs:
        raise TargetError("could not parse 'info registers' output: " + text[:80].replace("\n", " | "))
    return regs


class QmpTarget(Target):
    name = "qmp"

    def __init__(self, hmp: Hmp, qmp: Callable[..., object] | None = None,
                 layout: RamLayout | None = None):
        """``hmp(cmdline, cpu_index=None) -> str``; ``qmp(cmd, **args)`` (optional)
        enables the fast ``pmemsave`` path (HMP's pmemsave cannot take an absolute
        path: its expression parser reads "SIZE /tmp" as a division)."""
        super().__init__()
        self.hmp = hmp
        self.qmp = qmp
        self.layout = layout
        self._ncpus: int | None = None
        self._qmp = None
        self._tmpdir = tempfile.mkdtemp(prefix="sbmdbg-pmem-")

    @classmethod
    def connect(cls, address: str, **kw) -> "QmpTarget":
        from sbmdbg.vm.qmp import QmpClient
        q = QmpClient(address)
        q.cmd("query-status")   # reachable now, or a clear error here
        t = cls(q.hmp, q.cmd, **kw)
        t._qmp = q
        return t

    @property
    def ncpus(self) -> int:
        if self._ncpus is None:
            self._ncpus = len(re.findall(r"CPU #\d+", self.hmp("info cpus")))
        return self._ncpus

    def _registers(self, cpu: int) -> dict:
        return parse_info_registers(self.hmp("info registers", cpu_index=cpu))

    def _read_pages(self, pfn: int, count: int) -> list[bytes]:
        pa, n = pfn << 12, count * PAGE
        if self.layout is not None:
            self.layout.offset(pa, n)
        if self.qmp is not None:
            path = os.path.join(self._tmpdir, "pmem")
            try:
                self.qmp("pmemsave", val=pa, size=n, filename=path)
                with open(path, "rb") as fh:
                    data = fh.read()
            except Exception as e:  # noqa: BLE001
                raise TargetError(f"pmemsave at {pa:#x} failed: {e}") from None
            finally:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        else:
            data = parse_xp(self.hmp(f"xp /{n // 8}gx {pa:#x}"))
        if len(data) != n:
            raise TargetError(f"short physical read at {pa:#x}: {len(data)} of {n}")
        return [data[i * PAGE:(i + 1) * PAGE] for i in range(count)]

    def _read_page(self, pfn: int) -> bytes:
        return self._read_pages(pfn, 1)[0]

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        try:
            os.rmdir(self._tmpdir)
        except OSError:
            pass


def parse_xp(text: str) -> bytes:
    """``xp /Ngx`` output -> bytes (little-endian u64 words)."""
    out = bytearray()
    for line in text.splitlines():
        if ":" not in line:
            continue
        for word in line.split(":", 1)[1].split():
            out += int(word, 16).to_bytes(8, "little")
    return bytes(out)


_TLB_LEAF = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ([-X])([-G])([-P])([-D])([-A])([-C])([-T])([-U])([-W])$")


def parse_info_tlb(text: str) -> list[tuple[int, int, str]]:
    """QEMU's ``info tlb`` (x86_64, 4- or 5-level): one (va, pa, flags) per
    leaf, flags as QEMU prints them (``XGPDACTUW``, ``-`` for clear)."""
    out = []
    for line in text.splitlines():
        m = _TLB_LEAF.match(line.strip())
        if m:
            out.append((int(m.group(1), 16), int(m.group(2), 16), "".join(m.groups()[2:])))
    return out


def info_tlb_flags(raw: int, page_size: int) -> str:
    """The letters QEMU's ``info tlb`` prints for a leaf entry (PS shown only
    for 2M/1G leaves: bit 7 of a 4 KiB PTE is PAT, which QEMU masks)."""
    ps = raw & 0x80 and page_size != 4096
    return "".join([
        "X" if raw >> 63 else "-", "G" if raw & 0x100 else "-", "P" if ps else "-",
        "D" if raw & 0x40 else "-", "A" if raw & 0x20 else "-", "C" if raw & 0x10 else "-",
        "T" if raw & 0x8 else "-", "U" if raw & 0x4 else "-", "W" if raw & 0x2 else "-"])
