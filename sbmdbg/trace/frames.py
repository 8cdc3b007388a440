"""Sandbox interrupts from the hardware exception frame (no QEMU ``-d int``).

Two kinds of plugin probe (sbmdbg/vm/plugin/sbmtrace.c):

* ``sbment`` (the default for every vector that enters through
  error_entry: exceptions, external interrupts, system vectors): on the first
  store of ``.Lerror_entry_from_sbm`` (``andb $~3, CS+8(%rsp)``), a label
  only an entry from a sandbox reaches.  pt_regs is complete there (the
  sandbox's registers and the hardware frame, error code in orig_ax) and the
  handler's return address is right below it: one ``@sbm E`` line; the
  vector is the handler's whose ``call error_entry`` returns there
  (``PluginTracer.vector_of``), or pt_regs->orig_ax for the external vectors'
  common entry.  The andb has cleared the frame's RPL: the CPU pushed 3.
* ``frame`` (NMI, #DF and any vector that does not enter through
  error_entry; every vector on a kernel without the label): on the first
  push of the IDT handler, described below.

The ``frame`` probe sits on
the first push of every IDT handler: that store lands just below the frame
the CPU pushed (``[error code,] RIP, CS, RFLAGS, RSP, SS``), so the plugin
reads the frame from guest RAM at the store's physical address and writes
one ``@sbm F`` line, only for a frame from CPL 3 of a task that is in a
sandbox (``thread_info.sbm_state`` set).  The entry code then saves the
sandbox's registers right below the frame (``struct pt_regs``, which ends
with it); the plugin writes them as ``@sbm R`` at ``sync_regs`` (or at the
vCPU's next probe).  This module turns those lines into the ``int``
records the ``-d int`` log parser (fast.LogParser) produces, so the same
state machine (fast.Assembler) builds the events:

    vector      the handler's (each IDT vector has its own entry stub)
    error       the frame's error code (0 for a vector that pushes none, as QEMU logs it)
    cs/ip/sp    the frame's CS (as the CPU pushed it: before the entry code
                rewrites it to __SBM_CS), RIP and RSP
    regs        RAX.. R15 from pt_regs, RIP, RSP, CR3 = the task's sandbox CR3
                (x86_sbm_state.sbm_cr3)
    cr2         #PF only: CR2 is in no memory the kernel writes on this path,
                so it is recomputed: RIP for an instruction fetch (error bit
                I), else the faulting instruction's memory operand (decoded
                from vmlinux with capstone) from the saved registers
                (implicit stack and string operands included); None when
                that cannot be known (an FS-relative operand)
    gs_base     the vCPU's per-CPU base when the operand needs it; None in the
                record (the sandbox's GS base at the interrupt is not in
                memory: the entry code overwrites it)

What it cannot show that ``-d int`` shows: the GS base at the interrupt (the
``gs_base`` attack is named by the gdb tracer and the ``-d int`` source),
and, for a software interrupt (int3, int n), QEMU logs the instruction's
address where the frame holds the next one.
"""
from __future__ import annotations

#: vectors whose frame has an error code (SDM vol. 3, table 6-1)
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
PF_W, PF_I = 2, 16
U64 = (1 << 64) - 1
GPRS = ("ax", "bx", "cx", "dx", "si", "di", "bp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15")
_FIRST = 12          # instructions looked at for a handler's first push


def _cs():
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    return md


def first_push(code: bytes, addr: int) -> int | None:
    """The address of the first instruction of an IDT handler that stores
    to the stack (push, call), or None.  ``code`` is the handler's runtime
    code (alternatives applied) at ``addr``."""
    for ins in _cs().disasm(code, addr, _FIRST):
        if ins.mnemonic.startswith(("push", "call")):
            return ins.address
        if ins.mnemonic.startswith(("j", "ret", "iret", "sysret")):
            return None
    return None


def calls_to(code: bytes, addr: int, target: int) -> bool:
    """Does ``code`` (a whole entry function at ``addr``) call ``target`` directly?"""
    from capstone import x86 as cx

    for ins in _cs().disasm(code, addr):
        if ins.mnemonic == "call" and ins.operands and ins.operands[0].type == cx.X86_OP_IMM \
                and ins.operands[0].imm & U64 == target:
            return True
    return False


def first_store(code: bytes, addr: int) -> tuple[int, str | None, int] | None:
    """(address, base register, displacement) of the first instruction in
    ``code`` that writes a memory operand (``andb $~3, CS+8(%rsp)`` at
    .Lerror_entry_from_sbm), or None."""
    import capstone
    from capstone import x86 as cx

    for ins in _cs().disasm(code, addr, _FIRST):
        for op in ins.operands:
            if op.type == cx.X86_OP_MEM and op.access & capstone.CS_AC_WRITE:
                return ins.address, ins.reg_name(op.mem.base) if op.mem.base else None, op.mem.disp
        if ins.mnemonic.startswith(("j", "ret", "call")):
            return None
    return None


