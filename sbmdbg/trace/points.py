"""Where the tracer puts its breakpoints (link-time addresses from vmlinux).

Function entries come from the symbol table.  Three probes sit on local
labels of entry_64.S that have no symbol; they are found by decoding the
kernel's own instructions there, from vmlinux's bytes (capstone, in
sbmdbg.sbm.variant; both the reference series' and the v1 series' shapes):

* ``sbm_entry`` = ``.Lerror_entry_from_sbm``: the sandbox path of
  error_entry's check of x86_sbm_state.kernel_cr3 (``mov ...(%rip), %rax;
  test; jne`` -> its target, or v1's ``movq <abs>, %rcx; jrcxz`` -> the
  fall-through).  Every exception and interrupt that arrives at CPL 3 in a
  sandbox passes here (NMIs and #DF excepted), with pt_regs at rsp+8 and the
  entry stub's return address at [rsp]: the vector.
* ``sbm_nmi`` = ``.Lnmi_from_sbm``: the same check in asm_exc_nmi (v1:
  ``cmpq $0, <abs>; jne``).
* ``sbm_resume`` = ``.Lsbm_return_to_sandbox``: the sandbox return after
  ``cmpq $__SBM_CS, CS(%rsp); je`` (its target) or v1's ``cmpw ...; jne``
  (the fall-through) in restore_regs_and_return_to_kernel; pt_regs at rsp,
  regs->ip is where the sandbox resumes.

Levels (each probe is one gdb stop per hit):

    lean  x86_sbm_exec, handle_sbm_fault                       2 stops / call
    fast  lean + sbm_entry, sbm_nmi, sbm_resume                 3 stops / call
    full  fast + sbm_exec, arch_sbm_exec, x86_sbm_return        6 stops / call
"""
from __future__ import annotations

from dataclasses import dataclass

from sbmdbg.errors import SbmdbgError

SBM_CS = 0x30          # __SBM_CS = __USER_CS & ~3 (the design's pseudo selector)

LEVELS = {
    "lean": ("x86_sbm_exec", "handle_sbm_fault"),
    "fast": ("x86_sbm_exec", "handle_sbm_fault", "sbm_entry", "sbm_nmi", "sbm_resume"),
    "full": ("sbm_exec", "arch_sbm_exec", "x86_sbm_exec", "sbm_entry", "sbm_nmi",
             "handle_sbm_fault", "sbm_resume", "x86_sbm_return"),
}
DESCRIPTIONS = {
    "sbm_exec": "generic entry sbm_exec(sbm, func, data)",
    "arch_sbm_exec": "arch_sbm_exec(sbm, func, data)",
    "x86_sbm_exec": "x86_sbm_exec(state, func, args, sbm_tos, exc_tos): enter; func = first sandbox insn",
    "sbm_entry": ".Lerror_entry_from_sbm: exception/IRQ from the sandbox (vector from the stub)",
    "sbm_nmi": ".Lnmi_from_sbm: NMI in the sandbox",
    "handle_sbm_fault": "handle_sbm_fault(regs, error_code, address): return or abort",
    "sbm_resume": ".Lsbm_return_to_sandbox: back into the sandbox after an IRQ/NMI/spurious #PF",
    "x86_sbm_return": "x86_sbm_return: back in the kernel, rax = return value",
}


class ProbeError(SbmdbgError):
    pass


@dataclass(frozen=True)
class Probe:
    name: str
    addr: int           # link-time (unslid): the function or label
    how: str            # "symbol" or how it was decoded
    site: int | None = None     # where the breakpoint goes (>= addr), link-time
    insn: object = None         # emulate.Insn at site, or None: gdb steps over it
    sp_adjust: int = 0          # rsp at site + sp_adjust == rsp at addr

    @property
    def bp_addr(self) -> int:
        return self.addr if self.site is None else self.site

    def to_json(self, slide: int = 0) -> dict:
        d = {"name": self.name, "addr": f"{self.addr + slide:#x}", "how": self.how,
             "what": DESCRIPTIONS.get(self.name, ""), "site": f"{self.bp_addr + slide:#x}",
             "step_over": "emulated" if self.insn is not None else "gdb single-step"}
        if self.insn is not None:
            d["insn"] = self.insn.to_json()
        return d


