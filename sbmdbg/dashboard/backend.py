"""The dashboard's data side (no Textual here): connections to a guest, one
snapshot of every panel as a JSON-able dict, and the controls.

How a refresh reads the guest (the guest is never stopped for it):

* registers: QMP ``human-monitor-command "info registers"`` with ``cpu-index``
  (QEMU answers between TCG slices; the vCPUs keep running);
* memory: the harness's shared ``memory-backend-file`` (``/dev/shm``), mmapped;
* the SBM model (``sbmdbg.sbm``) on a ``Kernel`` over that target, with every
  cache dropped first (``kernel.invalidate()``).

A running guest can change between the register read and the memory reads;
a panel that fails to decode shows its error instead (bounded walks, no
evaluation of guest data).  gdb (pygdbmi) is used only for the controls:
pause/continue (``-exec-interrupt``/``-exec-continue``), ``stepi`` on one
vCPU, and the transition tracer, which runs inside that same gdb
(``sbm trace start --file F``; QEMU's gdbstub takes one client) and writes
JSON lines that ``TraceTail`` reads incrementally.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from sbmdbg.errors import SbmdbgError
from sbmdbg.vm.qmp import QmpClient

SCENARIOS = ("ok", "io", "write_ro_input", "read_guard", "write_kernel_data", "write_kernel_bss",
             "write_stack", "stack_overflow", "noncanonical", "read_null", "irq_in_sandbox", "repeat 20")
DEMO_RUN = "/sys/kernel/debug/sbm_demo/run"


def scenario_command(name: str) -> str:
    if not re.fullmatch(r"[a-z_]+( \d{1,5})?", name):
        raise SbmdbgError(f"bad scenario name {name!r}")
    return f"echo {name} > {DEMO_RUN}; cat {DEMO_RUN}"


# ---------------------------------------------------------------- connection
@dataclass
class Conn:
    """Where the guest is.  ``vm`` is set when the dashboard started it."""
    gdb: str | None
    qmp: str
    vmlinux: str
    tree: str | None = None
    ram: str | None = None
    ram_size: int | None = None
    serial: str | None = None
    console_log: str | None = None
    pid: int | None = None
    vm: object = None
    vm_id: str | None = None
    label: str = ""


def conn_from_info(info: dict, vm=None) -> Conn:
    return Conn(gdb=info["gdb"], qmp=info.get("qmp_harness") or info["qmp"], vmlinux=info["vmlinux"],
                tree=info.get("tree"), ram=info.get("ram"), ram_size=info.get("ram_size"),
                serial=info.get("serial"), console_log=info.get("console_log"), pid=info.get("pid"),
                vm=vm, vm_id=info.get("id"), label=f"VM {info.get('id')}")


def start_vm(smp: int = 2, pti: str = "off", mem: str = "512M") -> Conn:
    from sbmdbg.kernel.build import ensure_kernel
    from sbmdbg.vm import VM, VMOptions

    kb = ensure_kernel()
    vm = VM(VMOptions(smp=smp, pti=pti, mem=mem, kernel=str(kb.bzImage), vmlinux=str(kb.vmlinux),
                      tree=str(kb.tree)))
    c = conn_from_info(vm.info, vm)
    c.label = f"VM {vm.id} (started by the dashboard)"
    return c


def attach_vm(vm_id: str | None) -> Conn:
    from sbmdbg.vm import VM

    return conn_from_info(VM.attach(vm_id).info)


def explicit_conn(gdb: str, qmp: str, vmlinux: str, ram: str | None = None, ram_size: int | None = None,
                  serial: str | None = None, tree: str | None = None) -> Conn:
    if not os.path.isfile(vmlinux):
        raise SbmdbgError(f"--vmlinux {vmlinux} not found")
    if not os.path.exists(qmp):
        raise SbmdbgError(f"--qmp {qmp}: no such socket")
    if ram is None:
        # a local QEMU serving this gdb port with a shared memory-backend-file?
        from sbmdbg.target import shm
        find = getattr(shm, "find_ram_file", None)
        port = (gdb or "").rpartition(":")[2]   # no --gdb: nothing to look up
        found = find(int(port)) if find and port.isdigit() else None
        if found:
            ram, ram_size = found["path"], found["size"]
    return Conn(gdb=gdb, qmp=qmp, vmlinux=vmlinux, tree=tree, ram=ram, ram_size=ram_size, serial=serial,
                label=f"gdb {gdb}, qmp {qmp}")


# ---------------------------------------------------------------- trace tail
class TraceTail:
    """Incremental reader of a trace file (JSON lines): last events, rates,
    aborts by reason.  Only complete lines are consumed."""

    RATE_WINDOW_S = 5.0

    def __init__(self, keep: int = 200):
        self.path: str | None = None
        self.off = 0
        self.partial = b""
        self.last: collections.deque = collections.deque(maxlen=keep)
        self.recent: collections.deque = collections.deque()   # (host seconds, kind)
        self.counts: collections.Counter = collections.Counter()
        self.aborts: collections.Counter = collections.Counter()
        self.total = 0

    def follow(self, path: str) -> None:
        self.path, self.off, self.partial = path, 0, b""

    def poll(self) -> int:
        if not self.path:
            return 0
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.off)
                data = fh.read(4 << 20)
        except OSError:
            return 0
        self.off += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        now = time.time()
        n = 0
        for ln in lines:
            if not ln.strip():
                continue
            try:
                ev = json.loads(ln)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            self.add(ev, now)
            n += 1
        return n

    def add(self, ev: dict, now: float | None = None) -> None:
        k = str(ev.get("kind"))
        self.total += 1
        self.counts[k] += 1
        self.last.append(ev)
        ns = ev.get("host_ns")   # when the tracer recorded it (host clock), else now
        self.recent.append((ns / 1e9 if isinstance(ns, int) else time.time() if now is None else now, k))
        if k == "abort":
            self.aborts[abort_reason(ev)] += 1

    def rates(self, now: float | None = None) -> dict:
        """Events per second over the last RATE_WINDOW_S seconds (host time)."""
        now = time.time() if now is None else now
        while self.recent and self.recent[0][0] < now - self.RATE_WINDOW_S:
            self.recent.popleft()
        c = collections.Counter(k for _, k in self.recent if k not in ("trace_start", "trace_stop"))
        return {k: round(v / self.RATE_WINDOW_S, 2) for k, v in sorted(c.items())}

    def to_json(self, last: int = 30) -> dict:
        return {"file": self.path, "events": self.total, "counts": dict(self.counts),
                "aborts_by_reason": dict(self.aborts.most_common()), "per_second": self.rates(),
                "window_s": self.RATE_WINDOW_S, "last": list(self.last)[-last:]}


class AbortWhys:
    """The one-line ``sbm why`` of the latest abort events of a trace (the
    model of ``sbmdbg trace why``: vmlinux's instruction and DWARF line, the
    access from the error code, the tracer's region label).  Each abort is
    explained once, cached by its seq; a failed explanation is cached too."""

    LATEST = 4          # aborts explained per refresh (the newest ones)
    KEEP = 256          # cached lines (oldest dropped first)

    def __init__(self, image_factory):
        self._factory = image_factory   # () -> an image for sbmdbg.sbm.why.explain
        self._image = None
        self.cache: collections.OrderedDict = collections.OrderedDict()
        self.computed = 0               # explanations computed (not cache hits)

    def update(self, events) -> dict:
        """{str(seq): line} for the newest ``LATEST`` aborts among ``events``."""
        abs_ = [e for e in events if e.get("kind") == "abort" and isinstance(e.get("seq"), int)]
        out = {}
        for ev in abs_[-self.LATEST:]:
            seq = ev["seq"]
            if seq not in self.cache:
                self.cache[seq] = self._line(ev)
                self.computed += 1
                while len(self.cache) > self.KEEP:
                    self.cache.popitem(last=False)
            out[str(seq)] = self.cache[seq]
        return out

    def _line(self, ev: dict) -> str:
        from sbmdbg.sbm import why as W
        from sbmdbg.text import clean
        from sbmdbg.trace import why as TW

        try:
            if self._image is None:
                self._image = self._factory()
            return clean(W.one_line(TW.explain_event(self._image, ev)))
        except Exception as e:  # noqa: BLE001 - a malformed event or no DWARF: say so, once
            return clean(f"no explanation: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def abort_reason(ev: dict) -> str:
    """Short reason of an abort event: vector + #PF kind + region."""
    s = str(ev.get("vector_name") or "?")
    if ev.get("error_desc"):
        s += " " + str(ev["error_desc"])
    region = str(ev.get("cr2_region") or "")
    if region:
        s += " @ " + region.split(";")[0].split(":")[0]
    return s


# ---------------------------------------------------------------- backend
@dataclass
class Timing:
    ms: dict = field(default_factory=dict)

    def lap(self, name: str, t0: float) -> float:
        t = time.perf_counter()
        self.ms[name] = round((t - t0) * 1e3, 2)
        return t


class Backend:
    """Connections + snapshot + controls.  Methods are thread-safe: the
    Textual app calls them from worker threads."""

    def __init__(self, conn: Conn, trace_level: str = "fast", use_gdb: bool = True):
        self.conn = conn
        self.trace_level = trace_level
        self.use_gdb = use_gdb
        self.qmp = QmpClient(conn.qmp, timeout=10)
        self.kernel = None
        self.g = None
        self.tracer = None       # GdbTracer over self.g: the in-gdb transition tracer
        self.paused = False
        self.selected = 0
        self.trace = TraceTail()
        self.whys = AbortWhys(self._why_image)
        self.tmpdir = tempfile.mkdtemp(prefix="sbmdbg-dash-")
        self.gdb_lock = threading.RLock()
        self.model_lock = threading.Lock()
        self.messages: collections.deque = collections.deque(maxlen=6)
        self._serial = None
        self._pt_cache: dict = {}
        self.closed = False
        self._close_lock = threading.Lock()
        self.last_refresh_ms: float | None = None

    # ------------------------------------------------------------ setup
    def open(self) -> "Backend":
        try:
            self._open_model()
            if self.use_gdb and self.conn.gdb:
                self._open_gdb()
        except BaseException:
            self.close()
            raise
        return self

    def _open_model(self) -> None:
        from sbmdbg.sbm import open_kernel
        from sbmdbg.target.qmp import QmpTarget
        from sbmdbg.target.shm import ShmTarget

        regs = QmpTarget(self.qmp.hmp, self.qmp.cmd)
        if self.conn.ram:
            target = ShmTarget(self.conn.ram, self.conn.ram_size, regs_source=regs)
        else:
            target = regs   # pmemsave through QMP: slow, but works without a RAM file
            self.note("no RAM file: guest memory through QMP pmemsave (slow); pass --ram")
        self.kernel = open_kernel(target, self.conn.vmlinux)

    def _open_gdb(self) -> None:
        from sbmdbg.trace.live import GdbTracer
        from sbmdbg.vm.gdbmi import GdbSession

        g = GdbSession(self.conn.vmlinux, self.conn.tree, self.conn.gdb)
        self.g = g
        self.tracer = GdbTracer(g)
        g.console("set scheduler-locking step")
        if self.conn.ram:
            g.console(f"sbm target shm {self.conn.ram} {self.conn.ram_size or ''}".strip())
        g.cont()   # target remote stopped the guest

    def _why_image(self):
        """vmlinux + the live slide, no page tables: the aborts' sandboxes are
        gone when the panel shows them (the model of ``trace why``)."""
        from sbmdbg.sbm import why as W

        return W.OfflineImage(self.kernel.symbols, self.kernel.slide)

    @property
    def tracing(self) -> bool:
        return self.tracer is not None and self.tracer.on

    @property
    def ncpus(self) -> int:
        return self.kernel.target.ncpus if self.kernel else 0

    def note(self, msg: str) -> None:
        self.messages.append((time.strftime("%H:%M:%S"), msg))

    # ------------------------------------------------------------ snapshot
    def snapshot(self, full: bool = True) -> dict:
        """Every panel's data.  ``full=False`` skips the sandbox page-table walk."""
        with self.model_lock:
            return self._snapshot(full)

    def _snapshot(self, full: bool) -> dict:
        from sbmdbg.commands import TABLE
        from sbmdbg.jsonutil import jsonable
        from sbmdbg.sbm import model as M
        from sbmdbg.sbm import stacks as S

        k = self.kernel
        tm = Timing()
        t0 = t = time.perf_counter()
        self.poll_gdb()
        k.invalidate()
        snap: dict = {"running": not self.paused, "tracing": self.tracing, "selected": self.selected,
                      "label": self.conn.label, "trace_level": self.trace_level}
        try:
            st = TABLE["status"].compute(k)   # the vCPUs panel: `sbm --json`
            snap["sbm"], snap["note"] = st["sbm"], st["note"]
            cpus = st["cpus"]
        except Exception as e:  # noqa: BLE001 - a running guest moved under us
            cpus, snap["cpus_error"] = [], f"{type(e).__name__}: {e}"
        t = tm.lap("status", t)
        for r in cpus:
            c = r["cpu"]
            try:
                pc = M.pcpu_fields(k, c)
                r["preempt_count"] = pc.get("preempt_count", 0) & 0xFFFFFFFF
                r["top_of_stack"] = pc.get("top_of_stack", 0) & M.U64
                r["top_of_intr_stack"] = S.top_of_intr_stack(k, c)
            except Exception as e:  # noqa: BLE001
                r["stack_error"] = str(e)
        snap["cpus"] = cpus
        if self.paused and 0 <= self.selected < len(cpus):
            try:
                bt = S.backtrace(k, self.selected, max_frames=12)
                snap["backtrace"] = jsonable(bt)
            except Exception as e:  # noqa: BLE001
                snap["backtrace"] = {"error": str(e)}
        t = tm.lap("stacks", t)
        snap["sandboxes"] = self._sandboxes(full)
        t = tm.lap("sandboxes", t)
        self.trace.poll()
        snap["trace"] = self.trace.to_json()
        snap["trace"]["why"] = self.whys.update(snap["trace"]["last"])
        t = tm.lap("trace", t)
        snap["console"] = self.console_tail()
        t = tm.lap("console", t)
        snap["messages"] = list(self.messages)
        tm.ms["total"] = round((time.perf_counter() - t0) * 1e3, 2)
        snap["timing_ms"] = tm.ms
        self.last_refresh_ms = tm.ms["total"]
        return snap

    def _sandboxes(self, full: bool) -> list[dict]:
        from sbmdbg.sbm import audit as AU
        from sbmdbg.jsonutil import jsonable
        from sbmdbg.sbm import model as M
        from sbmdbg.sbm import regions as RG

        k = self.kernel
        out = []
        try:
            if not M.has_sbm(k):
                return []
            sbs = M.sandboxes(k)
        except Exception as e:  # noqa: BLE001
            return [{"error": f"{type(e).__name__}: {e}"}]
        for sb in sbs:
            d = jsonable(sb.to_json())
            if full:
                try:
                    lm = RG.labeled_map(k, sb)
                    findings = AU.audit_ranges(lm["ranges"], M.state_page_views(k, sb), sb.sbm)
                    findings += AU.out_of_object(lm["ranges"], lm["regions"])
                    d["pt_summary"] = pt_summary(lm["ranges"])
                    d["audit"] = [{"severity": f["severity"], "rule": f["rule"], "message": f["message"],
                                   "pages": f["pages"]} for f in findings]
                    d["audit_worst"] = AU.worst(findings)
                except Exception as e:  # noqa: BLE001
                    d["pt_error"] = f"{type(e).__name__}: {e}"
            out.append(d)
        return out

    # ------------------------------------------------------------ console
    def console_text(self) -> str:
        if self.conn.console_log:
            try:
                with open(self.conn.console_log, "rb") as fh:
                    fh.seek(0, 2)
                    size = fh.tell()
                    fh.seek(max(0, size - 16384))
                    return fh.read().decode("utf-8", errors="replace")
            except OSError:
                pass
        s = self._serial_conn(hold=True)
        return s.text()[-16384:] if s is not None else ""

    def console_tail(self, n: int = 60) -> list[str]:
        return clean_console(self.console_text()).splitlines()[-n:]

    def _serial_conn(self, hold: bool):
        from sbmdbg.vm.serial import SerialConsole

        vm = self.conn.vm
        if vm is not None and getattr(vm, "serial", None) is not None:
            return vm.serial
        if self._serial is not None and self._serial.connected:
            return self._serial
        if not self.conn.serial or not hold:
            return None
        self._serial = SerialConsole(self.conn.serial, connect_timeout=2)
        return self._serial

    def send_line(self, line: str) -> None:
        """Type a line into the guest's shell (serial console)."""
        if not self.conn.serial:
            raise SbmdbgError("no serial console (pass --serial SOCK)")
        line = line.replace("\r", "").replace("\n", " ")
        s = self._serial_conn(hold=not self.conn.console_log)
        if s is not None:
            s.send(line + "\n")
        else:   # attached harness VM: connect per line (do not hog its only serial client slot)
            from sbmdbg.vm.serial import SerialConsole
            s = SerialConsole(self.conn.serial, connect_timeout=2)
            try:
                s.send(line + "\n")
                time.sleep(0.05)
            finally:
                s.close()
        self.note(f"sent: {line[:60]}")

    def run_scenario(self, name: str) -> None:
        self.send_line(scenario_command(name))

    def run_and_wait(self, name: str, timeout: float = 60.0) -> str:
        """Run a scenario and wait for its result line on the console."""
        start = len(self.console_text_full())
        self.run_scenario(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(rf"scenario={re.escape(name.split()[0])} .*result=\S+", self.console_text_full()[start:])
            if m:
                return m.group(0)
            time.sleep(0.1)
        raise SbmdbgError(f"scenario {name} gave no result in {timeout:g} s")

    def console_text_full(self) -> str:
        if self.conn.console_log:
            try:
                with open(self.conn.console_log, "rb") as fh:
                    return fh.read().decode("utf-8", errors="replace")
            except OSError:
                pass
        return self.console_text()

    def break_during(self, symbol: str, scenario: str, timeout: float = 60.0) -> dict:
        """A temporary breakpoint at ``symbol``, then the scenario: the guest
        stays stopped there (paused) until resume()."""
        with self.gdb_lock:
            g = self._need_gdb()
            self._stop_guest()
            try:
                r = g.mi(f"-break-insert -t {symbol}")
            except SbmdbgError:
                self._run_guest()
                raise
            bkpt = str(((r.get("payload") or {}).get("bkpt") or {}).get("number"))
            self._run_guest()
        self.run_scenario(scenario)
        deadline = time.monotonic() + timeout
        with self.gdb_lock:
            while time.monotonic() < deadline:
                g.poll(0.05)
                st = g.last_stop or {}
                if not g.running and st.get("bkptno") == bkpt:
                    break
            else:
                raise SbmdbgError(f"{symbol} was not reached in {timeout:g} s")
            self.tracer.hold()
            self.paused = True
            tid = str(st.get("thread-id") or "")
            if tid.isdigit():
                self.selected = int(tid) - 1      # QEMU's gdbstub: thread N = vCPU N-1
        self.kernel.invalidate()
        self.note(f"stopped at {symbol} (scenario {scenario})")
        return st

    # ------------------------------------------------------------ gdb controls
    def _need_gdb(self):
        if self.g is None:
            raise SbmdbgError("no gdb attached (the dashboard runs without --gdb)")
        return self.g

    def poll_gdb(self) -> None:
        """Drain gdb's MI output (each trace probe stop prints records)."""
        if self.g is None:
            return
        with self.gdb_lock:
            try:
                self.g.poll(0)
            except SbmdbgError as e:
                self.note(f"gdb: {e}")
                self.g = None

    def _stop_guest(self, step: float = 5.0) -> None:
        """All vCPUs stopped (holding the tracer's own resumes first); ``step``
        bounds each wait for gdb."""
        self._need_gdb()
        self.tracer.stop_guest(step)

    def _run_guest(self) -> None:
        self._need_gdb()
        self.tracer.resume()

    def pause(self) -> None:
        with self.gdb_lock:
            self._stop_guest()
            self.paused = True
        self.kernel.invalidate()
        self.note("paused (all vCPUs stopped)")

    def resume(self) -> None:
        with self.gdb_lock:
            self._run_guest()
            self.paused = False
        self.note("continued")

    def toggle_pause(self) -> None:
        self.resume() if self.paused else self.pause()

    def stepi(self, cpu: int | None = None) -> dict:
        """One instruction on vCPU ``cpu`` (gdb thread cpu+1); the others stay stopped."""
        cpu = self.selected if cpu is None else cpu
        with self.gdb_lock:
            g = self._need_gdb()
            if not self.paused:
                self._stop_guest()
                self.paused = True
            g.mi(f"-thread-select {cpu + 1}")
            g.mi("-exec-step-instruction")
            stop = g.wait_stopped(timeout=30)
        self.kernel.invalidate()
        frame = (stop or {}).get("frame") or {}
        self.note(f"stepi on vCPU {cpu}: {frame.get('addr', '?')} {frame.get('func', '')}")
        return stop

    def select(self, cpu: int) -> None:
        if 0 <= cpu < max(self.ncpus, 1):
            self.selected = cpu

    def trace_on(self) -> dict:
        with self.gdb_lock:
            self._need_gdb()
            if self.tracing:
                return {}
            if not self.conn.ram:
                raise SbmdbgError("the tracer needs the guest RAM file (--ram)")
            path = os.path.join(self.tmpdir, f"trace-{int(time.time())}.jsonl")
            was_running = not self.paused
            try:
                info = self.tracer.start(path, self.trace_level)   # `sbm target shm` was set at attach
                self.trace.follow(path)
            finally:
                if was_running:
                    self._run_guest()
        self.note(f"trace on ({self.trace_level}, {len(info.get('probes', []))} probes)")
        return info

    def trace_off(self) -> dict:
        with self.gdb_lock:
            g = self._need_gdb()
            if not self.tracing:
                return {}
            was_running = not self.paused
            try:
                st = self.tracer.stop()
            finally:
                if was_running:
                    g.cont()
        self.trace.poll()
        self.note(f"trace off: {st.get('events')} events")
        return st

    def toggle_trace(self) -> None:
        self.trace_off() if self.tracing else self.trace_on()

    # ------------------------------------------------------------ timing
    def measure_stopped(self, repeat: int = 10) -> dict:
        """Refresh of every panel with the guest stopped, caches dropped each time."""
        was = self.paused
        if not was:
            if self.g is not None:
                self.pause()
            else:
                self.qmp.cmd("stop")
                self.paused = True   # a paused refresh also walks the selected vCPU's backtrace
        try:
            self.snapshot()
            ts = []
            for _ in range(repeat):
                ts.append(self.snapshot()["timing_ms"])
        finally:
            if not was:
                if self.g is not None:
                    self.resume()
                else:
                    self.qmp.cmd("cont")
                    self.paused = False
        tot = sorted(t["total"] for t in ts)
        sbs = [s.get("label") for s in self.snapshot()["sandboxes"] if "label" in s]
        return {"ncpus": self.ncpus, "repeat": repeat, "sandboxes": sbs, "median_ms": tot[len(tot) // 2], "min_ms": tot[0],
                "max_ms": tot[-1], "parts_ms_last": ts[-1], "goal_ms": 50.0,
                "meets_goal": tot[len(tot) // 2] <= 50.0}

    def measure_running(self, repeat: int = 10) -> dict:
        """The same refresh while the guest runs (registers over QMP, RAM by mmap)."""
        if self.paused:
            return {}
        ts = sorted(self.snapshot()["timing_ms"]["total"] for _ in range(repeat))
        return {"repeat": repeat, "median_ms": ts[len(ts) // 2], "min_ms": ts[0], "max_ms": ts[-1]}

    # ------------------------------------------------------------ lifetime
    def close(self) -> dict:
        """Never leaves the guest stopped or QEMU orphaned: stop the trace,
        continue the guest, detach gdb; kill the VM if we started it."""
        with self._close_lock:
            if self.closed:
                return {}
            self.closed = True
            return self._close()

    def _close(self) -> dict:
        out: dict = {}
        g = self.g
        if g is not None:
            with self.gdb_lock:
                try:
                    # detach needs a stopped target; QEMU's gdbstub resumes the VM on detach
                    self._stop_guest(step=1.0)
                    if self.tracing:
                        out["trace_events"] = self.tracer.stop(step=1.0).get("events")
                    g.mi("-target-detach", timeout=5)
                    out["detached"] = True
                except SbmdbgError as e:
                    out["gdb_error"] = str(e).splitlines()[0]
                finally:
                    g.close()
                    self.g = None
        # whatever happened above: the guest must run when we leave
        try:
            if (self.qmp.cmd("query-status") or {}).get("status") != "running":
                self.qmp.cmd("cont")
                out["continued_by_qmp"] = True
            out["guest"] = "running"
        except SbmdbgError as e:
            out["guest"] = f"unknown ({e})"
        self.paused = False
        self.qmp.close()
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        if self.kernel is not None:
            try:
                self.kernel.target.close()
                rs = getattr(self.kernel.target, "regs_source", None)
                if rs is not None:
                    rs.close()
            except Exception:  # noqa: BLE001
                pass
        vm = self.conn.vm
        if vm is not None:
            vm.close()
            out["vm_stopped"] = True
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        return out


# ---------------------------------------------------------------- helpers
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def clean_console(text: str) -> str:
    """Serial output as plain printable text: ANSI sequences removed, any other
    C0/C1 control shown visibly (sbmdbg.text), CRLF -> LF (the guest cannot
    restyle the dashboard)."""
    from sbmdbg.text import clean

    text = text.replace("\r\n", "\n").replace("\r", "")
    return clean(_ANSI.sub("", text), multiline=True)


def pt_summary(ranges: list[dict]) -> list[dict]:
    """Labeled ranges -> one row per (region kind, perms, global): pages, ranges, first VA."""
    from sbmdbg.sbm.regions import perm_str

    agg: dict[tuple, dict] = {}
    for r in ranges:
        key = (r["kind"], perm_str(r["perms"]), bool(r["global"]))
        a = agg.get(key)
        if a is None:
            a = agg[key] = {"kind": r["kind"], "perms": key[1], "global": key[2], "pages": 0, "ranges": 0,
                            "va": r["va"], "name": r["name"]}
        a["pages"] += r["pages"]
        a["ranges"] += 1
    return sorted(agg.values(), key=lambda a: a["va"])
