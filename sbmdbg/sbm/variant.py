"""Which SBM implementation the kernel under test has (issue 13), read from
its own code (capstone on vmlinux's bytes), symbols and DWARF -- never
assumed to be ours.

Facets, each with the evidence it was read from:

* ``exc_frame_gap``: bytes between the top of the SBM exception stack and
  the IRET frame x86_sbm_exec builds there.  0 = the reference series
  (``mov %r8, %rsp`` then the IRET frame: pt_regs of an exception from the
  sandbox ends at exc_top); 8 = the v1 series (``sub $8, %r8; mov %rsp,
  (%r8); mov %r8, %rsp``: the kernel rsp at [exc_top-8], the IRET frame
  below it).
* ``rbp_at_entry``: ``zeroed`` when x86_sbm_exec clears rbp before iretq (a
  frame-pointer walk in the sandbox ends at rbp 0), else ``kernel`` (the
  sandbox starts with the kernel's rbp; a walk must not follow it).
* ``handler_stack``: where a handler of an exception from the sandbox runs:
  ``sbm_exception_stack`` when error_entry's sandbox branch ends in ``jmp
  sync_regs`` (pt_regs copied to top_of_intr_stack()), ``entry_stack`` when
  it returns to the idtentry stub (pt_regs stays where the CPU pushed it:
  the cpu_entry_area entry stack, TSS.sp0).
* ``entry_check`` / ``nmi_check``: how error_entry / asm_exc_nmi tell "from
  the sandbox" (``mov x86_sbm_state.kernel_cr3(%rip); test; jne`` or the v1
  shapes ``movq <abs>, %rcx; jrcxz`` and ``cmpq $0, <abs>; jne``), the
  address of the sandbox branch, and whether a PTI bit test (``bt $12``)
  guards it.
* ``exit_check``: restore_regs_and_return_to_kernel's ``cmp $__SBM_CS,
  CS(%rsp)`` (q or w) with ``je`` (sandbox return elsewhere) or ``jne``
  (sandbox return inline, the fall-through); the address of the sandbox
  return.

``name`` is ``reference`` or ``v1`` when every facet agrees with one of
them, else ``mixed``; the faces use the facets, not the name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from sbmdbg.errors import SbmdbgError

SBM_CS = 0x30
U64 = (1 << 64) - 1
PTI_BIT = 12


class VariantError(SbmdbgError):
    pass


@dataclass
class Check:
    shape: str               # a readable form of the instructions
    addr: int                # the first instruction of the check (link-time)
    sandbox: int             # where the sandbox path starts (link-time)
    pti_bit_test: bool = False

    def to_json(self) -> dict:
        return {"shape": self.shape, "addr": self.addr, "sandbox": self.sandbox,
                "pti_bit_test": self.pti_bit_test}


@dataclass
class Variant:
    name: str
    exc_frame_gap: int | None = None
    rbp_at_entry: str | None = None
    handler_stack: str | None = None
    entry_check: Check | None = None
    nmi_check: Check | None = None
    exit_check: Check | None = None
    evidence: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("entry_check", "nmi_check", "exit_check"):
            c = getattr(self, k)
            d[k] = c.to_json() if c else None
        return d

    def describe(self) -> str:
        gap = ("IRET frame at exc_top" if self.exc_frame_gap == 0 else
               f"kernel rsp at [exc_top-{self.exc_frame_gap}], IRET frame below it"
               if self.exc_frame_gap else "exception-stack frame unknown")
        hs = {"sbm_exception_stack": "handlers on the SBM exception stack (sync_regs)",
              "entry_stack": "handlers on the entry stack (no sync_regs)"}.get(self.handler_stack or "",
                                                                                  "handler stack unknown")
        rbp = {"zeroed": "rbp 0 in the sandbox", "kernel": "rbp = the kernel's in the sandbox"}.get(
            self.rbp_at_entry or "", "rbp unknown")
        return f"{self.name}: {gap}; {hs}; {rbp}"


# ---------------------------------------------------------------- decoding
def _disasm(base: int, code: bytes, limit: int = 400) -> list:
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    md.skipdata = True           # alternatives' padding, data: keep going
    return list(md.disasm(code, base))[:limit]


def _mem_ea(insn, op) -> int | None:
    """The absolute address of a memory operand without base/index registers
    (rip-relative or a sign-extended 32-bit absolute), else None."""
    from capstone import x86 as cx
    m = op.mem
    if m.index != 0:
        return None
    if m.base == cx.X86_REG_RIP:
        return (insn.address + insn.size + m.disp) & U64
    if m.base == 0:
        return m.disp & U64
    return None


def _ops(insn) -> list:
    try:
        return list(insn.operands)
    except Exception:  # noqa: BLE001 - skipdata pseudo-instructions have no detail
        return []


def _branch_target(insn) -> int | None:
    ops = _ops(insn)
    from capstone import x86 as cx
    if len(ops) == 1 and ops[0].type == cx.X86_OP_IMM:
        return ops[0].imm & U64
    return None


def _is_pti_bt(insn) -> bool:
    from capstone import x86 as cx
    ops = _ops(insn)
    return (insn.mnemonic == "bt" and len(ops) == 2 and ops[1].type == cx.X86_OP_IMM
            and ops[1].imm == PTI_BIT)


def find_cr3_check(base: int, code: bytes, kernel_cr3_va: int) -> Check:
    """The "came from the sandbox" check in an entry path: a load or compare
    of x86_sbm_state.kernel_cr3 (rip-relative or absolute) and its branch."""
    from capstone import x86 as cx
    ins = _disasm(base, code)
    for i, a in enumerate(ins):
        mem = [op for op in _ops(a) if op.type == cx.X86_OP_MEM]
        if len(mem) != 1 or _mem_ea(a, mem[0]) != kernel_cr3_va & U64:
            continue
        rip_rel = mem[0].mem.base == cx.X86_REG_RIP
        where = "(%rip)" if rip_rel else " (absolute)"
        bt = any(_is_pti_bt(x) for x in ins[max(0, i - 3):i])
        nxt = ins[i + 1] if i + 1 < len(ins) else None
        if a.mnemonic == "mov" and nxt is not None:
            reg = a.reg_name(_ops(a)[0].reg) if _ops(a)[0].type == cx.X86_OP_REG else None
            if nxt.mnemonic == "jrcxz" and reg == "rcx":
                # zero: not the sandbox (branch); non-zero: the sandbox path falls through
                return Check(f"movq x86_sbm_state.kernel_cr3{where}, %rcx; jrcxz", a.address,
                             nxt.address + nxt.size, bt)
            if nxt.mnemonic == "test" and i + 2 < len(ins) and ins[i + 2].mnemonic in ("jne", "jnz"):
                t = _branch_target(ins[i + 2])
                if t is not None:
                    return Check(f"mov x86_sbm_state.kernel_cr3{where}, %{reg}; test; jne", a.address, t, bt)
        if a.mnemonic == "cmp" and nxt is not None and nxt.mnemonic in ("jne", "jnz"):
            ops = _ops(a)
            if len(ops) == 2 and ops[1].type == cx.X86_OP_IMM and ops[1].imm == 0:
                t = _branch_target(nxt)
                if t is not None:
                    return Check(f"cmpq $0, x86_sbm_state.kernel_cr3{where}; jne", a.address, t, bt)
    raise VariantError("no x86_sbm_state.kernel_cr3 check (mov+test+jne, movq+jrcxz or cmpq $0+jne) found")


def find_exit_check(base: int, code: bytes, cs_off: int) -> Check:
    """restore_regs_and_return_to_kernel: ``cmp $__SBM_CS, CS(%rsp)`` then
    ``je L`` (sandbox return at L) or ``jne L`` (sandbox return inline)."""
    from capstone import x86 as cx
    ins = _disasm(base, code, 80)
    for i, a in enumerate(ins[:-1]):
        ops = _ops(a)
        if a.mnemonic != "cmp" or len(ops) != 2 or ops[0].type != cx.X86_OP_MEM:
            continue
        m = ops[0].mem
        if m.base != cx.X86_REG_RSP or m.index != 0 or m.disp != cs_off:
            continue
        if ops[1].type != cx.X86_OP_IMM or ops[1].imm != SBM_CS:
            continue
        j = ins[i + 1]
        width = {8: "q", 4: "l", 2: "w", 1: "b"}.get(ops[0].size, "")
        t = _branch_target(j)
        if t is None:
            continue
        if j.mnemonic in ("je", "jz"):
            return Check(f"cmp{width} $__SBM_CS, CS(%rsp); je", a.address, t)
        if j.mnemonic in ("jne", "jnz"):
            return Check(f"cmp{width} $__SBM_CS, CS(%rsp); jne", a.address, j.address + j.size)
    raise VariantError("no cmp $__SBM_CS, CS(%rsp) with je/jne found")


def exec_frame(base: int, code: bytes) -> dict:
    """x86_sbm_exec: where the IRET frame goes below the exception stack
    top (r8), whether the kernel rsp is stored above it, whether rbp is
    cleared before iretq, whether it sets up a frame of its own."""
    from capstone import x86 as cx
    ins = _disasm(base, code)
    gap, slot, own_frame, rbp_cleared, iret = None, False, False, False, None
    sub = 0
    for a in ins:
        ops = _ops(a)
        regs = [a.reg_name(o.reg) for o in ops if o.type == cx.X86_OP_REG]
        if a.mnemonic == "mov" and regs == ["rbp", "rsp"]:
            own_frame = True
        if a.mnemonic == "sub" and regs == ["r8"] and len(ops) == 2 and ops[1].type == cx.X86_OP_IMM:
            sub += ops[1].imm
        if (a.mnemonic == "mov" and len(ops) == 2 and ops[0].type == cx.X86_OP_MEM
                and ops[0].mem.base == cx.X86_REG_R8 and ops[0].mem.disp == 0 and regs == ["rsp"]):
            slot = True
        if a.mnemonic == "mov" and regs == ["rsp", "r8"] and gap is None:
            gap = sub
        if a.mnemonic == "xor" and regs in (["ebp", "ebp"], ["rbp", "rbp"]) and gap is not None:
            rbp_cleared = True
        if a.mnemonic == "iretq":
            iret = a.address
            break
    if gap is None or iret is None:
        raise VariantError("x86_sbm_exec: no `mov %r8, %rsp` ... iretq (exception-stack switch) found")
    return {"exc_frame_gap": gap, "kernel_rsp_slot": slot and gap >= 8, "own_frame": own_frame,
            "rbp_cleared": rbp_cleared, "iretq": iret}


def follow_sandbox_branch(symbols, start: int, max_jumps: int = 8) -> tuple[str, str]:
    """From error_entry's sandbox branch, follow jumps: ``jmp sync_regs`` ->
    the handler runs on top_of_intr_stack(); a ``ret`` (back to the idtentry
    stub with pt_regs where the CPU pushed it) -> the entry stack."""
    sync = symbols.get("sync_regs")
    pc = start
    for _ in range(max_jumps):
        code = symbols.read_file_bytes(pc, 160)
        if not code:
            break
        for a in _disasm(pc, code, 60):
            if a.mnemonic in ("ret", "retq"):
                return "entry_stack", f"the sandbox branch at {start:#x} returns to the stub at {a.address:#x}"
            if a.mnemonic == "jmp":
                t = _branch_target(a)
                if t is None:
                    return "unknown", f"indirect jmp at {a.address:#x}"
                if sync is not None and t == sync:
                    return "sbm_exception_stack", f"the sandbox branch at {start:#x} jumps to sync_regs"
                if t == symbols.get("__x86_return_thunk"):     # RET with return thunks
                    return "entry_stack", f"the sandbox branch at {start:#x} returns to the stub at {a.address:#x}"
                pc = t
                break
        else:
            break
    return "unknown", f"the sandbox branch at {start:#x}: neither jmp sync_regs nor ret"


# ---------------------------------------------------------------- detection
def detect_from(symbols, kernel_cr3_va: int | None, cs_off: int) -> Variant:
    """Detection from vmlinux's symbols and bytes (``symbols``: get, size,
    read_file_bytes); ``kernel_cr3_va`` = &x86_sbm_state.kernel_cr3 (DWARF)."""
    v = Variant("unknown")

    def code_of(name, n=None):
        a = symbols.get(name)
        if a is None:
            raise VariantError(f"vmlinux has no symbol {name}")
        data = symbols.read_file_bytes(a, n or symbols.size(name) or 512)
        if not data:
            raise VariantError(f"cannot read the code of {name} from vmlinux")
        return a, data

    try:
        a, code = code_of("x86_sbm_exec")
        f = exec_frame(a, code)
        v.exc_frame_gap = f["exc_frame_gap"]
        v.rbp_at_entry = "zeroed" if f["rbp_cleared"] else "kernel"
        v.evidence.append(
            "x86_sbm_exec: " + ("`sub $8,%r8; mov %rsp,(%r8); mov %r8,%rsp`: kernel rsp at [exc_top-8]"
                                 if f["kernel_rsp_slot"] else f"IRET frame {f['exc_frame_gap']} bytes below exc_top")
            + ("; clears rbp before iretq" if f["rbp_cleared"] else "; rbp not cleared before iretq")
            + ("; own frame (mov %rsp,%rbp)" if f["own_frame"] else "; no frame of its own"))
    except VariantError as e:
        v.errors.append(str(e))
    if kernel_cr3_va is not None:
        for attr, fn in (("entry_check", "error_entry"), ("nmi_check", "asm_exc_nmi")):
            try:
                a, code = code_of(fn)
                c = find_cr3_check(a, code, kernel_cr3_va)
                setattr(v, attr, c)
                v.evidence.append(f"{fn}: {c.shape}" + (" (after a PTI bit test)" if c.pti_bit_test else "")
                                  + f"; sandbox path at {c.sandbox:#x}")
            except VariantError as e:
                v.errors.append(f"{fn}: {e}")
    if v.entry_check is not None:
        v.handler_stack, why = follow_sandbox_branch(symbols, v.entry_check.sandbox)
        v.evidence.append(f"error_entry: {why}")
    try:
        a, code = code_of("restore_regs_and_return_to_kernel", 256)
        v.exit_check = find_exit_check(a, code, cs_off)
        v.evidence.append(f"restore_regs_and_return_to_kernel: {v.exit_check.shape}; "
                          f"sandbox return at {v.exit_check.sandbox:#x}")
    except VariantError as e:
        v.errors.append(f"restore_regs_and_return_to_kernel: {e}")
    v.name = _name(v)
    return v


def _name(v: Variant) -> str:
    ref = (v.exc_frame_gap == 0, v.rbp_at_entry == "zeroed", v.handler_stack == "sbm_exception_stack")
    v1 = (v.exc_frame_gap == 8, v.rbp_at_entry == "kernel", v.handler_stack == "entry_stack")
    if all(ref):
        return "reference"
    if all(v1):
        return "v1"
    return "mixed" if any(ref) or any(v1) else "unknown"


def detect(kernel) -> Variant:
    """The kernel's SBM variant (cached for the kernel model's life)."""
    from sbmdbg.model.layout import LayoutError
    from sbmdbg.sbm import model as m

    def get():
        kcr3 = None
        st = kernel.symbols.get("x86_sbm_state")
        try:
            if st is not None:
                kcr3 = st + kernel.layouts.offsetof("x86_sbm_state", "kernel_cr3")
            cs_off = kernel.layouts.offsetof("pt_regs", "cs")
        except LayoutError as e:
            return Variant("unknown", errors=[f"DWARF: {e}"])
        return detect_from(kernel.symbols, kcr3, cs_off)
    return m._cached(kernel, "sbm_variant", get, static=True)
