"""Fuzz: every input a user (or an attacker) hands sbmdbg (issue 14).

The CLI's argument parsers (>= 2,000 argv), scenario files (>= 2,000),
trace files (>= 2,000: JSON lines with wrong types, depth, sizes, random
bytes, torn lines) and vmcore headers.  Each ends as a result or as one
``SbmdbgError`` / one ``sbmdbg: error: ...`` line: never another exception,
never a raw control character in what is shown."""
from __future__ import annotations

import collections
import contextlib
import functools
import io
import json
import math
import os
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rich.console import Console

from sbmdbg import cli
from sbmdbg.check import spec
from sbmdbg.commands.parser import ArgError, HelpShown
from sbmdbg.errors import SbmdbgError
from sbmdbg.text import has_raw_control

pytestmark = pytest.mark.unit

CASES = {"cli": 2000, "scenario": 2000, "trace": 2000, "vmcore": 600}


def _settings(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def timed(fig: dict):
    """Keep the worst time and the worst traced peak memory of one case
    (figures for the README; memory is asserted against MAX_CASE_BYTES)."""
    def deco(fn):
        @functools.wraps(fn)
        def run(*a, **kw):
            tracemalloc.start()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                fig["worst"] = max(fig.get("worst", 0.0), time.perf_counter() - t0)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                fig["peak"] = max(fig.get("peak", 0), peak)
                assert peak < MAX_CASE_BYTES, peak
        return run
    return deco


#: No single hostile input may make sbmdbg hold more than this (Python heap).
MAX_CASE_BYTES = 256 << 20


def _report(name: str, counts, fig: dict) -> None:
    print(f"\nhostile {name}: {counts['cases']} cases, worst {fig.get('worst', 0):.3f} s, "
          f"worst peak {fig.get('peak', 0) / (1 << 20):.1f} MiB; {dict(counts)}")


HOSTILE_TEXT = ("\x1b]0;pwned\x07", "[red]X[/]\x1b[2J", "\x9b31m", "\x00", "\ud800", "é²",
                "\u202e", "a" * 300, "")
NUMBERS = ("nan", "inf", "-inf", "-1", "0", "1e308", "5", "0x10", "1_000", "abc", "9" * 400,
           "-0", "1e-320", "2.5", "65", "4097")


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile-cli")
    (d / "garbage.jsonl").write_bytes(os.urandom(300))
    (d / "ok.jsonl").write_text('{"seq":0,"kind":"trace_start","ncpus":1}\n'
                                '{"seq":1,"kind":"enter","vcpu":0,"comm":"\\u001b[2J"}\n'
                                '{"seq":2,"kind":"sandbox_insn","vcpu":0,"insn":"\\u001b]0;x\\u0007",'
                                '"sym":"[red]\\u009b31m","bytes":"0f05","rip":"0x10"}\n')
    (d / "bad.check.toml").write_bytes(b"x = \xff\n")
    (d / "log.txt").write_text("garbage\n")
    (d / "dir").mkdir()
    return d


# commands that are safe to run to the end offline (no VM, no build)
SAFE = {("trace", "show"), ("trace", "export"), ("trace", "check")}
NUMERIC = {"timeout": (0, 86400), "rate": (0, 100), "repeat": (1, 1_000_000), "smp": (1, 64),
           "seconds": (0, 7 * 86400), "start_offset": (0, 1 << 62), "last": (1, 1 << 40),
           "vcpu": (0, 4095), "width": (40, 1000), "height": (10, 1000)}
OUT_PATHS = ("junit", "perfetto", "svg", "output")


def _argv(draw, d):
    trace = str(d / "ok.jsonl")
    heads = [["vm", "start"], ["vm", "run", "true"], ["trace", "show", trace],
             ["trace", "export", trace, "--perfetto", str(d / "out.json")],
             ["trace", "check", trace, "--qemu-log", str(d / "log.txt")],
             ["trace", "show", str(d / "garbage.jsonl")], ["check", str(d / "bad.check.toml"), "--validate"],
             ["dashboard", "--once"], ["bench", "trace"], ["bench", "pt"], ["bench", "status"],
             ["trace", "record", "--boot"], ["dump", "--vm", "x"], ["nonsense"], []]
    argv = list(draw(st.sampled_from(heads)))
    paths = [str(d / "x.out"), "/nonexistent/x", str(d / "dir"), "", str(d), "-", str(d / "ok.jsonl")]
    opts = ["--timeout", "--rate", "--repeat", "--smp", "--seconds", "--start-offset", "--last",
            "--vcpu", "--width", "--height", "--levels", "--junit", "--json", "--perfetto", "--file",
            "--svg", "--kind", "--qemu-log", "-o", "--help"]
    for _ in range(draw(st.sampled_from((0, 0, 1, 2, 4)))):
        opt = draw(st.sampled_from(opts))
        argv.append(opt)
        kind = draw(st.integers(0, 3))
        if kind == 0:
            argv.append(draw(st.sampled_from(NUMBERS)))
        elif kind == 1:
            argv.append(draw(st.sampled_from(paths)))
        elif kind == 2:
            argv.append(draw(st.sampled_from(HOSTILE_TEXT + ("plugin,bogus", "full,lean", "plugin"))))
    return argv


def test_cli_parsers(files, monkeypatch):
    monkeypatch.chdir(files)   # relative output paths ("1e308") land in the test's folder
    counts = collections.Counter()
    fig: dict = {}

    @_settings(CASES["cli"])
    @given(data=st.data())
    @timed(fig)
    def run(data):
        argv = _argv(data.draw, files)
        out, err = io.StringIO(), io.StringIO()
        code = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                args = cli.build_parser().parse_args(argv)
            except SystemExit as e:
                code = e.code
            except ArgError:
                code = cli.main(argv)   # what the face prints for it: usage + one line, exit 2
            except HelpShown as e:
                code = e.status
            else:
                if tuple(argv[:2]) in SAFE:
                    code = cli.main(argv)
        counts["cases"] += 1
        text = err.getvalue()
        assert "Traceback" not in text
        if code is None:
            counts["parsed"] += 1
            event("parsed")
            for k, (lo, hi) in NUMERIC.items():
                v = getattr(args, k, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert math.isfinite(v) and lo <= v <= hi, (k, v)
            for k in OUT_PATHS:
                v = getattr(args, k, None)
                if isinstance(v, str) and v:
                    assert os.path.isdir(os.path.dirname(os.path.abspath(v))) and not os.path.isdir(v)
        elif code == 0:
            counts["ok"] += 1
            event("exit 0")
        else:
            assert code in (1, 2), code
            lines = [ln for ln in text.splitlines() if ln.startswith("sbmdbg: ")]
            assert lines, text
            assert "internal error" not in text, text
            counts[f"exit {code}"] += 1
            event(f"exit {code}")
        assert not has_raw_control(text), text

    run()
    _report("CLI argv", counts, fig)
    n = counts["cases"]
    assert n >= CASES["cli"]
    assert counts["parsed"] + counts["ok"] >= n * 0.1, counts
    assert counts["exit 2"] >= n * 0.3 and counts["exit 1"] >= n * 0.002, counts


# ------------------------------------------------------------------ scenarios
def _toml_str(s: str) -> str:
    out = []
    for c in s:
        o = ord(c)
        if c in '"\\':
            out.append("\\" + c)
        elif o < 0x20 or o == 0x7F or 0xD800 <= o <= 0xDFFF:
            out.append(f"\\u{o:04x}" if not 0xD800 <= o <= 0xDFFF else "?")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml(v, depth=0) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x, depth + 1) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml(x, depth + 1)}" for k, x in v.items()) + "}"
    raise TypeError(v)


