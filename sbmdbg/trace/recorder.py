"""The tracer core: turns probe hits into events.  No gdb here: the face
calls ``Tracer.hit(probe, cpu, reg)`` from a breakpoint's ``stop()`` with
``reg(name) -> int`` reading the stopped vCPU's registers, and returns False
so the guest goes on.

How a hit becomes events (per task, since a task can migrate while an
interrupt preempts its sandbox):

* x86_sbm_exec            -> ``enter`` (func = rsi is the first sandbox instruction)
* sbm_entry (an exception) -> remembered; decided at the next hit of the task:
    handle_sbm_fault       -> ``return`` (the expected #PF at x86_sbm_return,
                              P|U|I) or ``abort`` (anything else)
    sbm_resume             -> ``spurious`` (the kernel absorbed the fault)
* sbm_entry (an interrupt) -> ``irq``; sbm_nmi -> ``nmi``; sbm_resume -> ``irq_return``
* handle_sbm_fault without an sbm_entry before it (#DF, or level lean)
                           -> the vector comes from its caller (return address)
* x86_sbm_return           -> ``exit`` (rax, sbm->error: confirms return/abort)
* sbm_exec/arch_sbm_exec   -> ``call``/``arch_call``

Failures reading guest memory never stop the guest: the event is still
written, with ``read_error``.
"""
from __future__ import annotations

import errno
import time
from typing import Callable

from sbmdbg.sbm.attack import Attack, classify
from sbmdbg.trace.context import GuestContext, s32
from sbmdbg.trace.events import (
    CALLER_VECTORS, PF_EXIT_ERROR, SCHEMA, STUB_VECTORS, EventSink, decode_pf_error,
    describe_pf_error, hx, vector_name,
)

Reg = Callable[[str], int]
U64 = (1 << 64) - 1