def frame_words(vector: int) -> int:
    """Words the plugin reads from the push's store: the pushed word,
    [the error code,] RIP, CS, RFLAGS, RSP, SS."""
    return 7 if vector in ERROR_CODE_VECTORS else 6


_R32 = {"eax": "RAX", "ebx": "RBX", "ecx": "RCX", "edx": "RDX", "esi": "RSI", "edi": "RDI",
        "ebp": "RBP", "esp": "RSP"}


def _reg(regs: dict, name: str) -> int | None:
    """A capstone register name's value from the saved registers (RAX.. R15, RSP)."""
    if name in _R32:
        v = regs.get(_R32[name])
        return None if v is None else v & 0xFFFFFFFF
    if name.startswith("r") and name.endswith("d"):
        v = regs.get(name[:-1].upper())
        return None if v is None else v & 0xFFFFFFFF
    return regs.get(name.upper())


def fault_address(code: bytes | None, rip: int, error: int, regs: dict,
                  gs_base: int | None = None) -> int | None:
    """CR2 of a #PF at ``rip`` with ``error``, from the registers the entry
    code saved (``regs``: RAX.. R15, RSP as keys) and the instruction's bytes."""
    if error & PF_I:
        return rip
    if not code:
        return None
    from capstone import x86 as cx

    ins = next(iter(_cs().disasm(code, rip, 1)), None)
    if ins is None:
        return None
    m, rsp, write = ins.mnemonic, regs.get("RSP"), bool(error & PF_W)
    if write and m.startswith(("push", "call")) and rsp is not None:
        return (rsp - 8) & U64
    if not write and m.startswith(("pop", "ret")) and rsp is not None:
        return rsp
    op0 = ins.opcode[0]
    if op0 in (0xA4, 0xA5):                     # movs: reads [rsi], writes [rdi]
        return regs.get("RDI") if write else regs.get("RSI")
    if op0 in (0xAA, 0xAB, 0xAE, 0xAF):         # stos, scas: [rdi]
        return regs.get("RDI")
    if op0 in (0xAC, 0xAD, 0xA6, 0xA7):         # lods, cmps: [rsi] first
        return regs.get("RSI")
    mems = [op for op in ins.operands if op.type == cx.X86_OP_MEM]
    if not mems:
        return None
    op = mems[0]
    ea = op.mem.disp
    if op.mem.base:
        name = ins.reg_name(op.mem.base)
        if name == "rip":
            ea += rip + ins.size
        else:
            v = _reg(regs, name)
            if v is None:
                return None
            ea += v
    if op.mem.index:
        v = _reg(regs, ins.reg_name(op.mem.index))
        if v is None:
            return None
        ea += v * op.mem.scale
    seg = ins.reg_name(op.mem.segment) if op.mem.segment else None
    if seg == "fs":
        return None
    if seg == "gs":
        if gs_base is None:
            return None
        ea += gs_base
    return ea & U64