SCALARS = st.one_of(st.integers(-2**63, 2**63 - 1), st.floats(), st.booleans(),
                    st.sampled_from(HOSTILE_TEXT + ("PASS", "repeat 3", "repeat ²", "sbm audit", "calls",
                                                    "(" * 40, "x" * 3000, "fault", "memwrite")),
                    st.text(max_size=20))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(("op", "value", "cmd", "path", "result",
                                                                  "status", "output", "x")), inner,
                                                 max_size=3)), max_leaves=6)
STEP_KEYS = sorted(spec.STEP_KEYS) + ["bogus"]
TOP_KEYS = ["name", "description", "timeout", "console_clean", "fresh_vm", "vm", "bogus"]
TIMEOUTS = st.sampled_from((1, 30.5, 600, math.nan, math.inf, -math.inf, -5, 0, 1e9, 86400))
GOOD_VALUES = {"name": st.sampled_from(HOSTILE_TEXT), "description": st.sampled_from(HOSTILE_TEXT),
               "timeout": TIMEOUTS, "console_clean": st.booleans(), "fresh_vm": st.booleans(),
               "vm": st.just({"smp": 2}), "expect": st.sampled_from(({"status": 0}, {"output": "(" * 40},
                                                                      {"output": "x" * 2500})),
               "break": st.just("sbm_exec"), "trace_level": st.just("fast"), "qmp_nmi": st.booleans()}


