"""What a sandbox tried: the attack class of an abort or an interrupt.

Issue 15 (hostile sandboxes).  A sandbox runs at CPL 3 and can try what any
user-mode code can: load segment registers, write its FS/GS base, execute
``syscall``/``int $0x80``, far-return into a 32-bit code segment, set TF or
AC, unmask SSE exceptions, hit a WARN site's ``ud2``, write PKRU, or never
return.  ``classify`` names the attempt from

* the vector of the exception (or interrupt) that left the sandbox,
* the instruction bytes at the faulting RIP (and the bytes just before it,
  for traps, whose RIP is the next instruction), read from vmlinux, never
  from guest memory (the sandbox cannot lie about its own code there),
* register evidence: the CS of the interrupted frame, the GS base at the
  interrupt against the CPU's per-CPU bases, the error code, sbm->error.

Pure: bytes and integers in, an :class:`Attack` (or ``None``) out.
"""
from __future__ import annotations

import dataclasses
import errno

#: Vectors (Intel SDM vol. 3, 6.15).
DB, BP, UD, GP, PF, MF, AC, XM = 1, 3, 6, 13, 14, 16, 17, 19
PF_PK = 1 << 5
USER32_CS = 0x20          # GDT_ENTRY_DEFAULT_USER32_CS << 3 (RPL cleared)
EFLAGS_TF, EFLAGS_AC = 1 << 8, 1 << 18


@dataclasses.dataclass(frozen=True)
class Attack:
    """One named attempt: ``name`` is the attack class (the demo scenario's
    name where one exists), ``insn`` the instruction it used, ``evidence``
    the register facts that support it."""

    name: str
    insn: str | None = None
    evidence: tuple[str, ...] = ()

    def to_json(self) -> dict:
        d = {"attack": self.name}
        if self.insn:
            d["attack_insn"] = self.insn
        if self.evidence:
            d["attack_evidence"] = list(self.evidence)
        return d


def _prefixes(code: bytes) -> tuple[int, int, bool]:
    """(index after legacy prefixes and REX, the REX byte or 0, F3 seen)."""
    i, f3 = 0, False
    while i < len(code) and i < 14 and code[i] in (0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36,
                                                   0x3E, 0x26, 0x64, 0x65, 0xF0):
        f3 = f3 or code[i] == 0xF3
        i += 1
    rex = 0
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        rex, i = code[i], i + 1
    return i, rex, f3


_SREG = {0: "es", 1: "cs", 2: "ss", 3: "ds", 4: "fs", 5: "gs"}
_OF01 = {0xEF: "wrpkru", 0xEE: "rdpkru", 0xF8: "swapgs", 0xF9: "rdtscp", 0xCA: "clac",
         0xCB: "stac", 0xD0: "xgetbv", 0xD1: "xsetbv"}
_OF = {0x05: "syscall", 0x07: "sysret", 0x34: "sysenter", 0x35: "sysexit", 0x0B: "ud2",
       0x30: "wrmsr", 0x32: "rdmsr", 0x06: "clts", 0x08: "invd", 0x09: "wbinvd", 0xB9: "ud1",
       0xFF: "ud0", 0xA1: "pop %fs", 0xA9: "pop %gs", 0xB2: "lss", 0xB4: "lfs", 0xB5: "lgs"}
#: opcode -> ModRM.reg -> mnemonic, memory operands only
_MEM_ONE = {0xFF: {3: "lcall *m", 5: "ljmp *m"}, 0xD9: {4: "fldenv", 5: "fldcw"}, 0xDD: {4: "frstor"}}
_OF_MEM = {0x00: {2: "lldt", 3: "ltr"}, 0x01: {2: "lgdt", 3: "lidt", 6: "lmsw", 7: "invlpg"},
           0xC7: {3: "xrstors"}}
_ONE = {0xF1: "int1", 0xCC: "int3", 0xCE: "into", 0xFA: "cli", 0xFB: "sti", 0xF4: "hlt",
        0x9D: "popf", 0xCF: "iret", 0xCB: "lret", 0xCA: "lret $imm", 0x1F: "pop %ds",
        0x07: "pop %es", 0x17: "pop %ss", 0x6C: "insb", 0x6D: "insl", 0x6E: "outsb",
        0x6F: "outsl", 0xE4: "in", 0xE5: "in", 0xE6: "out", 0xE7: "out", 0xEC: "in",
        0xED: "in", 0xEE: "out", 0xEF: "out", 0x9A: "lcall", 0xEA: "ljmp"}


