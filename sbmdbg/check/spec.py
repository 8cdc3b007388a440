"""Scenario files: load (tomllib), validate, and report bad input with the
file and line.  Nothing here boots a VM; everything a scenario names (demo
scenarios, ``sbm`` subcommands, JSON paths, trace fields, patch and kernel
files) is checked at load time.  The schema is documented in docs/checks.md.
"""
from __future__ import annotations

import bisect
import re
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from sbmdbg.check import known as K
from sbmdbg.check.expr import OPS, PathError, parse_path
from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import REPO_ROOT
from sbmdbg.text import clean

#: Longest timeout a scenario or step may ask for (seconds).
TIMEOUT_MAX = 24 * 3600.0
#: Longest regular expression a `matches` may carry (characters).
REGEX_MAX = 2000

FILE_KEYS = {"name", "description", "kernel", "extra_patches", "vm", "console_clean", "fresh_vm",
             "timeout", "step"}
VM_KEYS = {"smp", "pti", "kaslr", "la57", "append", "mem"}
KERNEL_KEYS = {"bzimage", "vmlinux", "tree"}
STEP_KEYS = {"name", "demo", "run", "expect", "stats", "transitions", "break", "assert", "timeout",
             "console_clean", "trace_level", "qmp_nmi"}
EXPECT_SPECIAL = {"result", "sbm_error", "ret", "status", "output"}
STATS_KEYS = {"calls", "returns", "aborts"}
ASSERT_KEYS = {"cmd", "path", "op", "value"}
_FIELD_RE = re.compile(r"[A-Za-z_][\w\[\]]*$")


class ScenarioError(SbmdbgError):
    """Bad scenario input: ``problems`` = [(file, line, message)], first one in the message."""

    def __init__(self, problems: list[tuple[str, int | None, str]]):
        # file text is hostile: every message shown visibly, and bounded
        problems = [(clean(f, limit=500), ln, clean(m, limit=500)) for f, ln, m in problems[:200]]
        self.problems = problems
        lines = [fmt_problem(*p) for p in problems]
        super().__init__(lines[0], detail="\n".join(lines[1:]))


def fmt_problem(file: str, line: int | None, msg: str) -> str:
    return f"{file}:{line}: {msg}" if line else f"{file}: {msg}"


# --------------------------------------------------------------- model
@dataclass
class Expectation:
    key: str
    op: str
    value: object
    line: int | None = None

    def describe(self) -> str:
        from sbmdbg.check.expr import short
        return f"{self.key} {self.op} {short(self.value)}" if self.op != "exists" else f"{self.key} exists"


@dataclass
class Assertion:
    cmd: str          # as written, e.g. "sbm audit"
    argv: str         # what gdb runs (with --json)
    sub: str          # subcommand ("" = bare sbm)
    path: object      # expr.Path
    op: str
    value: object
    line: int | None = None

    def describe(self) -> str:
        from sbmdbg.check.expr import short
        v = "" if self.op == "exists" else f" {short(self.value)}"
        return f"`{self.cmd}` {self.path.text} {self.op}{v}"


@dataclass
class Transitions:
    counts: list[Expectation] = field(default_factory=list)    # enters/returns/aborts/...
    per_kind: dict[str, list[Expectation]] = field(default_factory=dict)  # "abort" -> fields
    level: str = "fast"
    line: int | None = None
    attack: str | None = None       # some event names this attack (sbm.attack, issue 15)
    insn: str | None = None         # some sandbox_insn event names this instruction (level plugin)
    attack_counts: list[Expectation] = field(default_factory=list)   # events naming each attack class
    insn_counts: list[Expectation] = field(default_factory=list)     # sandbox_insn events per mnemonic


