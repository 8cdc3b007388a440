"""The no-stop tracer: QEMU's exception log + the sbmtrace plugin.

The gdb tracer (``recorder.py``) stops the whole VM at every probe; QEMU 7.2's
gdbstub makes that 7-15 ms a stop.  This tracer never stops the guest:

* QEMU logs every interrupt and exception it delivers (``-d int``): vector,
  error code, CPL, CS:RIP, SS:RSP, CR2 and a full register dump (RAX = the
  sandbox's return value at the exit #PF, CR3, GS base).  Switched on at
  ``start`` through the monitor (``logfile``/``log int,plugin,tid``).
* The sbmtrace plugin (``sbmdbg/vm/plugin/sbmtrace.c``) writes lines into the same log,
  in execution order, for what the exception log does not show: the enter
  (the ``iretq`` of x86_sbm_exec: the IRET frame = first sandbox instruction
  and stack, plus the current task and its x86_sbm_state words), the resume
  into a sandbox after an interrupt (the ``iretq`` after
  .Lsbm_return_to_sandbox), x86_sbm_return (sbm->error), and a time stamp
  at the first instruction of every IDT handler (host ns, host TSC, jiffies).

This module parses that log as it grows and turns it into the same events
(schema 1, ``events.py``) the gdb tracer writes:

    sandbox exception line + handler stamp -> return (#PF P|U|I at x86_sbm_return, ret = RAX)
                                           -> abort / spurious (decided by what follows:
                                              x86_sbm_return -> abort, resume -> spurious)
                                           -> irq / nmi (vector >= 32 / 2)
    plugin enter line                      -> enter
    plugin resume line                     -> irq_return (or spurious, above)
    plugin exit line                       -> exit (ret, sbm->error)
    plugin insn line (S)                   -> sandbox_insn (a sensitive instruction the
                                              sandbox executed: address, symbol, bytes)

    >>> t = PluginTracer(vm, "t.jsonl"); t.start()
    >>> vm.run("echo repeat 1000 > /sys/kernel/debug/sbm_demo/run")
    >>> t.stop()["summary"]["transitions"]
    2000
"""
from __future__ import annotations

import errno
import glob
import heapq
import os
import re
import struct
import threading
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import cstring
from sbmdbg.sbm.attack import Attack, classify, sensitive_insn
from sbmdbg.sbm.stacks import classify_in
from sbmdbg.trace.context import GuestContext
from sbmdbg.trace.live import TraceLost, TracerBase, Watcher, pid_alive
from sbmdbg.trace.events import (
    PF_EXIT_ERROR, SCHEMA, EventSink, decode_pf_error, describe_pf_error, hx, read_events,
    summarize, vector_name,
)

U64 = (1 << 64) - 1
EXCEPTION_STACK = "sbm_exception_stack"     # a word of sbm.stacks.STACK_KINDS
IRETQ = b"\x48\xcf"
FRAME = ("rip", "cs", "rflags", "rsp", "ss")

_HDR = re.compile(r"^\s*\d+:\s+v=([0-9a-f]+)\s+e=([0-9a-f]+)\s+i=(\d)\s+cpl=(\d)\s+"
                  r"IP=([0-9a-f]+):([0-9a-f]+)\s+pc=[0-9a-f]+\s+SP=([0-9a-f]+):([0-9a-f]+)"
                  r"(?:\s+CR2=([0-9a-f]+))?")
_REG = re.compile(r"\b(RAX|RBX|RCX|RDX|RSI|RDI|RBP|RSP|R8 |R9 |R10|R11|R12|R13|R14|R15|RIP|CR3|CR2)"
                  r"=([0-9a-f]+)")
_GS = re.compile(r"^GS =[0-9a-f]{4} ([0-9a-f]{16})")



