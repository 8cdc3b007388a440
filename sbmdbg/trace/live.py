"""Out-of-process tracing: a gdb (pygdbmi) runs the in-gdb tracer
(``sbm trace start --file F``) and the guest continues; this process only
watches.  No stop goes over MI: the probes are gdb-internal breakpoints whose
``stop()`` returns False.

API (for the CLI, tests and the dashboard)::

    rec = TraceRecorder(vm_info, "t.jsonl", level="full")   # vm.info or a detached VM's info
    rec.start()                 # attach gdb, set the probes, resume the guest
    rec.wait(5)                 # or rec.poll() in your own loop; raises TraceLost
    summary = rec.stop()        # interrupt, stop the trace, detach (the guest runs on)
    events = rec.events()       # read_events(path) at any time, also while recording

If QEMU dies or gdb goes away, ``poll``/``wait``/``stop`` raise ``TraceLost``
within about 0.2 s of noticing (the poll period is 0.1 s); the file keeps
every event recorded so far and gets a ``trace_stop`` line saying why.

``GdbTracer(gdb_session)`` is the one driver of the in-gdb tracer: the
recorder, the dashboard and ``sbmdbg check`` start, pause (``stop_guest``:
``sbm trace hold``, then interrupt until no posted resume is left), resume
(``sbm trace release``) and stop it through it.
"""
from __future__ import annotations

import json
import os
import threading
import time

from sbmdbg.errors import SbmdbgError
from sbmdbg.trace.events import read_events, summarize


class TraceLost(SbmdbgError):
    pass


