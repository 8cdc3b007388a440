"""``sbmdbg trace ...`` (the benchmark, ``sbmdbg bench trace``, is in sbmdbg.bench).

    sbmdbg trace record [--id ID | --boot] [--file F] [--via auto|plugin|gdb] [--source frames|dint]
                        [--level L] [--emulate]
                        [--run 'CMD'] [--seconds S] [--json]      (alias: start)
    sbmdbg trace show FILE [--last N] [--kind K,K] [--vcpu N] [--json]
    sbmdbg trace export FILE --perfetto OUT
    sbmdbg trace why FILE [SEQ] [--vmlinux V] [--json]
    sbmdbg trace check FILE --qemu-log LOG [--start-offset B]
"""
from __future__ import annotations

import json
import signal
import sys
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg import validate as V


def _record(args) -> int:
    from sbmdbg.trace.live import TraceRecorder
    from sbmdbg.vm import VM, VMOptions

    if args.boot:
        vm = VM(VMOptions(smp=args.smp, pti=args.pti, qemu_log=args.qemu_log))
    else:
        vm = VM.attach(args.id)
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    old = signal.signal(signal.SIGINT, handler)
    try:
        via = args.via
        if via == "auto":
            via = "plugin" if vm.info.get("trace_plugin") else "gdb"
        if via == "plugin":
            from sbmdbg.trace.fast import PluginTracer
            rec = PluginTracer(vm, args.file, force=args.force, source=args.source)
            what = ("sbmtrace plugin, exception frames" if args.source == "frames" else
                    "QEMU -d int log + sbmtrace plugin") + ", the guest never stops"
        else:
            rec = TraceRecorder(vm.info, args.file, args.level, emulate=args.emulate)
            what = f"gdb probes, level {args.level}"
        rec.start()
        print(f"tracing VM {vm.id} to {rec.path} ({what}); "
              + ("running: " + args.run if args.run else "Ctrl-C to stop"), file=sys.stderr, flush=True)
        out = None
        try:
            if args.run:
                res = vm.run(args.run, timeout=args.seconds or 600)
                out = res.output
                rec.poll()
            else:
                rec.wait(args.seconds or 10 ** 9, until=lambda: stop["now"])
            st = rec.stop()
        finally:
            rec.close()
    finally:
        signal.signal(signal.SIGINT, old)
        vm.close()
    if args.json:
        print(json.dumps({"status": st, "guest_output": out}, indent=2))
    else:
        if out:
            sys.stdout.write(out)
        s = st["summary"]
        print(f"{s['events']} events in {st['file']}: {s['calls']} calls, {s['returns']} returns, "
              f"{s['aborts']} aborts, {s['transitions']} transitions in {s['seconds']} s")
    return 0


def _show(args) -> int:
    from sbmdbg.trace.events import read_events, summarize

    events = read_events(args.file)
    if args.json:
        print(json.dumps({"summary": summarize(events), "events": events[-args.last:] if args.last else events}))
        return 0
    from rich.console import Console

    from sbmdbg.trace.export import timeline
    con = Console(highlight=False)
    con.print(timeline(events, args.last, set(args.kind.split(",")) if args.kind else None, args.vcpu))
    s = summarize(events)
    con.print(f"{s['calls']} calls, {s['returns']} returns, {s['aborts']} aborts, "
              f"{s['transitions']} transitions in {s['seconds']} s"
              + ("" if s["complete"] else "  (no trace_stop: the recorder died)"))
    return 0


def _export(args) -> int:
    from sbmdbg.trace.events import read_events
    from sbmdbg.trace.export import write_perfetto

    n = write_perfetto(read_events(args.file), args.perfetto)
    print(f"wrote {n} trace events to {args.perfetto} (open in ui.perfetto.dev)")
    return 0


def _check(args) -> int:
    from sbmdbg.trace.events import read_events
    from sbmdbg.trace.qemulog import cross_check, parse_log

    r = cross_check(read_events(args.file), parse_log(args.qemu_log, args.start_offset))
    print(json.dumps(r, indent=2))
    return 0 if not r["missing_from_log"] and not r["missing_from_trace"] else 1


