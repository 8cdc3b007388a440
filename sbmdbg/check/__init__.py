"""Scripted regression checks: scenario files (TOML) run against a live VM.

    spec.py         load + validate scenario files (file:line errors, before any boot)
    expr.py         JSON paths and operators of assertions
    known.py        demo scenarios, `sbm` subcommands and their JSON keys, trace fields
    transitions.py  expectations on the tracer's events (sbmdbg.trace)
    runner.py       VMs, gdb, steps -> results
    report.py       rich progress, failure text, JUnit XML, JSON
    pytest_plugin.py  pytest collects check_*.toml / *.check.toml (entry point pytest11)

``sbmdbg check FILE...``: see docs/checks.md.
"""
from __future__ import annotations

import sys
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg import validate as V

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def cli(args) -> int:
    """``sbmdbg check`` (args from sbmdbg.cli)."""
    from rich.console import Console

    from sbmdbg.check import report as R
    from sbmdbg.check import spec
    from sbmdbg.check.runner import Runner

    files = spec.discover(args.files)
    if not files:
        raise SbmdbgError("no scenario files (check_*.toml or *.check.toml) in "
                          + " ".join(args.files))
    # Validate everything before anything boots.
    scenarios, problems = [], []
    for f in files:
        try:
            scenarios.append(spec.load(f))
        except spec.ScenarioError as e:
            problems += e.problems
    if problems:
        for p in problems:
            print(f"sbmdbg: error: {spec.fmt_problem(*p)}", file=sys.stderr)
        print(f"sbmdbg: {len(problems)} problem(s) in the scenario files; nothing was run", file=sys.stderr)
        return EXIT_BAD_INPUT
    kernel = None
    if args.kernel or args.vmlinux:
        if not (args.kernel and args.vmlinux):
            raise SbmdbgError("--kernel and --vmlinux go together")
        from pathlib import Path
        for p in (args.kernel, args.vmlinux):
            if not Path(p).is_file():
                raise SbmdbgError(f"{p} not found")
        if args.extra_patch:
            raise SbmdbgError("--extra-patch builds the reference kernel; it cannot be combined with --kernel")
        kernel = {"bzimage": str(Path(args.kernel).resolve()), "vmlinux": str(Path(args.vmlinux).resolve())}
        if args.tree:
            kernel["tree"] = str(Path(args.tree).resolve())
    for p in args.extra_patch or ():
        from pathlib import Path
        if not Path(p).is_file():
            raise SbmdbgError(f"--extra-patch {p} not found")
    if args.validate:
        for sc in scenarios:
            print(f"{sc.path}: ok ({len(sc.steps)} step(s))")
        return 0
    con = Console(highlight=False, soft_wrap=True)
    rep = R.RichReporter(con, verbose=args.verbose)
    t0 = time.monotonic()
    from pathlib import Path
    with Runner(kernel=kernel, extra_patches=[str(Path(p).resolve()) for p in args.extra_patch or ()],
                reuse=not args.no_reuse, reuse_after_failure=args.reuse_after_failure,
                reporter=rep) as runner:
        results = runner.run(scenarios)
    secs = time.monotonic() - t0
    if args.junit:
        R.write_junit(results, args.junit, secs)
    if args.json:
        R.write_json(results, args.json, secs)
    ok = all(r.passed for r in results)
    con.print(("[green]PASSED[/] " if ok else "[red]FAILED[/] ") + R.summary_line(results, secs))
    return 0 if ok else EXIT_FAILED


def add_parser(sub) -> None:
    """The ``check`` subcommand's arguments (sbmdbg.cli calls this)."""
    c = sub.add_parser("check", help="run scenario files (scripted regression checks)",
                       description="Run scenario files (TOML, see docs/checks.md) against a live VM. "
                                   "Exit 0: all passed; 1: a check failed; 2: a scenario file is invalid "
                                   "(nothing is booted then).")
    c.add_argument("files", nargs="+", metavar="FILE", help="scenario files or directories")
    c.add_argument("--junit", metavar="OUT.xml", help="write a JUnit XML report",
                   type=V.arg_out_file("--junit"))
    c.add_argument("--json", metavar="OUT.json", help="write a JSON report", type=V.arg_out_file("--json"))
    c.add_argument("--kernel", metavar="BZIMAGE", help="run every file on this kernel (with --vmlinux)")
    c.add_argument("--vmlinux", help="vmlinux matching --kernel")
    c.add_argument("--tree", help="kernel tree of --kernel (for scripts/gdb)")
    c.add_argument("--extra-patch", action="append", metavar="FILE",
                   help="build the reference kernel with this patch too (for every file)")
    c.add_argument("--no-reuse", action="store_true", help="boot a fresh VM for every file")
    c.add_argument("--reuse-after-failure", action="store_true",
                   help="keep a failed file's VM for the next file when the guest still answers "
                        "(QEMU alive, gdb can stop and resume it, the shell echoes, the kernel's taint "
                        "unchanged); default: replace it")
    c.add_argument("--validate", action="store_true", help="only validate the files (no VM)")
    c.add_argument("-v", "--verbose", action="store_true", help="print every step's notes")
    c.set_defaults(func=cli)
