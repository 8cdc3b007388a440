"""sbm time: how long a command takes inside gdb (no MI round trip); used by
``sbmdbg bench pt|status`` instead of Python code sent to gdb as a string."""
from __future__ import annotations

import argparse
import statistics
import time

import gdb

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE


class TimeCommand(SbmCommand):
    """Run a gdb command N times and report how long one run takes.

Usage: sbm time [--repeat N] [--cold] [--flush-gdb] [--compute] [--json] COMMAND [ARGS...]
  --cold      drop every cache of the model before each run (not timed): a
              fresh stop, as after a resume
  --flush-gdb also flush gdb's register and memory caches (not timed)
  --compute   COMMAND is `sbm CMD ...` of the command table: time only its
              compute (the model), not argument parsing, JSON or text output"""

    name = "time"

    def add_args(self, p):
        p.add_argument("--repeat", type=int, default=10, help="runs (default 10)")
        p.add_argument("--cold", action="store_true", help="drop the caches before each run")
        p.add_argument("--compute", action="store_true", help="time the table's compute only")
        p.add_argument("--flush-gdb", action="store_true",
                       help="also flush gdb's register and memory caches before each run (not timed): "
                            "cold for gdb's own commands and scripts/gdb too")
        p.add_argument("command", nargs=argparse.REMAINDER, help="the gdb command to time")

    def parse_argv(self, argv):
        # COMMAND is argparse.REMAINDER: intermixed parsing refuses it, and
        # the timed command's own options must stay with it
        return self.parser.parse_args(argv)

    def run(self, args):
        if not args.command:
            raise SbmdbgError("which command? sbm time [--repeat N] [--cold] COMMAND")
        if not 1 <= args.repeat <= 100_000:
            raise SbmdbgError(f"--repeat {args.repeat}: want 1..100000")
        line = " ".join(args.command)
        if args.compute:
            once = self._compute(args.command)
        else:
            def once():
                try:
                    gdb.execute(line, to_string=True)
                except gdb.error as e:
                    raise SbmdbgError(f"{line}: {e}") from None
        ts = []
        for _ in range(args.repeat):
            if args.cold:
                STATE.invalidate()
            if args.flush_gdb:
                gdb.execute("maintenance flush register-cache", to_string=True)
                gdb.execute("maintenance flush dcache", to_string=True)
            t0 = time.perf_counter()
            once()
            ts.append(time.perf_counter() - t0)
        d = {"command": line, "repeat": args.repeat, "cold": args.cold, "compute": args.compute,
             "mean_ms": statistics.fmean(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3,
             "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
        if args.json:
            self.emit_json(d)
        else:
            self.emit_rich(f"{line}: median {d['median_ms']:.3f} ms, mean {d['mean_ms']:.3f} ms "
                           f"(min {d['min_ms']:.3f}, max {d['max_ms']:.3f}; {args.repeat} runs"
                           + (", cold" if args.cold else "") + ")")

    @staticmethod
    def _compute(words: list[str]):
        from sbmdbg.gdbcmd.sbmcmds import GDB_COMMANDS
        if words[:1] != ["sbm"]:
            raise SbmdbgError("--compute times `sbm CMD ...` of the command table")
        name = words[1] if len(words) > 1 and not words[1].startswith("-") else "status"
        cmd = GDB_COMMANDS.get(name)
        if cmd is None:
            raise SbmdbgError(f"--compute: `sbm {name}` is not in the command table")
        args = cmd.parse(words[2:] if len(words) > 1 and words[1] == name else words[1:])
        k = STATE.get_kernel()
        return lambda: cmd.spec.compute(k, args)


TimeCommand()
