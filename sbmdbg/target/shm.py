"""Guest RAM read straight from QEMU's memory-backend-file (share=on) by mmap.

Guest-physical to file offset for QEMU's x86 ``pc``/``q35`` machines (QEMU
7.2 ``pc_init1``/``pc_q35_init``): one RAM block, aliased as
``[0, below_4g)`` at 0 and ``[below_4g, ram)`` at 4 GiB.

* pc (i440fx): lowmem = max-ram-below-4g (default 3.5 GiB); when the RAM is
  at least that and the machine type is gigabyte-aligned (all current ones),
  lowmem = min(lowmem, 3 GiB).  below_4g = min(ram, lowmem).
* q35: lowmem = 2 GiB when ram >= 2.75 GiB, else 2.75 GiB (capped by
  max-ram-below-4g).  below_4g = min(ram, lowmem).

Registers cannot come from a RAM file: pass a ``regs_source`` (a Target,
e.g. the QMP or gdb one) if you need them.
"""
from __future__ import annotations

import mmap
import os
import struct

from sbmdbg.target.base import PAGE, Target, TargetError, UnbackedMemory

GiB = 1 << 30
_U512 = struct.Struct("<512Q")
FOUR_GIB = 4 * GiB


def below_4g_size(ram_size: int, machine: str = "pc", max_ram_below_4g: int | None = None) -> int:
    if machine.startswith("q35"):
        lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
        if max_ram_below_4g:
            lowmem = min(lowmem, max_ram_below_4g)
    else:
        lowmem = max_ram_below_4g or 0xE0000000
        if ram_size >= lowmem and lowmem > 0xC0000000:
            lowmem = 0xC0000000
    return min(ram_size, lowmem)


class RamLayout:
    """Guest-physical <-> RAM-file offset for a pc/q35 machine."""

    def __init__(self, ram_size: int, machine: str = "pc", max_ram_below_4g: int | None = None):
        self.ram_size = ram_size
        self.below = below_4g_size(ram_size, machine, max_ram_below_4g)
        self.above = ram_size - self.below

    def ranges(self) -> list[tuple[int, int]]:
        """Backed guest-physical ranges as (start, end)."""
        r = [(0, self.below)]
        if self.above:
            r.append((FOUR_GIB, FOUR_GIB + self.above))
        return r

    def offset(self, pa: int, n: int = 1) -> int:
        if 0 <= pa and pa + n <= self.below:
            return pa
        if self.above and FOUR_GIB <= pa and pa + n <= FOUR_GIB + self.above:
            return pa - FOUR_GIB + self.below
        raise UnbackedMemory(pa, n, f"outside guest RAM {', '.join(f'[{a:#x},{b:#x})' for a, b in self.ranges())}")


class ShmTarget(Target):
    name = "shm"

    def __init__(self, path: str, ram_size: int | None = None, machine: str = "pc",
                 regs_source: Target | None = None, max_ram_below_4g: int | None = None):
        super().__init__()
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise TargetError(f"cannot open guest RAM file {path}: {e.strerror}") from None
        size = os.fstat(self._fd).st_size
        if ram_size is None:
            ram_size = size
        if size < ram_size:
            os.close(self._fd)
            raise TargetError(f"guest RAM file {path} has {size} bytes, expected {ram_size}")
        self._mm = mmap.mmap(self._fd, ram_size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.layout = RamLayout(ram_size, machine, max_ram_below_4g)
        self.regs_source = regs_source

    def _read_page(self, pfn: int) -> bytes:
        off = self.layout.offset(pfn << 12, PAGE)
        return self._mm[off:off + PAGE]

    def _read_pages(self, pfn: int, count: int) -> list[bytes]:
        off = self.layout.offset(pfn << 12, count * PAGE)  # raises if it straddles a hole
        buf = self._mm[off:off + count * PAGE]
        return [buf[i * PAGE:(i + 1) * PAGE] for i in range(count)]

    def read_phys(self, pa: int, n: int) -> bytes:
        # Large reads: no point caching, straight from the mapping.
        if n >= 64 * PAGE:
            off = self.layout.offset(pa, n)
            return self._mm[off:off + n]
        return super().read_phys(pa, n)

    def read_table(self, pa: int) -> tuple[int, ...]:
        # Straight from the mapping: no page cache, no copy (the file is the
        # guest's RAM; a stopped guest does not change it).
        return _U512.unpack_from(self._mm, self.layout.offset(pa & ~0xFFF, PAGE))

    def _registers(self, cpu: int) -> dict:
        if self.regs_source is None:
            raise TargetError("the shm source has no registers (give it a regs_source)")
        return self.regs_source.registers(cpu)

    @property
    def ncpus(self) -> int:
        return self.regs_source.ncpus if self.regs_source is not None else 0

    def invalidate(self) -> None:
        super().invalidate()
        if self.regs_source is not None:
            self.regs_source.invalidate()

    def close(self) -> None:
        try:
            self._mm.close()
        finally:
            os.close(self._fd)