@st.composite
def scenario_text(draw) -> bytes:
    kind = draw(st.sampled_from(("structured", "structured", "structured", "deep", "bytes", "many")))
    event(f"scenario {kind}")
    if kind == "deep":
        n = draw(st.sampled_from((50, 500, 5000)))
        return ("x = " + "[" * n + "]" * draw(st.sampled_from((0, n)))).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    lines = []
    def value(k):
        good = k in GOOD_VALUES and draw(st.integers(0, 4)) > 0
        return _toml(draw(GOOD_VALUES[k] if good else VALUES))
    for k in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=3, unique=True)):
        lines.append(f"{k} = {value(k)}")
    nsteps = draw(st.integers(0, 3)) if kind != "many" else draw(st.integers(50, 400))
    for _ in range(nsteps):
        lines.append("[[step]]")
        if kind == "many" or draw(st.booleans()):
            lines.append('demo = "ok"' if draw(st.booleans()) else 'run = "true"')
        for k in draw(st.lists(st.sampled_from([k for k in STEP_KEYS if k not in ("run", "demo")]),
                               max_size=3 if kind != "many" else 1, unique=True)):
            lines.append(f"{_toml_str(k)} = {value(k)}")
    return "\n".join(lines).encode() + (b"\xff" if draw(st.integers(0, 9)) == 0 else b"")


def test_scenario_files(tmp_path):
    counts = collections.Counter()
    fig: dict = {}
    path = tmp_path / "fuzz.check.toml"

    @_settings(CASES["scenario"])
    @given(data=scenario_text())
    @timed(fig)
    def run(data):
        path.write_bytes(data)
        counts["cases"] += 1
        try:
            sc = spec.load(path, check_files=False)
        except SbmdbgError as e:
            counts["invalid"] += 1
            event("invalid")
            msg = str(e)
            assert not has_raw_control(msg), msg
            assert msg.startswith(str(path)), msg
            return
        counts["valid"] += 1
        event("valid")
        assert not has_raw_control(sc.name) and not has_raw_control(sc.description)
        assert 0 < sc.timeout <= spec.TIMEOUT_MAX
        for s in sc.steps:
            assert 0 < s.timeout <= spec.TIMEOUT_MAX and math.isfinite(s.timeout)
            assert not has_raw_control(s.name)

    run()
    _report("scenario files", counts, fig)
    n = counts["cases"]
    assert n >= CASES["scenario"]
    assert counts["valid"] >= n * 0.01 and counts["invalid"] >= n * 0.3, counts


# ------------------------------------------------------------------ traces
FIELD_NAMES = ("seq", "kind", "host_ns", "jiffies", "vcpu", "ncpus", "pid", "comm", "cpl", "vector",
               "error_code", "error_bits", "cr2", "cr2_region", "func_sym", "fault_sym", "fault_rip",
               "sandbox", "task", "point", "ret", "probes", "level", "reason", "vector_name")
KINDS = ("trace_start", "enter", "return", "abort", "irq", "nmi", "irq_return", "spurious", "exit",
         "trace_stop", "call", "bogus")
GOOD = {"seq": st.integers(0, 100), "kind": st.sampled_from(KINDS), "host_ns": st.integers(0, 10**12),
        "vcpu": st.integers(0, 3), "ncpus": st.integers(1, 4), "pid": st.integers(0, 1000),
        "comm": st.sampled_from(HOSTILE_TEXT), "vector": st.integers(0, 255),
        "error_code": st.integers(0, 0xFFFF), "error_bits": st.just(["P", "W"]),
        "cr2": st.sampled_from(("0x0", "0xffffffff81000000")), "cr2_region": st.sampled_from(HOSTILE_TEXT),
        "func_sym": st.sampled_from(HOSTILE_TEXT), "fault_sym": st.sampled_from(HOSTILE_TEXT)}
ANY = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                             st.sampled_from(HOSTILE_TEXT)),
                   lambda inner: st.one_of(st.lists(inner, max_size=3),
                                           st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                   max_leaves=5)


@st.composite
def event_dict(draw):
    ev = {}
    for k in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=8, unique=True)):
        good = k in GOOD and draw(st.integers(0, 9)) > 0
        ev[k] = draw(GOOD[k]) if good else draw(ANY)
    if draw(st.integers(0, 9)) > 0:
        ev["kind"] = draw(GOOD["kind"])
    return ev


@st.composite
def trace_bytes(draw) -> bytes:
    lines = [json.dumps({"seq": 0, "kind": "trace_start", "ncpus": draw(st.sampled_from((1, 2, 4, 0, 10_000_000)))
                                                                          if draw(st.integers(0, 3)) == 0 else 2},
                        allow_nan=True).encode()]
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.integers(0, 19))
        if kind == 0:
            lines.append(draw(st.binary(min_size=1, max_size=40)).replace(b"\n", b" "))
        elif kind == 1:
            lines.append(b"[" * draw(st.sampled_from((10, 5000, 100_000))))
        else:
            lines.append(json.dumps(draw(event_dict()), allow_nan=True).encode())
    data = b"\n".join(lines) + b"\n"
    if draw(st.integers(0, 4)) == 0:   # a torn last line
        data += b'{"seq": 99, "kind": "ret'
        event("torn")
    return data


