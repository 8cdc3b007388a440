"""Presentation of check results: rich progress for the CLI, a plain-text
failure report (CLI and pytest), JUnit XML and JSON."""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from sbmdbg.check.runner import FileResult, Reporter, StepResult
from sbmdbg.check.spec import Scenario, Step
from sbmdbg.text import clean, xml_safe


def _loc(path: str, line: int | None) -> str:
    return f"{path}:{line}" if line else path


def failure_text(fr: FileResult, console_tail: bool = True) -> str:
    """What failed in one file: every failing step's messages, then the console tail."""
    out = []
    for f in fr.setup_failures:
        out.append(clean(f"{fr.path}: {f}"))
    for s in fr.steps:
        if s.status in ("fail", "error"):
            out.append(clean(f"{_loc(fr.path, s.line)}: step {s.index} ({s.name}) {s.status.upper()}"))
            for msg in s.failures:
                out += ["    " + clean(ln) for ln in msg.splitlines()]
    if console_tail and fr.console_tail and out:
        out.append("console tail:")
        out += ["    " + clean(ln) for ln in fr.console_tail.splitlines()]
    return "\n".join(out)


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None, verbose: bool = False):
        self.con = console or Console(highlight=False)
        self.verbose = verbose
        self._status = None
        self._file_i = 0

    def file_start(self, sc: Scenario, i: int, n: int) -> None:
        self._file_i = i
        self.con.print(f"[bold]\\[{i + 1}/{n}] {escape(clean(str(sc.path)))}[/]  {escape(sc.name)}"
                       + (f" — {escape(sc.description)}" if sc.description else ""))

    def note(self, text: str) -> None:
        self.con.print(f"    [dim]{escape(clean(text))}[/]")

    def step_start(self, st: Step, n: int) -> None:
        if self.con.is_terminal:
            self._status = self.con.status(f"step {st.index}/{n}: {escape(st.name)}")
            self._status.start()

    def step_done(self, st: Step, r: StepResult) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
        mark = {"pass": "[green]✓[/]", "fail": "[red]✗[/]", "error": "[red]![/]",
                "skip": "[yellow]-[/]"}[r.status]
        self.con.print(f"  {mark} {st.index:>2} {escape(st.name)}  [dim]{r.seconds:.1f} s, "
                       f"{r.checks} check(s)[/]")
        for msg in r.failures:
            for ln in msg.splitlines():
                self.con.print(f"       [red]{escape(clean(ln))}[/]")
        if self.verbose or r.status != "pass":
            for n in r.notes:
                self.con.print(f"       [dim]{escape(clean(n))}[/]")

    def file_done(self, fr: FileResult) -> None:
        for f in fr.setup_failures:
            self.con.print(f"  [red]✗ {escape(clean(f))}[/]")
        if not fr.passed and fr.console_tail:
            self.con.print("  [bold]console tail:[/]")
            for ln in fr.console_tail.splitlines():
                self.con.print(f"    [dim]{escape(clean(ln))}[/]")
        colour = "green" if fr.passed else "red"
        self.con.print(f"  [{colour}]{fr.status.upper()}[/] {escape(clean(fr.path))} in {fr.seconds:.1f} s\n")


def summary_line(results: list[FileResult], seconds: float) -> str:
    steps = [s for f in results for s in f.steps]
    nfail = sum(1 for s in steps if s.status in ("fail", "error"))
    return (f"{sum(f.passed for f in results)}/{len(results)} file(s) passed, "
            f"{sum(s.status == 'pass' for s in steps)}/{len(steps)} step(s) passed"
            + (f", {nfail} failed" if nfail else "") + f" in {seconds:.1f} s")


def write_json(results: list[FileResult], path: str, seconds: float) -> None:
    doc = {"passed": all(f.passed for f in results), "seconds": round(seconds, 2),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "files": [f.to_json() for f in results]}
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


def write_junit(results: list[FileResult], path: str, seconds: float) -> None:
    """JUnit XML: one <testsuite> per scenario file, one <testcase> per step
    (plus a "setup" case when the kernel, the VM or the boot console failed)."""
    root = ET.Element("testsuites", name="sbmdbg check", time=f"{seconds:.2f}")
    total = fails = errors = skipped = 0
    for fr in results:
        cases = []
        if fr.setup_failures:
            cases.append(("setup", None, 0.0, "error" if fr.status == "error" else "fail",
                          fr.setup_failures, []))
        for s in fr.steps:
            cases.append((f"{s.index} {s.name}", s.line, s.seconds, s.status, s.failures, s.notes))
        ts = ET.SubElement(root, "testsuite", name=fr.name, file=fr.path, time=f"{fr.seconds:.2f}")
        n_f = n_e = n_s = 0
        classname = Path(fr.path).name.removesuffix(".toml").replace(".", "_")
        for name, line, secs, status, msgs, notes in cases:
            tc = ET.SubElement(ts, "testcase", classname=classname, name=name, file=fr.path,
                               time=f"{secs:.2f}")
            if line:
                tc.set("line", str(line))
            body = "\n".join(msgs)
            if status in ("fail", "error") and fr.console_tail:
                body += "\n\nconsole tail:\n" + fr.console_tail
            if status == "fail":
                n_f += 1
                ET.SubElement(tc, "failure", message=(msgs[0] if msgs else "failed")[:500]).text = body
            elif status == "error":
                n_e += 1
                ET.SubElement(tc, "error", message=(msgs[0] if msgs else "error")[:500]).text = body
            elif status == "skip":
                n_s += 1
                ET.SubElement(tc, "skipped", message="; ".join(notes) or "skipped")
            if notes and status != "skip":
                ET.SubElement(tc, "system-out").text = "\n".join(notes)
        ts.set("tests", str(len(cases)))
        ts.set("failures", str(n_f))
        ts.set("errors", str(n_e))
        ts.set("skipped", str(n_s))
        total += len(cases)
        fails += n_f
        errors += n_e
        skipped += n_s
    root.set("tests", str(total))
    root.set("failures", str(fails))
    root.set("errors", str(errors))
    root.set("skipped", str(skipped))
    _xml_clean(root)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _xml_clean(root: ET.Element) -> None:
    """Every text, tail and attribute as XML 1.0 allows (guest lines may carry
    ESC, NUL, lone surrogates...): controls shown visibly, ET.parse succeeds."""
    for el in root.iter():
        if el.text:
            el.text = xml_safe(el.text)
        if el.tail:
            el.tail = xml_safe(el.tail)
        for k, v in list(el.attrib.items()):
            el.set(k, xml_safe(v))
