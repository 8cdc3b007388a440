"""Scenario files (sbmdbg.check): bad input is reported with file, line and
what is wrong, before any VM boots; paths/operators; transition checks on
recorded-style events; reports.  Offline."""
from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sbmdbg.check import known as K
from sbmdbg.check import spec
from sbmdbg.check.expr import check_path, parse_path, PathError
from sbmdbg.check.runner import FileResult, StepResult, check_expect, console_tail
from sbmdbg.check.transitions import check_transitions

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def problems(text: str, name: str = "check_t.toml") -> list[tuple[int | None, str]]:
    with pytest.raises(spec.ScenarioError) as ei:
        spec.loads(text, name)
    return [(ln, msg) for _, ln, msg in ei.value.problems]


def test_suite_files_validate():
    files = spec.discover([REPO / "checks"])
    assert len(files) >= 4
    names = set()
    for f in files:
        sc = spec.load(f)
        names |= {s.demo.split()[0] for s in sc.steps if s.demo}
    # every demo scenario and repeat are covered, and the audit runs at a stop
    assert set(K.ALL_DEMO_SCENARIOS) | {"repeat", "nmi_storm"} <= names
    audit = [a for f in files for s in spec.load(f).steps for a in s.asserts if a.sub == "audit"]
    # each audit runs at a stop (a break step) and requires nothing above info
    assert audit
    for f in files:
        for s in spec.load(f).steps:
            for a in s.asserts:
                if a.sub == "audit":
                    assert s.brk, (f.name, s.name)
    assert any(a.path.text == "above_info" and a.op == "==" and a.value is False for a in audit)


def test_toml_syntax_error_has_line_and_column():
    [(line, msg)] = problems('name = "x"\n\n[[step]]\ndemo = "ok\n')
    assert line == 4 and "TOML syntax" in msg and "col" in msg


def test_unknown_keys_and_values_point_at_their_lines():
    text = """name = "t"
[vm]
smp = 2
pti = "maybe"

[[step]]
demo = "write_ro_inptu"
expect = {result = "PASS", sbm_eror = -14}

[[step]]
demo = "repeat 0"
colour = "red"
"""
    got = problems(text)
    assert (4, 'vm.pti: want "on"/"off" (or true/false), got \'maybe\'') in got
    assert any(ln == 7 and "unknown demo scenario 'write_ro_inptu' (did you mean 'write_ro_input'?)" in m
               for ln, m in got)
    assert any(ln == 11 and "repeat N" in m for ln, m in got)
    assert any(ln == 12 and "unknown key 'colour' in step 2" in m for ln, m in got)


def test_unknown_command_and_json_path_before_boot():
    text = """[[step]]
break = "*__sbm_thunk_sbm_demo_compute"
demo = "ok"

[[step.assert]]
cmd = "sbm"
path = "vcpus[*].mode"
op = "contains"
value = "sandbox"

[[step.assert]]
cmd = "sbm audti"
path = "worst"

[[step.assert]]
cmd = "sbm audit"
path = "worst"
op = "~="
value = "info"
"""
    got = problems(text)
    assert got[0][0] == 7 and "`sbm` has no 'vcpus' in its JSON (did you mean 'cpus'?" in got[0][1]
    assert got[1][0] == 12 and "unknown command `sbm audti` (did you mean `sbm audit`?)" in got[1][1]
    assert got[2][0] == 18 and "unknown op '~='" in got[2][1]


def test_inline_assert_list_lines_and_bad_path_syntax():
    text = """[[step]]
demo = "ok"
break = "__sbm_thunk_sbm_demo_compute"
assert = [
  {cmd = "sbm", path = "cpus[*].mode", op = "contains", value = "sandbox"},
  {cmd = "sbm list", path = "sandboxes[x]", op = "exists"},
]
"""
    [(line, msg)] = problems(text)
    assert line == 6 and "bad path segment" in msg


def test_transition_fields_and_files_checked():
    text = """extra_patches = ["no-such.patch"]
[[step]]
demo = "ok"
transitions = {aborts = 1, abort = {vectr = 14}, level = "slow"}
"""
    got = problems(text)
    assert got[0][0] == 1 and "patch 'no-such.patch' not found" in got[0][1]
    assert any(ln == 4 and "'vectr' is not a trace event field (did you mean 'vector'?)" in m for ln, m in got)
    assert any(ln == 4 and "transitions.level" in m for ln, m in got)


