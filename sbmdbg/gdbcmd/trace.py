"""sbm trace start|stop|status|show|export: the live transition tracer.

Breakpoints are gdb-internal (no MI notifications per hit) and their
``stop()`` records the event and returns False, so the guest continues
without the front end hearing about it.  ``breakpoint always-inserted on``
keeps gdb from removing and re-inserting every breakpoint at each stop.
Guest memory is read from QEMU's RAM file (``sbm target shm``; found
automatically for VMs of the sbmdbg harness).
"""
from __future__ import annotations

import os
import time

import gdb

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.gdbcmd.gdbtarget import _cpu_of

U64 = (1 << 64) - 1


class _Active:
    tracer = None
    bps: list = []
    last_file: str | None = None
    old_always_inserted: str | None = None
    fixup: tuple | None = None   # (thread, register writes) of the probe stop being handled
    token = 0                    # bumped at every stop: a stale resume does nothing
    hold = False                 # set by `sbm trace hold`/stop: do not resume any more
    resumes = 0


ACTIVE = _Active()


class _ProbeBreakpoint(gdb.Breakpoint):
    def __init__(self, tracer, name: str, addr: int, insn=None):
        super().__init__(f"*{addr:#x}", internal=True)
        self.silent = True
        self.probe = name
        self.tracer = tracer
        self.insn = insn
        self.addr = addr

    def stop(self):
        try:
            th = gdb.selected_thread()
            cpu = _cpu_of(th)
            frame = gdb.newest_frame()
        except gdb.error:
            return False
        cache: dict[str, int] = {}

        def reg(name: str) -> int:
            v = cache.get(name)
            if v is None:
                val = frame.read_register(name)
                try:
                    v = int(val)
                except gdb.error:
                    v = int(val.cast(gdb.lookup_type("unsigned long")))
                v &= U64
                cache[name] = v
            return v
        self.tracer.hit(self.probe, cpu, reg)
        if self.insn is None or ACTIVE.hold or ACTIVE.tracer is not self.tracer:
            return False          # gdb steps over the breakpoint itself
        from sbmdbg.trace.emulate import execute
        try:
            writes = execute(self.insn, self.addr, reg, self.tracer.ctx.read)
        except Exception:  # noqa: BLE001 - cannot emulate: let gdb step over
            return False
        ACTIVE.fixup = (th, writes)
        return True               # a real (silent) stop; _on_stop resumes past the insn


def _on_stop(event) -> None:
    ACTIVE.token += 1
    fx, ACTIVE.fixup = ACTIVE.fixup, None
    if fx is None or ACTIVE.hold or ACTIVE.tracer is None:
        return
    tok = ACTIVE.token
    gdb.post_event(lambda: _resume(tok, fx))


def _resume(tok: int, fx) -> None:
    """Perform the probed instruction (register writes) and continue: no
    single step, so QEMU keeps its translation cache (see emulate.py)."""
    if tok != ACTIVE.token or ACTIVE.hold or ACTIVE.tracer is None:
        return
    th, writes = fx
    try:
        if not th.is_valid() or not th.is_stopped():
            return
        if gdb.selected_thread() is not th:
            th.switch()
        for name, v in writes.items():
            gdb.execute(f"set ${name} = {v:#x}", to_string=True)
        ACTIVE.resumes += 1
        gdb.execute("continue&", to_string=True)
    except gdb.error as e:
        gdb.write(f"sbm trace: could not resume the guest: {e}\n", gdb.STDERR)


def _autodetect_ram() -> None:
    """No RAM file chosen: use the harness VM whose gdb stub we are connected to."""
    if STATE.ram_file:
        return
    try:
        conn = gdb.selected_inferior().connection
        details = getattr(conn, "details", None) or ""
    except (AttributeError, gdb.error):
        details = ""
    try:
        from sbmdbg.vm.vm import list_vms
        for info in list_vms():
            if details and details.endswith(info["gdb"].rpartition(":")[2]) and os.path.exists(info["ram"]):
                STATE.set_ram_file(info["ram"], info.get("ram_size"))
                return
    except Exception:  # noqa: BLE001 - autodetection is best effort
        pass