def test_trace_files(tmp_path):
    from sbmdbg.trace.events import read_events, summarize
    from sbmdbg.trace.export import timeline, write_perfetto
    counts = collections.Counter()
    fig: dict = {}
    path, out = tmp_path / "t.jsonl", tmp_path / "p.json"

    @_settings(CASES["trace"])
    @given(data=trace_bytes())
    @timed(fig)
    def run(data):
        path.write_bytes(data)
        counts["cases"] += 1
        try:
            evs = read_events(str(path))
        except SbmdbgError as e:
            msg = str(e)
            assert not has_raw_control(msg) and msg.startswith(f"{path}:"), msg
            counts["rejected"] += 1
            event("rejected")
            return
        counts["read"] += 1
        event("read")
        summarize(evs)
        con = Console(file=io.StringIO(), width=140, color_system=None, force_terminal=False)
        con.print(timeline(evs, 50))
        text = con.file.getvalue()
        assert not has_raw_control(text), text
        write_perfetto(evs, str(out))
        json.loads(out.read_text())

    run()
    _report("trace files", counts, fig)
    n = counts["cases"]
    assert n >= CASES["trace"]
    assert counts["read"] >= n * 0.05 and counts["rejected"] >= n * 0.3, counts


# ------------------------------------------------------------------ vmcore headers
def _qemu_note(rip: int) -> bytes:
    desc = struct.pack("<II", 1, 440) + struct.pack("<18Q", *([0] * 16 + [rip, 2])) + b"\0" * (10 * 24) \
        + struct.pack("<5Q", 0x80050033, 0, 0, 0x1000, 0x20) + struct.pack("<Q", 0)
    name = b"QEMU\0\0\0\0"
    return struct.pack("<III", 5, len(desc), 0) + name + desc


def _vmcore(ncpus: int = 2) -> bytes:
    notes = b"".join(_qemu_note(0xffffffff81000000 + i) for i in range(ncpus))
    phoff, phnum = 64, 2
    notes_off = phoff + 56 * phnum
    load_off = (notes_off + len(notes) + 0xFFF) & ~0xFFF
    eh = (b"\x7fELF" + bytes([2, 1, 1, 0]) + b"\0" * 8
          + struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 64, 0, 0))
    ph_note = struct.pack("<IIQQQQQQ", 4, 0, notes_off, 0, 0, len(notes), len(notes), 0)
    ph_load = struct.pack("<IIQQQQQQ", 1, 0, load_off, 0, 0, 0x2000, 0x2000, 0x1000)
    data = eh + ph_note + ph_load + notes
    return data + b"\0" * (load_off - len(data)) + bytes(range(256)) * 32


def test_vmcore_headers(tmp_path):
    from sbmdbg.target.vmcore import MAX_CPUS, VmcoreTarget
    base = _vmcore()
    path = tmp_path / "core"
    path.write_bytes(base)
    t = VmcoreTarget(str(path))   # the unmutated core opens: the mutations below are meaningful
    assert t.ncpus == 2 and t.read_phys(0x10, 4) == bytes(range(0x10, 0x14))
    t.close()
    counts = collections.Counter()
    fig: dict = {}

    @_settings(CASES["vmcore"])
    @given(patches=st.lists(st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)),
                            min_size=1, max_size=4),
           cut=st.one_of(st.none(), st.integers(0, len(base))))
    @timed(fig)
    def run(patches, cut):
        b = bytearray(base)
        for off, chunk in patches:
            b[off:off + len(chunk)] = chunk
        path.write_bytes(bytes(b[:cut] if cut is not None else b))
        counts["cases"] += 1
        try:
            t = VmcoreTarget(str(path))
        except SbmdbgError as e:
            assert str(e)
            counts["rejected"] += 1
            event("rejected")
            return
        counts["opened"] += 1
        event("opened")
        try:
            assert t.ncpus <= MAX_CPUS
            for c in range(min(t.ncpus, 4)):
                t.registers(c)
            for pa in (0, 0x1000, 0x1FF8, 1 << 40):
                try:
                    t.read_phys(pa, 8)
                except SbmdbgError:
                    counts["unbacked"] += 1
        finally:
            t.close()

    run()
    _report("vmcore headers", counts, fig)
    n = counts["cases"]
    assert n >= CASES["vmcore"]
    assert counts["opened"] >= n * 0.05 and counts["rejected"] >= n * 0.05, counts
