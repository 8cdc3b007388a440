"""The attack classifier (sbmdbg.sbm.attack, issue 15) on hand-built byte
sequences and register evidence: every scenario of the demo's catalogue is
named from what the tracer sees at the exception."""
from __future__ import annotations

import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sbmdbg.sbm.attack import AC, BP, DB, GP, PF, UD, XM, Attack, classify, sensitive_insn

pytestmark = pytest.mark.unit
PERCPU = (0xFFFF88807D600000, 0xFFFF88807D800000)


@pytest.mark.parametrize("code, name", [
    (b"\x0f\x05", "syscall"),
    (b"\x0f\x34", "sysenter"),
    (b"\xcd\x80", "int $0x80"),
    (b"\xf1", "int1"),
    (b"\x0f\x0b", "ud2"),
    (b"\x0f\x01\xef", "wrpkru"),
    (b"\xf3\x48\x0f\xae\xd8", "wrgsbase"),   # wrgsbase %rax
    (b"\xf3\x48\x0f\xae\xd0", "wrfsbase"),
    (b"\xf3\x48\x0f\xae\xc8", "rdgsbase"),
    (b"\x8e\xe8", "mov to %gs"),             # mov %eax,%gs
    (b"\x8e\xe0", "mov to %fs"),
    (b"\x48\xcb", "lretq"),
    (b"\x0f\xae\x55\xf0", "ldmxcsr"),        # ldmxcsr -0x10(%rbp)
    (b"\x9d", "popf"),
    (b"\xfa", "cli"),
    (b"\xee", "out"),
    (b"\x0f\x01\xf8", "swapgs"),
    (b"\x0f\x30", "wrmsr"),
])
def test_sensitive_instructions(code, name):
    assert sensitive_insn(code) == name


@pytest.mark.parametrize("code", [b"", b"\x90", b"\x48\x89\xe5", b"\x0f\xae\xe8",  # lfence
                                  b"\xf3\x0f\xae\xe0", b"\xff\xd0"])                 # rdfsbase? no: /4; call *%rax
def test_ordinary_instructions_are_not_sensitive(code):
    assert sensitive_insn(code) is None


@given(st.binary(max_size=64))
def test_any_bytes_are_safe(data):
    sensitive_insn(data)
    classify(6, data, before=data, cs=0x33, gs_base=0, percpu_bases=PERCPU)


def test_catalogue_names():
    assert classify(UD, b"\x0f\x05").name == "syscall"            # EFER.SCE clear: #UD
    assert classify(GP, b"\xcd\x80\x31\xc0").name == "int80"       # no ia32 gate: #GP
    assert classify(DB, b"\x90", before=b"\x48\x89\xc7\xf1").name == "int1"
    tf = classify(DB, b"\x90", before=b"\x9d", rflags=0x346)
    assert tf.name == "trap_flag" and "EFLAGS.TF set: single-step trap" in tf.evidence
    assert classify(AC, b"\x8b\x44\x24\x01", rflags=0x40246).name == "alignment_check"
    assert classify(XM, b"\xf3\x0f\x5e\xc1").name == "sse_unmasked"
    assert classify(UD, b"\x0f\x0b").name == "warn_ud2"
    assert classify(UD, b"\x0f\x01\xef").name == "pkru_write"
    assert classify(PF, b"\x48\x89\x45\xf8", error_code=0x27).name == "pkru_write"
    assert classify(BP, b"\x90", before=b"\xcc").name == "int3"
    assert classify(GP, b"\xcd\x21").insn == "int $0x21"


def test_lret32_from_cs():
    a = classify(PF, None, cs=0x23)
    assert a == Attack("lret32", None, ("CS 0x23: a 32-bit (compat) code segment",))


def test_gs_base_evidence_names_the_cpu_base():
    a = classify(0xEC, b"\xf3\x90", gs_base=0, percpu_bases=PERCPU)   # timer IRQ during pause
    assert a.name == "gs_base"
    assert a.evidence == ("GS base 0x0 at the interrupt: not the CPU's per-CPU base",)
    assert classify(0xEC, b"\xf3\x90", gs_base=PERCPU[1], percpu_bases=PERCPU) is None