# ------------------------------------------------------------------ the log
class LogParser:
    """Incremental parser of QEMU's ``-d int,plugin`` log.  ``feed(bytes)``
    returns records, each a dict with ``type``:

    * ``int``: vector, error, is_int, cpl, cs, ip, sp, cr2, regs (RAX.., CR3), gs_base
    * ``H``:   tag, vcpu, ns, tsc, jiffies           (a handler-entry stamp)
    * ``P``:   tag, vcpu, ns, tsc, jiffies, task, pid, comm, state, sw (state
               words), err, mva, mpa, mw (words at the access)
    * ``S``:   vcpu, ns, tsc, jiffies, va, bytes  (a sensitive instruction in a sandbox)
    """

    def __init__(self):
        self._rest = b""
        self._cur: dict | None = None
        self.lines = 0
        self.bad = 0
        self.plugin_lines = 0
        self.gaps = 0                  # plugin lines missing (their q= numbers skipped)
        self._q: dict[int, int] = {}
        self.gap_at: list[tuple] = []

    def feed(self, data: bytes) -> list[dict]:
        data = self._rest + data
        cut = data.rfind(b"\n")
        if cut < 0:
            self._rest = data
            return []
        self._rest = data[cut + 1:]
        out: list[dict] = []
        for raw in data[:cut].split(b"\n"):
            self.lines += 1
            line = raw.decode("ascii", errors="replace")
            if line.startswith("@sbm "):
                self.plugin_lines += 1
                self._close(out)
                rec = self._plugin(line)
                if rec is not None:
                    out.append(rec)
                continue
            if " v=" in line[:16]:
                self._close(out)
                m = _HDR.match(line)
                if m:
                    v, e, i, cpl, cs, ip, _ss, sp, cr2 = m.groups()
                    self._cur = {"type": "int", "vector": int(v, 16), "error": int(e, 16),
                                 "is_int": int(i), "cpl": int(cpl), "cs": int(cs, 16),
                                 "ip": int(ip, 16), "sp": int(sp, 16),
                                 "cr2": int(cr2, 16) if cr2 else None, "regs": {}, "gs_base": None}
                continue
            cur = self._cur
            if cur is None:
                continue
            if line.startswith("GS ="):
                m = _GS.match(line)
                if m:
                    cur["gs_base"] = int(m.group(1), 16)
            elif line.startswith("EFER="):
                self._close(out)
            else:
                for name, val in _REG.findall(line):
                    cur["regs"][name.strip()] = int(val, 16)
        return out

    def _close(self, out: list) -> None:
        if self._cur is not None:
            out.append(self._cur)
            self._cur = None

    def _plugin(self, line: str) -> dict | None:
        parts = line.split()
        try:
            rec = {"type": parts[1], "tag": parts[2], "vcpu": int(parts[3]), "ns": int(parts[4]),
                   "tsc": int(parts[5])}
            for kv in parts[6:]:
                k, _, v = kv.partition("=")
                if k == "j":
                    rec["jiffies"] = int(v)
                elif k == "q":
                    q, c = int(v), rec["vcpu"]
                    last = self._q.get(c)
                    if last is not None and q > last + 1:
                        self.gaps += q - last - 1
                        if len(self.gap_at) < 8:
                            self.gap_at.append((c, last, q, self.lines))
                    self._q[c] = q
                elif k == "pid":
                    rec["pid"] = int(v)
                elif k == "err":
                    rec["err"] = int(v)
                elif k == "comm":
                    rec["comm"] = cstring(bytes.fromhex(v))   # guest bytes: sanitized
                elif k in ("sw", "mw", "rw"):
                    rec[k] = [int(x, 16) for x in v.split(",") if x]
                elif k == "b":                 # instruction bytes (the insn watch)
                    rec["bytes"] = bytes.fromhex(v)[:15]
                elif k in ("t", "st", "mva", "mpa", "va", "ra"):
                    rec[{"t": "task", "st": "state"}.get(k, k)] = int(v, 16)
        except (IndexError, ValueError):
            self.bad += 1
            return None
        return rec