def test_defaults_for_demo_steps():
    sc = spec.loads('[[step]]\ndemo = "ok"\n', "check_ok.toml")
    st = sc.steps[0]
    assert [(e.key, e.op, e.value) for e in st.expect] == [("status", "==", 0), ("result", "==", "PASS")]
    assert st.command == f"echo ok > {K.DEMO_DIR}/run && cat {K.DEMO_DIR}/run"
    assert sc.console_clean and sc.vm == {}


def test_cli_reports_bad_files_with_exit_2_and_boots_nothing(tmp_path):
    bad = tmp_path / "check_bad.toml"
    bad.write_text('[[step]]\ndemo = "ok"\n[[step.assert]]\ncmd = "sbm frobnicate"\npath = "x"\n')
    good = tmp_path / "check_good.toml"
    good.write_text('[[step]]\ndemo = "ok"\n')
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "check", str(good), str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"{bad}:4: assert: unknown command `sbm frobnicate`" in r.stderr
    assert "nothing was run" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "check", "--validate", str(good)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok (1 step(s))" in r.stdout


# ------------------------------------------------------------------ paths
def test_paths_and_ops():
    doc = {"cpus": [{"mode": "sandbox", "cpl": 3, "cr3": "0x1000"}, {"mode": "kernel", "cpl": 0}],
           "worst": "info", "above_info": False, "audits": []}
    assert check_path(doc, parse_path("cpus[*].mode"), "contains", "sandbox")[0]
    assert not check_path(doc, parse_path("cpus[*].mode"), "contains", "user")[0]
    assert check_path(doc, parse_path("cpus[*].cpl"), "<=", 3)[0]
    assert not check_path(doc, parse_path("cpus[*].cpl"), ">", 0)[0]
    assert check_path(doc, parse_path("cpus"), "len==", 2)[0]
    assert check_path(doc, parse_path("cpus[0].cr3"), "==", 4096)[0]          # hex string vs number
    assert check_path(doc, parse_path("cpus[-1].mode"), "matches", "^ker")[0]
    assert check_path(doc, parse_path("above_info"), "==", False)[0]
    # bool vs int: false is not 0 (JSON types are compared, not Python's bool-is-int)
    ok, seen = check_path(doc, parse_path("above_info"), "==", 0)
    assert not ok and seen == "false", seen
    assert not check_path(doc, parse_path("worst"), "==", 0)[0]
    assert check_path(doc, parse_path("audits"), "len==", 0)[0]
    ok, seen = check_path(doc, parse_path("cpus[5].mode"), "exists", None)
    assert not ok and "2 element(s), no [5]" in seen
    ok, seen = check_path(doc, parse_path("nope"), "==", 1)
    assert not ok and "no key 'nope'" in seen
    with pytest.raises(PathError):
        parse_path("cpus[*")


# ------------------------------------------------------------------ demo results
def test_expect_messages_say_expected_and_seen():
    sc = spec.loads('[[step]]\ndemo = "write_ro_input"\nexpect = {sbm_error = -14, "out[0]" = "0xee"}\n')
    out = "scenario=write_ro_input ret=1 sbm_error=0 result=FAIL out[0]=0x5a\n"
    fails = check_expect(sc.steps[0], 0, out)
    assert any(f.startswith('result: expected == "PASS", saw "FAIL"') for f in fails)
    assert any(f.startswith("sbm_error: expected == -14, saw \"0\"") for f in fails)
    assert any(f.startswith('out[0]: expected == "0xee", saw "0x5a"') for f in fails)
    good = "scenario=write_ro_input ret=-14 sbm_error=-14 result=PASS out[0]=0xee\n"
    assert check_expect(sc.steps[0], 0, good) == []
    assert "no result line" in check_expect(sc.steps[0], 0, "sh: write error\n")[0]


def test_console_tail_drops_harness_lines():
    text = ("boot\n~ # echo __SBMDBG_BEGIN_x__; (eval \"$(echo Zm9v | base64 -d)\")\n__SBMDBG_BEGIN_abc__\n"
            "scenario=ok\n__SBMDBG_END_abc_0__\n~ # \x1b[6n\n")
    assert console_tail(text) == "boot\nscenario=ok\n~ #"


