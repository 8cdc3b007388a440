"""Build page tables in a fake physical memory (tests, fixtures, SBM model tests)."""
from __future__ import annotations

import struct

from sbmdbg.x86.paging import LEVEL_SHIFT, P, PS, RW, US


class PageTableBuilder:
    """Allocates 4 KiB tables from ``next_pa`` upward; ``map(va, pa, size, flags)``
    creates the intermediate tables (flags for them: ``upper``)."""

    def __init__(self, la57: bool = False, next_pa: int = 0x100000):
        self.la57 = la57
        self.levels = 5 if la57 else 4
        self.tables: dict[int, list[int]] = {}
        self.next_pa = next_pa
        self.root = self.alloc()

    def alloc(self) -> int:
        pa = self.next_pa
        self.next_pa += 4096
        self.tables[pa] = [0] * 512
        return pa

    def set(self, table_pa: int, idx: int, value: int) -> None:
        self.tables[table_pa][idx] = value

    def map(self, va: int, pa: int, size: int = 4096, flags: int = P | RW,
            upper: int = P | RW | US) -> None:
        level_of = {4096: 1, 1 << 21: 2, 1 << 30: 3}
        leaf_level = level_of[size]
        table = self.root
        for level in range(self.levels, leaf_level, -1):
            idx = (va >> LEVEL_SHIFT[level]) & 511
            e = self.tables[table][idx]
            if not e & P:
                nt = self.alloc()
                self.tables[table][idx] = nt | upper
                table = nt
            else:
                table = e & ((1 << 52) - 1) & ~0xFFF
        idx = (va >> LEVEL_SHIFT[leaf_level]) & 511
        self.tables[table][idx] = pa | flags | (PS if leaf_level > 1 else 0)

    def pages(self) -> dict[int, bytes]:
        return {pa: struct.pack("<512Q", *t) for pa, t in self.tables.items()}

    def read_phys(self, pa: int, n: int) -> bytes:
        base = pa & ~0xFFF
        if base not in self.tables or (pa & 0xFFF) + n > 4096:
            raise KeyError(f"unbacked {pa:#x}")
        return struct.pack("<512Q", *self.tables[base])[pa & 0xFFF:(pa & 0xFFF) + n]
