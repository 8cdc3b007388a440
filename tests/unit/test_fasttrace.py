"""The no-stop tracer's log parser and event assembly, offline, on a log
recorded from the reference kernel (fixtures/trace/qemu-int-plugin.log:
QEMU 7.2 ``-d int,plugin,tid`` with the sbmtrace plugin armed, during
``repeat 200``, ``write_kernel_data`` and ``noncanonical``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sbmdbg.trace.events import EventSink, read_events, validate
from sbmdbg.trace.fast import Assembler, LogParser

pytestmark = pytest.mark.unit

LOG = Path(__file__).resolve().parents[2] / "fixtures" / "trace" / "qemu-int-plugin.log"
X86_SBM_RETURN = 0xFFFFFFFF81401740
GS = {0xFFFF88801F200000: 0, 0xFFFF88801F300000: 1}     # per-CPU bases in the recorded run
STATE_OFF = {"sbm": 0, "pgd": 8, "stack": 16, "exc_stack": 24, "return_sp": 32, "kernel_cr3": 40,
             "sbm_cr3": 48}


def records(chunks=None) -> list[dict]:
    data = LOG.read_bytes()
    p = LogParser()
    if chunks is None:
        return p.feed(data)
    out, i = [], 0
    while i < len(data):
        n = chunks()
        out += p.feed(data[i:i + n])
        i += n
    return out


def test_parser_reads_exceptions_and_plugin_lines():
    recs = records()
    ints = [r for r in recs if r["type"] == "int"]
    plug = [r for r in recs if r["type"] in ("H", "P")]
    assert len(ints) == 12 and len(plug) == 23
    exit_pf = next(r for r in ints if r["vector"] == 14 and r["error"] == 0x15)
    assert exit_pf["cpl"] == 3 and exit_pf["cs"] == 0x33
    assert exit_pf["cr2"] == X86_SBM_RETURN == exit_pf["ip"]
    assert exit_pf["regs"]["RAX"] == 0x7E0            # the sandbox's return value (2016)
    assert exit_pf["regs"]["CR3"] == 0x65A000 and exit_pf["gs_base"] in GS
    enter = next(r for r in plug if r["tag"] == "enter")
    assert enter["vcpu"] == 0 and enter["pid"] == 70 and enter["comm"] == "sh"
    assert enter["sw"][6] == 0x65A000                 # state->sbm_cr3
    assert enter["mw"][:2] == [0xFFFFFFFF810BF60B, 0x33]   # IRET frame: RIP, CS (RPL 3)
    gp = next(r for r in ints if r["vector"] == 13)
    assert gp["cr2"] is None and gp["regs"]["RAX"] == 0x8000000000000000


def test_parser_is_independent_of_chunking():
    whole = records()
    rnd = random.Random(7)
    for sizes in (lambda: 1 + rnd.randrange(40), lambda: 1 + rnd.randrange(5000), lambda: 4096):
        assert records(sizes) == whole


def test_parser_survives_garbage():
    p = LogParser()
    out = p.feed(b"@sbm P enter notanumber\n@sbm H\n\xff\xfe   12: v=zz\nRAX=12 \n"
                 b"@sbm H v14 0 1 2 j=x\n" + b"A" * 100000 + b"\n")
    assert out == [] and p.bad == 3
    # a torn last line waits for the rest
    assert p.feed(b"@sbm H v14 1 5 6") == []
    assert p.feed(b" j=9\n")[0] == {"type": "H", "tag": "v14", "vcpu": 1, "ns": 5, "tsc": 6,
                                     "jiffies": 9}


class TinyContext:
    """The four GuestContext questions, answered without a guest (in the SBM
    model's words)."""

    def sym(self, va):
        return {X86_SBM_RETURN: "x86_sbm_return"}.get(va, f"{va:#x}" if va else None)

    def stack_class(self, rsp, task, st, cpu=None):
        return "sbm_sandbox_stack" if st and st["stack"] <= rsp <= st["stack"] + 0x4000 else "unknown"

    def cr3_role(self, cr3, st, task=0, pid=None):
        return f"sandbox:{pid}" if st and cr3 == st["sbm_cr3"] else "kernel"

    def where(self, addr, task=0, st=None, sbm=0, cpu=None):
        return "kernel half"


def assemble(tmp_path) -> list[dict]:
    path = str(tmp_path / "t.jsonl")
    sink = EventSink(path)
    asm = Assembler(TinyContext(), sink, x86_sbm_return=X86_SBM_RETURN, gs_to_cpu=GS,
                    state_off=STATE_OFF, sites={"enter": 1, "resume": 2, "exit": X86_SBM_RETURN},
                    clock=lambda: 0)
    asm._emit({"kind": "trace_start"})
    for r in records():
        asm.record(r)
    asm.flush()
    asm._emit({"kind": "trace_stop"})
    sink.close()
    return read_events(path)


def test_assembly_of_calls_irqs_and_aborts(tmp_path):
    evs = assemble(tmp_path)
    assert validate(evs) == []
    kinds = [e["kind"] for e in evs[1:-1]]
    assert kinds == ["enter", "irq", "irq_return", "return", "exit",
                     "enter", "return", "exit", "enter", "return", "exit",
                     "enter", "abort", "exit", "enter", "abort", "exit"]
    first = evs[1]
    assert first["func"] == "0xffffffff810bf60b" and first["sbm_cr3"] == "0x65a000"
    assert first["pid"] == 70 and first["vcpu"] == 0 and first["cr3_role"] == "sandbox:70"
    irq = evs[2]
    assert irq["vector"] == 0xEC and irq["vcpu"] == 0 and irq["cpl"] == 3 and irq["pid"] == 70
    assert irq["cr3_role"] == "sandbox:70" and irq["mode"] == "sandbox" and first["mode"] == "transition"
    assert evs[3]["to_rip"] == irq["fault_rip"]          # resumed where it was interrupted
    assert evs[3]["mode"] == "sandbox (in kernel handler)" and evs[5]["mode"] == "transition"
    ret = evs[4]
    assert ret["ret"] == 2016 and ret["error_code"] == 0x15 and ret["cr2"] == hex(X86_SBM_RETURN)
    assert evs[5]["ret"] == 2016 and evs[5]["aborted"] is False and evs[5]["error"] == 0
    pf, gp = [e for e in evs if e["kind"] == "abort"]
    assert (pf["vector"], pf["error_code"], pf["cr2"]) == (14, 7, "0xffffffff818aaf60")
    assert pf["error_bits"] == ["P", "W", "U"] and pf["vcpu"] == 1 and pf["sbm_error"] == -14
    assert pf["cr2_region"].endswith("sandbox: present (protection fault)")
    assert (gp["vector"], gp["vector_name"], gp["sbm_error"]) == (13, "#GP", -14)
    # host time and TSC come from the handler stamp right after QEMU's line
    assert pf["host_ns"] == 1795917367593902125 and pf["tsc"] == 29395297359372
    # user-mode faults (the shell's own #PFs) are not sandbox events
    assert all(e.get("cpl") != 3 or int(e["rip"], 16) >= 1 << 47 for e in evs if "rip" in e)
    json.dumps(evs)


def test_attacks_are_named(tmp_path):
    """Issue 15: a #PF at a user-half RIP on the sandbox's CR3 with CS 0x23
    (a far transfer into the 32-bit CS) is a sandbox abort named lret32; an
    IRQ with a foreign GS base is named gs_base; the instruction comes from
    code_at (vmlinux), never guest memory."""
    recs = records()
    enter = next(i for i, r in enumerate(recs) if r["type"] == "P" and r["tag"] == "enter")
    ex = next(i for i, r in enumerate(recs) if i > enter and r["type"] == "P" and r["tag"] == "exit")
    vcpu, cr3 = recs[enter]["vcpu"], recs[enter]["sw"][STATE_OFF["sbm_cr3"] // 8]
    gs0 = next(g for g, c in GS.items() if c == vcpu)
    lret = {"type": "int", "vector": 14, "error": 0x14, "is_int": 0, "cpl": 3, "cs": 0x23, "ip": 0x1000,
            "sp": 0xFFFFC90000003FD0, "cr2": 0x1000, "regs": {"CR3": cr3}, "gs_base": gs0}
    irq = {"type": "int", "vector": 0xEC, "error": 0, "is_int": 0, "cpl": 3, "cs": 0x33,
           "ip": 0xFFFFFFFF81092E8C, "sp": 0xFFFFC90000003FD0, "cr2": None, "regs": {"CR3": cr3}, "gs_base": 0}
    stamp = {"type": "H", "vcpu": vcpu, "ns": 1, "tsc": 1, "jiffies": 1}
    recs[ex:ex] = [irq, dict(stamp, tag="v236"), lret, dict(stamp, tag="v14")]
    path = str(tmp_path / "t.jsonl")
    sink = EventSink(path)
    asm = Assembler(TinyContext(), sink, x86_sbm_return=X86_SBM_RETURN, gs_to_cpu=GS, state_off=STATE_OFF,
                    sites={"enter": 1, "resume": 2, "exit": X86_SBM_RETURN}, clock=lambda: 0,
                    code_at=lambda a, n: b"\xf3\x90"[:n] if a == 0xFFFFFFFF81092E8C else None)
    for r in recs:
        asm.record(r)
    asm.flush()
    sink.close()
    evs = read_events(path)
    [ab] = [e for e in evs if e.get("attack") == "lret32"]
    assert ab["kind"] == "abort" and ab["attack_evidence"] == ["CS 0x23: a 32-bit (compat) code segment"]
    [gs] = [e for e in evs if e.get("attack") == "gs_base"]
    assert gs["kind"] == "irq" and gs["vcpu"] == vcpu
    assert gs["attack_evidence"] == ["GS base 0x0 at the interrupt: not the CPU's per-CPU base"]


def test_resume_into_the_kernel_is_no_irq_return(tmp_path):
    """A kernel whose sandbox return shares its iretq with the kernel's (the
    v1 series: the probe then sees every kernel-mode return too): only a
    frame back to CPL 3 is an irq_return."""
    recs = records()
    res = next(i for i, r in enumerate(recs) if r["type"] == "P" and r["tag"] == "resume")
    kernel_ret = dict(recs[res], mw=[0xFFFFFFFF81000000, 0x10, 0x2, 0xFFFFC90000000F00, 0x18])
    recs[res:res] = [kernel_ret]
    path = str(tmp_path / "t.jsonl")
    sink = EventSink(path)
    asm = Assembler(TinyContext(), sink, x86_sbm_return=X86_SBM_RETURN, gs_to_cpu=GS, state_off=STATE_OFF,
                    sites={"enter": 1, "resume": 2, "exit": X86_SBM_RETURN}, clock=lambda: 0)
    for r in recs:
        asm.record(r)
    asm.flush()
    sink.close()
    backs = [e for e in read_events(path) if e["kind"] == "irq_return"]
    assert len(backs) == 1 and backs[0]["to_rip"] != hex(0xFFFFFFFF81000000), backs


def test_sandbox_instruction_watch(tmp_path):
    """Issue 15: the plugin's "@sbm S insn" lines (a sensitive instruction a
    sandbox executed) become sandbox_insn events with the address, symbol,
    bytes and the mnemonic named from those bytes; bad bytes are one bad line."""
    p = LogParser()
    recs = p.feed(b"@sbm S insn 1 10 20 q=0 j=5 va=ffffffff81092e80 b=f3480fae\n"
                  b"@sbm S insn 1 11 21 q=1 va=ffffffff81092e80 b=f3480faed0\n"
                  b"@sbm S insn 1 12 22 q=2 va=ffffffff81092e85 b=zz\n")
    assert p.bad == 1 and len(recs) == 2
    assert recs[1] == {"type": "S", "tag": "insn", "vcpu": 1, "ns": 11, "tsc": 21,
                       "va": 0xFFFFFFFF81092E80, "bytes": b"\xf3\x48\x0f\xae\xd0"}
    path = str(tmp_path / "t.jsonl")
    sink = EventSink(path)
    asm = Assembler(TinyContext(), sink, x86_sbm_return=X86_SBM_RETURN, gs_to_cpu=GS, state_off=STATE_OFF,
                    sites={"enter": 1, "resume": 2, "exit": X86_SBM_RETURN}, clock=lambda: 0)
    for r in recs:
        asm.record(r)
    sink.close()
    a, b = read_events(path, strict=True)
    assert a["insn"] == "?" and a["bytes"] == "f3480fae" and a["jiffies"] == 5
    assert (b["kind"], b["insn"], b["bytes"], b["rip"], b["vcpu"]) == \
        ("sandbox_insn", "wrfsbase", "f3480faed0", "0xffffffff81092e80", 1)
    assert b["sym"] == "0xffffffff81092e80" and b["cpl"] == 3 and b["mode"] == "sandbox"
    from sbmdbg.trace.export import summary_line
    assert summary_line(b) == "insn wrfsbase [f3480faed0] at 0xffffffff81092e80"


@pytest.mark.parametrize("bad", ['"bytes": "0g"', '"bytes": "abc"', '"bytes": 5', '"bytes": "' + "00" * 16 + '"',
                                 '"insn": 3'])
def test_sandbox_insn_fields_are_checked(tmp_path, bad):
    from sbmdbg.errors import SbmdbgError

    f = tmp_path / "t.jsonl"
    f.write_text('{"seq": 0, "kind": "sandbox_insn", "vcpu": 0, ' + bad + '}\n')
    with pytest.raises(SbmdbgError, match=r"t.jsonl:1: (bytes|insn):"):
        read_events(str(f))


def _returns(tmp_path, exit_gs):
    """The return events of the recorded trace, every exit #PF's GS base set by ``exit_gs``."""
    recs = records()
    for r in recs:
        if r["type"] == "int" and r["vector"] == 14 and r["cr2"] == X86_SBM_RETURN:
            r["gs_base"] = exit_gs(r["gs_base"])
    path = str(tmp_path / "r.jsonl")
    sink = EventSink(path)
    asm = Assembler(TinyContext(), sink, x86_sbm_return=X86_SBM_RETURN, gs_to_cpu=GS, state_off=STATE_OFF,
                    sites={"enter": 1, "resume": 2, "exit": X86_SBM_RETURN}, clock=lambda: 0,
                    code_at=lambda a, n: None)
    for r in recs:
        asm.record(r)
    asm.flush()
    sink.close()
    return [e for e in read_events(path) if e.get("kind") == "return"]


def test_exit_with_a_foreign_gs_base_names_gs_base(tmp_path):
    """A sandbox that changed its GS base meets the kernel at its exit (the #PF
    at x86_sbm_return) even when no interrupt came while it ran: the return
    event names gs_base there; a return with the CPU's own base names nothing."""
    clean = _returns(tmp_path, lambda gs: gs)
    assert len(clean) == 3 and not any("attack" in e for e in clean)
    bad = _returns(tmp_path, lambda gs: 0)
    assert len(bad) == 3
    for e in bad:
        assert e["attack"] == "gs_base"
        assert e["attack_evidence"] == ["GS base 0x0 at the interrupt: not the CPU's per-CPU base"]