def test_time_limit():
    a = classify(0xEC, b"\xf3\x90", sbm_error=-errno.ETIMEDOUT)
    assert a.name == "endless_loop" and a.to_json()["attack"] == "endless_loop"


def test_plain_fault_is_not_an_attack_class():
    assert classify(PF, b"\x48\x89\x07", error_code=0x7) is None     # a write to RO data


def test_sbm_status_flags_a_foreign_gs_base():
    """`sbm` (vcpu_status) flags a vCPU in a sandbox whose GS base is not
    its per-CPU base; the renderer prints it."""
    from types import SimpleNamespace

    from sbmdbg.sbm.model import _gs_base_evidence
    from sbmdbg.commands.render import status

    k = SimpleNamespace(per_cpu_offset=lambda c: PERCPU[c])
    assert _gs_base_evidence(k, 1, PERCPU[1]) == []
    assert _gs_base_evidence(k, 0, None) == []
    [e] = _gs_base_evidence(k, 0, 0)
    assert e.startswith("GS base 0x0 on cpu 0: not its per-CPU base 0xffff88807d600000")
    row = {"cpu": 0, "mode": "sandbox", "cpl": 3, "cr3": 0x1000, "cr3_role": "sandbox:1", "rip": 0,
           "task": None, "stack": {}, "sandbox": "sandbox:1", "attack_evidence": [e]}
    out = status({"sbm": True, "note": "", "cpus": [row]})
    assert any(isinstance(x, str) and "cpu 0: GS base 0x0" in x for x in out)


def _fake_kernel(fsbase: int, pkru: int | None):
    """A kernel whose one task (at 0x1000) has thread.fsbase/thread.pkru."""
    from types import SimpleNamespace

    offs = {"thread.fsbase": 0x100, "thread.pkru": 0x108}
    mem = {0x1100: fsbase.to_bytes(8, "little")}
    if pkru is not None:
        mem[0x1108] = pkru.to_bytes(4, "little")

    def offsetof(struct, path):
        if path == "thread.pkru" and pkru is None:
            raise KeyError(path)              # a kernel without the field
        return offs[path]
    return SimpleNamespace(root=0, layouts=SimpleNamespace(offsetof=offsetof),
                           read_virt=lambda root, va, n: mem[va][:n])


def test_sbm_status_flags_a_foreign_fs_base():
    from sbmdbg.sbm.model import _fs_base_evidence

    k = _fake_kernel(0x7F0000001740, 0x55555554)
    who = {"pid": 70, "comm": "sh"}
    assert _fs_base_evidence(k, 0, 0x7F0000001740, 0x1000, who) == []
    assert _fs_base_evidence(k, 0, None, 0x1000, who) == []
    [e] = _fs_base_evidence(k, 1, 0x5BAD000, 0x1000, who)
    assert e == ("FS base 0x5bad000 on cpu 1: not 70 sh's thread.fsbase 0x7f0000001740 "
                 "(its user TLS: a WRFSBASE or FS load in the sandbox)")


def test_sbm_status_flags_a_foreign_pkru():
    from sbmdbg.sbm.model import _pkru_evidence

    k = _fake_kernel(0, 0x55555554)
    assert _pkru_evidence(k, 0, 0x55555554, 0x1000) == []      # the task's own
    assert _pkru_evidence(k, 0, 0, 0x1000) == []               # the reference kernel's sandbox PKRU
    assert _pkru_evidence(k, 0, None, 0x1000) == []            # the target reads no PKRU
    [e] = _pkru_evidence(k, 0, 2, 0x1000)                      # key 0 write-disabled
    assert e.startswith("PKRU 0x2 on cpu 0: neither the task's thread.pkru 0x55555554 nor 0")
    assert _pkru_evidence(_fake_kernel(0, None), 0, 2, 0x1000) == []   # no thread.pkru: no claim
