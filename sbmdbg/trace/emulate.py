"""Emulated step-over: execute a probe's instruction in the tracer instead of
letting gdb single-step it.

Why: to continue from a breakpoint gdb removes it, single-steps the vCPU and
re-inserts it.  Under TCG a single step flushes QEMU's whole translation
cache (cpu_single_step -> tb_flush), so the guest then re-translates
everything it runs: measured ~20 ms per stop on the demo, against ~1 ms for
the gdbstub packets themselves.  If the tracer instead performs the probed
instruction itself (new register values, PC past it), gdb resumes with a
plain ``vCont;c``: no step, no breakpoint removal, no cache flush.

Only a few instruction forms are emulated, the ones the probe sites are
chosen on (points.py): NOPs, ``mov r64,r64``, ``pop r64``, loads
``mov [gs:]disp(base|rip), r32/r64`` and ``lea disp(base), r64``.  Anything
else returns None and the probe falls back to gdb's step-over.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

REGS64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Insn:
    length: int
    op: str                    # nop | mov | pop | load | lea
    dst: str | None = None
    src: str | None = None     # register (mov) or base register (load/lea), "rip" for rip-relative
    disp: int = 0
    size: int = 8              # load size in bytes (4 zero-extends)
    gs: bool = False

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, 0, False) or k == "length"}


def _modrm_mem(code: bytes, i: int, rex: int) -> tuple[str, int, int] | None:
    """Memory operand at code[i] (ModRM) -> (base, disp, bytes used) or None."""
    modrm = code[i]
    mod, rm = modrm >> 6, modrm & 7
    j = i + 1
    if mod == 3:
        return None
    if rm == 4:            # SIB: only base, no index (0x24 with base rsp/r12)
        if j >= len(code):
            return None
        sib = code[j]
        if (sib >> 3) & 7 != 4 or sib >> 6:
            return None
        base_n = (sib & 7) | (rex & 1) << 3
        if sib & 7 == 5 and mod == 0:
            return None
        j += 1
        base = REGS64[base_n]
    elif rm == 5 and mod == 0:
        if j + 4 > len(code):
            return None
        return "rip", struct.unpack_from("<i", code, j)[0], j + 4 - i
    else:
        base = REGS64[rm | (rex & 1) << 3]
    if mod == 1:
        if j + 1 > len(code):
            return None
        return base, struct.unpack_from("<b", code, j)[0], j + 1 - i
    if mod == 2:
        if j + 4 > len(code):
            return None
        return base, struct.unpack_from("<i", code, j)[0], j + 4 - i
    return base, 0, j - i


def _modrm_len(code: bytes, i: int) -> int | None:
    """Bytes of a ModRM operand (+SIB +disp) at code[i], whatever it addresses."""
    if i >= len(code):
        return None
    modrm = code[i]
    mod, rm = modrm >> 6, modrm & 7
    n = 1
    if mod != 3 and rm == 4:
        if i + 1 >= len(code):
            return None
        n += 1
        if mod == 0 and code[i + 1] & 7 == 5:
            n += 4
    if mod == 0 and rm == 5:
        n += 4
    n += {1: 1, 2: 4}.get(mod, 0)
    return n if i + n <= len(code) else None


def _nop_len(code: bytes) -> int | None:
    i = 0
    while i < len(code) and code[i] in (0x66, 0x2E) and i < 4:
        i += 1
    if i < len(code) and code[i] == 0x90:
        return i + 1
    if i + 2 < len(code) and code[i] == 0x0F and code[i + 1] == 0x1F and (code[i + 2] >> 3) & 7 == 0:
        m = _modrm_len(code, i + 2)
        return None if m is None else i + 2 + m
    return None


def decode(code: bytes) -> Insn | None:
    """The instruction at code[0] if it is one we emulate."""
    if not code:
        return None
    n = _nop_len(code)
    if n is not None:
        return Insn(n, "nop")
    i, gs, rex = 0, False, 0
    if code[i] == 0x65:
        gs, i = True, i + 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex, i = code[i], i + 1
    if i >= len(code):
        return None
    op = code[i]
    if not gs and 0x58 <= op <= 0x5F and not rex & 8:
        return Insn(i + 1, "pop", dst=REGS64[(op - 0x58) | (rex & 1) << 3])
    if op in (0x89, 0x8B, 0x8D) and i + 1 < len(code):
        modrm = code[i + 1]
        reg = REGS64[(modrm >> 3) & 7 | (rex >> 2 & 1) << 3]
        if modrm >> 6 == 3:
            if op == 0x8D or gs or not rex & 8:
                return None
            rm = REGS64[modrm & 7 | (rex & 1) << 3]
            return Insn(i + 2, "mov", dst=rm if op == 0x89 else reg, src=reg if op == 0x89 else rm)
        if op == 0x89:
            return None            # a store: we do not write guest memory
        m = _modrm_mem(code, i + 1, rex)
        if m is None:
            return None
        base, disp, used = m
        length = i + 1 + used
        if op == 0x8D:
            if gs or not rex & 8 or base == "rip":
                return None
            return Insn(length, "lea", dst=reg, src=base, disp=disp)
        return Insn(length, "load", dst=reg, src=base, disp=disp, size=8 if rex & 8 else 4, gs=gs)
    return None


def execute(insn: Insn, pc: int, reg: Callable[[str], int],
            read: Callable[[int, int], bytes]) -> dict[str, int]:
    """Register writes (rip included) that perform ``insn`` at ``pc``."""
    nxt = (pc + insn.length) & U64
    out = {"rip": nxt}
    if insn.op == "mov":
        out[insn.dst] = reg(insn.src)
    elif insn.op == "pop":
        sp = reg("rsp")
        out[insn.dst] = struct.unpack("<Q", read(sp, 8))[0]
        if insn.dst != "rsp":
            out["rsp"] = (sp + 8) & U64
    elif insn.op in ("load", "lea"):
        addr = (nxt if insn.src == "rip" else reg(insn.src)) + insn.disp
        if insn.gs:
            addr += reg("gs_base")
        addr &= U64
        if insn.op == "lea":
            out[insn.dst] = addr
        else:
            data = read(addr, insn.size)
            out[insn.dst] = struct.unpack("<Q" if insn.size == 8 else "<I", data)[0]
    return out
