"""Dashboard pieces without a guest: panels (markup safety, small terminals),
the trace tail, helpers, and the Textual app driven by Textual's pilot over
a fake backend."""
from __future__ import annotations

import asyncio
import collections
import json

import pytest
from rich.console import Console

from sbmdbg.dashboard import backend as B
from sbmdbg.dashboard import panels as P
from sbmdbg.errors import SbmdbgError

pytestmark = pytest.mark.unit

EVIL = "[red]x[/red][link=file:///etc]"


def _snap(**kw) -> dict:
    cpu = {"cpu": 0, "mode": "sandbox", "cpl": 3, "cr3_role": "sandbox:67", "rip": 0xffffffff810bf60b,
           "rip_symbol": {"text": "__sbm_thunk_sbm_demo_compute"}, "task": {"pid": 67, "comm": EVIL},
           "preempt_count": 0x80000000, "stack": {"kind": "sbm_sandbox_stack", "offset_from_top": 16},
           "top_of_stack": 0xffff88800058c000, "top_of_intr_stack": 0xffffc90000024000}
    cpu1 = dict(cpu, cpu=1, mode="kernel", cpl=0, cr3_role="kernel", task={"pid": 0, "comm": "swapper/1"},
                preempt_count=0x100, stack={"kind": "irq_stack", "offset_from_top": 0xf8},
                top_of_intr_stack=0xffff88800058c000)
    sb = {"label": "sandbox:67", "state": 0xffff888000646000, "pid": 67, "comm": EVIL, "cpus": [0],
          "fields": {"sbm_cr3": 0x598000, "stack": 0xffffc9000001d000, "exc_stack": 0xffffc90000021000},
          "sbm": {"error": 0, "buffers": [{"direction": "input", "sbm_ptr": 0xffffc90000019000, "size": 64}]},
          "pt_summary": [{"kind": "kernel_text", "perms": "r-x user", "global": False, "pages": 512}],
          "audit_worst": "high", "audit": [{"severity": "high", "rule": "input_writable",
                                            "message": "input buffer is writable " + EVIL, "pages": 1}]}
    ev = [{"seq": 1, "kind": "enter", "vcpu": 0, "func_sym": EVIL, "sandbox": "0x1"},
          {"seq": 2, "kind": "abort", "vcpu": 0, "vector_name": "#PF", "error_code": 7,
           "error_bits": ["P", "W", "U"], "cr2": "0xffffffff818a0000", "cr2_region": "data: " + EVIL,
           "fault_sym": EVIL}]
    tail = B.TraceTail()
    for e in ev:
        tail.add(e)
    s = {"running": False, "tracing": True, "selected": 0, "label": "VM test", "sbm": True,
         "cpus": [cpu, cpu1], "sandboxes": [sb], "trace": tail.to_json(),
         "console": B.clean_console("~ # \x1b[31mred\x1b]0;title\x07 " + EVIL + "\r\nnext\r\n").splitlines(),
         "messages": [("12:00:00", "paused " + EVIL)], "timing_ms": {"total": 12.5},
         "backtrace": {"frames": [{"pc": 0xffffffff810bf60b, "symbol": EVIL, "context": "sandbox"}]}}
    s.update(kw)
    return s


def _render(renderable, width=120, height=None) -> str:
    con = Console(width=width, height=height, record=True, file=open("/dev/null", "w"), color_system="truecolor")
    con.print(renderable, height=height) if height else con.print(renderable)
    return con.export_text()


def test_guest_strings_are_not_markup():
    s = _snap()
    for part in (P.vcpu_panel(s), P.sandbox_panel(s), P.trace_panel(s), P.console_panel(s), P.header(s),
                 P.messages_text(s)):
        _render(part)   # markup errors would raise here
    text = _render(P.frame(s, 200, 60), 200, 60)
    assert "[red]x[/red]" in text            # printed literally (the comm, the console, ...)
    assert "\x1b" not in B.clean_console("a\x1b[31mb\x1b]0;t\x07c")
    assert B.clean_console("a\x1b[31mb\x1b]0;t\x07c\x00\x07d") == "abc\\x00\\x07d"  # shown, not raw


