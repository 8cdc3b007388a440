"""The Target interface: how bytes and registers arrive.

A Target gives physical memory (``read_phys``) and per-vCPU registers
(``registers``).  Sources subclass ``Target`` and implement ``_read_page``
(one 4 KiB page, or raise ``UnbackedMemory``) and ``_registers``; the base
class adds the page-granular cache and the register cache, both dropped by
``invalidate()`` (called whenever the guest resumes).
"""
from __future__ import annotations

import struct
from typing import Iterable

from sbmdbg.errors import SbmdbgError

PAGE = 4096
_U512 = struct.Struct("<512Q")

# Register names every source tries to provide (ints).
REGISTER_NAMES = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    "rip", "rflags", "cs", "ss", "ds", "es", "fs", "gs",
    "fs_base", "gs_base", "k_gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
)


class TargetError(SbmdbgError):
    pass


class UnbackedMemory(TargetError):
    def __init__(self, pa: int, n: int = 1, why: str = "no RAM there"):
        super().__init__(f"physical address {pa:#x} (+{n:#x}) is not backed: {why}")
        self.pa = pa


class Target:
    """Base class.  ``read_phys`` is page-cached; ``registers`` is cached per CPU."""

    name = "target"

    def __init__(self) -> None:
        self._pages: dict[int, bytes] = {}
        self._regs: dict[int, dict] = {}
        self.page_reads = 0        # pages fetched from the source (cache misses)

    # ---- to implement -------------------------------------------------
    def _read_page(self, pfn: int) -> bytes:
        raise NotImplementedError

    def _read_pages(self, pfn: int, count: int) -> list[bytes]:
        """Several consecutive pages; sources with cheap bulk reads override."""
        return [self._read_page(pfn + i) for i in range(count)]

    def _registers(self, cpu: int) -> dict:
        raise NotImplementedError

    @property
    def ncpus(self) -> int:
        raise NotImplementedError

    # ---- public -------------------------------------------------------
    def read_phys(self, pa: int, n: int) -> bytes:
        if pa < 0 or n < 0 or pa + n > 1 << 52:
            raise TargetError(f"bad physical range {pa:#x}+{n:#x}")
        if n == 0:
            return b""
        first, last = pa >> 12, (pa + n - 1) >> 12
        missing = [p for p in range(first, last + 1) if p not in self._pages]
        if missing:
            # group consecutive missing pages into runs
            run_start = prev = missing[0]
            runs = []
            for p in missing[1:]:
                if p != prev + 1:
                    runs.append((run_start, prev - run_start + 1))
                    run_start = p
                prev = p
            runs.append((run_start, prev - run_start + 1))
            for start, count in runs:
                for i, data in enumerate(self._read_pages(start, count)):
                    if len(data) != PAGE:
                        raise TargetError(f"{self.name}: short read at {(start + i) << 12:#x}")
                    self._pages[start + i] = bytes(data)
                self.page_reads += count
        if first == last:
            off = pa & 0xFFF
            return self._pages[first][off:off + n]
        buf = b"".join(self._pages[p] for p in range(first, last + 1))
        off = pa & 0xFFF
        return buf[off:off + n]

    def read_table(self, pa: int) -> tuple[int, ...]:
        """The 4 KiB page at ``pa`` (rounded down) as 512 little-endian u64
        (a page-table page; the paging walker's fast path)."""
        return _U512.unpack(self.read_table_bytes(pa))

    def read_table_bytes(self, pa: int) -> bytes:
        """The 4 KiB page at ``pa`` (rounded down): a page-table page's bytes."""
        return self.read_phys(pa & ~0xFFF, PAGE)

    def read_u64(self, pa: int) -> int:
        return struct.unpack("<Q", self.read_phys(pa, 8))[0]

    def registers(self, cpu: int) -> dict:
        if not 0 <= cpu < self.ncpus:
            raise TargetError(f"no CPU {cpu} (the target has {self.ncpus})")
        if cpu not in self._regs:
            self._regs[cpu] = self._registers(cpu)
        return dict(self._regs[cpu])

    def prefetch_registers(self) -> None:
        """Fetch every vCPU's registers now if the source does that cheaper in
        one pass than one by one (the gdb source); a no-op here."""

    def cpus(self) -> Iterable[int]:
        return range(self.ncpus)

    def invalidate(self) -> None:
        self._pages.clear()
        self._regs.clear()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DictTarget(Target):
    """Memory from a {page PA: bytes} dict and fixed registers (tests, fixtures)."""

    name = "dict"

    def __init__(self, pages: dict[int, bytes] | None = None, regs: list[dict] | None = None,
                 zero_fill: bool = False):
        super().__init__()
        self.pages = dict(pages or {})
        self.regs = list(regs or [{}])
        self.zero_fill = zero_fill

    def _read_page(self, pfn: int) -> bytes:
        pa = pfn << 12
        if pa in self.pages:
            return self.pages[pa]
        if self.zero_fill:
            return bytes(PAGE)
        raise UnbackedMemory(pa, PAGE, "not in the recorded pages")

    def _registers(self, cpu: int) -> dict:
        return dict(self.regs[cpu])

    @property
    def ncpus(self) -> int:
        return len(self.regs)


class RecordingTarget(Target):
    """Wraps a target and remembers every page read (to write small fixtures)."""

    name = "recording"

    def __init__(self, inner: Target):
        super().__init__()
        self.inner = inner
        self.recorded: dict[int, bytes] = {}

    def _read_page(self, pfn: int) -> bytes:
        data = self.inner.read_phys(pfn << 12, PAGE)
        self.recorded[pfn << 12] = data
        return data

    def _registers(self, cpu: int) -> dict:
        return self.inner.registers(cpu)

    @property
    def ncpus(self) -> int:
        return self.inner.ncpus

    def invalidate(self) -> None:
        super().invalidate()
        self.inner.invalidate()
