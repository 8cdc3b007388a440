"""The VM harness: boot the reference kernel under QEMU (TCG) and drive it.

``with VM(VMOptions(...)) as vm:`` boots and always kills QEMU (by pid) and
removes its sockets and RAM file on the way out, exceptions included.  A VM
can be detached (``vm.detach()``): QEMU keeps running, a state file
``<cache>/vms/<id>.json`` describes it, and later processes reach it with
``VM.attach(id)`` (``sbmdbg vm run``, ``sbmdbg vm stop``).
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import cache_root
from sbmdbg.vm.qemu import (QEMU, VMOptions, VMPaths, check_kernel_image, free_port, kernel_cmdline, parse_mem,
                            qemu_command)
from sbmdbg.vm.serial import RunResult, SerialConsole

READY_MARKER = "SBMDBG-READY"
_live: dict[int, "VM"] = {}


def _vms_dir() -> Path:
    d = cache_root() / "vms"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _workdir_for(vm_id: str) -> Path:
    wd = _vms_dir() / vm_id
    if len(str(wd / "serial.sock")) > 100:  # AF_UNIX path limit
        wd = Path("/tmp") / f"sbmdbg-vm-{vm_id}"
    return wd


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _pdeathsig() -> None:
    """In the QEMU child: die with the parent (a crashed test leaves no QEMU)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def pid_alive(pid: int, vm_id: str | None = None) -> bool:
    """Is *pid* a live QEMU (of VM *vm_id*, if given)?"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    if "qemu-system" not in cmdline:
        return False
    return vm_id is None or f"sbmdbg-{vm_id}" in cmdline or f"/{vm_id}/" in cmdline


def kill_pid(pid: int, proc: subprocess.Popen | None = None, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after *grace* seconds; reaps if it is our child."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                if proc.poll() is not None:
                    return
            elif not pid_alive(pid):
                return
            time.sleep(0.05)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _note_boot(vm_id: str, pid: int) -> None:
    """One line per QEMU started, in $SBMDBG_BOOT_LOG when it is set (the test
    suite counts its boots with it, subprocesses included)."""
    log = os.environ.get("SBMDBG_BOOT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"id": vm_id, "pid": pid,
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "")}) + "\n")


class VM:
    """A QEMU guest running the reference kernel and the sbmdbg initramfs."""

    def __init__(self, opts: VMOptions | None = None, *, boot: bool = True,
                 detach: bool = False, **kw):
        self.opts = opts if opts is not None else VMOptions(**kw)
        self.id = uuid.uuid4().hex[:10]
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.serial: SerialConsole | None = None
        self.info: dict = {}
        self.owned = True       # we started it: close() stops it
        self.detached = False
        self.paths: VMPaths | None = None
        self.boot_seconds: float | None = None
        self._detachable = detach
        if boot:
            try:
                self._boot()
            except BaseException:
                self.close()
                raise
            if detach:
                self.detach()

    # ------------------------------------------------------------ boot
    def _boot(self) -> None:
        from sbmdbg.kernel.initramfs import ensure_initramfs

        opts = self.opts
        if opts.kernel is None:
            from sbmdbg.kernel.build import ensure_kernel

            kb = ensure_kernel()
            kernel, vmlinux, tree = str(kb.bzImage), str(kb.vmlinux), str(kb.tree)
        else:
            kernel, vmlinux, tree = opts.kernel, opts.vmlinux, opts.tree
            if not Path(kernel).is_file():
                raise SbmdbgError(f"kernel image {kernel} not found")
            check_kernel_image(kernel)
        initrd = opts.initrd or str(ensure_initramfs())
        if opts.trace_plugin is True:
            from sbmdbg.vm.qplugin import plugin_path

            opts.trace_plugin = str(plugin_path())
        if shutil.which(QEMU) is None:
            raise SbmdbgError(f"{QEMU} not found (apt-get install qemu-system-x86)")

        remove_stale_ram_files()
        workdir = _workdir_for(self.id)
        workdir.mkdir(parents=True, exist_ok=True)
        self.paths = paths = VMPaths.for_id(self.id, workdir)
        t0 = time.monotonic()
        for attempt in range(3):
            port = free_port()
            cmd = qemu_command(opts, paths, port, kernel, initrd)
            with open(paths.stderr, "w") as err:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                             cwd=workdir, start_new_session=True,
                                             preexec_fn=None if self._detachable else _pdeathsig)
            self.pid = self.proc.pid
            _live[id(self)] = self
            # QEMU creates the sockets before the guest runs; wait for them.
            deadline = time.monotonic() + 15
            while not paths.serial.exists() and self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.proc.poll() is None:
                break
            stderr = paths.stderr.read_text(errors="replace")
            if "Address already in use" in stderr and attempt < 2:
                continue  # the gdb port was taken between free_port() and QEMU
            raise SbmdbgError(f"QEMU exited at start (status {self.proc.returncode}): "
                              f"{_tail(stderr, 5) or 'no message'}")
        _note_boot(self.id, self.pid)
        self.serial = SerialConsole(str(paths.serial))
        self.info = {
            "id": self.id,
            "pid": self.pid,
            "gdb": f"127.0.0.1:{port}",
            "qmp": str(paths.qmp),
            "qmp_harness": str(paths.qmp_harness),
            "serial": str(paths.serial),
            "console_log": str(paths.console_log),
            "ram": str(paths.ram),
            "ram_size": parse_mem(opts.mem),
            "vmlinux": vmlinux,
            "tree": tree,
            "kernel": kernel,
            "initrd": initrd,
            "workdir": str(workdir),
            "smp": opts.smp,
            "pti": opts.pti,
            "kaslr": opts.kaslr,
            "la57": opts.la57,
            "cmdline": kernel_cmdline(opts),
            "trace_plugin": str(workdir / "sbmtrace.sock") if opts.trace_plugin else None,
            "trace_log": (str(workdir / "qemu-%d.log") if opts.trace_plugin and not opts.qemu_log
                          else None),
            "qemu_log": opts.qemu_log,
        }
        self._wait_ready(opts.boot_timeout)
        self.boot_seconds = time.monotonic() - t0
        self.info["boot_seconds"] = round(self.boot_seconds, 2)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if READY_MARKER in self.console_text():
                # Let the shell start and settle its prompt before the first run().
                if self.serial is not None:
                    self.serial.wait_for(lambda t: "# " in t.split(READY_MARKER, 1)[-1], 5)
                return
            exited = self.proc is not None and self.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                what = (f"QEMU exited (status {self.proc.returncode}) before the guest was ready"
                        if exited else f"guest not ready after {timeout:g} s")
                tail = _tail(self.console_text()) or "(no console output)"
                stderr = ""
                if self.paths is not None and self.paths.stderr.exists():
                    stderr = _tail(self.paths.stderr.read_text(errors="replace"), 5)
                raise SbmdbgError(f"boot failed: {what}",
                                  detail="console tail:\n" + tail + (f"\nqemu: {stderr}" if stderr else ""))
            time.sleep(0.1)

    # ------------------------------------------------------------ guest I/O
    def console_text(self) -> str:
        """The whole serial console output so far (QEMU's own log of it)."""
        path = self.info.get("console_log") or (self.paths and str(self.paths.console_log))
        try:
            return Path(path).read_text(errors="replace") if path else ""
        except OSError:
            return self.serial.text() if self.serial else ""

    def run(self, cmd: str, timeout: float = 30.0) -> RunResult:
        """Run a shell command in the guest; output and exit status."""
        if self.serial is None or not self.serial.connected:
            if not self.alive():
                raise SbmdbgError(f"VM {self.id} is not running",
                                  detail=_tail(self.console_text(), 10))
            self.serial = SerialConsole(self.info["serial"])
        try:
            return self.serial.run(cmd, timeout=timeout)
        except SbmdbgError as exc:
            if "did not finish" not in str(exc.args[0]):
                raise
            # a shell that does not answer: say what QEMU sees (run state, each vCPU, its APIC)
            raise SbmdbgError(exc.args[0], detail=exc.detail + "\n" + self.stuck_report()) from None

    def stuck_report(self) -> str:
        """QEMU's view of a guest whose shell does not answer: the run state and,
        per vCPU, RIP/CPL/RFLAGS/HLT/CR3 and the local APIC's in-service and pending vectors."""
        import re

        lines = []
        try:
            lines.append(f"qemu status: {self.qmp('query-status', timeout=10)['status']}")
            for cpu in range(len(self.qmp("query-cpus-fast", timeout=10))):
                regs = self.hmp("info registers", cpu_index=cpu)
                apic = self.hmp("info lapic", cpu_index=cpu)
                want = ("RIP", "RFL", "CPL", "HLT", "CR3")
                got = {k: m.group(1) for k in want
                       for m in [re.search(rf"\b{k}=(\S+)", regs)] if m}
                isr = re.search(r"^ISR\s+(.*)$", apic, re.M)
                irr = re.search(r"^IRR\s+(.*)$", apic, re.M)
                lines.append(f"cpu {cpu}: " + " ".join(f"{k}={v}" for k, v in got.items())
                             + f" ISR={isr.group(1).strip() if isr else '?'}"
                             + f" IRR={irr.group(1).strip() if irr else '?'}")
        except Exception as exc:  # noqa: BLE001 - a report, never a second failure
            lines.append(f"(QEMU state unavailable: {exc})")
        return "\n".join(lines)

    def qmp(self, cmd: str, timeout: float | None = None, **args):
        """One QMP command (``cpu_index=`` becomes ``cpu-index``); its ``return`` value.
        Connects for each command (the harness's own socket stays free).  ``timeout``:
        seconds to wait for the answer (the client's default when None)."""
        from sbmdbg.vm.qmp import QmpClient

        return QmpClient(self.info.get("qmp_harness") or self.info["qmp"],
                         keep_open=False).cmd(cmd, timeout=timeout, **args)

    def hmp(self, cmdline: str, cpu_index: int | None = None) -> str:
        """A human monitor command (e.g. ``info registers``) on one vCPU."""
        args = {"command_line": cmdline}
        if cpu_index is not None:
            args["cpu_index"] = cpu_index
        return self.qmp("human-monitor-command", **args)

    # ------------------------------------------------------------ lifetime
    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and pid_alive(self.pid, self.id)

    def detach(self) -> dict:
        """Leave QEMU running after this process; write the state file; return info.

        Only for a VM made with ``VM(opts, detach=True)`` (others die with
        their parent process).
        """
        if not self._detachable:
            raise SbmdbgError("this VM was not started detachable (use VM(opts, detach=True))")
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        self.detached = True
        self.owned = False
        _live.pop(id(self), None)
        state = _vms_dir() / f"{self.id}.json"
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=2) + "\n")
        tmp.rename(state)
        return dict(self.info)

    @classmethod
    def attach(cls, vm_id: str | None = None) -> "VM":
        """A handle on a detached VM (the only one if *vm_id* is None)."""
        running = list_vms()
        if vm_id is None:
            if not running:
                raise SbmdbgError("no detached VM is running (start one: sbmdbg vm start --detach)")
            if len(running) > 1:
                raise SbmdbgError("several VMs are running; name one: "
                                  + " ".join(i["id"] for i in running))
            info = running[0]
        else:
            matches = [i for i in running if i["id"].startswith(vm_id)]
            if len(matches) != 1:
                raise SbmdbgError(f"no running VM {vm_id!r}" if not matches
                                  else f"VM id {vm_id!r} is ambiguous")
            info = matches[0]
        vm = cls(VMOptions(), boot=False)
        vm.id, vm.info, vm.pid = info["id"], info, info["pid"]
        vm.owned, vm.detached = False, True
        vm.paths = VMPaths.for_id(vm.id, Path(info["workdir"]))
        return vm

    def stop(self) -> None:
        """Stop QEMU even if this handle did not start it."""
        self.owned = True
        self.close()

    def close(self) -> None:
        """Disconnect; if we own the VM, kill QEMU and remove its files."""
        if self.serial is not None:
            self.serial.close()
            self.serial = None
        _live.pop(id(self), None)
        if not self.owned:
            return
        if self.pid is not None and (self.proc is not None or pid_alive(self.pid, self.id)):
            kill_pid(self.pid, self.proc)
        if self.paths is not None:
            for p in (self.paths.qmp, self.paths.qmp_harness, self.paths.serial, self.paths.ram):
                try:
                    p.unlink()
                except OSError:
                    pass
        (_vms_dir() / f"{self.id}.json").unlink(missing_ok=True)
        self.pid = None if self.proc is None else self.pid

    def __enter__(self) -> "VM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VM {self.id} pid={self.pid} gdb={self.info.get('gdb')}>"


def _qemu_cmdlines() -> list[str]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmd:
                out.append(cmd.decode(errors="replace"))
    return out


def remove_stale_ram_files() -> list[str]:
    """Delete /dev/shm/sbmdbg-<id>.ram files no running QEMU uses (a killed test's)."""
    files = list(Path("/dev/shm").glob("sbmdbg-*.ram"))
    if not files:
        return []
    cmdlines = _qemu_cmdlines()
    removed = []
    for f in files:
        if not any(str(f) in c for c in cmdlines):
            f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


def list_vms() -> list[dict]:
    """Running detached VMs; state files of dead ones are removed."""
    out = []
    for state in sorted(_vms_dir().glob("*.json")):
        try:
            info = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(info.get("pid", -1), info.get("id")):
            out.append(info)
        else:
            state.unlink(missing_ok=True)
            Path(info.get("ram", "/nonexistent")).unlink(missing_ok=True)
    return out


@atexit.register
def _cleanup_at_exit() -> None:
    for vm in list(_live.values()):
        try:
            vm.close()
        except Exception:
            pass