@dataclass
class Step:
    index: int                      # 1-based
    name: str
    line: int | None
    demo: str | None = None
    run: str | None = None
    expect: list[Expectation] = field(default_factory=list)
    stats: list[Expectation] = field(default_factory=list)
    transitions: Transitions | None = None
    brk: str | None = None
    asserts: list[Assertion] = field(default_factory=list)
    timeout: float = 60.0
    console_clean: bool = True
    qmp_nmi: bool = False           # QEMU's QMP `inject-nmi` over and over while the command runs

    @property
    def command(self) -> str | None:
        if self.demo is not None:
            return f"echo {self.demo} > {K.DEMO_DIR}/run && cat {K.DEMO_DIR}/run"
        return self.run

    @property
    def needs_gdb(self) -> bool:
        return bool(self.brk or self.asserts or self.transitions)


@dataclass
class Scenario:
    path: Path
    name: str
    description: str = ""
    kernel: dict | None = None            # {"bzimage", "vmlinux", "tree"} as absolute paths
    extra_patches: list[Path] = field(default_factory=list)
    vm: dict = field(default_factory=dict)  # VMOptions fields
    console_clean: bool = True
    fresh_vm: bool = False
    timeout: float = 60.0
    steps: list[Step] = field(default_factory=list)

    @property
    def needs_gdb(self) -> bool:
        return any(s.needs_gdb for s in self.steps)


# --------------------------------------------------------------- lines
class _Locator:
    """Best-effort line numbers of keys (tomllib's data carries none).

    Walks the key path through table headers (``[vm]``, ``[[step]]``,
    ``[[step.assert]]``, ``[step.expect]``) and then ``key =`` lines and
    inline tables inside the section found."""

    _HDR = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.headers = []   # (lineno 0-based, name, is_array)
        for i, ln in enumerate(self.lines):
            m = self._HDR.match(ln)
            if m and not ln.lstrip().startswith("#"):
                self.headers.append((i, re.sub(r"\s+", "", m.group(2)).replace('"', ""),
                                     m.group(1) == "[["))
        # Linear-time indexes: headers by name (in file order) and where each
        # header's section ends (the next header that is not a sub-table of it).
        self._by_name: dict[str, list[tuple[int, bool]]] = {}
        self._end: dict[int, int] = {}
        stack: list[tuple[int, str]] = []
        for ln, n, arr in self.headers:
            self._by_name.setdefault(n, []).append((ln, arr))
            while stack and not n.startswith(stack[-1][1] + "."):
                self._end[stack.pop()[0]] = ln
            stack.append((ln, n))
        for ln, _ in stack:
            self._end[ln] = len(self.lines)
        # Line numbers are best effort: the scans below stop after a budget
        # linear in the file size (an inline array of 100k tables stays fast).
        self._work = 0
        self._budget = 16 * (len(text) + len(self.lines)) + 100_000

    def line(self, keypath: tuple) -> int | None:
        """1-based line of *keypath* (best effort; falls back to the enclosing section)."""
        lo, hi = 0, len(self.lines)
        prefix = ""
        pos = None             # (line, col) inside [lo, hi) once in key=value territory
        found = None
        i = 0
        # top-level section: before the first header
        if self.headers:
            hi = self.headers[0][0]
        while i < len(keypath):
            k = keypath[i]
            if isinstance(k, str):
                name = f"{prefix}.{k}" if prefix else k
                hdrs = self._by_name.get(name, [])
                if prefix and hdrs:
                    a = bisect.bisect_left(hdrs, (lo, False))
                    b = bisect.bisect_left(hdrs, (self._section_end(lo, prefix), False))
                    hdrs = hdrs[a:b]
                if hdrs and pos is None:
                    idx = 0
                    if hdrs[0][1] and i + 1 < len(keypath) and isinstance(keypath[i + 1], int):
                        idx = keypath[i + 1]
                        i += 1
                    if idx >= len(hdrs):
                        return found
                    lo = hdrs[idx][0]
                    hi = self._section_end(lo, name)
                    found = lo + 1
                    prefix = name
                    i += 1
                    continue
                hit = self._find_key(k, lo, hi, pos)
                if hit is None:
                    return found
                pos = hit
                found = hit[0] + 1
            else:  # index into an inline array: the k-th '{' after the key
                if pos is None:
                    return found
                hit = self._find_char("{", pos, hi, k + 1)
                if hit is None:
                    return found
                pos = (hit[0], hit[1] + 1)
                found = hit[0] + 1
            i += 1
        return found

    def _section_end(self, start: int, name: str) -> int:
        """Where the section opened at *start* ends: the next header that is
        not a sub-table of *name*."""
        return self._end.get(start, len(self.lines))

    def _find_key(self, key: str, lo: int, hi: int, pos):
        pat = re.compile(r'(^|[\s{,])("?)' + re.escape(key) + r'\2\s*=')
        start_line, start_col = pos if pos else (lo, 0)
        for ln in range(start_line, hi):
            text = self.lines[ln]
            self._work += len(text) + 1
            if self._work > self._budget:
                return None
            col = start_col if ln == start_line else 0
            m = pat.search(text, col)
            if m and not text[:m.start()].lstrip().startswith("#"):
                return ln, m.end()
        return None

    def _find_char(self, ch: str, pos, hi: int, nth: int):
        ln, col = pos
        seen = 0
        while ln < hi:
            text = self.lines[ln]
            self._work += len(text) - col + 1
            if self._work > self._budget:
                return None
            j = text.find(ch, col)
            while j >= 0:
                seen += 1
                if seen == nth:
                    return ln, j
                j = text.find(ch, j + 1)
            ln, col = ln + 1, 0
        return None


