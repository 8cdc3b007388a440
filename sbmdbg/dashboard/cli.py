"""``sbmdbg dashboard``: the live dashboard (Textual), or one frame of it.

    sbmdbg dashboard                              boot the reference VM, show it, kill it on quit
    sbmdbg dashboard --vm ID                      a detached harness VM (left running on quit)
    sbmdbg dashboard --gdb H:P --qmp SOCK --vmlinux V [--ram F --ram-size N] [--serial SOCK]
    sbmdbg dashboard --once [--svg F] [--trace] [--demo NAME]... [--break SYM] [--json-timing]
"""
from __future__ import annotations

import json
import signal
import sys
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg import validate as V


def add_parser(sub) -> None:
    d = sub.add_parser("dashboard", help="live dashboard: vCPUs, sandboxes, transitions, console")
    src = d.add_argument_group("guest (default: boot the reference kernel)")
    src.add_argument("--vm", metavar="ID", help="a detached harness VM (sbmdbg vm start --detach)")
    src.add_argument("--gdb", metavar="HOST:PORT", help="gdb stub (with --qmp and --vmlinux)")
    src.add_argument("--qmp", metavar="SOCKET", help="QMP socket (registers without stopping the guest)")
    src.add_argument("--vmlinux", help="kernel ELF with symbols and DWARF")
    src.add_argument("--tree", help="kernel tree (for scripts/gdb)")
    src.add_argument("--ram", metavar="FILE", help="QEMU memory-backend-file (share=on) of the guest")
    src.add_argument("--ram-size", type=V.arg_int(4096, 1 << 46), metavar="N", help="guest RAM bytes")
    src.add_argument("--serial", metavar="SOCK", help="serial console socket (the console panel's input)")
    src.add_argument("--smp", type=V.arg_int(1, 64), default=2, help="vCPUs of the booted VM (default 2)")
    src.add_argument("--pti", choices=["on", "off"], default="off", help="pti= of the booted VM")
    d.add_argument("--rate", type=V.arg_float(0, 100, lo_open=True), default=2.0, metavar="HZ",
                   help="refresh rate while running (default 2)")
    d.add_argument("--trace", action="store_true", help="start with the transition tracer on")
    d.add_argument("--trace-level", choices=["lean", "fast", "full"], default="fast")
    d.add_argument("--once", action="store_true", help="print one frame and exit (also without a TTY)")
    d.add_argument("--svg", metavar="FILE", help="save one frame as SVG (implies --once)",
                   type=V.arg_out_file("--svg"))
    d.add_argument("--width", type=V.arg_int(40, 1000), default=120, help="frame width for --once/--svg")
    d.add_argument("--height", type=V.arg_int(10, 1000), default=40, help="frame height for --once/--svg")
    d.add_argument("--demo", action="append", metavar="NAME", default=[],
                   help="--once: run demo scenarios first (in order; waits for each result)")
    d.add_argument("--break", dest="break_at", metavar="SYMBOL",
                   help="--once: stop at SYMBOL (during the last --demo) and show that frame")
    d.add_argument("--json", action="store_true", help="--once: print the snapshot as JSON")
    d.add_argument("--json-timing", action="store_true",
                   help="--once: measure a refresh of every panel with the guest stopped; print JSON")
    d.set_defaults(func=cmd_dashboard)


def _conn(args):
    from sbmdbg.dashboard import backend as B

    explicit = [a for a in ("gdb", "qmp") if getattr(args, a)]
    if args.vm and explicit:
        raise SbmdbgError("give either --vm ID or --gdb/--qmp/--vmlinux, not both")
    if explicit:
        if not (args.qmp and args.vmlinux):
            raise SbmdbgError("attaching needs --qmp SOCKET and --vmlinux V (and --gdb HOST:PORT for the controls)")
        if args.ram and not args.ram_size:
            import os
            args.ram_size = os.path.getsize(args.ram) if os.path.exists(args.ram) else None
        return B.explicit_conn(args.gdb, args.qmp, args.vmlinux, args.ram, args.ram_size, args.serial, args.tree)
    if args.vm:
        return B.attach_vm(args.vm)
    return B.start_vm(smp=args.smp, pti=args.pti)


def cmd_dashboard(args) -> int:
    from sbmdbg.dashboard.backend import Backend

    once = args.once or bool(args.svg) or args.json or args.json_timing or not sys.stdout.isatty()
    if (args.demo or args.break_at) and not once:
        raise SbmdbgError("--demo/--break go with --once (in the live dashboard press d)")
    if args.break_at and not args.demo:
        raise SbmdbgError("--break SYMBOL needs a --demo NAME to run into it")
    if args.rate <= 0:
        raise SbmdbgError("--rate must be > 0")
    def _leave(signum, frame):   # SIGTERM/SIGHUP while booting or attaching: clean up on the way out
        raise SystemExit(128 + signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _leave)
    conn = _conn(args)
    need_gdb = not once or args.trace or bool(args.break_at)
    if need_gdb and not conn.gdb:
        if conn.vm is not None:
            conn.vm.close()
        raise SbmdbgError("the controls need gdb: pass --gdb HOST:PORT")
    try:
        be = Backend(conn, trace_level=args.trace_level, use_gdb=need_gdb)
    except BaseException:
        if conn.vm is not None:
            conn.vm.close()
        raise
    be.open()
    if not once:
        from sbmdbg.dashboard.app import run_app
        try:
            if args.trace:
                be.trace_on()
        except BaseException:
            be.close()
            raise
        report = run_app(be, args.rate)
        print(f"sbmdbg dashboard: closed ({', '.join(f'{k}={v}' for k, v in report.items())})",
              file=sys.stderr)
        return 0
    try:
        return _once(be, args)
    finally:
        be.close()


def _once(be, args) -> int:
    from rich.console import Console

    from sbmdbg.dashboard import panels as P

    if args.trace:
        be.trace_on()
    for i, name in enumerate(args.demo):
        last = i == len(args.demo) - 1
        if last and args.break_at:
            be.break_during(args.break_at, name)
        else:
            be.run_and_wait(name)
    if args.trace:
        time.sleep(0.3)   # let the last events reach the file
    timing = be.measure_stopped() if args.json_timing else None
    snap = be.snapshot()
    if args.json or args.json_timing:
        out = {"snapshot": snap} if args.json else {}
        if timing:
            out["stopped_refresh"] = timing
            out["running_refresh_ms"] = be.measure_running()
        print(json.dumps(out, indent=1, default=str))
        if not args.svg:
            return 0
    if not args.svg:
        con = Console(width=args.width, height=args.height, highlight=False)
        con.print(P.frame(snap, args.width, args.height), height=args.height)
        return 0
    import io
    con = Console(width=args.width, height=args.height, record=True, highlight=False, force_terminal=True,
                  color_system="truecolor", file=io.StringIO())
    con.print(P.frame(snap, args.width, args.height), height=args.height)
    text = con.export_text(clear=False)
    con.save_svg(args.svg, title="sbmdbg dashboard")
    if not (args.json or args.json_timing):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")   # the same frame, plain text
    print(f"wrote {args.svg}", file=sys.stderr)
    return 0