def start_trace(path: str, level: str = "full", emulate: bool = False) -> dict:
    from sbmdbg.trace.events import EventSink
    from sbmdbg.trace.points import find_probes
    from sbmdbg.trace.recorder import Tracer

    if ACTIVE.tracer is not None:
        raise SbmdbgError(f"a trace is already running (to {ACTIVE.tracer.sink.path}); sbm trace stop first")
    _autodetect_ram()
    if not STATE.ram_file:
        raise SbmdbgError("tracing reads guest RAM from QEMU's memory-backend file: "
                          "sbm target shm /dev/shm/sbmdbg-<id>.ram first")
    k = STATE.get_kernel()
    probes = find_probes(k.symbols, k.layouts, level)
    from dataclasses import replace

    from sbmdbg.trace.context import GuestContext
    from sbmdbg.trace.points import choose_site
    ctx = GuestContext(k)
    probes = {n: choose_site(p, ctx.read(p.addr + k.slide, 48)) for n, p in probes.items()}
    if not emulate:
        # gdb steps over every probe; x86_sbm_return keeps its later site (after
        # the CR3 switch), so the sandbox's `ret` does not stop there at CPL 3.
        probes = {n: replace(p, insn=None, site=p.site if n == "x86_sbm_return" else None)
                  for n, p in probes.items()}
    sink = EventSink(path)
    try:
        tracer = Tracer(k, probes, sink, level, meta={"vmlinux": STATE.vmlinux(), "ram": STATE.ram_file,
                                                      "emulate": emulate})
        ACTIVE.old_always_inserted = gdb.parameter("breakpoint always-inserted")
        gdb.execute("set breakpoint always-inserted on", to_string=True)
        bps = [_ProbeBreakpoint(tracer, n, p.bp_addr + k.slide, p.insn) for n, p in probes.items()]
    except BaseException:
        sink.close()
        raise
    ACTIVE.tracer, ACTIVE.bps, ACTIVE.last_file = tracer, bps, path
    ACTIVE.hold, ACTIVE.fixup, ACTIVE.resumes = False, None, 0
    return {"file": path, "level": level, "probes": [p.to_json(k.slide) for p in probes.values()]}


def stop_trace(reason: str = "sbm trace stop") -> dict:
    t = ACTIVE.tracer
    if t is None:
        raise SbmdbgError("no trace is running (sbm trace start)")
    ACTIVE.hold = True
    th = gdb.selected_thread()
    if th is not None and th.is_running():
        gdb.execute("interrupt", to_string=True)
        raise SbmdbgError("the guest is running: interrupted it; run `sbm trace stop` again once it stopped")
    ACTIVE.hold = False
    ACTIVE.fixup = None
    ACTIVE.token += 1
    for bp in ACTIVE.bps:
        try:
            if bp.is_valid():
                bp.delete()
        except (gdb.error, RuntimeError):
            pass
    ACTIVE.bps = []
    ACTIVE.tracer = None
    if ACTIVE.old_always_inserted is not None:
        try:
            gdb.execute(f"set breakpoint always-inserted {'on' if ACTIVE.old_always_inserted is True else 'off'}",
                        to_string=True)
        except gdb.error:
            pass
    return t.stop(reason)


def _on_exited(event=None) -> None:
    """The target went away (QEMU died, connection closed): close the file."""
    t = ACTIVE.tracer
    if t is not None:
        ACTIVE.bps = []  # gdb deletes nothing here; the breakpoints stay harmless
        ACTIVE.tracer = None
        t.stop("target exited (QEMU died or the connection closed)")


gdb.events.exited.connect(_on_exited)
gdb.events.stop.connect(_on_stop)