# --------------------------------------------------------------- loading
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_EOF = re.compile(r"\s*\(at end of document\)\s*$")


def load(path: str | Path, *, check_files: bool = True) -> Scenario:
    """Parse and validate one scenario file; ``ScenarioError`` lists every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ScenarioError([(str(path), None, f"cannot read: {e.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ScenarioError([(str(path), line, f"not UTF-8 text (byte {raw[e.start]:#04x} at offset "
                                               f"{e.start}); scenario files are UTF-8 TOML")]) from None
    return loads(text, path, check_files=check_files)


def loads(text: str, path: str | Path = "<scenario>", *, check_files: bool = True) -> Scenario:
    path = Path(path)
    fname = str(path)
    try:
        return _loads(text, path, fname, check_files)
    except RecursionError:
        raise ScenarioError([(fname, None, "nested too deeply (arrays/tables inside each other)")]) from None


def _loads(text: str, path: Path, fname: str, check_files: bool) -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _TOML_POS.search(msg)
        if m:
            line, col = int(m.group(1)), int(m.group(2))
            raise ScenarioError([(fname, line, f"col {col}: TOML syntax: {msg[:m.start()]}")]) from None
        m = _TOML_EOF.search(msg)
        line = len(text.splitlines()) or 1
        raise ScenarioError([(fname, line if m else None,
                              f"TOML syntax: {msg[:m.start()] if m else msg} (at the end of the file)")]) \
            from None
    v = _Validator(fname, path, text, check_files)
    sc = v.scenario(data)
    if v.problems:
        v.problems.sort(key=lambda p: p[1] or 0)
        raise ScenarioError(v.problems)
    return sc


class _Validator:
    def __init__(self, fname: str, path: Path, text: str, check_files: bool):
        self.fname = fname
        self.path = path
        self.loc = _Locator(text)
        self.check_files = check_files
        self.problems: list[tuple[str, int | None, str]] = []

    def err(self, keypath: tuple, msg: str) -> None:
        self.problems.append((self.fname, self.loc.line(keypath), msg))

    def line(self, keypath: tuple) -> int | None:
        return self.loc.line(keypath)

    def typed(self, kp: tuple, v, types, what: str) -> bool:
        if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            self.err(kp, f"{_kp(kp)}: want {what}, got {v!r}")
            return False
        if not isinstance(v, types):
            self.err(kp, f"{_kp(kp)}: want {what}, got {type(v).__name__} {v!r}")
            return False
        return True

    def seconds(self, kp: tuple, v) -> bool:
        """A timeout: a finite number of seconds in (0, TIMEOUT_MAX]."""
        if not self.typed(kp, v, (int, float), "seconds"):
            return False
        if not (0 < v <= TIMEOUT_MAX):  # also false for nan
            self.err(kp, f"{_kp(kp)}: want seconds in (0, {TIMEOUT_MAX:g}], got {v!r}")
            return False
        return True

    def unknown(self, kp: tuple, d: dict, allowed: set, where: str) -> None:
        for k in d:
            if k not in allowed:
                hint = _suggest(k, allowed)
                self.err(kp + (k,), f"unknown key {k!r} in {where}"
                         + (f" (did you mean {hint!r}?)" if hint else f" (known: {', '.join(sorted(allowed))})"))

    def resolve_file(self, kp: tuple, p: str, what: str) -> Path | None:
        cand = [Path(p)] if Path(p).is_absolute() else [self.path.parent / p, REPO_ROOT / p]
        for c in cand:
            if c.is_file():
                return c.resolve()
        if self.check_files:
            self.err(kp, f"{what} {p!r} not found (relative paths: to the scenario file's directory, "
                         "then to the repository root)")
            return None
        return cand[0]

    # ----------------------------------------------------------- file
    def scenario(self, d: dict) -> Scenario:
        self.unknown((), d, FILE_KEYS, "the file (top level)")
        sc = Scenario(path=self.path, name=self.path.name)
        if "name" in d and self.typed(("name",), d["name"], str, "a string"):
            sc.name = clean(d["name"], limit=200)
        if "description" in d and self.typed(("description",), d["description"], str, "a string"):
            sc.description = clean(d["description"], multiline=True, limit=2000)
        for k in ("console_clean", "fresh_vm"):
            if k in d and self.typed((k,), d[k], bool, "true or false"):
                setattr(sc, k, d[k])
        if "timeout" in d and self.seconds(("timeout",), d["timeout"]):
            sc.timeout = float(d["timeout"])
        if "kernel" in d:
            sc.kernel = self.kernel(d["kernel"])
        if "extra_patches" in d:
            kp = ("extra_patches",)
            if self.typed(kp, d["extra_patches"], list, "a list of patch files"):
                for p in d["extra_patches"]:
                    if self.typed(kp, p, str, "a patch file name"):
                        f = self.resolve_file(kp, p, "patch")
                        if f:
                            sc.extra_patches.append(f)
            if sc.kernel is not None and sc.extra_patches:
                self.err(kp, "extra_patches applies to the reference kernel build; it cannot be "
                             "combined with kernel = {bzimage=..., vmlinux=...}")
        if "vm" in d:
            sc.vm = self.vm(d["vm"])
        steps = d.get("step")
        if steps is None:
            self.err((), "no [[step]]: a scenario needs at least one step")
            return sc
        if not isinstance(steps, list):
            self.err(("step",), "step must be an array of tables: write [[step]]")
            return sc
        for i, s in enumerate(steps):
            st = self.step(i, s, sc)
            if st:
                sc.steps.append(st)
        return sc

    def kernel(self, v) -> dict | None:
        kp = ("kernel",)
        if v == "reference":
            return None
        if not isinstance(v, dict):
            self.err(kp, f"kernel: want \"reference\" or {{bzimage=..., vmlinux=...}}, got {v!r}")
            return None
        self.unknown(kp, v, KERNEL_KEYS, "kernel")
        out = {}
        for k in ("bzimage", "vmlinux"):
            if k not in v:
                self.err(kp, f"kernel: {k} is required with a prebuilt kernel")
        for k in KERNEL_KEYS & set(v):
            if self.typed(kp + (k,), v[k], str, "a path"):
                if k == "tree":
                    t = Path(v[k]) if Path(v[k]).is_absolute() else self.path.parent / v[k]
                    if self.check_files and not t.is_dir():
                        self.err(kp + (k,), f"kernel.tree {v[k]!r} is not a directory")
                    out[k] = str(t)
                else:
                    f = self.resolve_file(kp + (k,), v[k], f"kernel.{k}")
                    if f:
                        out[k] = str(f)
        return out

    def vm(self, v) -> dict:
        kp = ("vm",)
        if not isinstance(v, dict):
            self.err(kp, "vm: want a table ([vm] smp = 2 ...)")
            return {}
        self.unknown(kp, v, VM_KEYS, "[vm]")
        out = {}
        if "smp" in v and self.typed(kp + ("smp",), v["smp"], int, "an integer"):
            if not 1 <= v["smp"] <= 8:
                self.err(kp + ("smp",), f"vm.smp: want 1..8, got {v['smp']}")
            out["smp"] = v["smp"]
        if "pti" in v:
            p = v["pti"]
            if p in (True, "on"):
                out["pti"] = "on"
            elif p in (False, "off"):
                out["pti"] = "off"
            else:
                self.err(kp + ("pti",), f"vm.pti: want \"on\"/\"off\" (or true/false), got {p!r}")
        for k in ("kaslr", "la57"):
            if k in v and self.typed(kp + (k,), v[k], bool, "true or false"):
                out[k] = v[k]
        for k in ("append", "mem"):
            if k in v and self.typed(kp + (k,), v[k], str, "a string"):
                out[k] = v[k]
        return out

    # ----------------------------------------------------------- steps
    def step(self, i: int, s, sc: Scenario) -> Step | None:
        kp = ("step", i)
        if not isinstance(s, dict):
            self.err(kp, f"step {i + 1}: want a table")
            return None
        self.unknown(kp, s, STEP_KEYS, f"step {i + 1}")
        st = Step(index=i + 1, name=f"step {i + 1}", line=self.line(kp), timeout=sc.timeout,
                  console_clean=sc.console_clean)
        if "demo" in s and "run" in s:
            self.err(kp + ("run",), f"step {i + 1}: give demo or run, not both")
        if "demo" in s and self.typed(kp + ("demo",), s["demo"], str, "a demo scenario name"):
            st.demo = s["demo"].strip()
            self.check_demo(kp + ("demo",), st.demo)
        if "run" in s and self.typed(kp + ("run",), s["run"], str, "a guest shell command"):
            st.run = s["run"]
        if "name" in s and self.typed(kp + ("name",), s["name"], str, "a string"):
            st.name = clean(s["name"], limit=200)
        elif st.demo:
            st.name = clean(f"demo {st.demo}", limit=200)
        elif st.run:
            st.name = clean(f"run {st.run[:40]}")
        if "timeout" in s and self.seconds(kp + ("timeout",), s["timeout"]):
            st.timeout = float(s["timeout"])
        if "console_clean" in s and self.typed(kp + ("console_clean",), s["console_clean"], bool,
                                               "true or false"):
            st.console_clean = s["console_clean"]
        if "qmp_nmi" in s and self.typed(kp + ("qmp_nmi",), s["qmp_nmi"], bool, "true or false"):
            st.qmp_nmi = s["qmp_nmi"]
            if st.qmp_nmi and st.demo is None and st.run is None:
                self.err(kp + ("qmp_nmi",), f"step {i + 1}: qmp_nmi needs a command (demo = ... or run = ...)")
        if "break" in s and self.typed(kp + ("break",), s["break"], str, "a symbol (or *ADDRESS)"):
            if not re.fullmatch(r"\*?[A-Za-z_.][\w.$]*(\+\d+|\+0x[0-9a-fA-F]+)?|\*0x[0-9a-fA-F]+",
                                s["break"].strip()):
                self.err(kp + ("break",), f"break: {s['break']!r} is not a symbol or *ADDRESS")
            st.brk = s["break"].strip()
        if "expect" in s:
            st.expect = self.expectations(kp + ("expect",), s["expect"], None, "expect")
        if st.demo is not None and not any(e.key == "result" for e in st.expect):
            st.expect.insert(0, Expectation("result", "==", "PASS", st.line))   # default for demos
        if (st.demo is not None or st.run is not None) and not any(e.key == "status" for e in st.expect):
            st.expect.insert(0, Expectation("status", "==", 0, st.line))
        if st.expect and st.demo is None and st.run is None:
            self.err(kp + ("expect",), f"step {i + 1}: expect needs a command (demo = ... or run = ...)")
        if "stats" in s:
            st.stats = self.expectations(kp + ("stats",), s["stats"], STATS_KEYS, "stats")
        if "transitions" in s:
            st.transitions = self.transitions(kp + ("transitions",), s["transitions"])
            if st.transitions and st.demo is None and st.run is None:
                self.err(kp + ("transitions",), f"step {i + 1}: transitions needs a command to trace")
        if "trace_level" in s:
            lv = s["trace_level"]
            if lv not in K.TRACE_LEVELS:
                self.err(kp + ("trace_level",), f"trace_level: want one of {', '.join(K.TRACE_LEVELS)}")
            elif st.transitions:
                st.transitions.level = lv
        if "assert" in s:
            a = s["assert"]
            if isinstance(a, dict):
                a = [a]
            if not isinstance(a, list):
                self.err(kp + ("assert",), "assert: want a table or a list of tables")
            else:
                for j, one in enumerate(a):
                    x = self.assertion(kp + ("assert", j), one)
                    if x:
                        st.asserts.append(x)
        if not (st.demo or st.run or st.brk or st.asserts):
            self.err(kp, f"step {i + 1}: nothing to do (give demo, run, break or assert)")
        return st

    def check_demo(self, kp: tuple, name: str) -> None:
        words = name.split()
        if words and words[0] == "repeat":
            if (len(words) != 2 or not re.fullmatch(r"[0-9]{1,9}", words[1])
                    or not 1 <= int(words[1]) <= K.DEMO_REPEAT_MAX):
                self.err(kp, f"demo {name!r}: want \"repeat N\" with 1 <= N <= {K.DEMO_REPEAT_MAX}")
            return
        if words and words[0] == "nmi_storm":
            if len(words) > 3 or (len(words) >= 2 and not (re.fullmatch(r"[0-9]{1,9}", words[1]) and
                                                          1 <= int(words[1]) <= K.DEMO_REPEAT_MAX)) \
                    or (len(words) == 3 and words[2] != "external"):
                self.err(kp, f"demo {name!r}: want \"nmi_storm\", \"nmi_storm N\" or \"nmi_storm N external\" "
                             f"with 1 <= N <= {K.DEMO_REPEAT_MAX}")
            return
        if name not in K.ALL_DEMO_SCENARIOS:
            hint = _suggest(name, set(K.ALL_DEMO_SCENARIOS))
            self.err(kp, f"unknown demo scenario {name!r}" + (f" (did you mean {hint!r}?)" if hint else
                     f" (known: {', '.join(K.ALL_DEMO_SCENARIOS)}, repeat N, nmi_storm N)"))

    def expectations(self, kp: tuple, d, allowed: set | None, where: str,
                     fields: frozenset | None = None) -> list[Expectation]:
        if not isinstance(d, dict):
            self.err(kp, f"{where}: want a table, e.g. {where} = {{result = \"PASS\"}}")
            return []
        if allowed is not None:
            self.unknown(kp, d, allowed, where)
        out = []
        for k, v in d.items():
            if allowed is not None and k not in allowed:
                continue
            if fields is not None and k not in fields:
                hint = _suggest(k, set(fields))
                self.err(kp + (k,), f"{where}: {k!r} is not a trace event field"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
                continue
            if allowed is None and fields is None and not _FIELD_RE.match(k):
                self.err(kp + (k,), f"{where}: {k!r} is not a field name")
                continue
            e = self.expectation(kp + (k,), k, v, where)
            if e:
                if where == "expect" and k == "output" and e.op == "==":
                    e.op = "matches"   # output = "regex" means a search
                out.append(e)
        return out

    def expectation(self, kp: tuple, key: str, v, where: str) -> Expectation | None:
        line = self.line(kp)
        if isinstance(v, dict):
            bad = set(v) - {"op", "value"}
            if bad or "op" not in v:
                self.err(kp, f"{where}.{key}: want a value or {{op = \"...\", value = ...}}"
                         + (f"; unknown {', '.join(sorted(bad))}" if bad else ""))
                return None
            op = v["op"]
            if where == "expect" and key == "output" and op == "==":
                op = "matches"   # output = "regex" means a search
            if not isinstance(op, str) or op not in OPS:
                self.err(kp, f"{where}.{key}: unknown op {op!r} (ops: {' '.join(OPS)})")
                return None
            if op != "exists" and "value" not in v:
                self.err(kp, f"{where}.{key}: op {op!r} needs a value")
                return None
            if not self.value_ok(kp, op, v.get("value")):
                return None
            return Expectation(key, op, v.get("value"), line)
        op = "matches" if (where == "expect" and key == "output") else "=="
        if op == "matches" and not self.value_ok(kp, op, v):
            return None
        return Expectation(key, op, v, line)

    def value_ok(self, kp: tuple, op: str, value) -> bool:
        if op == "matches":
            if len(str(value)) > REGEX_MAX:
                self.err(kp, f"regular expression longer than {REGEX_MAX} characters")
                return False
            try:
                with warnings.catch_warnings():   # FutureWarning on "[[": not the user's business
                    warnings.simplefilter("ignore")
                    re.compile(str(value))
            except (re.error, RecursionError, OverflowError) as e:
                self.err(kp, f"bad regular expression {value!r}: {e}")
                return False
        if op == "len==" and (not isinstance(value, int) or isinstance(value, bool)):
            self.err(kp, f"len== wants an integer, got {value!r}")
            return False
        if op in ("<", "<=", ">", ">=") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            if not (isinstance(value, str) and re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", value)):
                self.err(kp, f"{op} wants a number, got {value!r}")
                return False
        return True

    def transitions(self, kp: tuple, d) -> Transitions | None:
        if not isinstance(d, dict):
            self.err(kp, "transitions: want a table, e.g. transitions = {aborts = 1, abort = {vector = 14}}")
            return None
        allowed = set(K.TRACE_COUNTS) | K.TRACE_KINDS | {"level", "attack", "insn", "attack_counts",
                                                         "insn_counts"}
        self.unknown(kp, d, allowed, "transitions")
        t = Transitions(line=self.line(kp))
        for k, v in d.items():
            if k == "attack":
                if self.typed(kp + (k,), v, str, "an attack class (sbmdbg/sbm/attack.py)"):
                    t.attack = v
            elif k == "insn":
                if self.typed(kp + (k,), v, str, "an instruction mnemonic (sbm.attack.sensitive_insn)"):
                    t.insn = v
            elif k in ("attack_counts", "insn_counts"):
                if self.typed(kp + (k,), v, dict, 'a table, e.g. {syscall = 40, "int $0x80" = {op = ">=", value = 40}}'):
                    for name, x in v.items():
                        e = self.expectation(kp + (k, name), name, x, f"transitions.{k}")
                        if e is not None:
                            getattr(t, k).append(e)
            elif k == "level":
                if v not in K.TRACE_LEVELS:
                    self.err(kp + (k,), f"transitions.level: want one of {', '.join(K.TRACE_LEVELS)}")
                else:
                    t.level = v
            elif k in K.TRACE_COUNTS:
                e = self.expectation(kp + (k,), k, v, "transitions")
                if e:
                    t.counts.append(e)
            elif k in K.TRACE_KINDS:
                t.per_kind[k] = self.expectations(kp + (k,), v, None, f"transitions.{k}",
                                                  fields=K.TRACE_FIELDS)
        if (t.insn is not None or t.insn_counts or "insns" in d or "sandbox_insn" in d) and t.level != "plugin":
            self.err(kp, "transitions: insn/insns/sandbox_insn need level = \"plugin\" (only the "
                         "no-stop tracer watches the instructions a sandbox executes)")
        return t

    def assertion(self, kp: tuple, a) -> Assertion | None:
        if not isinstance(a, dict):
            self.err(kp, "assert: want {cmd = \"sbm ...\", path = \"...\", op = \"...\", value = ...}")
            return None
        self.unknown(kp, a, ASSERT_KEYS, "assert")
        ok = True
        for k in ("cmd", "path"):
            if k not in a:
                self.err(kp, f"assert: {k} is required")
                ok = False
        if not ok:
            return None
        cmd = a["cmd"]
        if not self.typed(kp + ("cmd",), cmd, str, "an `sbm ...` command"):
            return None
        words = cmd.split()
        if not words or words[0] != "sbm":
            self.err(kp + ("cmd",), f"assert: cmd {cmd!r} is not an `sbm` command")
            return None
        sub = words[1] if len(words) > 1 and not words[1].startswith("-") else ""
        if sub not in K.SBM_COMMANDS:
            hint = _suggest(sub, {c for c in K.SBM_COMMANDS if c})
            self.err(kp + ("cmd",), f"assert: unknown command `sbm {sub}`"
                     + (f" (did you mean `sbm {hint}`?)" if hint else
                        f" (known: sbm, {', '.join('sbm ' + c for c in K.SBM_COMMANDS if c)})"))
            return None
        if sub in K.SBM_COMMANDS_FORBIDDEN:
            self.err(kp + ("cmd",), f"assert: `sbm {sub}` is not allowed here: {K.SBM_COMMANDS_FORBIDDEN[sub]}")
            return None
        argv = cmd if "--json" in words else cmd + " --json"
        try:
            path = parse_path(a["path"]) if isinstance(a["path"], str) else parse_path("")
        except PathError as e:
            self.err(kp + ("path",), f"assert: {e}")
            return None
        keys = K.SBM_COMMANDS[sub]
        if keys is not None:
            if path.first_key is None and path.parts and path.parts[0] != "*":
                self.err(kp + ("path",), f"assert: `sbm {sub}`'s JSON is an object; a path starts with a key")
                return None
            if path.first_key is not None and path.first_key not in keys:
                hint = _suggest(path.first_key, set(keys))
                self.err(kp + ("path",), f"assert: `{cmd}` has no {path.first_key!r} in its JSON"
                         + (f" (did you mean {hint!r}?" if hint else " (")
                         + f" top-level keys: {', '.join(sorted(keys))})")
                return None
        op = a.get("op", "exists" if "value" not in a else "==")
        if op not in OPS:
            self.err(kp + ("op",), f"assert: unknown op {op!r} (ops: {' '.join(OPS)})")
            return None
        if op != "exists" and "value" not in a:
            self.err(kp + ("op",), f"assert: op {op!r} needs a value")
            return None
        if not self.value_ok(kp + ("value",), op, a.get("value")):
            return None
        return Assertion(cmd=cmd, argv=argv, sub=sub, path=path, op=op, value=a.get("value"),
                         line=self.line(kp))


def _kp(kp: tuple) -> str:
    """("step", 2, "expect", "ret") -> "step 3 expect.ret" (steps count from 1)."""
    out = ""
    for n, k in enumerate(kp):
        if isinstance(k, int):
            out += f" {k + 1}" if n == 1 and kp[0] == "step" else f"[{k}]"
        else:
            out += (" " if out.endswith(tuple("0123456789")) and n == 2 and kp[0] == "step" else
                    "." if out else "") + k
    return out or "(top)"


def _suggest(word: str, choices: set) -> str | None:
    import difflib
    if not isinstance(word, str) or len(word) > 64:
        return None
    m = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return m[0] if m else None


def discover(paths) -> list[Path]:
    """Scenario files of *paths* (files, or directories searched for
    ``check_*.toml`` and ``*.check.toml``), sorted, deduplicated."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(set(p.rglob("check_*.toml")) | set(p.rglob("*.check.toml")))
        else:
            out.append(p)
    seen, res = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            res.append(p)
    return res


def is_scenario_file(name: str) -> bool:
    return (name.startswith("check_") and name.endswith(".toml")) or name.endswith(".check.toml")
