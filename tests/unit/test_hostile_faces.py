"""A guest comm with ESC/OSC/CSI through every offline face (issue 14).

The comm is written into the recorded guest memory of a real snapshot (the
model reads it as it would from a live guest), the same string goes into a
trace file, a scenario name, a console tail and a step failure.  No raw
C0/C1 byte may come out of: ``sbmdbg inspect``'s renderers, the dashboard
frame (text and SVG), ``sbmdbg trace show`` (text and JSON), the check
reporter, the failure report and JUnit (which ElementTree must parse).
The gdb commands and the live dashboard: tests/live/test_hostile_live.py."""
from __future__ import annotations

import io
import json
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from sbmdbg.text import has_raw_control

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"
EVIL = "\x1b]0;pwned\x07[red]X[/]\x1b[2J\x9b1m"   # OSC title, markup, CSI, C1 CSI
EVIL_COMM = EVIL.encode()[:15]                       # what fits in task_struct.comm


def _text(*renderables, width=140) -> str:
    con = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="standard",
                  highlight=False)
    for r in renderables:
        con.print(r)
    return con.file.getvalue()


def _no_raw(text: str) -> None:
    # ANSI styling from rich itself is ESC '[' ... 'm'; anything else is the guest's
    import re
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", text)
    assert not has_raw_control(stripped), repr(stripped[:400])
    assert "\x07" not in text and "\x1b]" not in text and "\x1b[2J" not in text and "\x9b" not in text


@pytest.fixture(scope="module")
def hostile_kernel():
    """The sbm-in-sandbox snapshot with the sandbox task's comm overwritten."""
    from sbmdbg.model.kernel import Kernel
    from sbmdbg.sbm import model as M
    from sbmdbg.model.fixture import load_snapshot
    t, syms, lays, _ = load_snapshot(str(FIX / "sbm-in-sandbox.json.gz"))
    k = Kernel(t, syms, lays)
    sb = M.sandboxes(k)[0]
    off = lays.layout("task_struct").fields["comm"].offset
    tr = k.translate(k.root, sb.task + off)
    assert tr.pa is not None
    page = tr.pa & ~0xFFF
    data = bytearray(t.pages[page])
    o = tr.pa & 0xFFF
    data[o:o + 16] = EVIL_COMM + b"\0" * (16 - len(EVIL_COMM))
    t.pages[page] = bytes(data)
    t.invalidate()
    k2 = Kernel(t, syms, lays)   # fresh caches
    assert M.sandboxes(k2)[0].comm.startswith("\\x1b]0;pwned\\x07")   # read, sanitized at entry
    return k2


def test_inspect_renderers(hostile_kernel):
    from sbmdbg.commands import TABLE, command_parser
    seen = 0
    for argv in (["status"], ["list"], ["show"], ["audit"], ["stack"]):
        args = command_parser("sbmdbg inspect").parse_args(argv)
        cmd = TABLE[args.cmd]
        d = cmd.compute(hostile_kernel, args)
        raw = json.dumps(d, ensure_ascii=False)
        assert not has_raw_control(raw)
        seen += "pwned" in raw
        _no_raw(_text(*cmd.render(d)))
    assert seen >= 2   # the comm really went through (list, show)


def test_dashboard_frame(hostile_kernel, tmp_path):
    from sbmdbg.dashboard import backend as B
    from sbmdbg.dashboard import panels as P
    from sbmdbg.sbm import model as M
    sb = M.sandboxes(hostile_kernel)[0]
    tail = B.TraceTail()
    for e in _hostile_events(tmp_path):
        tail.add(e)
    cpu = {"cpu": 0, "mode": "sandbox", "cpl": 3, "cr3_role": sb.label, "rip": 0xffffffff810bf60b,
           "rip_symbol": {"text": "x"}, "task": {"pid": sb.pid, "comm": sb.comm}, "preempt_count": 0,
           "stack": {"kind": "sbm_sandbox_stack", "offset_from_top": 16},
           "top_of_stack": 0xffff88800058c000, "top_of_intr_stack": 0xffffc90000024000}
    snap = {"running": False, "tracing": True, "selected": 0, "label": "VM", "sbm": True, "cpus": [cpu],
            "sandboxes": [{"label": sb.label, "state": sb.state, "pid": sb.pid, "comm": sb.comm, "cpus": [0],
                           "fields": {}, "sbm": {"error": 0, "buffers": []}, "pt_summary": [],
                           "audit_worst": "info", "audit": []}],
            "trace": tail.to_json(), "console": B.clean_console(EVIL + "\r\n").splitlines(),
            "messages": [], "timing_ms": {"total": 1.0}, "backtrace": {"frames": []}}
    con = Console(file=io.StringIO(), width=120, height=40, record=True, force_terminal=True,
                  color_system="standard")
    con.print(P.frame(snap, 120, 40), height=40)
    _no_raw(con.file.getvalue())
    svg = con.export_svg()
    assert not has_raw_control(svg) and "pwned" in svg