class TraceCommand(SbmCommand):
    """Record SBM transitions while the guest runs.

Usage:
  sbm trace start [--file F] [--level lean|fast|full]   then `continue`
  sbm trace stop | status
  sbm trace hold | release   (front ends: keep the next stop / resume again)
  sbm trace show [FILE] [--last N] [--kind K,K] [--vcpu N]
  sbm trace export --perfetto OUT [FILE]

Stop a running trace with `interrupt` (or Ctrl-C) first, then `sbm trace stop`.
Events (enter, return, abort, exit, irq, nmi, irq_return, spurious, call)
are written to F as JSON lines, one os.write per event.  Levels: lean =
x86_sbm_exec + handle_sbm_fault (2 stops per call); fast = + entry/NMI/resume
labels (IRQs, NMIs, spurious faults, exact vectors); full (default) = +
sbm_exec, arch_sbm_exec, x86_sbm_return."""

    name = "trace"

    def add_args(self, p):
        p.add_argument("action", choices=["start", "stop", "hold", "release", "status", "show", "export"])
        p.add_argument("trace_file", nargs="?", help="trace file (show/export; default the last one)")
        p.add_argument("--file", help="where start writes (default sbm-trace.jsonl)")
        p.add_argument("--level", choices=["lean", "fast", "full"], default="full")
        p.add_argument("--emulate", action="store_true",
                       help="step over probes by emulating their instruction (stop + continue&) "
                            "instead of gdb's single step")
        p.add_argument("--last", type=int, help="show: only the last N events")
        p.add_argument("--kind", help="show: only these kinds (comma-separated)")
        p.add_argument("--vcpu", type=int, help="show: only this vCPU")
        p.add_argument("--perfetto", help="export: Chrome/Perfetto JSON file to write")

    def complete_positional(self, text, word):
        return [a for a in ("start", "stop", "hold", "release", "status", "show", "export") if a.startswith(word or "")]

    def run(self, args):
        from sbmdbg.trace.events import read_events, summarize
        a = args.action
        if a == "start":
            path = os.path.abspath(args.file or args.trace_file or "sbm-trace.jsonl")
            info = start_trace(path, args.level, emulate=args.emulate)
            if args.json:
                self.emit_json(info)
            else:
                self.emit_rich(f"tracing to {path} (level {args.level}, {len(info['probes'])} probes: "
                               + ", ".join(p["name"] for p in info["probes"]) + "); `continue` to run")
        elif a == "stop":
            st = stop_trace()
            if args.json:
                self.emit_json(st)
            else:
                self.emit_rich(f"trace stopped: {st['events']} events in {st['file']} "
                               f"({', '.join(f'{k}={v}' for k, v in sorted(st['counts'].items()))})"
                               + (f", {st['errors']} read errors" if st["errors"] else ""))
        elif a == "hold":
            ACTIVE.hold = True      # no target access: allowed while the guest runs
            self.emit_json({"hold": True}) if args.json else self.emit_rich("holding: the next stop stays stopped")
        elif a == "release":
            ACTIVE.hold = False     # the tracer resumes past its probes again (after `continue`)
            self.emit_json({"hold": False}) if args.json else self.emit_rich("released: the tracer resumes again")
        elif a == "status":
            t = ACTIVE.tracer
            st = t.status() if t else {"running": False, "last_file": ACTIVE.last_file}
            if t:
                st.update(running=True, resumes=ACTIVE.resumes, hold=ACTIVE.hold)
            self.emit_json(st) if args.json else self.emit_rich(str(st))
        else:
            path = args.trace_file or (ACTIVE.tracer.sink.path if ACTIVE.tracer else ACTIVE.last_file)
            if not path:
                raise SbmdbgError("which trace? sbm trace show FILE")
            events = read_events(path)
            if a == "show":
                if args.json:
                    self.emit_json({"summary": summarize(events), "events": events[-args.last:] if args.last
                                    else events})
                    return
                from sbmdbg.trace.export import timeline
                kinds = set(args.kind.split(",")) if args.kind else None
                s = summarize(events)
                self.emit_rich(timeline(events, args.last, kinds, args.vcpu),
                               f"{s['calls']} calls, {s['returns']} returns, {s['aborts']} aborts, "
                               f"{s['transitions']} transitions in {s['seconds']} s")
            else:
                if not args.perfetto:
                    raise SbmdbgError("export needs --perfetto OUT")
                from sbmdbg.trace.export import write_perfetto
                t0 = time.monotonic()
                n = write_perfetto(events, args.perfetto)
                info = {"file": args.perfetto, "trace_events": n, "seconds": round(time.monotonic() - t0, 3)}
                self.emit_json(info) if args.json else self.emit_rich(
                    f"wrote {n} trace events to {args.perfetto} (open in ui.perfetto.dev)")


TraceCommand()
