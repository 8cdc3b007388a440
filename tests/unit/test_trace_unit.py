"""The tracer's offline pieces: schema/sink/reader, probe-site decoding,
the step-over emulator, QEMU log parsing and cross-check, Perfetto export."""
import json
import os
import struct

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.trace import emulate as em
from sbmdbg.trace.events import EventSink, decode_pf_error, describe_pf_error, read_events, summarize, validate
from sbmdbg.trace.export import pair_calls, timeline, to_perfetto
from sbmdbg.sbm.variant import VariantError, find_cr3_check, find_exit_check
from sbmdbg.trace.points import Probe, choose_site
from sbmdbg.trace.qemulog import cross_check, parse_log

pytestmark = pytest.mark.unit


def test_pf_error_decode():
    assert decode_pf_error(0x15) == ["P", "U", "I"]
    assert decode_pf_error(0x6) == ["W", "U"]
    assert decode_pf_error(0x27) == ["P", "W", "U", "PK"]
    assert describe_pf_error(0x4) == "not-present read from user"
    assert describe_pf_error(0x15) == "protection fetch from user"


def test_sink_reader_torn_line(tmp_path):
    p = str(tmp_path / "t.jsonl")
    s = EventSink(p)
    for i in range(3):
        s.write({"seq": i, "kind": "trace_start" if i == 0 else "enter", "vcpu": 0, "host_ns": i})
    # visible before close: one os.write per event
    assert len(read_events(p)) == 3
    s.close()
    with open(p, "ab") as fh:
        fh.write(b'{"seq": 3, "kind": "ret')          # a torn last line
    evs = read_events(p)
    assert [e["seq"] for e in evs] == [0, 1, 2] and validate(evs) == []
    with pytest.raises(SbmdbgError):
        read_events(p, strict=True)
    with open(p, "ab") as fh:
        fh.write(b'\n{"seq": 4, "kind": "enter"}\n')  # garbage in the middle is an error
    with pytest.raises(SbmdbgError):
        read_events(p)


def _evs():
    base = {"vcpu": 0, "task": "0x1", "sandbox": "0x2", "pid": 7, "comm": "sh"}
    return [
        {"seq": 0, "kind": "trace_start", "host_ns": 0, "ncpus": 2},
        {"seq": 1, "kind": "enter", "host_ns": 1000, "func_sym": "__sbm_thunk_f", **base},
        {"seq": 2, "kind": "irq", "host_ns": 2000, "vector": 0xEC, "vector_name": "irq 0xec", **base},
        {"seq": 3, "kind": "irq_return", "host_ns": 3000, **base},
        {"seq": 4, "kind": "return", "host_ns": 4000, "ret": 5, "error_code": 0x15, "vector": 14,
         "cr2": "0xffffffff81401740", "fault_rip": "0xffffffff81401740", **base},
        {"seq": 5, "kind": "enter", "host_ns": 5000, "func_sym": "__sbm_thunk_g", **{**base, "vcpu": 1}},
        {"seq": 6, "kind": "abort", "host_ns": 7000, "vector": 14, "vector_name": "#PF", "error_code": 6,
         "error_bits": ["W", "U"], "cr2": "0x0", "cr2_region": "NULL page", "fault_rip": "0xffffffff81000010",
         **{**base, "vcpu": 1}},
        {"seq": 7, "kind": "trace_stop", "host_ns": 8000},
    ]


def test_summary_pairs_perfetto_timeline():
    evs = _evs()
    s = summarize(evs)
    assert (s["calls"], s["returns"], s["aborts"], s["complete"]) == (2, 1, 1, True)
    calls = pair_calls(evs)
    assert [c["end"]["kind"] for c in calls] == ["return", "abort"] and calls[0]["irqs"] == 1
    doc = json.loads(json.dumps(to_perfetto(evs)))
    te = doc["traceEvents"]
    names = {e["args"]["name"] for e in te if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"vCPU 0", "vCPU 1"}
    xs = [e for e in te if e["ph"] == "X"]
    assert [(x["tid"], x["ts"], x["dur"]) for x in xs] == [(0, 1.0, 3.0), (1, 5.0, 2.0)]
    assert {e["cat"] for e in te if e["ph"] == "i"} >= {"irq", "irq_return", "return", "abort"}
    from rich.console import Console
    con = Console(width=160, record=True)
    con.print(timeline(evs))
    out = con.export_text()
    assert "ABORT #PF err=0x6 [W|U]" in out and "vCPU 1" in out


