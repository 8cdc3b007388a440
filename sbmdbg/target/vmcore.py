"""Offline source: a QEMU ``dump-guest-memory`` ELF vmcore.

Memory from PT_LOAD segments (by p_paddr); registers from the per-CPU
"QEMU" notes (QEMUCPUState, target/i386/arch_dump.c), falling back to the
"CORE" NT_PRSTATUS notes for the general registers.
"""
from __future__ import annotations

import bisect
import mmap
import os
import struct

from elftools.elf.elffile import ELFFile

from sbmdbg.target.base import PAGE, Target, TargetError, UnbackedMemory

_SEGS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
#: Bounds on what a (hostile) vmcore header may ask of us.
MAX_NOTES_BYTES = 16 << 20
MAX_CPUS = 4096
MAX_SEGMENTS = 1 << 16

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


def parse_qemu_cpu_state(desc: bytes) -> dict:
    version, size = struct.unpack_from("<II", desc, 0)
    off = 8
    regs = dict(zip(_GPRS, struct.unpack_from("<18Q", desc, off)))
    off += 18 * 8
    for name in _SEGS:
        sel, _limit, _flags, _pad, base = struct.unpack_from("<IIIIQ", desc, off)
        off += 24
        if name in ("cs", "ds", "es", "fs", "gs", "ss"):
            regs[name] = sel
        if name in ("fs", "gs"):
            regs[f"{name}_base"] = base
    cr = struct.unpack_from("<5Q", desc, off)
    off += 40
    regs.update(cr0=cr[0], cr2=cr[2], cr3=cr[3], cr4=cr[4])
    if size >= off + 8 and len(desc) >= off + 8:
        regs["k_gs_base"] = struct.unpack_from("<Q", desc, off)[0]
    regs["_version"] = version
    return regs


def _iter_notes(data: bytes):
    off = 0
    while off + 12 <= len(data):
        namesz, descsz, ntype = struct.unpack_from("<III", data, off)
        off += 12
        name = data[off:off + namesz].rstrip(b"\0").decode("latin-1")
        off += (namesz + 3) & ~3
        desc = data[off:off + descsz]
        off += (descsz + 3) & ~3
        yield name, ntype, desc


class VmcoreTarget(Target):
    name = "vmcore"

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        try:
            self._fh = open(path, "rb")
        except OSError as e:
            raise TargetError(f"cannot open vmcore {path}: {e.strerror}") from None
        try:
            elf = ELFFile(self._fh)
            if elf.header["e_type"] != "ET_CORE":
                raise TargetError(f"{path} is not an ELF core dump")
            if elf.num_segments() > MAX_SEGMENTS:
                raise TargetError(f"{path}: {elf.num_segments()} program headers (at most {MAX_SEGMENTS})")
            fsize = os.fstat(self._fh.fileno()).st_size
            self._segs: list[tuple[int, int, int, int]] = []  # paddr, filesz, memsz, offset
            cpus: list[dict] = []
            core: list[dict] = []
            for seg in elf.iter_segments():
                if seg["p_type"] == "PT_LOAD":
                    off = seg["p_offset"]
                    filesz = max(0, min(seg["p_filesz"], fsize - off))   # past the file: unbacked
                    self._segs.append((seg["p_paddr"], filesz, seg["p_memsz"], off))
                elif seg["p_type"] == "PT_NOTE":
                    if seg["p_filesz"] > MAX_NOTES_BYTES or seg["p_offset"] + seg["p_filesz"] > fsize:
                        raise TargetError(f"{path}: a PT_NOTE of {seg['p_filesz']} bytes at "
                                          f"{seg['p_offset']:#x} (file {fsize} bytes)")
                    for name, ntype, desc in _iter_notes(seg.data()):
                        if name == "QEMU":
                            cpus.append(parse_qemu_cpu_state(desc))
                        elif name == "CORE" and ntype == 1 and len(desc) >= 112 + 27 * 8:
                            # elf_prstatus: pr_reg at 112 (x86_64), user_regs_struct order
                            r = struct.unpack_from("<27Q", desc, 112)
                            core.append({"r15": r[0], "r14": r[1], "r13": r[2], "r12": r[3],
                                         "rbp": r[4], "rbx": r[5], "r11": r[6], "r10": r[7],
                                         "r9": r[8], "r8": r[9], "rax": r[10], "rcx": r[11],
                                         "rdx": r[12], "rsi": r[13], "rdi": r[14], "rip": r[16],
                                         "cs": r[17], "rflags": r[18], "rsp": r[19], "ss": r[20],
                                         "fs_base": r[21], "gs_base": r[22]})
        except TargetError:
            self._fh.close()
            raise
        except Exception as e:  # noqa: BLE001 - a malformed file is bad input
            self._fh.close()
            raise TargetError(f"cannot parse vmcore {path}: {e}") from None
        self._segs.sort()
        self._starts = [s[0] for s in self._segs]
        self._cpus = (cpus or core)[:MAX_CPUS]
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) \
            if os.fstat(self._fh.fileno()).st_size else None

    def _find(self, pa: int, n: int) -> int:
        i = bisect.bisect_right(self._starts, pa) - 1
        if i >= 0:
            paddr, filesz, memsz, off = self._segs[i]
            if pa + n <= paddr + filesz:
                return off + pa - paddr
        raise UnbackedMemory(pa, n, "not in any PT_LOAD segment of the vmcore")

    def _read_page(self, pfn: int) -> bytes:
        off = self._find(pfn << 12, PAGE)
        return self._mm[off:off + PAGE]

    def _registers(self, cpu: int) -> dict:
        return dict(self._cpus[cpu])

    @property
    def ncpus(self) -> int:
        return len(self._cpus)

    def ranges(self) -> list[tuple[int, int]]:
        return [(p, p + f) for p, f, _m, _o in self._segs]

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
        self._fh.close()
