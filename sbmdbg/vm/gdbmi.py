"""A gdb/MI driver (pygdbmi) for tests and out-of-process faces.

Every command carries a token and is written with ``read_response=False``;
responses are polled until the result record with that token arrives, so
nothing relies on pygdbmi's "0.2 s of silence" heuristic.
"""

from __future__ import annotations

import itertools
import json
import select
import shutil
import socket
import time
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import gdb_script

GDB_SCRIPT = gdb_script()


def mi_quote(text: str) -> str:
    """A C string for MI (``-interpreter-exec console "..."``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def parse_json_object(text: str):
    """The first JSON object or array in ``text`` (gdb may print lines before
    it), or None."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text[i:])[0]
            except ValueError:
                continue
    return None


def check_listening(addr: str, timeout: float = 2.0) -> tuple[str, int]:
    """Parse HOST:PORT and check something accepts connections there."""
    host, sep, port_s = addr.rpartition(":")
    if not sep or not port_s.isdigit():
        raise SbmdbgError(f"bad gdb stub address {addr!r} (want HOST:PORT)")
    host = host or "127.0.0.1"
    port = int(port_s)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise SbmdbgError(f"nothing listening at {host}:{port} ({exc.strerror or exc})") from None
    return host, port


class GdbSession:
    """gdb (MI3) attached to a guest: ``console()``, ``sbm_json()``, ``mi()``,
    ``interrupt()``, ``cont()``, ``poll()``, ``alive()``."""

    def __init__(self, vmlinux: str | Path, tree: str | Path | None = None,
                 gdb_addr: str | None = None, *, load_sbmdbg: bool = True,
                 timeout: float = 120.0):
        from pygdbmi.gdbcontroller import GdbController

        vmlinux = Path(vmlinux)
        if not vmlinux.is_file():
            raise SbmdbgError(f"vmlinux {vmlinux} not found")
        if shutil.which("gdb") is None:
            raise SbmdbgError("gdb not found (apt-get install gdb)")
        self._tokens = itertools.count(100)
        self.running = False
        self.connected = False             # attached to a gdb stub (detached on close)
        self.events: list[dict] = []      # async records seen (notify/exec)
        self.last_stop: dict | None = None
        self.resumes = 0                   # *running records seen
        self._gdb = GdbController(command=["gdb", "--interpreter=mi3", "-nx", "-q"],
                                  time_to_check_for_additional_output_sec=0.01)
        try:
            self.mi("-gdb-set mi-async on")
            self.console("set pagination off")
            self.console("set confirm off")
            self.console("set width 0")
            self.mi(f"-file-exec-and-symbols {mi_quote(str(vmlinux))}", timeout=timeout)
            if tree is not None:
                tree = Path(tree)
                self.console(f"add-auto-load-safe-path {tree}")
                from sbmdbg.kernel.build import foreign_comp_dirs

                for d in foreign_comp_dirs(tree, vmlinux):
                    self.console(f"set substitute-path {d} {tree}")
                gdbpy = tree / "vmlinux-gdb.py"
                if gdbpy.exists():
                    self.console(f"source {gdbpy}", timeout=timeout)
            if load_sbmdbg:
                self.console(f"source {GDB_SCRIPT}", timeout=timeout)
            if gdb_addr is not None:
                check_listening(gdb_addr)
                self.mi(f"-target-select remote {gdb_addr}", timeout=timeout)
                self.running = False
                self.connected = True
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ plumbing
    def poll(self, timeout: float = 0.0) -> list[dict]:
        """Read what gdb printed (up to ``timeout`` s): the records, after
        noting ``*running``/``*stopped`` (``running``, ``last_stop``, ``events``).
        Front ends call it to drain gdb while the guest runs."""
        if self._gdb is None:
            raise SbmdbgError("gdb went away: the session is closed")
        try:
            out = self._gdb.get_gdb_response(timeout_sec=timeout, raise_error_on_timeout=False)
        except Exception as exc:  # gdb died: pygdbmi raises a plain exception
            raise SbmdbgError(f"gdb went away: {exc}") from exc
        for r in out:
            if r.get("type") == "notify":
                self.events.append(r)
                if r.get("message") == "stopped":
                    self.running = False
                    self.last_stop = r.get("payload")
                elif r.get("message") == "running":
                    self.running = True
                    self.resumes += 1
        return out

    @property
    def pid(self) -> int | None:
        proc = getattr(self._gdb, "gdb_process", None) if self._gdb is not None else None
        return proc.pid if proc is not None else None

    def exit_status(self) -> int | None:
        """gdb's exit status once it has exited (-1 once closed); None while it runs."""
        proc = getattr(self._gdb, "gdb_process", None) if self._gdb is not None else None
        if proc is None:
            return -1
        return proc.poll()

    def alive(self) -> bool:
        return self.exit_status() is None

    def _exec(self, line: str, timeout: float, keep_on_error: bool = False) -> tuple[dict, list[dict]]:
        """Send one MI line with a token; wait for its result record (an error
        result raises SbmdbgError unless ``keep_on_error``)."""
        token = next(self._tokens)
        if self._gdb is None:
            raise SbmdbgError("gdb went away: the session is closed")
        try:
            self._gdb.write(f"{token}{line}", read_response=False)
        except Exception as exc:
            raise SbmdbgError(f"gdb went away: {exc}") from exc
        seen: list[dict] = []
        deadline = time.monotonic() + timeout
        while True:
            # poll(0) + select on gdb's pipes: back as soon as the result record
            # is read (pygdbmi's own timed read lingers 10 ms after any output)
            for r in self.poll(0):
                seen.append(r)
                if r.get("type") == "result" and r.get("token") == token:
                    if r.get("message") == "error" and not keep_on_error:
                        msg = (r.get("payload") or {}).get("msg", "unknown error")
                        raise SbmdbgError(f"gdb: {msg}")
                    return r, seen
            left = deadline - time.monotonic()
            if left <= 0:
                raise SbmdbgError(f"gdb did not answer {line!r} in {timeout:g} s")
            self._wait_output(min(0.1, left))

    def _wait_output(self, timeout: float) -> None:
        """Until gdb wrote something (or ``timeout``); raises once gdb exited."""
        proc = getattr(self._gdb, "gdb_process", None) if self._gdb is not None else None
        if proc is None or proc.poll() is not None:
            raise SbmdbgError("gdb went away")
        fds = [f.fileno() for f in (proc.stdout, proc.stderr) if f is not None]
        try:
            select.select(fds, [], [], timeout)
        except (OSError, ValueError):
            time.sleep(min(timeout, 0.01))

    def mi(self, cmd: str, timeout: float = 30.0) -> dict:
        """Run an MI command; its result record (``message``, ``payload``)."""
        result, _ = self._exec(cmd, timeout)
        return result

    def console(self, cmd: str, timeout: float = 30.0) -> str:
        """Run a CLI command; the console text it printed."""
        return self.console_result(cmd, timeout, raise_error=True)[0]

    def console_result(self, cmd: str, timeout: float = 30.0, raise_error: bool = False) -> tuple[str, str | None]:
        """Run a CLI command; (the console text it printed, gdb's error or None).
        Keeps the text of a command that prints and then fails (``sbm audit``
        above info) unless ``raise_error``."""
        result, seen = self._exec(f"-interpreter-exec console {mi_quote(cmd)}", timeout,
                                  keep_on_error=not raise_error)
        text = "".join(r.get("payload") or "" for r in seen if r.get("type") == "console" and r.get("payload"))
        err = (result.get("payload") or {}).get("msg", "unknown error") if result.get("message") == "error" else None
        return text, err

    def sbm_json(self, cmd: str, timeout: float = 120.0, fail_ok: bool = False) -> dict:
        """Run an ``sbm ...`` command with ``--json``; its one JSON object.
        A command that fails raises SbmdbgError, unless ``fail_ok`` and it
        printed its JSON first (``sbm audit`` above info)."""
        if "--json" not in cmd.split():
            cmd += " --json"
        text, err = self.console_result(cmd, timeout)
        doc = parse_json_object(text)
        if err is not None and (doc is None or not fail_ok):
            raise SbmdbgError(f"gdb: {err}")
        if doc is None:
            raise SbmdbgError(f"`{cmd}` printed no JSON: {text.strip()[:300]!r}")
        return doc

    def wait_stopped(self, timeout: float = 30.0) -> dict:
        """Wait for a ``*stopped`` record; its payload."""
        deadline = time.monotonic() + timeout
        while self.running:
            self.poll(0.1)
            if time.monotonic() > deadline:
                raise SbmdbgError(f"target did not stop in {timeout:g} s")
        return self.last_stop or {}

    # ------------------------------------------------------------ execution
    def interrupt(self, timeout: float = 30.0) -> dict:
        """Stop all vCPUs; the ``*stopped`` payload."""
        self.poll(0)
        if not self.running:
            return self.last_stop or {}
        self.mi("-exec-interrupt --all", timeout=timeout)
        return self.wait_stopped(timeout)

    def cont(self, timeout: float = 30.0) -> None:
        """Resume all vCPUs and wait until gdb says they run."""
        self.poll(0)
        if self.running:
            return
        before = self.resumes
        self.mi("-exec-continue --all", timeout=timeout)
        deadline = time.monotonic() + timeout
        # *running, even when a breakpoint stopped it again in the same read
        while self.resumes == before:
            self.poll(0.1)
            if time.monotonic() > deadline:
                raise SbmdbgError(f"target did not resume in {timeout:g} s")

    def break_and_wait(self, symbol: str, timeout: float = 60.0) -> dict:
        """Temporary breakpoint at *symbol*, continue, wait for the hit; the stop payload."""
        was_running = self.running
        if was_running:
            self.interrupt()
        self.mi(f"-break-insert -t {symbol}")
        self.cont()
        stop = self.wait_stopped(timeout)
        if stop.get("reason") != "breakpoint-hit":
            raise SbmdbgError(f"stopped for {stop.get('reason')!r}, not at {symbol}")
        return stop

    # ------------------------------------------------------------ lifetime
    def detach(self, timeout: float = 10.0) -> None:
        """Leave the guest running and the stub free: stop it if it runs, then
        ``-target-detach`` (QEMU's stub resumes every vCPU on gdb's ``D``).
        gdb's own exit does not do this: quitting while the target runs it
        cannot detach ("Cannot execute this command while the target is
        running"), and about one close in ten then left QEMU paused (measured:
        a guest whose shell never answered again; the exact path was not traced)."""
        if not getattr(self, "connected", False) or getattr(self, "_gdb", None) is None:
            return
        self.poll(0)
        if self.running:
            self.interrupt(timeout=timeout)
        self.mi("-target-detach", timeout=timeout)
        self.connected = False

    def close(self) -> None:
        """Detach (the guest runs on), then end gdb (the stub then accepts the next client)."""
        gdb = getattr(self, "_gdb", None)
        if gdb is None:
            return
        try:
            self.detach()
        except Exception:  # noqa: BLE001 - gdb or QEMU already gone: nothing to detach
            pass
        self._gdb = None
        proc = getattr(gdb, "gdb_process", None)
        try:
            gdb.exit()
        except Exception:
            pass
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=5)
            except Exception:
                pass

    def __enter__(self) -> "GdbSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