def test_find_sbm_check_and_resume():
    base = 0xFFFFFFFF81401000
    kcr3 = 0xFFFFFFFF819EA028
    # mov %cr3,%rax; bt $12,%rax; jc +x; mov kcr3(%rip),%rax; test %rax,%rax; jne +0x20
    code = bytearray(b"\x90" * 16 + b"\x0f\x20\xd8" + b"\x48\x0f\xba\xe0\x0c" + b"\x72\x10")
    i = len(code)
    code += b"\x48\x8b\x05" + struct.pack("<i", kcr3 - (base + i + 7)) + b"\x48\x85\xc0" + b"\x75\x20"
    c = find_cr3_check(base, bytes(code), kcr3)
    assert c.sandbox == base + len(code) + 0x20 and c.pti_bit_test and c.addr == base + i
    with pytest.raises(VariantError):
        find_cr3_check(base, bytes(code), kcr3 + 8)
    # v1: movq kcr3 (absolute), %rcx; jrcxz +0x40: the sandbox path falls through
    v1 = b"\x90" + b"\x48\x8b\x0c\x25" + struct.pack("<i", kcr3 - (1 << 64)) + b"\xe3\x40" + b"\x0f\x22\xd9"
    c = find_cr3_check(base, v1, kcr3)
    assert c.sandbox == base + 11 and not c.pti_bit_test and "jrcxz" in c.shape
    # v1 NMI: cmpq $0, kcr3 (absolute); jne rel32
    v1n = b"\x48\x83\x3c\x25" + struct.pack("<i", kcr3 - (1 << 64)) + b"\x00" + b"\x0f\x85" + struct.pack("<i", 0x9e)
    assert find_cr3_check(base, v1n, kcr3).sandbox == base + len(v1n) + 0x9e
    # cmpq $0x30, 0x88(%rsp); je rel32
    code2 = b"\x90\x90" + b"\x48\x83\xbc\x24\x88\x00\x00\x00\x30" + b"\x0f\x84" + struct.pack("<i", 0x100)
    assert find_exit_check(base, code2, 0x88).sandbox == base + len(code2) + 0x100
    # v1: cmpw $0x30, 0x88(%rsp); jne short: the sandbox return is the fall-through
    code3 = b"\x66\x83\xbc\x24\x88\x00\x00\x00\x30" + b"\x75\x3f" + b"\x41\x5f"
    e = find_exit_check(base, code3, 0x88)
    assert e.sandbox == base + 11 and e.shape == "cmpw $__SBM_CS, CS(%rsp); jne"
    with pytest.raises(VariantError):
        find_exit_check(base, code3, 0x90)


def test_emulate_decode_execute():
    regs = {"rsp": 0x1000, "rbp": 0, "rdi": 0x2000, "rax": 0, "gs_base": 0x500000, "r15": 0}
    mem = {0x1000: struct.pack("<Q", 0xdead), 0x2000: struct.pack("<I", 0xfffffff2) + b"\0" * 4,
           0x500000 + 0x1ecc0: struct.pack("<Q", 0xbeef)}

    def read(a, n):
        return mem[a][:n]
    r = regs.__getitem__
    i = em.decode(b"\x48\x89\xe5")                          # mov %rsp,%rbp
    assert (i.op, i.length) == ("mov", 3) and em.execute(i, 0x10, r, read) == {"rip": 0x13, "rbp": 0x1000}
    i = em.decode(b"\x41\x5f")                              # pop %r15
    assert em.execute(i, 0x10, r, read) == {"rip": 0x12, "r15": 0xdead, "rsp": 0x1008}
    i = em.decode(b"\x8b\x07")                              # mov (%rdi),%eax
    assert (i.size, em.execute(i, 0, r, read)["rax"]) == (4, 0xfffffff2)
    pc = 0xFFFFFFFF8102625F                                 # mov %gs:disp(%rip),%rax
    disp = (0x1ecc0 - (pc + 8)) & 0xFFFFFFFF
    i = em.decode(b"\x65\x48\x8b\x05" + struct.pack("<I", disp))
    assert i.gs and em.execute(i, pc, r, read)["rax"] == 0xbeef
    i = em.decode(b"\x48\x8d\x7c\x24\x08")                  # lea 8(%rsp),%rdi
    assert em.execute(i, 0, r, read)["rdi"] == 0x1008
    for nop in (b"\x90", b"\x66\x90", b"\x0f\x1f\x00", b"\x0f\x1f\x44\x00\x00", b"\x66\x0f\x1f\x44\x00\x00"):
        assert em.decode(nop).length == len(nop), nop
    for no in (b"\x55", b"\x48\x89\x07", b"\x0f\x22\xd8", b"\xc3", b"\x89\xe5", b""):
        assert em.decode(no) is None, no