def sensitive_insn(code: bytes) -> str | None:
    """The mnemonic of ``code[0..]`` if it is an instruction that can change
    state outside a sandbox (or try to); else None.  Bounded: looks at most
    at the first 16 bytes."""
    code = bytes(code[:16])
    i, rex, f3 = _prefixes(code)
    if i >= len(code):
        return None
    op = code[i]
    if op in _ONE:
        name = _ONE[op]
        if op == 0xCF and rex & 8:
            name = "iretq"
        elif op == 0xCB and rex & 8:
            name = "lretq"
        return name
    if op == 0xCD:
        return f"int ${code[i + 1]:#x}" if i + 1 < len(code) else "int n"
    if op == 0x8E and i + 1 < len(code):
        sreg = _SREG.get((code[i + 1] >> 3) & 7)
        return f"mov to %{sreg}" if sreg else None
    if op in (0xFF, 0xD9, 0xDD) and i + 1 < len(code):
        reg = (code[i + 1] >> 3) & 7
        if code[i + 1] >> 6 == 3:
            return None
        return _MEM_ONE[op].get(reg)
    if op != 0x0F or i + 1 >= len(code):
        return None
    op2 = code[i + 1]
    if op2 in (0x00, 0x01, 0xC7) and i + 2 < len(code):
        modrm = code[i + 2]
        if op2 == 0x01 and modrm >> 6 == 3:
            return _OF01.get(modrm)
        return _OF_MEM[op2].get((modrm >> 3) & 7) if op2 != 0xC7 or modrm >> 6 != 3 else None
    if op2 == 0xAE and i + 2 < len(code):
        modrm = code[i + 2]
        reg = (modrm >> 3) & 7
        if modrm >> 6 == 3:
            if f3:
                return {0: "rdfsbase", 1: "rdgsbase", 2: "wrfsbase", 3: "wrgsbase"}.get(reg)
            return None
        return {1: "fxrstor", 2: "ldmxcsr", 5: "xrstor"}.get(reg)
    if op2 in (0x20, 0x22):
        return "mov %cr"
    if op2 in (0x21, 0x23):
        return "mov %dr"
    return _OF.get(op2)


#: The first matching rule names the attempt: instruction -> attack class.
_INSN_CLASS = {
    "syscall": "syscall", "sysenter": "syscall", "int $0x80": "int80", "int1": "int1",
    "ud2": "warn_ud2", "wrpkru": "pkru_write", "wrgsbase": "wrgsbase",
    "wrfsbase": "wrfsbase", "mov to %gs": "gs_selector", "mov to %fs": "fs_selector",
    "lret": "lret32", "lretq": "lret32", "lret $imm": "lret32", "ljmp *m": "far_jump",
    "lcall *m": "far_call", "ldmxcsr": "sse_unmasked", "cli": "cli_sti", "sti": "cli_sti",
    "popf": "popf", "int3": "int3",
}


def classify(vector: int | None, code: bytes | None = None, *, before: bytes = b"",
             cs: int | None = None, gs_base: int | None = None,
             percpu_bases=(), error_code: int | None = None, rflags: int | None = None,
             sbm_error: int | None = None) -> Attack | None:
    """Name the attempt behind an exception/interrupt from the sandbox.

    ``code``: vmlinux bytes at the fault RIP (None: not kernel text, e.g. a
    32-bit address after a far return); ``before``: the bytes just before it
    (a trap's RIP is the next instruction); ``cs``: the frame's CS as the CPU
    pushed it; ``gs_base`` and ``percpu_bases``: the GS base at the
    interrupt and every CPU's per-CPU base; ``sbm_error``: sbm->error at the
    exit (-ETIMEDOUT: the time limit)."""
    evidence: list[str] = []
    if gs_base is not None and percpu_bases and gs_base not in set(percpu_bases):
        evidence.append(f"GS base {gs_base:#x} at the interrupt: not the CPU's per-CPU base")
    if cs is not None and (cs & ~3) == USER32_CS:
        evidence.append(f"CS {cs:#x}: a 32-bit (compat) code segment")
    insn = sensitive_insn(code) if code else None
    prev = None
    if before:
        for n in (1, 2, 3):                 # f1; cd nn / 0f 05; prefixed forms
            prev = sensitive_insn(before[-n:])
            if prev:
                break

    if sbm_error == -errno.ETIMEDOUT:
        return Attack("endless_loop", insn, tuple(evidence + ["sbm->error -ETIMEDOUT: the time limit"]))
    if cs is not None and (cs & ~3) == USER32_CS:
        return Attack("lret32", insn, tuple(evidence))
    if vector == DB:
        if prev == "int1":
            return Attack("int1", "int1", tuple(evidence))
        if rflags is not None and rflags & EFLAGS_TF:
            evidence.append("EFLAGS.TF set: single-step trap")
        return Attack("trap_flag", prev, tuple(evidence))
    if vector == AC:
        if rflags is not None and rflags & EFLAGS_AC:
            evidence.append("EFLAGS.AC set at CPL 3")
        return Attack("alignment_check", insn, tuple(evidence))
    if vector == XM:
        return Attack("sse_unmasked", insn, tuple(evidence))
    if vector == MF:
        return Attack("x87_unmasked", insn, tuple(evidence))
    if vector == PF and error_code is not None and error_code & PF_PK:
        return Attack("pkru_write", insn, tuple(evidence + ["#PF error code PK: a protection-key fault"]))
    if vector == BP and prev == "int3":
        return Attack("int3", "int3", tuple(evidence))
    if insn is not None:
        if insn.startswith("int $") and insn != "int $0x80":
            return Attack("int_n", insn, tuple(evidence))
        name = _INSN_CLASS.get(insn)
        if name is not None:
            return Attack(name, insn, tuple(evidence))
        return Attack("privileged_insn", insn, tuple(evidence))
    if evidence and gs_base is not None:
        return Attack("gs_base", None, tuple(evidence))
    return None