class FrameDecoder:
    """``@sbm F``/``@sbm R`` records (fast.LogParser) -> ``int`` records.

    ``ptregs``: struct pt_regs field -> offset (``ax``.. ``r15``);
    ``state_off``: x86_sbm_state field -> offset; ``code_at(addr, n)``:
    vmlinux bytes; ``percpu``: cpu -> per-CPU base (the GS base of an
    unattacked sandbox)."""

    def __init__(self, ptregs: dict[str, int], state_off: dict[str, int], code_at=None,
                 percpu: dict[int, int] | None = None, vector_of=None):
        self.ptregs = {f: o for f, o in ptregs.items() if f in GPRS}
        self.frame_off = {f: ptregs[f] for f in ("orig_ax", "ip", "cs", "sp") if f in ptregs}
        self.vector_of = vector_of      # (entry stub's return address, orig_ax) -> vector or None
        self.state_off = state_off
        self.code_at = code_at
        self.percpu = percpu or {}
        self._pending: dict[int, dict] = {}
        self.frames = 0
        self.with_regs = 0
        self.unknown = 0

    def feed(self, rec: dict) -> list[dict]:
        """An F or R record in; the int records now complete out."""
        c = rec["vcpu"]
        if rec["type"] == "E":
            r = self.decode_entry(rec)
            return self.flush(c) + ([r] if r is not None else [])
        if rec["type"] == "F":
            out = self.flush(c)
            self._pending[c] = rec
            return out
        f = self._pending.pop(c, None)
        return [] if f is None else [self.decode(f, rec.get("rw"))]

    def flush(self, vcpu: int | None = None) -> list[dict]:
        """Frames still waiting for their registers (``vcpu`` None: all)."""
        if vcpu is None:
            out = [self.decode(f, None) for f in self._pending.values()]
            self._pending.clear()
            return out
        f = self._pending.pop(vcpu, None)
        return [] if f is None else [self.decode(f, None)]

    def decode_entry(self, e: dict) -> dict:
        """An ``@sbm E`` record (pt_regs at .Lerror_entry_from_sbm) -> an int
        record.  The entry code has cleared the frame's RPL by then (andb
        $~3): the CPU pushed it with RPL 3, the entry came from CPL 3."""
        rw = e.get("rw") or []
        o = {f: rw[off // 8] if off % 8 == 0 and off // 8 < len(rw) else 0
             for f, off in self.frame_off.items()}
        v = self.vector_of(e.get("ra") or 0, o.get("orig_ax", 0)) if self.vector_of else None
        err = o.get("orig_ax", 0) if v in ERROR_CODE_VECTORS else 0
        sp = o.get("sp", 0)
        words = ([0, err] if v in ERROR_CODE_VECTORS else [0]) + [o.get("ip", 0), o.get("cs", 0) | 3, 0, sp, 0]
        if v is None:                   # a stub the IDT does not name: counted, no event
            self.unknown += 1
            return None
        return self.decode(dict(e, tag=f"v{v}", mw=words), rw)

    def decode(self, f: dict, rw: list[int] | None) -> dict:
        w = f.get("mw") or []
        v = int(f["tag"][1:])
        has_err = len(w) == 7
        err = w[1] if has_err else 0
        rip, cs, _flags, rsp, _ss = (w[-5:] + [0] * 5)[:5] if len(w) >= 5 else (0, 0, 0, 0, 0)
        regs: dict[str, int] = {}
        if rw:
            self.with_regs += 1
            for name, off in self.ptregs.items():
                if off % 8 == 0 and off // 8 < len(rw):
                    regs["R" + name.upper() if name[0] != "r" else name.upper()] = rw[off // 8]
        regs["RIP"], regs["RSP"] = rip, rsp
        sw = f.get("sw") or []
        o = self.state_off.get("sbm_cr3")
        if o is not None and o % 8 == 0 and o // 8 < len(sw):
            regs["CR3"] = sw[o // 8]
        cr2 = None
        if v == 14:
            code = self.code_at(rip, 16) if self.code_at is not None else None
            cr2 = fault_address(code, rip, err, regs, self.percpu.get(f["vcpu"])) if (rw or err & PF_I) else None
        self.frames += 1
        return {"type": "int", "vector": v, "error": err, "is_int": 0, "cpl": cs & 3, "cs": cs,
                "ip": rip, "sp": rsp, "cr2": cr2, "regs": regs, "gs_base": None, "vcpu": f["vcpu"],
                "ns": f.get("ns"), "tsc": f.get("tsc"), "jiffies": f.get("jiffies")}


#: what the cross-check compares (``regs`` keys: the sandbox's registers at the interrupt)
CHECKED = ("vector", "ip", "error", "cpl", "cs", "sp")
CHECKED_REGS = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP", "R8", "R9", "R10", "R11", "R12",
                "R13", "R14", "R15", "CR3")


def crosscheck(dint: list[dict], frames: list[dict], limit: int = 20) -> dict:
    """Compare, per vCPU and in order, the sandbox interrupts QEMU's ``-d int``
    logged with those decoded from the exception frames of the same run:
    vector, RIP, error code, CPL, CS, RSP, CR2 (#PF), the saved registers and
    CR3.  Returns counts and the first ``limit`` differences."""
    out = {"dint": len(dint), "frames": len(frames), "compared": 0, "fields": 0,
           "unknown_vcpu": 0, "mismatches": []}
    bad = out["mismatches"]
    vcpus = sorted({r.get("vcpu") for r in dint + frames if r.get("vcpu") is not None})
    out["unknown_vcpu"] = sum(1 for r in dint if r.get("vcpu") is None)
    for c in vcpus:
        a = [r for r in dint if r.get("vcpu") == c]
        b = [r for r in frames if r.get("vcpu") == c]
        if len(a) != len(b):
            bad.append({"vcpu": c, "what": "count", "dint": len(a), "frames": len(b)})
        for i, (x, y) in enumerate(zip(a, b)):
            out["compared"] += 1
            pairs = [(f, x.get(f), y.get(f)) for f in CHECKED]
            if x.get("vector") == 14:
                pairs.append(("cr2", x.get("cr2"), y.get("cr2")))
            if y.get("regs", {}).get("RAX") is not None:     # the registers came (not a paranoid entry)
                pairs += [(r, x["regs"].get(r), y["regs"].get(r)) for r in CHECKED_REGS]
            for f, u, v in pairs:
                out["fields"] += 1
                if u != v and len(bad) < limit:
                    bad.append({"vcpu": c, "index": i, "vector": x.get("vector"), "field": f,
                                "dint": u, "frames": v})
    out["clean"] = not bad and out["unknown_vcpu"] == 0
    return out