def _skip_entry_prologue(code: bytes) -> int:
    """Length of `mov %reg,%cr3` + `andb $imm8, disp(%rsp)` at the start of
    an SBM entry label (both run before the probe; neither changes rsp)."""
    i = 0
    if code[i:i + 2] == b"\x0f\x22" and len(code) > 2 and code[2] >> 6 == 3:
        i += 3
    if code[i:i + 3] == b"\x80\x64\x24":
        i += 5
    elif code[i:i + 3] == b"\x80\xa4\x24":
        i += 8
    return i


def choose_site(probe: Probe, code: bytes) -> Probe:
    """Move a probe onto an instruction we can emulate (see emulate.py).
    ``code``: the runtime bytes at probe.addr (alternatives applied)."""
    from dataclasses import replace

    from sbmdbg.trace.emulate import decode

    off, adj = 0, 0
    if probe.name in ("sbm_entry", "sbm_nmi"):
        off = _skip_entry_prologue(code)
    elif probe.name == "x86_sbm_return":
        i = code.find(b"\x41\x5f", 0, 40)        # the first pop, after the CR3 switch
        off = i if i > 0 else 0
    elif code[:1] == b"\x55" and decode(code) is None and decode(code[1:]) is not None:
        off, adj = 1, 8                           # after `push %rbp`
    insn = decode(code[off:])
    if insn is None:
        return replace(probe, site=None, insn=None, sp_adjust=0)
    return replace(probe, site=probe.addr + off, insn=insn, sp_adjust=adj)


def function_code(symbols, name: str, default_len: int = 512) -> tuple[int, bytes]:
    a = symbols.get(name)
    if a is None:
        raise ProbeError(f"vmlinux has no symbol {name} (not an SBM kernel?)")
    n = symbols.size(name) or default_len
    data = symbols.read_file_bytes(a, n)
    if data is None:
        raise ProbeError(f"cannot read the code of {name} from vmlinux")
    return a, data


def find_probes(symbols, layouts, level: str = "full") -> dict[str, Probe]:
    """Probe name -> Probe (link-time addresses) for ``level``.  The three
    labels come from the kernel's own code in either shape the SBM series
    use (sbmdbg.sbm.variant: ``mov kernel_cr3(%rip); test; jne`` or v1's
    ``movq <abs>, %rcx; jrcxz`` / ``cmpq $0, <abs>; jne``; ``cmpq ...; je``
    or v1's ``cmpw $__SBM_CS, CS(%rsp); jne`` with the sandbox return inline)."""
    from sbmdbg.sbm.variant import VariantError, find_cr3_check, find_exit_check

    if level not in LEVELS:
        raise ProbeError(f"bad level {level!r}: {', '.join(LEVELS)}")
    want = LEVELS[level]
    out: dict[str, Probe] = {}
    for name in want:
        if name in ("sbm_entry", "sbm_nmi", "sbm_resume"):
            continue
        a = symbols.get(name)
        if a is None:
            raise ProbeError(f"vmlinux has no symbol {name} (not an SBM kernel?)")
        out[name] = Probe(name, a, "symbol")
    if {"sbm_entry", "sbm_nmi"} & set(want):
        st = symbols.get("x86_sbm_state")
        if st is None:
            raise ProbeError("vmlinux has no symbol x86_sbm_state (not an SBM kernel?)")
        kcr3 = st + layouts.offsetof("x86_sbm_state", "kernel_cr3")
        for name, fn in (("sbm_entry", "error_entry"), ("sbm_nmi", "asm_exc_nmi")):
            if name in want:
                base, code = function_code(symbols, fn)
                try:
                    c = find_cr3_check(base, code, kcr3)
                except VariantError as e:
                    raise ProbeError(f"SBM_CHECK_SANDBOX_CR3 in {fn}: {e}") from None
                out[name] = Probe(name, c.sandbox, f"sandbox path of `{c.shape}` in {fn}")
    if "sbm_resume" in want:
        base, code = function_code(symbols, "restore_regs_and_return_to_kernel", 256)
        try:
            c = find_exit_check(base, code, layouts.offsetof("pt_regs", "cs"))
        except VariantError as e:
            raise ProbeError(f"restore_regs_and_return_to_kernel: {e}") from None
        out["sbm_resume"] = Probe(name="sbm_resume", addr=c.sandbox,
                                  how=f"sandbox return of `{c.shape}` in restore_regs_and_return_to_kernel")
    return {n: out[n] for n in want}