def _hostile_events(tmp_path):
    from sbmdbg.trace.events import read_events
    p = tmp_path / "evil.jsonl"
    evs = [{"seq": 0, "kind": "trace_start", "ncpus": 1, "host_ns": 0},
           {"seq": 1, "kind": "enter", "vcpu": 0, "pid": 5, "comm": EVIL, "func_sym": EVIL, "host_ns": 1},
           {"seq": 2, "kind": "abort", "vcpu": 0, "pid": 5, "comm": EVIL, "vector": 14, "vector_name": EVIL,
            "error_code": 6, "error_bits": ["W", EVIL], "cr2": "0x0", "cr2_region": EVIL,
            "fault_sym": EVIL, "host_ns": 2},
           {"seq": 3, "kind": "trace_stop", "host_ns": 3, "reason": EVIL}]
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    return read_events(str(p))


def test_trace_show(tmp_path, capsys):
    from sbmdbg import cli
    _hostile_events(tmp_path)
    f = str(tmp_path / "evil.jsonl")
    assert cli.main(["trace", "show", f]) == 0
    out = capsys.readouterr().out
    _no_raw(out)
    assert "pwned" in out
    assert cli.main(["trace", "show", f, "--json"]) == 0
    out = capsys.readouterr().out
    assert not has_raw_control(out) and "pwned" in out
    out_path = tmp_path / "p.json"
    assert cli.main(["trace", "export", f, "--perfetto", str(out_path)]) == 0
    assert not has_raw_control(json.dumps(json.loads(out_path.read_text()), ensure_ascii=False))


def test_check_report_and_junit(tmp_path):
    from sbmdbg.check import report as R
    from sbmdbg.check.runner import FileResult, StepResult
    from sbmdbg.check.spec import loads
    from sbmdbg.vm.serial import parse_run_output
    name = json.dumps(EVIL)   # a TOML basic string with \u escapes
    sc = loads(f"name = {name}\n[[step]]\nname = {name}\nrun = \"true\"\n", tmp_path / "evil.check.toml",
               check_files=False)
    guest = parse_run_output("__SBMDBG_BEGIN_x__\n" + EVIL + "\n__SBMDBG_END_x_3__\n", "x")
    assert guest is not None and not has_raw_control(guest.output)
    st = sc.steps[0]
    r = StepResult(index=st.index, name=st.name, line=st.line)
    r.status = "fail"
    r.failures = [f"output: {guest.output}", "console: 1 oops/warning line(s): " + EVIL]
    r.notes = [EVIL]
    fr = FileResult(path=str(sc.path), name=sc.name)
    fr.steps = [r]
    fr.status = "fail"
    fr.console_tail = EVIL + "\n" + EVIL
    fr.setup_failures = [EVIL]
    con = Console(file=io.StringIO(), width=140, force_terminal=True, color_system="standard")
    rep = R.RichReporter(con, verbose=True)
    rep.file_start(sc, 0, 1)
    rep.step_done(st, r)
    rep.file_done(fr)
    rep.note(EVIL)
    _no_raw(con.file.getvalue())
    assert not has_raw_control(R.failure_text(fr), allow="\n")
    junit = tmp_path / "j.xml"
    R.write_junit([fr], str(junit), 1.0)
    tree = ET.parse(junit)   # the guest's ESC would make invalid XML
    text = ET.tostring(tree.getroot(), encoding="unicode")
    assert not has_raw_control(text) and "pwned" in text
    R.write_json([fr], str(tmp_path / "j.json"), 1.0)
    json.loads((tmp_path / "j.json").read_text())