def test_choose_site():
    p = Probe("x86_sbm_exec", 0x1000, "symbol")
    q = choose_site(p, b"\x55\x48\x89\xe5\x53")
    assert (q.site, q.sp_adjust, q.insn.op) == (0x1001, 8, "mov")
    e = choose_site(Probe("sbm_entry", 0x2000, "x"), b"\x0f\x22\xd8\x80\xa4\x24\x90\x00\x00\x00\xfc\x90\x90")
    assert e.site == 0x200B and e.insn.op == "nop"
    r = choose_site(Probe("x86_sbm_return", 0x3000, "symbol"),
                    b"\x48\x8b\x0d\x00\x00\x00\x00\x48\x85\xc9\x74\x03\x0f\x22\xd9\x41\x5f")
    assert r.site == 0x300F and r.insn.op == "pop"
    assert choose_site(Probe("f", 0x4000, "symbol"), b"\xc3").insn is None


LOG = """\
check_exception old: 0xffffffff new 0xe
     7: v=0e e=0015 i=0 cpl=3 IP=0033:ffffffff81401740 pc=ffffffff81401740 SP=002b:ffffc90000971000 CR2=ffffffff81401740
RAX=00000000000007e0 RBX=0000000000000000
     8: v=ec e=0000 i=0 cpl=3 IP=0033:ffffffff810bf7d7 pc=ffffffff810bf7d7 SP=002b:ffffc9000098cff0 env->regs[R_EAX]=0000000000000000
     9: v=0d e=0000 i=0 cpl=3 IP=0033:ffffffff810bf6a3 pc=ffffffff810bf6a3 SP=002b:ffffc90000971ff0 env->regs[R_EAX]=8000000000000000
    10: v=0e e=0004 i=0 cpl=3 IP=0033:0000000000401000 pc=0000000000401000 SP=002b:00007ffd00000000 CR2=0000000000401000
    11: v=ef e=0000 i=0 cpl=0 IP=0010:ffffffff81000000 pc=ffffffff81000000 SP=0018:ffffc90000003e00 env->regs[R_EAX]=0000000000000000
"""


def test_qemu_log_cross_check(tmp_path):
    p = tmp_path / "q.log"
    p.write_text(LOG)
    log = parse_log(str(p))
    assert len(log) == 5 and log[0].cr2 == 0xFFFFFFFF81401740 and log[1].cr2 is None
    assert [q.in_sandbox for q in log] == [True, True, True, False, False]
    evs = [{"kind": "return", "vector": 14, "error_code": 0x15, "cr2": "0xffffffff81401740",
            "fault_rip": "0xffffffff81401740"},
           {"kind": "abort", "vector": 13, "error_code": 0, "fault_rip": "0xffffffff810bf6a3"},
           {"kind": "irq", "vector": 0xEC, "fault_rip": "0xffffffff810bf7d7"}]
    r = cross_check(evs, log)
    assert (r["traced_faults"], r["logged_faults"], r["missing_from_log"], r["missing_from_trace"]) == (2, 2, [], [])
    assert r["irqs_missing_from_trace"] == [] and r["irqs_missing_from_log"] == []
    r = cross_check(evs[:1], log)
    assert r["missing_from_trace"] == [{"vector": 13, "error": 0, "cr2": None, "ip": "0xffffffff810bf6a3", "n": 1}]
    off = LOG.index("     9:")
    assert len(parse_log(str(p), start=off)) == 3
    assert os.path.getsize(p) == len(LOG)


def test_an_abort_without_an_error_code_reads_and_renders(tmp_path):
    """#UD, #DB and the other vectors that push no error code: the tracers
    write error_code null (the attack catalogue's int1, warn_ud2,
    pkru_write); the strict reader must take it and every face render it."""
    from sbmdbg.trace.export import summary_line
    p = tmp_path / "t.jsonl"
    evs = [{"seq": 0, "kind": "trace_start", "ncpus": 2, "schema": 2},
           {"seq": 1, "kind": "abort", "vcpu": 0, "vector": 6, "vector_name": "#UD", "error_code": None,
            "fault_rip": "0xffffffff81000000"},
           {"seq": 2, "kind": "spurious", "vcpu": 0, "vector": 14, "error_code": None}]
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    got = read_events(str(p), strict=True)
    assert [e["error_code"] for e in got[1:]] == [None, None]
    assert summary_line(got[1]) == "ABORT #UD at 0xffffffff81000000"
    assert "err=0x0" in summary_line(got[2])
    assert to_perfetto(got)["traceEvents"] is not None
    (tmp_path / "bad.jsonl").write_text(json.dumps({"seq": 0, "kind": "abort", "error_code": "6"}) + "\n")
    with pytest.raises(SbmdbgError, match="error_code: want an integer"):
        read_events(str(tmp_path / "bad.jsonl"))