@pytest.mark.parametrize("w,h", [(80, 24), (120, 40), (200, 60)])
def test_frame_sizes(w, h):
    text = _render(P.frame(_snap(), w, h), w, h)
    lines = text.splitlines()
    assert len(lines) == h and all(len(ln) <= w for ln in lines)
    assert "vCPU 0" in text and "vCPU 1" in text
    assert "PAUSED" in text and "transitions" in text and "console" in text
    if w >= 120:
        assert "ABORT #PF" in text and "sandbox:67" in text


def test_trace_tail_incremental(tmp_path):
    p = tmp_path / "t.jsonl"
    t = B.TraceTail()
    t.follow(str(p))
    assert t.poll() == 0                       # no file yet
    p.write_bytes(b'{"seq":0,"kind":"trace_start"}\n{"seq":1,"kind":"ent')
    assert t.poll() == 1                       # the torn line waits
    with open(p, "ab") as fh:
        fh.write(b'er","vcpu":1}\n' + json.dumps({"seq": 2, "kind": "abort", "vector_name": "#GP"}).encode()
                 + b"\nnot json\n")
    assert t.poll() == 2
    j = t.to_json()
    assert j["counts"] == {"trace_start": 1, "enter": 1, "abort": 1}
    assert j["aborts_by_reason"] == {"#GP": 1}
    assert j["per_second"] == {"abort": 0.2, "enter": 0.2}     # 5 s window, trace_start not a rate


def test_abort_reason():
    ev = {"vector_name": "#PF", "error_desc": "protection write from user",
          "cr2_region": "data: demo_static_data; sandbox: RO,U,NX"}
    assert B.abort_reason(ev) == "#PF protection write from user @ data"


def test_pt_summary():
    rs = [{"kind": "kernel_text", "name": "kernel text", "perms": {"u": True, "w": False, "x": True},
           "global": False, "pages": 2, "va": 0x2000},
          {"kind": "rodata", "name": "rodata", "perms": {"u": True, "w": False, "x": False},
           "global": False, "pages": 3, "va": 0x9000},
          {"kind": "kernel_text", "name": "kernel text", "perms": {"u": True, "w": False, "x": True},
           "global": False, "pages": 5, "va": 0x5000}]
    out = B.pt_summary(rs)
    assert [(r["kind"], r["pages"], r["ranges"]) for r in out] == [("kernel_text", 7, 2), ("rodata", 3, 1)]


def test_scenario_command():
    assert B.scenario_command("ok") == "echo ok > /sys/kernel/debug/sbm_demo/run; cat /sys/kernel/debug/sbm_demo/run"
    assert B.scenario_command("repeat 20").startswith("echo repeat 20 >")
    for bad in ("ok; reboot", "$(id)", "OK", "repeat 1234567"):
        with pytest.raises(SbmdbgError):
            B.scenario_command(bad)
    assert all(B.scenario_command(s) for s in B.SCENARIOS)


def test_preempt_str():
    assert P.preempt_str(0x80000000) == "0x0"           # bit 31 set = no resched pending (inverted)
    assert P.preempt_str(0x00000101) == "0x101 resched"


# ---------------------------------------------------------------- the app
class FakeBackend:
    def __init__(self):
        self.paused = False
        self.tracing = False
        self.selected = 0
        self.ncpus = 2
        self.calls: list = []
        self.messages = collections.deque(maxlen=6)
        self.trace = B.TraceTail()

    def snapshot(self, full=True):
        self.calls.append("snapshot")
        return _snap(running=not self.paused, tracing=self.tracing, selected=self.selected)

    def poll_gdb(self):
        pass

    def console_tail(self, n=60):
        return ["~ # " + EVIL]

    def toggle_pause(self):
        self.calls.append("pause")
        self.paused = not self.paused

    def stepi(self, cpu=None):
        self.calls.append(("stepi", self.selected if cpu is None else cpu))

    def toggle_trace(self):
        self.calls.append("trace")
        self.tracing = not self.tracing

    def select(self, cpu):
        self.selected = cpu

    def send_line(self, line):
        self.calls.append(("send", line))

    def run_scenario(self, name):
        self.calls.append(("scenario", name))

    def close(self):
        self.calls.append("close")
        return {}