def keep_polling(poll, seconds: float, until=None, period: float = 0.1) -> None:
    """Call ``poll()`` (which raises when the trace is lost) every ``period``
    for ``seconds``, or until ``until()`` is true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        poll()
        if until is not None and until():
            return
        time.sleep(period)
    poll()


class Watcher:
    """A daemon thread that calls ``step()`` every ``period`` s until
    :meth:`stop`, or until ``step()`` returns a reason (a string, kept in
    ``reason``); ``step()`` returning True means there is more to do at once."""

    def __init__(self, step, name: str, period: float = 0.02):
        self.step, self.name, self.period = step, name, period
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.reason = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.step()
            if isinstance(r, str):
                self.reason = r
                return
            if r is not True:
                time.sleep(self.period)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


class GdbTracer:
    """Drives ``sbm trace`` in a GdbSession (``g``).  Probe stops resume
    themselves (a posted ``continue&``), so stopping the guest while tracing
    is: ``sbm trace hold`` first, then interrupt until gdb stays quiet."""

    def __init__(self, g):
        self.g = g
        self.on = False

    def start(self, path: str, level: str = "full", emulate: bool = False, ram: str | None = None,
              ram_size: int | None = None) -> dict:
        """Stop the guest (it stays stopped: ``resume()``), read RAM from
        ``ram`` when given, set the probes; the ``sbm trace start`` JSON."""
        g = self.g
        self.stop_guest()
        if ram:
            g.console(f"sbm target shm {ram} {ram_size or ''}".strip())
        info = g.sbm_json(f"sbm trace start --file {path} --level {level}" + (" --emulate" if emulate else ""),
                          timeout=120)
        self.on = True
        return info

    def hold(self, timeout: float = 10.0) -> None:
        """The next probe stop stays stopped (allowed while the guest runs)."""
        if self.on:
            self.g.console("sbm trace hold", timeout=timeout)

    def stop_guest(self, step: float = 5.0) -> None:
        """Every vCPU stopped; ``step`` bounds each wait for gdb."""
        g = self.g
        if not g.alive():
            raise SbmdbgError("gdb exited")
        self.hold(timeout=2 * step)
        quiet = 0
        deadline = time.monotonic() + 6 * step
        for _ in range(100):
            if time.monotonic() > deadline:
                break
            if not g.alive():
                raise SbmdbgError("gdb exited")
            g.poll(0.02)
            if g.running:
                quiet = 0
                try:
                    g.mi("-exec-interrupt --all", timeout=step)
                except SbmdbgError:
                    if not g.alive():
                        raise SbmdbgError("gdb exited") from None
                try:
                    g.wait_stopped(timeout=step)
                except SbmdbgError:
                    pass
            else:
                quiet += 1
                if quiet >= 3:   # no *running for 60 ms: a posted tracer resume would have shown
                    return
        raise SbmdbgError("the guest did not stop")

    def resume(self) -> None:
        """Continue the guest; the tracer resumes past its probes again."""
        if self.on:
            self.g.console("sbm trace release", timeout=10)
        self.g.cont()

    def stop(self, step: float = 5.0) -> dict:
        """Stop the guest and end the trace (gdb writes trace_stop); the
        ``sbm trace stop`` JSON.  The guest stays stopped."""
        try:
            for _ in range(20):
                self.stop_guest(step)
                text, err = self.g.console_result("sbm trace stop --json", timeout=60)
                if err is None:
                    from sbmdbg.vm.gdbmi import parse_json_object
                    return parse_json_object(text) or {}
                if "running" not in err:
                    raise SbmdbgError(f"sbm trace stop: {err}")
                self.g.running = True   # gdb interrupted it itself: wait for that stop
            raise SbmdbgError("sbm trace stop: the guest kept running")
        finally:
            self.on = False


class TracerBase:
    """What both out-of-process tracers share (``TraceRecorder`` here and
    ``fast.PluginTracer``): their ``poll()`` raises TraceLost, ``close()``
    ends them, ``path`` is the JSON-lines file."""
    path: str

    def poll(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def wait(self, seconds: float, until=None, period: float = 0.1) -> None:
        """Keep the trace running for ``seconds`` (or until ``until()`` is true)."""
        keep_polling(self.poll, seconds, until, period)

    def events(self) -> list[dict]:
        return read_events(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TraceRecorder(TracerBase):
    def __init__(self, vm_info: dict, path: str, level: str = "full", gdb_addr: str | None = None,
                 emulate: bool = False):
        self.info = vm_info
        self.emulate = emulate
        self.path = os.path.abspath(path)
        self.level = level
        self.gdb_addr = gdb_addr or vm_info["gdb"]
        self.g = None
        self.tracer: GdbTracer | None = None
        self.started = None
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._drain = Watcher(self._drain_step, "sbm-trace-drain")

    # ------------------------------------------------------------ control
    def start(self) -> dict:
        from sbmdbg.vm.gdbmi import GdbSession

        info = self.info
        self.g = GdbSession(info["vmlinux"], info.get("tree"), self.gdb_addr)
        self.tracer = GdbTracer(self.g)
        try:
            start = self.tracer.start(self.path, self.level, self.emulate, info["ram"], info.get("ram_size"))
            self.tracer.resume()
        except BaseException:
            self.g.close()
            self.g = None
            raise
        self.started = time.monotonic()
        self._drain.start()
        return start

    def _drain_step(self) -> str | None:
        """Read gdb's MI output all the time: each probe stop prints a
        *stopped/*running pair, and a full pipe would block gdb."""
        with self._lock:
            return self._check()

    def _stop_drain(self) -> None:
        self._drain.stop()

    def poll(self) -> None:
        """Raise TraceLost if QEMU or gdb is gone (checked every 20 ms by the
        drain thread, or here when it is not running)."""
        if self.lost:
            raise TraceLost(self.lost)
        if self._drain.running():
            return
        why = self._drain.reason
        if why is None:
            with self._lock:
                why = self._check()
        if why:
            self._stop_drain()
            self._lose(why)

    def _check(self) -> str | None:
        why = None
        if not pid_alive(self.info.get("pid")):
            why = f"QEMU (pid {self.info.get('pid')}) died"
        elif self.g is None:
            why = "gdb is not running"
        else:
            status = self.g.exit_status()
            if status is not None:
                why = f"gdb exited (status {status})"
            else:
                try:
                    recs = self.g.poll(0)
                except SbmdbgError as e:
                    recs, why = [], f"gdb went away ({e})"
                for r in recs:
                    msg = str(r.get("payload") or "")
                    if r.get("message") == "thread-group-exited" or "Remote connection closed" in msg \
                            or "Remote communication error" in msg:
                        why = "gdb lost the target (" + (msg.strip() or r.get("message")) + ")"
                    if r.get("message") == "stopped" and (r.get("payload") or {}).get("reason") in (
                            "exited", "exited-normally", "exited-signalled"):
                        why = f"the target stopped: {(r.get('payload') or {}).get('reason')}"
        return why

    def _lose(self, why: str) -> None:
        n = self._seal(why)
        self.lost = f"{why}; {self.path} holds the {n} events recorded until then"
        if self.g is not None:
            self.g.close()
            self.g = None
        raise TraceLost(self.lost)

    def _seal(self, why: str) -> int:
        """Append a trace_stop line if the writer could not (gdb or QEMU died)."""
        try:
            evs = read_events(self.path)
        except SbmdbgError:
            return 0
        if evs and evs[-1].get("kind") != "trace_stop":
            # let a gdb that is still closing finish its own line first
            if self.g is not None:
                try:
                    self.g.close()
                except Exception:  # noqa: BLE001
                    pass
                self.g = None
                evs = read_events(self.path)
            if evs[-1].get("kind") != "trace_stop":
                with open(self.path, "ab") as fh:
                    fh.write((json.dumps({"seq": evs[-1]["seq"] + 1, "kind": "trace_stop",
                                          "host_ns": time.time_ns(), "reason": why,
                                          "sealed_by": "sbmdbg trace (the recorder died)"},
                                         separators=(",", ":")) + "\n").encode())
        return len(evs)

    def stop(self) -> dict:
        """Interrupt, end the trace (gdb writes trace_stop), detach; the summary."""
        self.poll()
        self._stop_drain()
        self.poll()
        g = self.g
        try:
            st = self.tracer.stop()
            try:
                g.mi("-target-detach", timeout=5)
            except SbmdbgError:
                pass
        except SbmdbgError as e:
            self.poll()           # raises TraceLost if that is why
            self._lose(f"stopping the trace failed: {e}")
        finally:
            if self.g is not None:
                self.g.close()
                self.g = None
        st["summary"] = summarize(self.events())
        return st

    def close(self) -> None:
        self._stop_drain()
        if self.g is not None:
            self.g.close()
            self.g = None

