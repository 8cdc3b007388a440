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
        return _U512.unpack(self.read_table_bytes(pa))

    def read_table_bytes(self, pa: int) -> bytes:
        # No page cache (the file is the guest's RAM; a stopped guest does not
        # change it).  pread, not the mapping: a hostile walk touches pages all
        # over RAM, and each fault on the mapping maps 64 KiB around it into
        # this process (512 MiB of garbage tables: +500 MiB RSS).
        data = os.pread(self._fd, PAGE, self.layout.offset(pa & ~0xFFF, PAGE))
        if len(data) != PAGE:
            raise TargetError(f"guest RAM file: short read at {pa:#x}")
        return data

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


# ---------------------------------------------------------------- discovery
def _qemu_size(s: str) -> int | None:
    s = s.strip()
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    unit = s[-1:].upper() if s[-1:].isalpha() else ""
    try:
        return int(s[:len(s) - len(unit)] if unit else s) * mult[unit]
    except (ValueError, KeyError):
        return None


def _opts(s: str) -> dict[str, str]:
    out = {}
    for i, part in enumerate(s.split(",")):
        k, sep, v = part.partition("=")
        if sep:
            out[k] = v
        elif i == 0:
            out["type"] = k
    return out


def ram_file_from_qemu_argv(argv: list[str], gdb_port: int) -> dict | None:
    """If this QEMU command line serves a gdbstub on ``gdb_port`` and backs the
    machine's RAM with a shared memory-backend-file: {path, size, machine,
    max_ram_below_4g}; else None."""
    port = None
    backends: dict[str, dict] = {}
    machine: dict[str, str] = {}
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if a == "-s":
            port = port or 1234
        elif a == "-gdb" and nxt.startswith("tcp:"):
            p = nxt.split(",")[0].rpartition(":")[2]
            port = int(p) if p.isdigit() else port
        elif a == "-object" and nxt.startswith("memory-backend-file"):
            o = _opts(nxt)
            backends[o.get("id", "")] = o
        elif a in ("-machine", "-M"):
            machine.update(_opts(nxt))
    if port != gdb_port:
        return None
    be = backends.get(machine.get("memory-backend", ""))
    if be is None or be.get("share") not in ("on", "true", "yes") or "mem-path" not in be:
        return None
    size = _qemu_size(be.get("size", ""))
    if size is None:
        return None
    mtype = machine.get("type", "pc")
    return {"path": be["mem-path"], "size": size,
            "machine": "q35" if mtype.startswith("q35") else "pc",
            "max_ram_below_4g": _qemu_size(machine["max-ram-below-4g"]) if "max-ram-below-4g" in machine else None}


def find_ram_file(gdb_port: int, proc: str = "/proc") -> dict | None:
    """The RAM file of the local QEMU whose gdbstub listens on ``gdb_port``
    (see ``ram_file_from_qemu_argv``), or None."""
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(os.path.join(proc, pid, "cmdline"), "rb") as fh:
                raw = fh.read()
        except OSError:
            continue
        if b"qemu-system" not in raw or b"memory-backend-file" not in raw:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
        found = ram_file_from_qemu_argv(argv, gdb_port)
        if found and os.path.exists(found["path"]):
            return found
    return None