def test_app_keys_with_pilot():
    from sbmdbg.dashboard.app import Dashboard

    be = FakeBackend()

    async def drive():
        app = Dashboard(be, rate=10)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.3)
            await pilot.press("space")
            await pilot.pause(0.2)
            await pilot.press("1", "s", "t")
            await pilot.pause(0.2)
            await pilot.press("d")
            await pilot.pause(0.2)
            await pilot.press("down", "down", "down", "down", "enter")   # write_kernel_data
            await pilot.pause(0.2)
            await pilot.press("c", *"ls", "enter", "escape", "v")
            await pilot.pause(0.3)
            assert app.frames > 0
            await pilot.press("q")
    asyncio.run(drive())
    assert "pause" in be.calls and ("stepi", 1) in be.calls and "trace" in be.calls
    assert ("scenario", "write_kernel_data") in be.calls and ("send", "ls") in be.calls
    assert be.selected == 0            # v after 1 wraps around 2 vCPUs


def test_abort_why_lines_in_the_transitions_panel():
    """The newest aborts get a one-line `sbm why` (the model of `trace why`, on
    the recorded LZ4 fixture), computed once per abort, shown under the abort."""
    import re
    from pathlib import Path

    from sbmdbg.trace import why as TW

    fx = json.loads((Path(__file__).resolve().parents[2] / "fixtures" / "trace" / "why-lz4-fast.json")
                    .read_text())
    made = []
    whys = B.AbortWhys(lambda: made.append(1) or TW.FixtureImage(fx))
    tail = B.TraceTail()
    aborts = TW.aborts(fx["events"])
    for e in fx["events"]:
        tail.add(e)
    tail.add({"seq": 99, "kind": "abort", "vcpu": 0, "vector": 14, "fault_rip": "zzz"})   # malformed
    for _ in range(3):   # three refreshes: each abort explained once
        lines = whys.update(tail.to_json()["last"])
    assert whys.computed == len(aborts) + 1 and made == [1]
    assert lines["99"].startswith("no explanation: bad number")
    for ev in aborts:
        rip = int(ev["fault_rip"], 16) - int(fx["slide"], 16)
        m = re.search(r'Line (\d+) of "([^"]+)"', fx["gdb"][hex(rip)])   # gdb's own `info line`
        line = lines[str(ev["seq"])]
        assert line.startswith(f"{m.group(2).rsplit('/', 1)[-1]}:{m.group(1)} in "), line
        assert f"read {int(ev['cr2'], 16):#x}" in line and "not present in the sandbox page table" in line
    snap = _snap(trace=dict(tail.to_json(), why=lines))
    text = _render(P.trace_panel(snap, max_events=8), 200)
    rows = text.splitlines()
    last = aborts[-1]
    i = next(n for n, r in enumerate(rows) if re.match(rf"\s*{last['seq']} cpu", r))
    assert rows[i + 1].strip() == "why: " + lines[str(last["seq"])]
    assert rows[-2].strip().startswith("99 cpu0") and "why: no explanation" in rows[-1]
    assert sum(1 for r in rows if re.match(r"\s*\d+ cpu", r) or "why:" in r) <= 8   # the newest fit


def test_vcpu_panel_flags_foreign_bases():
    """Issue 15: the vCPU panel shows `sbm`'s evidence (GS/FS base, PKRU not
    what the kernel expects in a sandbox), with or without a backtrace."""
    s = _snap()
    ev = "FS base 0x5bad000 on cpu 0: not 67 sh's thread.fsbase 0x0 " + EVIL
    s["cpus"][0]["attack_evidence"] = [ev]
    for snap in (s, dict(s, backtrace=None)):
        text = _render(P.vcpu_panel(snap), 200)
        assert "vCPU 0: FS base 0x5bad000 on cpu 0" in text and "[red]x[/red]" in text
    assert "FS base" not in _render(P.vcpu_panel(_snap()), 200)
