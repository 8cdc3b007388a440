"""SBM variant detection (sbmdbg.sbm.variant) on code bytes recorded from two
built kernels (fixtures/sbm-variants/*.json: the entry text from
restore_regs_and_return_to_kernel to the end of x86_sbm_exec, the symbols
the detection reads, and the DWARF offsets of x86_sbm_state.kernel_cr3 and
pt_regs.cs): the reference kernel, and the v1-layout test variant
(fixtures/kernel/variants/v1-layout).  Each facet is checked against what
the patch says the kernel does, and against the instructions themselves."""
import json
from pathlib import Path

import pytest

from sbmdbg.model.symbols import Symbols
from sbmdbg.sbm import variant as V
from sbmdbg.sbm.model import mode_of

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "sbm-variants"


class RecordedSymbols(Symbols):
    """Symbols + vmlinux bytes from a recording (only the recorded range reads)."""

    def __init__(self, doc):
        table = {n: (a, s, "T") for n, (a, s) in doc["symbols"].items()}
        super().__init__(table, doc["build_id"])
        self.code_addr = doc["code"]["addr"]
        self.code = bytes.fromhex(doc["code"]["hex"])

    def read_file_bytes(self, addr, n):
        off = addr - self.code_addr
        if off < 0 or off >= len(self.code):
            return None
        return self.code[off:off + n]


def recorded(name):
    doc = json.loads((FIX / f"{name}.json").read_text())
    syms = RecordedSymbols(doc)
    return doc, syms, V.detect_from(syms, doc["symbols"]["x86_sbm_state"][0] + doc["kernel_cr3_offset"],
                                    doc["pt_regs_cs_offset"])


def _insn_at(syms, addr, n=16):
    import capstone
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return next(md.disasm(syms.read_file_bytes(addr, n), addr))


def test_reference_kernel():
    doc, syms, v = recorded("reference")
    assert v.name == "reference" and not v.errors, v.to_json()
    assert v.exc_frame_gap == 0 and v.rbp_at_entry == "zeroed" and v.handler_stack == "sbm_exception_stack"
    assert v.entry_check.pti_bit_test and "test; jne" in v.entry_check.shape
    assert v.exit_check.shape == "cmpq $__SBM_CS, CS(%rsp); je"
    # the sandbox return label is a POP_REGS (pop %r15), not the kernel return's fall-through
    assert _insn_at(syms, v.exit_check.sandbox).op_str == "r15"
    assert v.exit_check.sandbox != v.exit_check.addr + 11
    # the entry branch starts by switching to the kernel CR3
    assert _insn_at(syms, v.entry_check.sandbox).mnemonic == "mov"
    assert _insn_at(syms, v.entry_check.sandbox).op_str.startswith("cr3")


def test_v1_layout_kernel():
    doc, syms, v = recorded("v1-layout")
    assert v.name == "v1" and not v.errors, v.to_json()
    assert v.exc_frame_gap == 8 and v.rbp_at_entry == "kernel" and v.handler_stack == "entry_stack"
    assert v.entry_check.shape == "movq x86_sbm_state.kernel_cr3 (absolute), %rcx; jrcxz"
    assert not v.entry_check.pti_bit_test
    assert v.nmi_check.shape == "cmpq $0, x86_sbm_state.kernel_cr3 (absolute); jne"
    assert v.exit_check.shape == "cmpw $__SBM_CS, CS(%rsp); jne"
    # the inline sandbox return: the fall-through after the 9-byte cmpw and the 2-byte jne
    assert v.exit_check.sandbox == v.exit_check.addr + 11
    assert _insn_at(syms, v.entry_check.sandbox).op_str == "cr3, rcx"
    assert any("kernel rsp at [exc_top-8]" in e for e in v.evidence)
    assert "kernel rsp at [exc_top-8]" in v.describe()


def test_exec_frame_from_bytes():
    """The two x86_sbm_exec shapes, assembled by hand."""
    # push rbp; mov rbp,rsp; mov rsp,r8; push 0x2b; xor ebp,ebp; iretq
    ref = bytes.fromhex("55" "4889e5" "4c89c4" "6a2b" "31ed" "48cf")
    f = V.exec_frame(0x1000, ref)
    assert f == {"exc_frame_gap": 0, "kernel_rsp_slot": False, "own_frame": True, "rbp_cleared": True,
                 "iretq": 0x1000 + len(ref) - 2}
    # push rbp; sub r8,8; mov [r8],rsp; mov rsp,r8; push 0x2b; iretq
    v1 = bytes.fromhex("55" "4983e808" "498920" "4c89c4" "6a2b" "48cf")
    f = V.exec_frame(0x1000, v1)
    assert f["exc_frame_gap"] == 8 and f["kernel_rsp_slot"] and not f["rbp_cleared"] and not f["own_frame"]
    with pytest.raises(V.VariantError):
        V.exec_frame(0x1000, bytes.fromhex("55" "48cf"))


def test_unreadable_code_says_so():
    doc, syms, _ = recorded("v1-layout")
    syms.code = b""
    v = V.detect_from(syms, doc["symbols"]["x86_sbm_state"][0] + 0x28, 0x88)
    assert v.name == "unknown" and v.errors and v.handler_stack is None


def test_mode_of_handler_stack():
    # v1: a handler of a sandbox exception runs on the entry stack (kernel CR3)
    assert mode_of(0, False, True, "handle_sbm_fault", "entry_stack", "entry_stack") == \
        "sandbox (in kernel handler)"
    # reference: on the entry stack that is the entry code before sync_regs
    assert mode_of(0, False, True, "error_entry", "entry_stack", "sbm_exception_stack") == "transition"
    assert mode_of(0, False, True, "handle_sbm_fault", "sbm_exception_stack", None) == \
        "sandbox (in kernel handler)"
    # an NMI from the sandbox runs on the exception stack on both
    assert mode_of(0, False, True, "exc_nmi", "sbm_exception_stack", "entry_stack") == \
        "sandbox (in kernel handler)"
    assert mode_of(0, True, True, "handle_sbm_fault", "entry_stack", "entry_stack") == "transition"
    assert mode_of(0, False, True, "handle_sbm_fault", None, None) == "transition"
