"""`trace why` on a recorded trace (fixtures/trace/why-lz4-fast.json: three
LZ4_decompress_fast aborts traced by the no-stop tracer during a fuzz
campaign on the reference kernel, with the image data the explanation needs
and gdb's own `info line` / `x/i` answers recorded from the same vmlinux)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.sbm import why as W
from sbmdbg.trace import why as TW

pytestmark = pytest.mark.unit
FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "trace" / "why-lz4-fast.json"


@pytest.fixture(scope="module")
def fx():
    return json.loads(FIXTURE.read_text())


def test_every_abort_explained_like_gdb(fx):
    img = TW.FixtureImage(fx)
    events = fx["events"]
    out = [TW.explain_event(img, e) for e in TW.aborts(events)]
    assert len(out) == 3
    for d, ev in zip(out, TW.aborts(events)):
        rip = int(ev["fault_rip"], 16) - img.slide
        gdb = fx["gdb"][hex(rip)]
        m = re.search(r'Line (\d+) of "([^"]+)"', gdb)
        assert m, gdb
        assert d["source"]["line"] == int(m.group(1))
        assert d["source"]["file"].endswith(m.group(2))
        assert d["source"]["function"] == "LZ4_decompress_fast"
        assert any(x["function"] == "LZ4_decompress_generic" for x in d["source"]["inlined"])
        # gdb's x/i (intel flavor): the same mnemonic, and the next instruction where ours ends
        ins = [ln for ln in gdb.splitlines() if ln.lstrip().startswith("0x")]
        assert d["instruction"]["mnemonic"] == ins[0].split(":", 1)[1].split()[0]
        nxt = int(ins[1].split()[0], 16)
        assert rip + d["instruction"]["length"] == nxt
        name, off = re.search(r"<(\w+)\+(\d+)>", ins[0]).groups()
        assert d["instruction"]["symbol"] == f"{name}+{int(off):#x}"
        # the access from the error code and the operand
        err = ev["error_code"]
        assert d["access"]["kind"] == ("write" if err & 2 else "read")
        assert d["access"]["address"] == int(ev["cr2"], 16)
        assert d["access"]["size"] == d["instruction"]["memory"]["size"]
        assert d["address"]["region"] == ev["cr2_region"]
        assert d["denied"]["from"].startswith("error code") and d["denied"]["bit"] == ("P" if not err & 1 else None)
        assert d["rule"]["id"] in W.RULES
        assert "walks" in d and "sandbox" not in d["walks"]      # the sandbox is gone
        assert W.lines(d)[0].startswith("why: ")


def test_buffers_turn_into_distances(fx):
    """Given the run's buffers (what `sbmdbg fuzz` knows from sbm_codec), the
    address becomes "N bytes past the end of input buffer #0"."""
    img = TW.FixtureImage(fx)
    ev = TW.aborts(fx["events"])[1]
    cr2 = int(ev["cr2"], 16)
    end = cr2 & ~0xFFF                      # the input's data ends at a page end
    bufs = [{"direction": "input", "index": 0, "sbm_ptr": end - 61, "size": 61},
            {"direction": "output", "index": 0, "sbm_ptr": end + (64 << 20), "size": 4000}]
    d = W.explain(img, rip=int(ev["fault_rip"], 16), vector=14, error_code=ev["error_code"],
                  cr2=cr2, buffers=bufs)
    b = d["address"]["buffer"]
    assert (b["relation"], b["direction"], b["offset"]) == ("past_end", "input", cr2 - end)
    assert "past the end of input buffer #0 (61 bytes), in its guard page" in b["text"]
    assert d["rule"]["id"] == "past_buffer"
    assert W.group_key(d).endswith("read past the end of input buffer #0")


def test_select_and_errors(fx):
    img_events = fx["events"]
    seqs = [e["seq"] for e in TW.aborts(img_events)]
    with pytest.raises(SbmdbgError, match="no abort event with seq"):
        TW.why(img_events, "/nonexistent", seq=10 ** 9)
    with pytest.raises(SbmdbgError, match="no vmlinux"):
        TW.why(img_events, "/nonexistent/vmlinux", seq=seqs[0])
    with pytest.raises(SbmdbgError, match="no abort"):
        TW.why([e for e in img_events if e["kind"] != "abort"], None)


def test_hostile_event_is_one_error(fx):
    img = TW.FixtureImage(fx)
    ev = dict(TW.aborts(fx["events"])[0], fault_rip="0xnothex")
    with pytest.raises(SbmdbgError, match="bad number"):
        TW.explain_event(img, ev)


def test_disassemble_operand_sizes():
    assert W.disassemble(bytes.fromhex("488b03"), 0)["memory"]["size"] == 8       # mov rax,[rbx]
    assert W.disassemble(bytes.fromhex("0fb609"), 0)["memory"]["size"] == 1       # movzx ecx,byte [rcx]
    w = W.disassemble(bytes.fromhex("488902"), 0)                                  # mov [rdx],rax
    assert w["memory"]["write"] and w["length"] == 3