# ------------------------------------------------------------------ transitions
def _events():
    return [
        {"seq": 0, "kind": "trace_start"},
        {"seq": 1, "kind": "enter", "vcpu": 0},
        {"seq": 2, "kind": "abort", "vcpu": 0, "vector": 14, "vector_name": "#PF", "error_code": 7,
         "error_bits": ["P", "W", "U"], "cr2": "0xffffc90000123000", "cr2_region": "input buffer #0 +0x0"},
        {"seq": 3, "kind": "exit", "vcpu": 0, "ret": -14, "error": -14},
        {"seq": 4, "kind": "trace_stop"},
    ]


def test_transitions_pass_and_fail_messages():
    ok = spec.loads('[[step]]\ndemo = "write_ro_input"\ntransitions = {enters = 1, aborts = 1, returns = 0, '
                    'abort = {vector = 14, error_bits = ["U", "W", "P"], cr2_region = {op = "matches", '
                    'value = "^input buffer"}}, exit = {error = -14}}\n')
    assert check_transitions(ok.steps[0].transitions, _events()) == []
    bad = spec.loads('[[step]]\ndemo = "ok"\ntransitions = {aborts = 0, returns = 1, '
                     'abort = {vector = 13}}\n')
    fails = check_transitions(bad.steps[0].transitions, _events())
    assert any("expected aborts == 0, saw 1" in f for f in fails)
    assert any("expected returns == 1, saw 0" in f for f in fails)
    assert any("abort #2: expected vector == 13, saw 14" in f for f in fails)


# ------------------------------------------------------------------ reports
def test_junit_and_json_reports(tmp_path):
    from sbmdbg.check.report import failure_text, write_json, write_junit

    fr = FileResult(path="checks/check_x.toml", name="x", status="fail", seconds=1.5,
                    steps=[StepResult(1, "demo ok", 3, seconds=0.5),
                           StepResult(2, "demo write_ro_input", 7, status="fail",
                                      failures=["sbm_error: expected == -14, saw \"0\""])],
                    console_tail="sbm_demo: scenario=write_ro_input result=FAIL")
    write_junit([fr], tmp_path / "o.xml", 1.5)
    root = ET.parse(tmp_path / "o.xml").getroot()
    assert root.get("tests") == "2" and root.get("failures") == "1"
    f = root.find(".//failure")
    assert "expected == -14" in f.get("message") and "console tail" in f.text
    write_json([fr], tmp_path / "o.json", 1.5)
    d = json.loads((tmp_path / "o.json").read_text())
    assert d["passed"] is False and d["files"][0]["steps"][1]["status"] == "fail"
    t = failure_text(fr)
    assert "checks/check_x.toml:7: step 2 (demo write_ro_input) FAIL" in t and "console tail:" in t


# ------------------------------------------------------------------ schema drift
def test_known_json_keys_match_the_commands():
    """The top-level keys the validator accepts are those the commands print
    (the offline commands on the recorded snapshot, no SBM state needed)."""
    from sbmdbg.model.kernel import open_kernel
    from sbmdbg.commands import compute as C
    from sbmdbg.model.fixture import load_snapshot

    t, syms, lays, _ = load_snapshot(str(REPO / "fixtures" / "pt" / "kaslr-pti-smp2.json.gz"))
    k = open_kernel(t, symbols=syms, layouts=lays)
    assert set(C.pcpu(k)) == K.SBM_COMMANDS["pcpu"]
    from types import SimpleNamespace as NS
    assert set(C.vtop(k, NS(va=hex(k.sym("_text")), root="kernel"))) <= K.SBM_COMMANDS["vtop"]
    assert set(C.pt(k, NS(range=f"{k.sym('_text'):#x}-{k.sym('_text') + 0x2000:#x}"))) == K.SBM_COMMANDS["pt"]
    assert set(C.ptov(k, NS(pa=hex(k.phys_base + 0x1000)))) == K.SBM_COMMANDS["ptov"]
    from sbmdbg.commands import TABLE
    assert set(TABLE) <= set(K.SBM_COMMANDS)
