"""The plugin tracer's frame source (sbmdbg/trace/frames.py: sandbox
interrupts from guest RAM, no QEMU ``-d int``), offline, on logs recorded
with both sources at once (fixtures/trace/*-dint.log, described in their
.json): qemu-entry-dint with the sbment probe (pt_regs at
.Lerror_entry_from_sbm, the default), qemu-frames-dint with frame probes on
every handler + pt_regs at sync_regs (the fallback, and NMI/#DF): the
``-d int`` cross-check, the events against the demo's own counters, CR2
recomputed from the saved registers, and the decoder's edge cases."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_fasttrace import TinyContext as FastTinyContext

from sbmdbg.trace.events import EventSink, read_events, summarize, validate
from sbmdbg.trace.fast import Assembler, LogParser
from sbmdbg.trace.frames import (
    FrameDecoder, calls_to, crosscheck, fault_address, first_push, first_store, frame_words,
)

pytestmark = pytest.mark.unit

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "trace"
LOG = FIX / "qemu-frames-dint.log"
META = json.loads((FIX / "qemu-frames-dint.json").read_text())
ENTRY_LOG = FIX / "qemu-entry-dint.log"
ENTRY_META = json.loads((FIX / "qemu-entry-dint.json").read_text())
RET = int(META["x86_sbm_return"], 16)
assert int(ENTRY_META["x86_sbm_return"], 16) == RET          # the same kernel build
GS = {int(k, 16): v for k, v in META["gs_to_cpu"].items()}
CODE = {int(k, 16): bytes.fromhex(v) for m in (META, ENTRY_META) for k, v in m["code"].items()}
ENTRY_VECTORS = {int(k, 16): v for k, v in ENTRY_META["entry_vectors"].items()}
RECORDINGS = {"frames": (LOG, 18, [13] + [14] * 12 + [0xEC] * 5),
              "entry": (ENTRY_LOG, 19, [13] + [14] * 12 + [0xEC] * 5 + [0xFB])}


class TinyContext(FastTinyContext):
    """test_fasttrace's guest-less context, with this recording's x86_sbm_return."""

    def sym(self, va):
        return {RET: "x86_sbm_return"}.get(va, f"{va:#x}" if va else None)


def code_at(addr, n):
    c = CODE.get(addr)
    return c[:n] if c else None


def assemble(tmp_path, data: bytes | None = None, *, check: bool = True, log: Path = LOG):
    path = str(tmp_path / "t.jsonl")
    sink = EventSink(path)
    frames = FrameDecoder(META["pt_regs"], META["state_off"], code_at=code_at,
                          percpu={c: g for g, c in GS.items()},
                          vector_of=lambda ra, orig_ax: ENTRY_VECTORS.get(ra))
    asm = Assembler(TinyContext(), sink, x86_sbm_return=RET, gs_to_cpu=GS, state_off=META["state_off"],
                    sites={"enter": 1, "resume": 2, "exit": RET}, clock=lambda: 0, code_at=code_at,
                    frames=frames)
    if check:
        asm.dint_seen, asm.frame_seen = [], []
    asm._emit({"kind": "trace_start"})
    for r in LogParser().feed(log.read_bytes() if data is None else data):
        asm.record(r)
    asm.flush()
    asm._emit({"kind": "trace_stop"})
    sink.close()
    return read_events(path), asm


@pytest.mark.parametrize("rec", sorted(RECORDINGS))
def test_frames_agree_with_qemu_dint_field_by_field(tmp_path, rec):
    log, n, want = RECORDINGS[rec]
    _, asm = assemble(tmp_path, log=log)
    cc = crosscheck(asm.dint_seen, asm.frame_seen)
    assert cc["mismatches"] == [] and cc["clean"]
    assert cc["dint"] == cc["frames"] == cc["compared"] == n
    # all but the paranoid ones with their registers: vector, RIP, error, CPL, CS, RSP + 16 registers
    assert cc["fields"] > n * 6 + (n - 1) * 16
    assert sorted(r["vector"] for r in asm.frame_seen) == sorted(want)
    assert asm.frames.unknown == 0


@pytest.mark.parametrize("rec", sorted(RECORDINGS))
def test_events_count_what_the_demo_counted(tmp_path, rec):
    evs, _ = assemble(tmp_path, check=False, log=RECORDINGS[rec][0])
    assert validate(evs) == []
    s = summarize(evs)
    d = META["demo_stats_delta"]
    assert (s["calls"], s["returns"], s["aborts"]) == (d["calls"], d["returns"], d["aborts"])
    kinds = [e["kind"] for e in evs]
    assert kinds.count("irq") == kinds.count("irq_return") == RECORDINGS[rec][2].count(0xEC) + (rec == "entry")
    ret = next(e for e in evs if e["kind"] == "return")
    assert ret["ret"] == 2016 and ret["cr2"] == hex(RET) and ret["error_code"] == 0x15
    assert ret["point"] == "IDT vector 0xe (exception frame)"
    aborts = {e["fault_rip"]: e for e in evs if e["kind"] == "abort"}
    gp = next(e for e in aborts.values() if e["vector"] == 13)
    assert gp["sbm_error"] == -14 and gp.get("cr2") is None
    # every #PF abort has its CR2, recomputed from the saved registers
    assert all(e["cr2"] for e in aborts.values() if e["vector"] == 14)
    assert "exception frame" in gp["via"]


def test_crosscheck_catches_a_wrong_register_and_a_lost_frame(tmp_path):
    data = LOG.read_bytes()
    line = next(x for x in data.split(b"\n") if x.startswith(b"@sbm R"))
    words = line.split(b"rw=")[1].split(b",")
    words[10] = b"dead"                            # pt_regs.ax
    bad = data.replace(line, line.split(b"rw=")[0] + b"rw=" + b",".join(words), 1)
    _, asm = assemble(tmp_path, bad)
    cc = crosscheck(asm.dint_seen, asm.frame_seen)
    assert not cc["clean"] and cc["mismatches"][0]["field"] == "RAX"
    assert cc["mismatches"][0]["frames"] == 0xDEAD
    fline = next(x for x in data.split(b"\n") if x.startswith(b"@sbm F"))
    _, asm = assemble(tmp_path, data.replace(fline + b"\n", b"", 1))
    cc = crosscheck(asm.dint_seen, asm.frame_seen)
    assert not cc["clean"] and cc["mismatches"][0]["what"] == "count"


def test_a_frame_without_registers_still_makes_its_event():
    """A paranoid entry (#DF, NMI) never reaches sync_regs: the frame is
    decoded at the vCPU's next line, without registers (CR2 of a data
    fault unknown, an instruction fetch's is its RIP)."""
    d = FrameDecoder({"ax": 80}, {"sbm_cr3": 48})
    f = {"type": "F", "tag": "v14", "vcpu": 1, "ns": 5, "tsc": 6, "sw": [0] * 6 + [0x1234000],
         "mw": [0xFFFFFFFF81200B39, 0x15, RET, 0x33, 0x246, 0xFFFFC9000003FFF8, 0x2B]}
    assert d.feed(f) == []
    r = d.flush(1)[0]
    assert (r["vector"], r["error"], r["ip"], r["cpl"], r["cr2"]) == (14, 0x15, RET, 3, RET)
    assert r["regs"]["CR3"] == 0x1234000 and "RAX" not in r["regs"] and r["vcpu"] == 1
    f2 = dict(f, mw=[0xFFFFFFFF81200B39, 0x7, 0xFFFFFFFF81000010, 0x33, 0x246, 0x1000, 0x2B])
    d.feed(f2)
    out = d.feed(dict(f2, tag="v236", mw=[0xFFFFFFFFFFFFFFFF, 0xFFFFFFFF81000020, 0x23, 0x202, 0x10, 0x2B]))
    assert out[0]["cr2"] is None and out[0]["error"] == 7      # a data fault: no registers, no CR2
    irq = d.flush()[0]
    assert (irq["vector"], irq["error"], irq["cs"], irq["cpl"]) == (236, 0, 0x23, 3)
    assert d.feed({"type": "R", "vcpu": 0, "rw": [1, 2]}) == []     # registers of no frame


def test_fault_address_from_the_instruction_and_registers():
    regs = {"RAX": 0x1000, "RBX": 0x2000, "RCX": 3, "RSI": 0x5000, "RDI": 0x6000, "RSP": 0x7FF0,
            "R8": 0x10}
    assert fault_address(bytes.fromhex("48890c98"), 0x100, 2, regs) == 0x9000   # mov [rax+rbx*4],rcx
    assert fault_address(bytes.fromhex("e800000000"), 0x100, 2, regs) == 0x7FE8  # call: the push
    assert fault_address(bytes.fromhex("c3"), 0x100, 0, regs) == 0x7FF0          # ret: the pop
    assert fault_address(bytes.fromhex("f3a4"), 0x100, 2, regs) == 0x6000        # rep movsb: write
    assert fault_address(bytes.fromhex("f3a4"), 0x100, 0, regs) == 0x5000        # rep movsb: read
    assert fault_address(bytes.fromhex("f3ab"), 0x100, 2, regs) == 0x6000        # rep stosd
    assert fault_address(bytes.fromhex("488b0510000000"), 0x100, 0, regs) == 0x117   # rip-relative
    assert fault_address(bytes.fromhex("458b4804"), 0x100, 0, regs) == 0x14      # mov r9d,[r8+4]
    assert fault_address(bytes.fromhex("8b4004"), 0x100, 0, regs) == 0x1004      # mov eax,[rax+4]
    assert fault_address(bytes.fromhex("64488b042528000000"), 0x100, 0, regs) is None   # %fs: unknown
    gs = bytes.fromhex("65488b042528000000")
    assert fault_address(gs, 0x100, 0, regs) is None
    assert fault_address(gs, 0x100, 0, regs, gs_base=0xFFFF888000000000) == 0xFFFF888000000028
    assert fault_address(bytes.fromhex("90"), 0x100, 0x10, regs) == 0x100        # fetch: RIP
    assert fault_address(None, 0x100, 2, regs) is None
    assert fault_address(bytes.fromhex("488b04d8"), 0x100, 0, {}) is None         # no registers


def test_the_first_push_of_each_kind_of_idt_handler():
    # idtentry with an error code: endbr64; clac; cld; call error_entry
    assert first_push(bytes.fromhex("f30f1efa0f01cafce800000000"), 0x1000) == 0x1008
    # without one: endbr64; nopl (clac patched out); cld; pushq $-1
    assert first_push(bytes.fromhex("f30f1efa0f1f00fc6aff"), 0x1000) == 0x1008
    # an external vector's stub: endbr64; push $vector; jmp asm_common_interrupt
    assert first_push(bytes.fromhex("f30f1efa6a20eb00"), 0x1000) == 0x1004
    assert first_push(bytes.fromhex("f30f1efaeb00"), 0x1000) is None           # jumps before any push
    assert first_push(b"", 0x1000) is None
    assert [frame_words(v) for v in (0, 8, 13, 14, 32, 0xEC)] == [6, 7, 7, 7, 6, 6]


def test_entry_records_decode_and_an_unknown_stub_is_counted(tmp_path):
    """@sbm E: pt_regs at .Lerror_entry_from_sbm, after its andb cleared the
    frame's RPL (the CS is given back as the CPU pushed it, RPL 3); a wrong
    register is caught by the cross-check; a return address that names no
    IDT handler makes no event and is counted."""
    data = ENTRY_LOG.read_bytes()
    line = next(x for x in data.split(b"\n") if x.startswith(b"@sbm E"))
    rw = line.split(b"rw=")[1].split(b",")
    assert int(rw[17], 16) & 3 == 0                    # pt_regs->cs as the entry code left it
    _, asm = assemble(tmp_path, log=ENTRY_LOG)
    assert all(r["cs"] & 3 == 3 for r in asm.frame_seen)
    bad = data.replace(line, line.split(b"rw=")[0] + b"rw=" + b",".join(rw[:10] + [b"beef"] + rw[11:]), 1)
    _, asm = assemble(tmp_path, bad)
    cc = crosscheck(asm.dint_seen, asm.frame_seen)
    assert not cc["clean"] and cc["mismatches"][0]["field"] == "RAX"
    ra = line.split(b" ra=")[1].split(b" ")[0]
    _, asm = assemble(tmp_path, data.replace(b" ra=" + ra + b" ", b" ra=1234 ", 1))
    assert asm.frames.unknown == 1
    assert not crosscheck(asm.dint_seen, asm.frame_seen)["clean"]


def test_the_call_to_error_entry_and_the_first_store():
    # asm_exc_page_fault: clac; cld; call error_entry (a rel32 to a higher address)
    code = bytes.fromhex("0f01cafce8570500004889c4")
    assert calls_to(code, 0xFFFFFFFF81200B30, 0xFFFFFFFF81201090)
    assert not calls_to(code, 0xFFFFFFFF81200B30, 0xFFFFFFFF81201000)
    # #DB: pushq $-1; testb $3, 8(%rsp); jnz 1f; call paranoid_entry; ...; 1: call error_entry
    db = bytes.fromhex("6aff" "f644240803" "7505" "e800100000" "e800200000")
    assert calls_to(db, 0x1000, 0x1000 + 19 + 0x2000) and calls_to(db, 0x1000, 0x1000 + 14 + 0x1000)
    assert not calls_to(bytes.fromhex("f30f1efa6a20eb00"), 0x1000, 0x1000)     # a stub: no call
    # .Lerror_entry_from_sbm: mov %rax,%cr3; andb $~3, CS+8(%rsp)
    assert first_store(bytes.fromhex("0f22d880a42490000000fc"), 0x2000) == (0x2003, "rsp", 0x90)
    assert first_store(bytes.fromhex("0f22d8c3"), 0x2000) is None