class Assembler:
    """Log records -> trace events (the per-vCPU state machine).

    ``ctx`` is a :class:`sbmdbg.trace.context.GuestContext` (symbols, stack
    classes, CR3 roles, regions), ``sink`` an :class:`EventSink`."""

    def __init__(self, ctx, sink, *, x86_sbm_return: int, gs_to_cpu: dict[int, int],
                 state_off: dict[str, int], sites: dict[str, int], clock=time.time_ns,
                 code_at=None, resume_stack: str = EXCEPTION_STACK, frames=None):
        self.ctx = ctx
        self.resume_stack = resume_stack    # where the kernel returns to the sandbox (sbm.variant)
        self.frames = frames            # a frames.FrameDecoder: interrupts from @sbm F/R, not -d int
        self.source = "QEMU -d int" if frames is None else "exception frame"
        self.dint_seen: list | None = None     # frames + -d int at once: both sides of the cross-check
        self.frame_seen: list | None = None
        self.code_at = code_at          # (runtime address, n) -> vmlinux bytes or None
        self.sink = sink
        self.x86_sbm_return = x86_sbm_return
        self.gs_to_cpu = gs_to_cpu
        self.state_off = state_off
        self.sites = sites
        self.clock = clock
        self.seq = 0
        self.counts: dict[str, int] = {}
        self._pending_int: list[dict] = []        # sandbox interrupts waiting for their stamp
        self._pending_exc: dict[int, dict] = {}   # vcpu -> exception awaiting exit/resume
        self._inflight: dict[int, list] = {}      # vcpu -> [irq/nmi vectors]
        self._vcpu_ctx: dict[int, dict] = {}      # vcpu -> context of its sandbox call
        self._inside: dict[int, int] = {}         # vcpu -> sandbox CR3, between enter and exit
        self._last_ret: dict[int, int] = {}

    def _handler_stack(self) -> str | None:
        try:
            return self.ctx.handler_stack
        except AttributeError:      # a context without a kernel model (unit tests' fakes)
            return None

    # ------------------------------------------------------------ events
    def _emit(self, ev: dict) -> dict:
        ev = {"seq": self.seq, **ev}
        if ev.get("host_ns") is None:       # never stamped (a software `int n` that faulted, say)
            ev["host_ns"] = self.clock()
        self.seq += 1
        self.counts[ev["kind"]] = self.counts.get(ev["kind"], 0) + 1
        self.sink.write(ev)
        return ev

    def _state(self, words: list[int] | None) -> dict | None:
        if not words:
            return None
        return {f: words[o // 8] for f, o in self.state_off.items() if o // 8 < len(words)}

    def record(self, rec: dict) -> None:
        t = rec["type"]
        if t == "int" and self.frames is not None:
            self._dint_crosscheck(rec)
        elif t == "int":
            if rec["cpl"] == 3 and (rec["ip"] >= 1 << 47 or self._sandbox_cr3(rec["regs"].get("CR3"))):
                rec["vcpu"] = self.gs_to_cpu.get(rec["gs_base"])
                self._pending_int.append(rec)
                del self._pending_int[:-64]         # bounded: stamps can be missed
        elif t == "H":
            v = int(rec["tag"][1:])
            for i, p in enumerate(self._pending_int):
                if p["vector"] == v and p["vcpu"] in (None, rec["vcpu"]):
                    del self._pending_int[i]
                    self._sandbox_int(p, rec)
                    break
        elif t == "P":
            self._frames_flush(rec["vcpu"])
            getattr(self, "_on_" + rec["tag"], lambda r: None)(rec)
        elif t == "S":
            self._sandbox_insn(rec)
        elif t in ("F", "R", "E") and self.frames is not None:
            for r in self.frames.feed(rec):
                self._frame_int(r)

    # ------------------------------------------------------------ frames (no -d int)
    def _frames_flush(self, vcpu: int | None) -> None:
        """A frame whose registers never came (a paranoid entry: #DF, NMI)."""
        if self.frames is not None:
            for r in self.frames.flush(vcpu):
                self._frame_int(r)

    def _frame_int(self, rec: dict) -> None:
        """An int record from the plugin's frame probe: it is its own stamp."""
        if rec["cpl"] == 3 and (rec["ip"] >= 1 << 47 or self._sandbox_cr3(rec["regs"].get("CR3"))):
            if self.frame_seen is not None:
                self.frame_seen.append(rec)
            self._sandbox_int(rec, rec)

    def _dint_crosscheck(self, rec: dict) -> None:
        """Frames mode: QEMU's own record of the interrupt is only kept for the
        cross-check (frames.crosscheck), never turned into events."""
        if self.dint_seen is None:
            return
        if rec["cpl"] == 3 and (rec["ip"] >= 1 << 47 or self._sandbox_cr3(rec["regs"].get("CR3"))):
            rec["vcpu"] = self.gs_to_cpu.get(rec["gs_base"])
            self.dint_seen.append(rec)

    def _common(self, kind: str, stamp: dict, vcpu: int) -> dict:
        ev = {"kind": kind, "host_ns": stamp.get("ns"), "tsc": stamp.get("tsc"),
              "jiffies": stamp.get("jiffies"), "vcpu": vcpu}
        c = self._vcpu_ctx.get(vcpu) or {}
        for f in ("pid", "comm", "task", "sandbox"):
            ev[f] = c.get(f)
        return ev

    def _where(self, ev: dict, rip: int, rsp: int, cr3: int | None, cpl: int, vcpu: int) -> None:
        c = self._vcpu_ctx.get(vcpu) or {}
        st = c.get("st")
        ctx, task = self.ctx, c.get("task_va") or 0
        ev.update({"cpl": cpl, "rip": hx(rip), "sym": ctx.sym(rip), "rsp": hx(rsp),
                   "stack": self._stack_class(rsp, task, st, vcpu, c), "cr3": hx(cr3),
                   "cr3_role": ctx.cr3_role(cr3, st, task, c.get("pid")) if cr3 is not None else None})
        ev["mode"] = GuestContext.mode(cpl, ev["cr3_role"], st, ev["sym"], ev["stack"], self._handler_stack())

    def _stack_class(self, rsp: int, task: int, st: dict | None, vcpu: int, c: dict) -> str:
        """ctx.stack_class, the stack ranges of a sandbox call read once (at its
        enter, kept in its vCPU context ``c``) for all its events."""
        ranges_of = getattr(self.ctx, "stack_ranges", None)
        if ranges_of is None:
            return self.ctx.stack_class(rsp, task, st, vcpu)
        r = c.get("_ranges")
        if r is None or c.get("_ranges_key") != (task, vcpu):
            r = sorted(ranges_of(task, st, vcpu), key=lambda x: x.get("cpu") != vcpu)
            c["_ranges"], c["_ranges_key"] = r, (task, vcpu)
        hit = classify_in(r, rsp)
        return hit["kind"] if hit else "unknown"

    def _mode(self, ev: dict, vcpu: int) -> None:
        """The SBM model's mode for an event whose CR3 the log does not show."""
        st = (self._vcpu_ctx.get(vcpu) or {}).get("st")
        ev["mode"] = GuestContext.mode(ev["cpl"], None, st, ev.get("sym"), ev.get("stack"), self._handler_stack())

    def _sandbox_int(self, rec: dict, stamp: dict) -> None:
        vcpu = stamp["vcpu"]
        v, regs = rec["vector"], rec["regs"]
        ev = self._common("irq", stamp, vcpu)
        self._where(ev, rec["ip"], rec["sp"], regs.get("CR3"), 3, vcpu)
        ev["point"] = f"IDT vector {v:#x} ({self.source})"
        if v == 14 and rec["cr2"] == self.x86_sbm_return and rec["error"] == PF_EXIT_ERROR:
            ev.update(kind="return", ret=regs.get("RAX"), vector=14, error_code=rec["error"],
                      cr2=hx(rec["cr2"]), fault_rip=hx(rec["ip"]))
            self._last_ret[vcpu] = regs.get("RAX")
            # the exit is a kernel entry too: a GS base the sandbox changed is there at it
            # (every run of a GS attack names it here, with or without a timer interrupt inside);
            # the CPU's own base, the common case, costs no vmlinux read on this hot path
            gs = rec.get("gs_base")
            if gs is not None and gs not in self.gs_to_cpu:
                self._attack(rec, ev, only=("gs_base",))
            self._emit(ev)
            return
        if v == 2 or v >= 32:
            ev.update(kind="nmi" if v == 2 else "irq", vector=v, vector_name=vector_name(v),
                      fault_rip=hx(rec["ip"]), fault_sym=ev["sym"], fault_rsp=hx(rec["sp"]))
            self._attack(rec, ev)
            self._inflight.setdefault(vcpu, []).append(v)
            self._emit(ev)
            return
        ev.update(vector=v, vector_name=vector_name(v), error_code=rec["error"],
                  fault_rip=hx(rec["ip"]), fault_sym=ev["sym"], fault_rsp=hx(rec["sp"]),
                  fault_stack=ev["stack"], ret=regs.get("RAX"))
        if v == 14:
            c = self._vcpu_ctx.get(vcpu) or {}
            cr2 = rec["cr2"]
            ev.update(cr2=hx(cr2), address=hx(cr2), error_bits=decode_pf_error(rec["error"]),
                      error_text=describe_pf_error(rec["error"]),
                      cr2_region=self._region(cr2, c, rec["error"]))
        self._attack(rec, ev)
        self._pending_exc[vcpu] = ev

    def _sandbox_insn(self, rec: dict) -> None:
        """A sensitive instruction the sandbox is about to execute (the
        plugin's instruction watch, issue 15): its address, symbol, the bytes
        QEMU translated and their mnemonic (sbm.attack.sensitive_insn)."""
        vcpu, va, code = rec["vcpu"], rec.get("va"), rec.get("bytes") or b""
        ev = self._common("sandbox_insn", rec, vcpu)
        ev.update(point="sbmtrace instruction watch", cpl=3, mode="sandbox", rip=hx(va),
                  sym=self.ctx.sym(va) if va is not None else None,
                  insn=sensitive_insn(code) or "?", bytes=code.hex())
        self._emit(ev)

    def _sandbox_cr3(self, cr3: int | None) -> bool:
        """A sandbox's CR3 (a sandbox at a user-half RIP: after a far
        transfer into a 32-bit CS, issue 15)."""
        if cr3 is None:
            return False
        return (cr3 & ~0xFFF) in self._inside.values()   # not a freed sandbox PGD reused since

    def _attack(self, rec: dict, ev: dict, only: tuple[str, ...] | None = None) -> None:
        """Name what the sandbox tried (sbm.attack): the instruction at the
        fault RIP read from vmlinux, the frame's CS, the GS base (``only``:
        these attack classes, nothing else)."""
        ip, code, before = rec["ip"], None, b""
        if self.code_at is not None:
            code = self.code_at(ip, 16)
            before = self.code_at(ip - 4, 4) or b""
        a = classify(rec["vector"], code, before=before, cs=rec.get("cs"), gs_base=rec.get("gs_base"),
                     percpu_bases=tuple(self.gs_to_cpu), error_code=rec.get("error"))
        if a is not None and (only is None or a.name in only):
            ev.update(a.to_json())

    def _region(self, addr: int, c: dict, error: int | None = None) -> str | None:
        """Which region ``addr`` is in.  Read after the fact (the sandbox may
        be gone by now), so how the sandbox mapped it comes from the error
        code, not from a walk of its page table."""
        try:
            st = c.get("st")
            where = self.ctx.where(addr, c.get("task_va") or 0, st, (st or {}).get("sbm") or 0, None)
        except Exception:  # noqa: BLE001 - best effort: the sandbox may be gone
            return None
        if error is not None:
            where += "; sandbox: " + ("present (protection fault)" if error & 1 else "not mapped")
        return where

    def _on_enter(self, rec: dict) -> None:
        vcpu = rec["vcpu"]
        st = self._state(rec.get("sw"))
        frame = dict(zip(FRAME, rec.get("mw") or []))
        c = {"pid": rec.get("pid"), "comm": rec.get("comm"), "task": hx(rec.get("task")),
             "task_va": rec.get("task"), "sandbox": hx(rec.get("state")), "st": st}
        self._vcpu_ctx[vcpu] = c
        if (st or {}).get("sbm_cr3"):
            self._inside[vcpu] = st["sbm_cr3"]
        self._pending_exc.pop(vcpu, None)
        self._inflight.pop(vcpu, None)
        ev = self._common("enter", rec, vcpu)
        ev["point"] = "x86_sbm_exec iretq"
        cr3 = st.get("sbm_cr3") if st else None
        self._where(ev, self.sites["enter"], rec.get("mva") or 0, cr3, 0, vcpu)
        func = frame.get("rip")
        ev.update({"sbm": hx(st.get("sbm")) if st else None, "func": hx(func),
                   "func_sym": self.ctx.sym(func) if func else None,
                   "sandbox_rsp": hx(frame.get("rsp")), "sandbox_cs": hx(frame.get("cs")),
                   "sbm_cr3": hx(cr3), "exc_tos": hx(rec.get("mva", 0) + 40 if rec.get("mva") else None),
                   "sbm_tos": hx((frame.get("rsp") or 0) + 16 if frame.get("rsp") else None)})
        self._emit(ev)

    def _on_resume(self, rec: dict) -> None:
        vcpu = rec["vcpu"]
        frame = dict(zip(FRAME, rec.get("mw") or []))
        if frame.get("cs") is not None and frame["cs"] & 3 != 3:
            return      # an iretq the sandbox return shares with the kernel's (v1): not into the sandbox
        exc = self._pending_exc.pop(vcpu, None)
        if exc is not None:
            exc["kind"] = "spurious"
            self._emit(exc)
            return
        stack = self._inflight.get(vcpu) or []
        ev = self._common("irq_return", rec, vcpu)
        ev["point"] = ".Lsbm_return_to_sandbox iretq"
        ev["vector"] = stack.pop() if stack else None
        to = frame.get("rip")
        ev.update(to_rip=hx(to), to_sym=self.ctx.sym(to) if to else None, cpl=0,
                  rip=hx(self.sites.get("resume")), rsp=hx(rec.get("mva")), stack=self.resume_stack,
                  sandbox_rsp=hx(frame.get("rsp")))
        self._mode(ev, vcpu)
        self._emit(ev)

    def _on_exit(self, rec: dict) -> None:
        vcpu = rec["vcpu"]
        exc = self._pending_exc.pop(vcpu, None)
        if exc is not None:
            exc["kind"] = "abort"
            exc["via"] = f"{self.source} (the exception) + x86_sbm_return (the exit)"
            exc["sbm_error"] = rec.get("err")
            self._emit(exc)
        ev = self._common("exit", rec, vcpu)
        ev["point"] = "x86_sbm_return"
        if exc is None and rec.get("err") == -errno.ETIMEDOUT:
            ev.update(Attack("endless_loop", None, ("sbm->error -ETIMEDOUT: the sandbox time limit",)).to_json())
        ev.update(ret=None if exc else self._last_ret.pop(vcpu, None), error=rec.get("err"),
                  aborted=exc is not None or bool(rec.get("err")), cpl=0, rip=hx(self.x86_sbm_return),
                  sym=self.ctx.sym(self.x86_sbm_return))
        self._mode(ev, vcpu)
        self._emit(ev)
        self._inflight.pop(vcpu, None)
        self._inside.pop(vcpu, None)

    def flush(self) -> None:
        """The trace stops: decide what is still pending."""
        self._frames_flush(None)
        for p in self._pending_int:          # delivered but never reached a handler stamp
            self._sandbox_int(p, {"vcpu": p["vcpu"] if p["vcpu"] is not None else -1})
        self._pending_int.clear()
        for exc in list(self._pending_exc.values()):
            exc["kind"] = "abort"
            exc["via"] = f"{self.source} (trace stopped before the exit)"
            self._emit(exc)
        self._pending_exc.clear()


# ------------------------------------------------------------------ tracer
class PluginTracer(TracerBase):
    """Trace a VM started by the harness with the sbmtrace plugin loaded
    (``VMOptions(trace_plugin=True)``, the default).  ``vm`` is a
    :class:`sbmdbg.vm.VM` (its ``hmp``/``qmp`` and ``info``).

    ``source``: where sandbox interrupts come from: ``frames`` (default: the
    plugin reads the exception frame and the saved registers from guest RAM,
    see frames.py; QEMU logs nothing of its own) or ``dint`` (QEMU's ``-d
    int`` log: also the GS base at the interrupt; the cross-check)."""

    SOURCES = ("frames", "dint")

    def __init__(self, vm, path: str, kernel=None, clock=time.time_ns, force: bool = False,
                 source: str = "frames", crosscheck: bool = False):
        if source not in self.SOURCES:
            raise SbmdbgError(f"trace source {source!r}: one of {', '.join(self.SOURCES)}")
        self.source = source
        self.crosscheck = crosscheck and source == "frames"   # QEMU logs -d int too: compare
        self.vm = vm
        self.info = vm.info
        self.path = os.path.abspath(path)
        sock = self.info.get("trace_plugin")
        if not sock:
            raise SbmdbgError(f"VM {self.info.get('id')} was started without the sbmtrace plugin "
                              "(VMOptions(trace_plugin=False)): use the gdb tracer (--via gdb)")
        self.sock = sock
        self.k = kernel
        self.force = force
        self.clock = clock
        if not self.info.get("trace_log"):
            raise SbmdbgError(f"VM {self.info.get('id')} has no per-thread QEMU log (it was started "
                              "with qemu_log=...): use the gdb tracer (--via gdb)")
        self.sink: EventSink | None = None
        self.asm: Assembler | None = None
        self.ctl = None
        self.lost: str | None = None
        self._files: dict[str, tuple] = {}        # path -> (fh, LogParser)
        self.log_bytes = 0
        self._tailer = Watcher(self._tail_step, "sbm-fasttrace")
        self._lock = threading.Lock()
        self.busy_s = 0.0
        self.notes: list[str] = []
        self.frames_missing: list[int] = []     # vectors whose handler has no push to probe
        self._handler_vec: dict[int, int] = {}  # handler entering through error_entry -> vector
        self._error_entry = None
        self._paths: list[str] = []
        self._last_ns: dict[str, int] = {}
        self._glob_at = 0.0

    # ------------------------------------------------------------ setup
    def _kernel(self):
        if self.k is None:
            from sbmdbg.sbm import open_kernel
            from sbmdbg.target.qmp import QmpTarget
            from sbmdbg.target.shm import ShmTarget

            regs = QmpTarget(self.vm.hmp, self.vm.qmp)
            shm = ShmTarget(self.info["ram"], self.info["ram_size"], regs_source=regs)
            self.k = open_kernel(shm, self.info["vmlinux"])
        return self.k

    def probes(self) -> list[tuple[int, str, str, int]]:
        """(runtime address, tag, kind, words) of every probe."""
        from sbmdbg.sbm.variant import find_exit_check
        from sbmdbg.trace.points import function_code

        # code from vmlinux (link-time addresses, exact function sizes), slid
        k = self.k
        a, code = function_code(k.symbols, "x86_sbm_exec")
        i = code.find(IRETQ)
        if i < 0:
            raise SbmdbgError("no iretq in x86_sbm_exec: cannot see the sandbox enter")
        out = [(a + i + k.slide, "enter", "mem", 5), (k.sym("x86_sbm_return"), "exit", "ctx", 0)]
        try:
            b, rcode = function_code(k.symbols, "restore_regs_and_return_to_kernel", 256)
            # either shape (je to the sandbox return, or v1's jne around it inline)
            lab = find_exit_check(b, rcode, k.layouts.offsetof("pt_regs", "cs")).sandbox
            j = rcode.find(IRETQ, lab - b)
            if j < 0:
                raise SbmdbgError("no iretq after the sandbox return label")
            out.append((b + j + k.slide, "resume", "mem", 5))
        except SbmdbgError as e:
            # say so: a kernel whose sandbox return sbmdbg cannot find records no irq_return events
            self.notes.append(f"no irq_return events: {e}")
        # every IDT handler: a time stamp right after QEMU logged the delivery
        idt = k.read_virt(k.root, k.sym("idt_table"), 256 * 16)
        seen = set()
        ent = self._sbm_entry_probe() if self.source == "frames" else None
        out += ent or []
        for v in range(256):
            lo, sel, _ist, _attr, mid, hi, _r = struct.unpack_from("<HHBBHII", idt, 16 * v)
            h = lo | mid << 16 | hi << 32
            if not (_attr & 0x80) or not h or h in seen:
                continue
            seen.add(h)
            if self.source == "frames" and ent and self._enters_via_error_entry(h, v):
                continue            # the sbment probe sees it, only when it comes from a sandbox
            if self.source == "frames":
                out.extend(self._frame_probe(h, v))
                continue
            out.append((h, f"v{v}", "stamp", 0))
        if self.source == "frames" and not ent and "sync_regs" in k.symbols:
            out.append((k.sym("sync_regs"), "rg", "regs", 0))
        return out

    def _code(self, addr: int) -> bytes | None:
        """Up to 64 bytes of runtime code (alternatives applied) at ``addr``."""
        for n in (64, min(64, 4096 - (addr & 4095))):     # the next page may be unmapped
            try:
                return self.k.read_virt(self.k.root, addr, n)
            except SbmdbgError:
                continue
        return None

    def _sbm_entry_probe(self) -> list[tuple[int, str, str, int]]:
        """The sbment probe: the first store of .Lerror_entry_from_sbm, which
        must be into pt_regs->cs (``CS+8(%rsp)``), else none (every vector
        then has its frame probe)."""
        from sbmdbg.trace.frames import first_store
        from sbmdbg.sbm.variant import find_cr3_check
        from sbmdbg.trace.points import function_code

        k = self.k
        try:
            base, code = function_code(k.symbols, "error_entry")
            kcr3 = k.symbols.addr("x86_sbm_state") + k.layouts.offsetof("x86_sbm_state", "kernel_cr3")
            label = find_cr3_check(base, code, kcr3).sandbox + k.slide
        except (SbmdbgError, TypeError):
            return []
        code = self._code(label)
        st = first_store(code, label) if code else None
        if st is None or st[1] != "rsp" or st[2] != 8 + k.layouts.offsetof("pt_regs", "cs"):
            return []
        self._error_entry = k.sym("error_entry")
        return [(st[0], "en", "sbment", 0)]

    def _enters_via_error_entry(self, h: int, v: int) -> bool:
        """Does IDT vector ``v``'s handler ``h`` reach error_entry from CPL 3
        (so that the sbment probe sees it)?  It calls error_entry somewhere
        (#DB and #MC only on their from-user path, which is the only one a
        sandbox takes), or it is an external vector's stub (which jumps to
        asm_common_interrupt or asm_spurious_interrupt: the vector is then
        pt_regs->orig_ax)."""
        from sbmdbg.trace.frames import calls_to
        from sbmdbg.trace.points import function_code

        r = self.k.lookup(h)
        if r is not None and r[0] in ("irq_entries_start", "spurious_entries_start"):
            return True
        if r is None or r[1]:
            return False
        try:
            a, code = function_code(self.k.symbols, r[0], 256)
        except SbmdbgError:
            return False
        if calls_to(code, a, self._error_entry - self.k.slide):
            self._handler_vec[h] = v
            return True
        return False

    def vector_of(self, ra: int, orig_ax: int) -> int | None:
        """The vector of an entry through error_entry, from the return
        address of the handler's ``call error_entry``."""
        r = self.k.lookup(ra)
        if r is None:
            return None
        if r[0] in ("asm_common_interrupt", "asm_spurious_interrupt"):
            return orig_ax & 0xFF
        return self._handler_vec.get(ra - r[1])

    def _frame_probe(self, handler: int, v: int) -> list[tuple[int, str, str, int]]:
        """The frame probe of IDT vector ``v``: on the handler's first push
        (its runtime code: alternatives applied); none if it has no push."""
        from sbmdbg.trace.frames import first_push, frame_words

        code = self._code(handler)
        at = first_push(code, handler) if code else None
        if at is None:
            self.frames_missing.append(v)
            return []
        return [(at, f"v{v}", "frame", frame_words(v))]

    def start(self) -> dict:
        from sbmdbg.trace.qplugin import PluginControl

        k = self._kernel()
        from sbmdbg.sbm.model import require_sbm
        require_sbm(k)  # a kernel without SBM: the one "no SandBox Mode" line
        lay = k.layouts
        self.ctl = ctl = PluginControl(self.sock)
        if ctl.status()["probes"] and not self.force:
            raise SbmdbgError("the sbmtrace plugin of this VM is already armed: another trace is "
                              "running (stop it, or pass --force to take over)")
        from sbmdbg.target.shm import RamLayout
        below = RamLayout(self.info["ram_size"]).below
        ctl.cmd(f"ram {self.info['ram']} {self.info['ram_size']} {below}")
        st_size = lay.sizeof("x86_sbm_state")
        ctl.cmd(f"ctx {k.page_offset_base:#x} {lay.offsetof('task_struct', 'pid')} "
                f"{lay.offsetof('task_struct', 'comm')} "
                f"{lay.offsetof('task_struct', 'thread_info.sbm_state')} {min(st_size // 8, 24)} "
                f"{lay.offsetof('x86_sbm_state', 'sbm')} {lay.offsetof('sbm', 'error')}")
        state_off = {n: f.offset for n, f in lay.layout("x86_sbm_state").fields.items()}
        from sbmdbg.model.percpu import field_addr
        ncpus = k.target.ncpus
        gs_to_cpu = {}
        for c in range(ncpus):
            off = k.per_cpu_offset(c)
            gs_to_cpu[off & U64] = c
            va = field_addr(k, "current_task", c)
            pa = k.translate(k.root, va).pa
            if pa is None:
                raise SbmdbgError(f"cannot translate the per-CPU current_task of cpu {c}")
            ctl.cmd(f"cpu {c} {pa:#x}")
        jname = "jiffies" if "jiffies" in k.symbols else "jiffies_64"
        jpa = k.translate(k.root, k.sym(jname)).pa
        if jpa is not None:
            ctl.cmd(f"jiffies {jpa:#x}")
        ret_ip = k.sym("x86_sbm_return")
        def code_at(addr: int, n: int) -> bytes | None:
            return k.symbols.read_file_bytes((addr - k.slide) & U64, n)

        frames = None
        if self.source == "frames":
            from sbmdbg.trace.frames import FrameDecoder
            ctl.cmd(f"ptregs {lay.offsetof('pt_regs', 'ip')} {lay.sizeof('pt_regs') // 8}")
            ptregs = {n: f.offset for n, f in lay.layout("pt_regs").fields.items()}
            frames = FrameDecoder(ptregs, state_off, code_at=code_at, vector_of=self.vector_of,
                                  percpu={c: g for g, c in gs_to_cpu.items()})
        if "__entry_text_start" in k.symbols and "__entry_text_end" in k.symbols:
            # the instruction watch skips the kernel entering (no handler stamps with frames)
            ctl.cmd(f"insnskip {k.sym('__entry_text_start'):#x} {k.sym('__entry_text_end'):#x}")
        plist = self.probes()
        for addr, tag, kind, words in plist:
            ctl.cmd(f"probe {addr:#x} {tag} {kind} {words}")
        ctl.cmd("arm")
        ctl.wait_applied()
        self._mark_start()
        self.sink = EventSink(self.path)
        from sbmdbg.sbm.variant import detect
        var = detect(k)
        self.asm = Assembler(GuestContext(k), self.sink, x86_sbm_return=ret_ip, gs_to_cpu=gs_to_cpu,
                             state_off=state_off, sites={t: a for a, t, _, _ in plist},
                             clock=self.clock, code_at=code_at, frames=frames,
                             resume_stack=var.handler_stack or EXCEPTION_STACK)
        if self.crosscheck:
            self.asm.dint_seen, self.asm.frame_seen = [], []
        via = ("sbmtrace plugin: exception frames from guest RAM (the guest never stops)"
               if frames is not None else "QEMU -d int log + sbmtrace plugin (the guest never stops)")
        meta = {"kind": "trace_start", "schema": SCHEMA, "level": "plugin", "via": via,
                "slide": hx(k.slide), "ncpus": ncpus, "vmlinux": self.info.get("vmlinux"),
                "build_id": k.symbols.build_id, "x86_sbm_return": hx(ret_ip),
                "probes": [{"name": t, "site": hx(a), "kind": kd} for a, t, kd, _ in plist
                           if not t.startswith("v")],
                "stamps": sum(1 for p in plist if p[1].startswith("v")),
                "sbm_variant": var.name, "notes": list(self.notes),
                "source": self.source,
                "clocks": "host_ns: host CLOCK_REALTIME at the event (in QEMU's vCPU thread); "
                          "tsc: host TSC (under TCG the guest TSC is the host TSC plus an offset "
                          "that changes only when the VM is stopped); jiffies: the guest's"}
        self.asm._emit(meta)
        self.vm.hmp("log plugin,tid" if frames is not None and not self.crosscheck else "log int,plugin,tid")
        self._tailer.start()
        return meta

    # ------------------------------------------------------------ reading
    def _tail_step(self) -> str | bool | None:
        """Read QEMU's logs (the tailer thread): True while there was more,
        the reason when the trace is lost."""
        try:
            if self.drain():
                return True
        except Exception as e:  # noqa: BLE001 - keep the reason, never die silently
            self.lost = f"reading QEMU's log failed: {e}"
            return self.lost
        if not self._alive():
            self.lost = f"QEMU (pid {self.info.get('pid')}) died"
            return self.lost
        return None

    def _alive(self) -> bool:
        return pid_alive(self.info.get("pid"))

    def _log_glob(self) -> str:
        return self.info["trace_log"].replace("%d", "*")

    def _mark_start(self) -> None:
        """Per-thread log files outlive a trace: read each from where it ends now."""
        for path in glob.glob(self._log_glob()):
            fh = open(path, "rb")
            fh.seek(0, os.SEEK_END)
            self._files[path] = (fh, LogParser())

    def drain(self) -> int:
        """Read and process what QEMU's per-thread logs gained; the bytes read."""
        n = 0
        with self._lock:
            now = time.monotonic()
            if now >= self._glob_at:        # a new vCPU thread's file: looked for once a second
                self._glob_at = now + 1.0   # while data flows, at every idle read otherwise
                self._paths = sorted(glob.glob(self._log_glob()))
            t0 = time.perf_counter()
            per_file = []
            for path in self._paths:
                if path not in self._files:
                    self._files[path] = (open(path, "rb"), LogParser())
                fh, parser = self._files[path]
                data = fh.read(1 << 20)
                if not data:
                    continue
                n += len(data)
                per_file.append(self._stamped(path, parser.feed(data)))
            # the vCPU threads' files merged by host time (each file's own order kept), so
            # that events of different vCPUs read in one batch are written in time order
            for _, rec in heapq.merge(*per_file, key=lambda x: x[0]):
                self.asm.record(rec)
            self.busy_s += time.perf_counter() - t0
        self.log_bytes += n
        if not n:
            self._glob_at = 0.0
        return n

    def _stamped(self, path: str, recs: list[dict]) -> list[tuple[int, dict]]:
        """(host ns, record): a record without a time (QEMU's own lines) takes
        the time of the line before it in its file."""
        last = self._last_ns.get(path, 0)
        out = []
        for r in recs:
            last = r.get("ns") or last
            out.append((last, r))
        self._last_ns[path] = last
        return out

    # ------------------------------------------------------------ control
    def poll(self) -> None:
        if self.lost:
            self._seal(self.lost)
            n = self.asm.seq if self.asm else 0
            raise TraceLost(f"{self.lost}; {self.path} holds the {n} events recorded until then")

    def _seal(self, why: str) -> None:
        if self.sink is not None and not self.sink.closed:
            with self._lock:
                self.asm._emit({"kind": "trace_stop", "reason": why, "counts": dict(self.asm.counts)})
                self.sink.close()
        self._close_files()

    def stop(self) -> dict:
        """Switch QEMU's log off, disarm the plugin, read the rest, write trace_stop."""
        self.poll()
        try:
            self.vm.hmp("log tid")          # per-thread mode stays for the next trace
            self.ctl.cmd("disarm")
        except SbmdbgError:
            if not self._alive():
                self.lost = f"QEMU (pid {self.info.get('pid')}) died"
                self.poll()
            raise
        self._tailer.stop(timeout=10)
        self._glob_at = 0.0                 # every file, for the last reads
        while self.drain():
            pass
        self.asm.flush()
        st = {"file": self.path, "counts": dict(self.asm.counts), "busy_s": round(self.busy_s, 3),
              "log_lines": sum(p.lines for _, p in self._files.values()),
              "log_bad_lines": sum(p.bad for _, p in self._files.values()),
              "log_plugin_lines": sum(p.plugin_lines for _, p in self._files.values()),
              "log_plugin_gaps": sum(p.gaps for _, p in self._files.values()),
              "log_plugin_gap_at": [g for _, p in self._files.values() for g in p.gap_at],
              "log_bytes": self.log_bytes, "log_files": len(self._files),
              "plugin": self.ctl.status(), "source": self.source, "insn_watch": self._insn_watch(),
              # frames: entries whose handler the IDT does not name (no event), vectors without a probe
              "frames_unknown": self.asm.frames.unknown if self.asm.frames is not None else 0,
              "frames_missing": list(self.frames_missing)}
        if self.crosscheck:
            from sbmdbg.trace.frames import crosscheck
            st["crosscheck"] = crosscheck(self.asm.dint_seen, self.asm.frame_seen)
        self._seal("stopped")
        self.ctl.close()
        st["summary"] = summarize(read_events(self.path))
        return st

    def _insn_watch(self) -> dict:
        """The plugin's instruction watch counters: lines written, sites
        watched, sites not watched because its table was full."""
        words = self.ctl.cmd("insns").split()[2:]
        return {k: int(v) for k, v in (w.split("=", 1) for w in words)}

    def _close_files(self) -> None:
        for fh, _ in self._files.values():
            fh.close()
        self._files.clear()

    def close(self) -> None:
        self._tailer.stop()
        if self.sink is not None and not self.sink.closed:
            try:
                self.vm.hmp("log tid")
                self.ctl.cmd("disarm")
            except Exception:  # noqa: BLE001 - QEMU may be gone: nothing to undo then
                pass
            self._seal("closed")
        if self.ctl is not None:
            self.ctl.close()