class Tracer:
    def __init__(self, kernel, probes: dict, sink: EventSink, level: str,
                 clock: Callable[[], int] = time.time_ns, meta: dict | None = None):
        """``probes``: name -> Probe (link-time addresses); ``kernel``: the model."""
        self.k = kernel
        self.ctx = GuestContext(kernel)
        self.sink = sink
        self.level = level
        self.clock = clock
        self.slide = kernel.slide
        self.probes = probes
        self.addr = {n: p.bp_addr + kernel.slide for n, p in probes.items()}
        self.ret_ip = kernel.sym("x86_sbm_return")
        self.seq = 0
        self.hits: dict[str, int] = {n: 0 for n in probes}
        self.errors = 0
        self.last_hit: dict[int, tuple] = {}        # vcpu -> signature of its last hit
        self.duplicates = 0
        self.busy_s = 0.0                           # time spent in hit() (our share of a stop)
        self.pending_exc: dict[int, dict] = {}      # task -> exception seen at sbm_entry
        self.inflight: dict[int, list] = {}         # task -> [vector of irq/nmi being handled]
        self.last_end: dict[int, str] = {}          # task -> "return" | "abort"
        self.counts: dict[str, int] = {}
        self.started_ns = clock()
        self.stopped = False
        self._emit({"kind": "trace_start", "schema": SCHEMA, "level": level,
                    "slide": hx(kernel.slide), "ncpus": kernel.target.ncpus,
                    "probes": [p.to_json(kernel.slide) for p in probes.values()],
                    "x86_sbm_return": hx(self.ret_ip), **(meta or {})})

    # ------------------------------------------------------------ plumbing
    def _emit(self, ev: dict) -> dict:
        ev = {"seq": self.seq, **ev}
        ev.setdefault("host_ns", self.clock())
        self.seq += 1
        k = ev["kind"]
        self.counts[k] = self.counts.get(k, 0) + 1
        self.sink.write(ev)
        return ev

    def _base(self, kind: str, point: str, cpu: int, reg: Reg) -> tuple[dict, int, dict | None]:
        ctx = self.ctx
        rip, rsp, cr3, cs = reg("rip"), reg("rsp"), reg("cr3"), reg("cs")
        ev: dict = {"kind": kind, "host_ns": self.clock(), "vcpu": cpu, "point": point}
        task, st = 0, None
        try:
            ev["jiffies"] = ctx.jiffies_now()
            task = ctx.current_task(cpu)
            ev["pid"], ev["comm"] = ctx.task_brief(task)
            ev["task"] = hx(task)
            state = ctx.sbm_state(task)
            ev["sandbox"] = hx(state) if state else None
            st = ctx.state(state) if state else None
        except Exception as e:  # noqa: BLE001 - never stop the guest for a read
            ev["read_error"] = str(e)[:200]
            self.errors += 1
        try:
            role = ctx.cr3_role(cr3, st, task, ev.get("pid"))
        except Exception:  # noqa: BLE001
            role = None
        ev.update(cr3=hx(cr3), cr3_role=role, cpl=cs & 3, rip=hx(rip), sym=ctx.sym(rip), rsp=hx(rsp))
        try:
            ev["stack"] = ctx.stack_class(rsp, task, st, cpu)
        except Exception:  # noqa: BLE001
            ev["stack"] = "unknown"
        ev["mode"] = ctx.mode(cs & 3, role, st, ev["sym"], ev["stack"], ctx.handler_stack)
        return ev, task, st

    def hit(self, point: str, cpu: int, reg: Reg) -> None:
        """Record what probe ``point`` means; never raises."""
        if self.stopped:
            return
        t0 = time.perf_counter()
        try:
            sig = (point, reg("rip"), reg("rsp"), reg("rax"))
        except Exception:  # noqa: BLE001
            sig = None
        if sig is not None and self.last_hit.get(cpu) == sig:
            # The same stop reported twice (the vCPU did not move between two
            # reports, seen rarely with 2 vCPUs in all-stop): record it once.
            self.duplicates += 1
            return
        self.last_hit[cpu] = sig
        self.hits[point] = self.hits.get(point, 0) + 1
        try:
            # The guest ran since the last hit (gdb resumes it after stop()
            # returns False without a `cont` event): drop every memory cache.
            self.k.invalidate()
            getattr(self, "_on_" + point)(point, cpu, reg)
        except Exception as e:  # noqa: BLE001
            self.errors += 1
            self._emit({"kind": "error", "vcpu": cpu, "point": point, "error": f"{type(e).__name__}: {e}"[:300]})
        self.busy_s += time.perf_counter() - t0

    def _sp_adjust(self, point: str) -> int:
        p = self.probes.get(point)
        return getattr(p, "sp_adjust", 0) if p is not None else 0

    # ------------------------------------------------------------ probes
    def _on_sbm_exec(self, point, cpu, reg, kind="call"):
        ev, task, st = self._base(kind, point, cpu, reg)
        sbm, func = reg("rdi"), reg("rsi")
        ev.update(sbm=hx(sbm), func=hx(func), func_sym=self.ctx.sym(func), data=hx(reg("rdx")))
        try:
            ev["sticky_error"] = self.ctx.sbm_error(sbm)
        except Exception as e:  # noqa: BLE001
            ev["read_error"] = str(e)[:200]
        self._emit(ev)

    def _on_arch_sbm_exec(self, point, cpu, reg):
        self._on_sbm_exec(point, cpu, reg, kind="arch_call")

    def _on_x86_sbm_exec(self, point, cpu, reg):
        ev, task, _ = self._base("enter", point, cpu, reg)
        state, func = reg("rdi"), reg("rsi")
        ev.update(sandbox=hx(state), func=hx(func), func_sym=self.ctx.sym(func), args=hx(reg("rdx")),
                  sbm_tos=hx(reg("rcx")), exc_tos=hx(reg("r8")))
        try:
            st = self.ctx.state(state)
            ev["sbm"], ev["sbm_cr3"] = hx(st["sbm"]), hx(st["sbm_cr3"])
        except Exception as e:  # noqa: BLE001
            ev["read_error"] = str(e)[:200]
        self.pending_exc.pop(task, None)
        self.inflight.pop(task, None)
        self._emit(ev)

    def _on_sbm_entry(self, point, cpu, reg):
        ctx = self.ctx
        rsp = reg("rsp")
        regs = ctx.pt_regs(rsp + 8)
        stub_addr = ctx.u64(rsp)
        r = self.k.lookup(stub_addr)
        stub = r[0] if r else "?"
        vector = STUB_VECTORS.get(stub)
        if stub in ("asm_common_interrupt", "asm_spurious_interrupt"):
            vector = regs["orig_ax"] & 0xFF
        is_irq = stub.startswith("asm_sysvec_") or stub in ("asm_common_interrupt", "asm_spurious_interrupt") \
            or (vector is not None and vector >= 32)
        if is_irq:
            ev, task, st = self._base("irq", point, cpu, reg)
            ev.update(vector=vector, vector_name=vector_name(vector) if vector is not None else stub,
                      stub=stub, fault_rip=hx(regs["ip"]), fault_sym=ctx.sym(regs["ip"]),
                      fault_rsp=hx(regs["sp"]), fault_stack=ctx.stack_class(regs["sp"], task, st))
            self._attack(ev, vector, regs["ip"], regs["cs"], self._gs_base(reg))
            self.inflight.setdefault(task, []).append(vector)
            self._emit(ev)
            return
        task = ctx.current_task(cpu)
        exc = {"vector": vector, "stub": stub, "vcpu": cpu, "host_ns": self.clock(),
               "error_code": regs["orig_ax"] if regs["orig_ax"] != U64 else None,
               "fault_rip": regs["ip"], "fault_rsp": regs["sp"], "ax": regs["ax"],
               "cs": regs["cs"], "gs_base": self._gs_base(reg)}
        if vector == 14:
            exc["cr2"] = reg("cr2")
        self.pending_exc[task] = exc

    def _on_sbm_nmi(self, point, cpu, reg):
        ctx = self.ctx
        ev, task, st = self._base("nmi", point, cpu, reg)
        rsp = reg("rsp")
        ip, sp = ctx.u64(rsp + 8), ctx.u64(rsp + 32)
        ev.update(vector=2, vector_name="NMI", fault_rip=hx(ip), fault_sym=ctx.sym(ip), fault_rsp=hx(sp))
        self.inflight.setdefault(task, []).append(2)
        self._emit(ev)

    def _on_sbm_resume(self, point, cpu, reg):
        ctx = self.ctx
        regs = ctx.pt_regs(reg("rsp"))
        ev, task, st = self._base("irq_return", point, cpu, reg)
        ev.update(to_rip=hx(regs["ip"]), to_sym=ctx.sym(regs["ip"]), to_rsp=hx(regs["sp"]))
        exc = self.pending_exc.pop(task, None)
        if exc is not None:
            ev["kind"] = "spurious"
            self._fault_fields(ev, exc, task, st)
        else:
            stack = self.inflight.get(task) or []
            v = stack.pop() if stack else None
            ev.update(vector=v, vector_name=vector_name(v) if v is not None else None)
        self._emit(ev)

    def _fault_fields(self, ev: dict, exc: dict, task: int, st: dict | None) -> None:
        ctx = self.ctx
        v, err = exc.get("vector"), exc.get("error_code")
        ev.update(vector=v, vector_name=vector_name(v), error_code=err,
                  fault_rip=hx(exc["fault_rip"]), fault_sym=ctx.sym(exc["fault_rip"]),
                  fault_rsp=hx(exc["fault_rsp"]))
        if exc.get("stub"):
            ev["stub"] = exc["stub"]
        if v == 14 and err is not None:
            ev["error_bits"] = decode_pf_error(err)
            ev["error_desc"] = describe_pf_error(err)
        if exc.get("cr2") is not None:
            ev["cr2"] = hx(exc["cr2"])
            try:
                ev["cr2_region"] = ctx.region(exc["cr2"], task, st, st["sbm"] if st else 0, ev.get("vcpu"))
            except Exception as e:  # noqa: BLE001
                ev["cr2_region"] = f"? ({e})"
        try:
            ev["fault_stack"] = ctx.stack_class(exc["fault_rsp"], task, st)
        except Exception:  # noqa: BLE001
            pass
        self._attack(ev, v, exc["fault_rip"], exc.get("cs"), exc.get("gs_base"), err)

    # ------------------------------------------------------------ attacks (issue 15)
    def _gs_base(self, reg) -> int | None:
        """The GS base at the stop: still the sandbox's at sbm_entry (the
        entry code writes the kernel's after the probe)."""
        try:
            return reg("gs_base")
        except Exception:  # noqa: BLE001 - a gdb without the register
            return None

    def _percpu_bases(self) -> tuple[int, ...]:
        if getattr(self, "_bases", None) is None:
            try:
                self._bases = tuple(self.k.per_cpu_offset(c) & U64 for c in range(self.k.target.ncpus))
            except Exception:  # noqa: BLE001
                self._bases = ()
        return self._bases

    def _attack(self, ev: dict, vector, rip: int, cs=None, gs_base=None, error_code=None) -> None:
        """Name what the sandbox tried (sbm.attack): the instruction bytes at
        the fault RIP from vmlinux (never guest memory), the frame's CS, the
        GS base against the per-CPU bases."""
        k, code, before = self.k, None, b""
        try:
            link = (rip - k.slide) & U64
            code = k.symbols.read_file_bytes(link, 16)
            before = k.symbols.read_file_bytes(link - 4, 4) or b""
        except Exception:  # noqa: BLE001 - not kernel text (a 32-bit address, say)
            pass
        a = classify(vector, code, before=before, cs=cs, gs_base=gs_base,
                     percpu_bases=self._percpu_bases(), error_code=error_code)
        if a is not None:
            ev.update(a.to_json())

    def _on_handle_sbm_fault(self, point, cpu, reg):
        ctx = self.ctx
        regs_va, err, address = reg("rdi"), reg("rsi"), reg("rdx")
        ev, task, st = self._base("return", point, cpu, reg)
        regs = ctx.pt_regs(regs_va)
        caller_ip = ctx.u64(reg("rsp") + self._sp_adjust(point))
        r = self.k.lookup(caller_ip)
        caller = r[0] if r else None
        exc = self.pending_exc.pop(task, None)
        if exc is None or exc.get("error_code") not in (None, err):
            exc = {"vector": CALLER_VECTORS.get(caller or ""), "error_code": err,
                   "fault_rip": regs["ip"], "fault_rsp": regs["sp"], "ax": regs["ax"]}
            if exc["vector"] == 14:
                exc["cr2"] = address
        exit_ok = address == self.ret_ip and regs["ip"] == self.ret_ip and err == PF_EXIT_ERROR
        ev["kind"] = "return" if exit_ok else "abort"
        ev.update(via=caller, address=hx(address), ret=s32(regs["ax"]))
        self._fault_fields(ev, exc, task, st)
        if ev.get("vector") is None and caller:
            ev["vector_name"] = f"other (via {caller})"
        if ev["kind"] == "abort" and st:
            try:                # the time limit sets sbm->error before the abort
                if self.ctx.sbm_error(st["sbm"]) == -errno.ETIMEDOUT:
                    ev.update(Attack("endless_loop", ev.get("attack_insn"),
                                     ("sbm->error -ETIMEDOUT: the sandbox time limit",)).to_json())
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.inflight.pop(task, None)
        self.last_end[task] = ev["kind"]
        self._emit(ev)

    def _on_x86_sbm_return(self, point, cpu, reg):
        if reg("cs") & 3:
            # TCG checks breakpoints before the fetch faults: the sandbox's
            # `ret` to x86_sbm_return stops here once at CPL 3 before the #PF.
            self.ret_seen = getattr(self, "ret_seen", 0) + 1
            return
        ev, task, st = self._base("exit", point, cpu, reg)
        ev["ret"] = s32(reg("rax"))
        try:
            if st:
                ev["sbm"] = hx(st["sbm"])
                ev["error"] = self.ctx.sbm_error(st["sbm"])
                ev["aborted"] = ev["error"] != 0
                if ev["error"] == -errno.ETIMEDOUT:
                    ev.update(Attack("endless_loop", None,
                                     ("sbm->error -ETIMEDOUT: the sandbox time limit",)).to_json())
                last = self.last_end.pop(task, None)
                if last is not None:
                    ev["agrees"] = (last == "abort") == ev["aborted"]
        except Exception as e:  # noqa: BLE001
            ev["read_error"] = str(e)[:200]
        self._emit(ev)

    # ------------------------------------------------------------ end
    def stop(self, reason: str = "stopped") -> dict:
        if self.stopped:
            return self.status()
        self.stopped = True
        self._emit({"kind": "trace_stop", "reason": reason, "hits": dict(self.hits),
                    "counts": dict(self.counts), "errors": self.errors,
                    "duplicates": self.duplicates})
        self.sink.close()
        return self.status()

    def status(self) -> dict:
        return {"file": self.sink.path, "level": self.level, "events": self.seq, "hits": dict(self.hits),
                "counts": dict(self.counts), "errors": self.errors, "stopped": self.stopped,
                "busy_s": round(self.busy_s, 3), "duplicates": self.duplicates,
                "seconds": round((self.clock() - self.started_ns) / 1e9, 3)}