def _why(args) -> int:
    from sbmdbg.sbm.why import lines
    from sbmdbg.trace.events import read_events
    from sbmdbg.trace.why import why

    out = why(read_events(args.file), args.vmlinux, args.event)
    if args.json:
        print(json.dumps(out if args.event is None else out[0], indent=2))
    else:
        def clean(s: str) -> str:   # trace files are input: no terminal control characters
            return "".join(c if c.isprintable() else "?" for c in s)
        for d in out:
            print(clean(f"abort seq {d['event']['seq']} (vCPU {d['event']['vcpu']}, "
                        f"pid {d['event']['pid']} {d['event']['comm']}):"))
            print("\n".join(clean(x) for x in lines(d)))
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("trace", help="live SBM transition tracer").add_subparsers(
        dest="tcmd", required=True, parser_class=sub._parser_class)
    for name in ("record", "start"):
        r = t.add_parser(name, help="record while the guest runs (until --run ends, --seconds, Ctrl-C)")
        r.add_argument("--id", help="detached VM id (default: the only one)")
        r.add_argument("--boot", action="store_true", help="boot a VM for this trace (stopped afterwards)")
        r.add_argument("--smp", type=V.arg_int(1, 64), default=2)
        r.add_argument("--pti", choices=["on", "off"], default="on")
        r.add_argument("--qemu-log", help="with --boot: QEMU -d int -D FILE", type=V.arg_out_file("--qemu-log"))
        r.add_argument("--file", default="sbm-trace.jsonl", type=V.arg_out_file("--file"))
        r.add_argument("--via", choices=["auto", "plugin", "gdb"], default="auto",
                       help="plugin: the sbmtrace plugin, no stops (default "
                            "when the VM has the plugin); gdb: breakpoints (stops per probe)")
        r.add_argument("--source", choices=["frames", "dint"], default="frames",
                       help="plugin: sandbox interrupts from the exception frames in guest RAM "
                            "(default) or from QEMU's -d int log (also the GS base at the interrupt)")
        r.add_argument("--level", choices=["lean", "fast", "full"], default="full", help="gdb probes")
        r.add_argument("--force", action="store_true", help="plugin: take over a plugin left armed")
        r.add_argument("--emulate", action="store_true", help="emulated step-over (see README)")
        r.add_argument("--run", help="guest shell command to run while tracing")
        r.add_argument("--seconds", type=V.arg_float(0, 7 * 86400, lo_open=True),
                       help="how long to trace (or --run's timeout)")
        r.add_argument("--json", action="store_true")
        r.set_defaults(func=_record)
    s = t.add_parser("show", help="terminal timeline of a trace file")
    s.add_argument("file")
    s.add_argument("--last", type=V.arg_int(1, 1 << 40))
    s.add_argument("--kind")
    s.add_argument("--vcpu", type=V.arg_int(0, 4095))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_show)
    e = t.add_parser("export", help="Chrome/Perfetto trace JSON")
    e.add_argument("file")
    e.add_argument("--perfetto", required=True, metavar="OUT", type=V.arg_out_file("--perfetto"))
    e.set_defaults(func=_export)
    w = t.add_parser("why", help="explain the aborts of a trace (sbm why, offline)")
    w.add_argument("file")
    w.add_argument("event", nargs="?", type=int, help="seq of one abort event (default: all)")
    w.add_argument("--vmlinux", help="the traced kernel's vmlinux (default: the trace's)")
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=_why)
    c = t.add_parser("check", help="cross-check a trace against QEMU's -d int log")
    c.add_argument("file")
    c.add_argument("--qemu-log", required=True, type=V.arg_in_file("--qemu-log"))
    c.add_argument("--start-offset", type=V.arg_int(0, 1 << 62), default=0,
                   help="byte offset of the log where tracing began")
    c.set_defaults(func=_check)
