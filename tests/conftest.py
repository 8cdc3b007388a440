"""Shared fixtures.  Teammates' live tests use these; keep names and signatures.

    kernel_build                 session: KernelBuild (ensure_kernel())
    make_vm(**VMOptions fields)  factory: a booted VM of this test alone, always stopped at test end
    shared_vm(**VMOptions fields) factory: a VM shared by every test that asks for the same
                                 options (booted once per session; see VMPool).  Tests that kill
                                 QEMU or gdb use end_vm, tests that need a broken kernel make_vm.
    end_vm(**VMOptions fields)   factory: the pool's idle VM for those options, taken out of the
                                 pool (else a fresh one), for a test that ends it; stopped after it
    vm_pool                      session: the VMPool (scenario files take their VMs from it too)
    logged_vms(pti, last=False)  session: (detached VM, its QEMU -d int log), one per PTI setting;
                                 logged_vms.started[pti]: the JSON `sbmdbg vm start` printed for it
    gdb_session(vm, **kw)        factory: a GdbSession attached to vm, always closed
    boots                        the QEMU processes started by this test so far (BootLog)

Every test must carry the ``unit`` or the ``live`` marker (collection fails
otherwise), and the terminal summary counts the VMs the run booted.

A test that ends a shared VM (``end_vm``, ``logged_vms(pti, last=True)``)
carries ``@pytest.mark.ends_vm``: those tests run after all the others (in
collection order among themselves), so each one takes its configuration's VM
at its last use instead of booting one (under ``-n N`` they stay with their
file: correct, one boot more).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest

from sbmdbg.kernel.build import KernelBuild, ensure_kernel

BOOT_LOG_ENV = "SBMDBG_BOOT_LOG"   # sbmdbg.vm.vm writes one line per QEMU it starts


def pytest_configure(config):
    """SIGTERM (CI time-out, kill) unwinds like Ctrl-C so fixtures stop QEMU and gdb."""
    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass
    if not os.environ.get(BOOT_LOG_ENV):
        fd, path = tempfile.mkstemp(prefix="sbmdbg-boots-", suffix=".jsonl")
        os.close(fd)
        os.environ[BOOT_LOG_ENV] = path
        config._sbmdbg_boot_log_owned = path
    from sbmdbg.check import pytest_plugin

    config.stash[pytest_plugin.VM_FACTORY] = _check_vm_factory(config)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    pool = config.stash.get(_POOL, None)
    if pool is not None:
        pool.close()
    path = getattr(config, "_sbmdbg_boot_log_owned", None)
    if path:
        Path(path).unlink(missing_ok=True)
        os.environ.pop(BOOT_LOG_ENV, None)


class BootLog:
    """The QEMU starts recorded in $SBMDBG_BOOT_LOG (in-process and by subprocesses)."""

    @staticmethod
    def entries() -> list[dict]:
        path = os.environ.get(BOOT_LOG_ENV)
        if not path or not Path(path).exists():
            return []
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def __init__(self, nodeid: str):
        self.nodeid = nodeid

    def pids(self) -> list[int]:
        """QEMU pids started while this test ran (the harness's own record, not pgrep)."""
        return [e["pid"] for e in self.entries() if e["test"].split(" (")[0] == self.nodeid]


@pytest.fixture
def boots(request) -> BootLog:
    return BootLog(request.node.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    entries = BootLog.entries()
    if not entries:
        return
    per_file = Counter(e["test"].split("::")[0] or "(outside a test)" for e in entries)
    tr = terminalreporter
    tr.write_sep("-", f"VM boots: {len(entries)}")
    for f, n in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0])):
        tr.write_line(f"{n:4d}  {f}")
    pool = config.stash.get(_POOL, None)     # this process's pool (under -n N: per worker, not shown)
    if pool is not None and pool.found_paused:
        tr.write_sep("-", f"pool guests found paused and resumed: {len(pool.found_paused)}")
        for line in pool.found_paused:
            tr.write_line(f"  {line}")


@pytest.fixture(scope="session")
def kernel_build() -> KernelBuild:
    """The reference kernel (built once, then a cache hit)."""
    return ensure_kernel()


def _reference_opts(kernel_build, opts):
    from dataclasses import replace

    from sbmdbg.vm import VMOptions

    o = replace(opts) if isinstance(opts, VMOptions) else VMOptions(**opts)
    if o.kernel is None:
        o.kernel, o.vmlinux, o.tree = (str(kernel_build.bzImage), str(kernel_build.vmlinux),
                                       str(kernel_build.tree))
    return o


@pytest.fixture
def make_vm(kernel_build):
    """``vm = make_vm(pti="on", kaslr=True, ...)``: boots; stopped after the test."""
    from sbmdbg.vm import VM

    vms = []

    def factory(**opts) -> VM:
        vm = VM(_reference_opts(kernel_build, opts))
        vms.append(vm)
        return vm

    yield factory
    for vm in vms:
        vm.close()


class VMPool:
    """Reference-kernel VMs shared by the tests that ask for the same options.

    A VM is handed out again only while it is healthy (QEMU alive, the guest
    running and its shell answering); otherwise it is replaced.  At most
    ``keep`` VMs stay booted (the least recently used one is stopped)."""

    def __init__(self, kernel_build, keep: int = 4):
        self.kernel_build = kernel_build
        self.keep = keep
        self.vms: dict[tuple, object] = {}
        self.users: dict[int, str] = {}       # id(vm) -> the last test handed it
        self.found_paused: list[str] = []     # "<status> after <test>": shown in the summary

    def _healthy(self, vm) -> bool:
        try:
            status = vm.qmp("query-status")["status"] if vm.alive() else None
            if status in ("paused", "debug"):
                # a gdb that ended without detaching (killed) can leave it paused: resumed here,
                # and named in the terminal summary (it once hid a bug of GdbSession.close)
                self.found_paused.append(f"{status} after {self.users.get(id(vm), '?')}")
                vm.qmp("cont")
            return (vm.alive() and vm.qmp("query-status")["status"] == "running"
                    and vm.run("echo pool-ok", timeout=60).output == "pool-ok\n")
        except Exception:  # noqa: BLE001 - any trouble: boot a fresh one
            return False

    def key(self, opts) -> tuple:
        """The pool's key: every VMOptions field, the reference kernel's paths
        filled in (defaults spelt out or not, kernel given or implied)."""
        from dataclasses import asdict

        o = _reference_opts(self.kernel_build, opts)
        return tuple(sorted((k, v) for k, v in asdict(o).items() if k != "boot_timeout"))

    def get(self, **opts):
        from sbmdbg.vm import VM

        key = self.key(opts)
        vm = self.vms.pop(key, None)
        if vm is not None and not self._healthy(vm):
            vm.close()
            vm = None
        if vm is None:
            while len(self.vms) >= self.keep:
                oldest = next(iter(self.vms))
                self.vms.pop(oldest).close()
            vm = VM(_reference_opts(self.kernel_build, opts))
        self.vms[key] = vm          # most recently used last
        self.users[id(vm)] = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
        return vm

    def take(self, **opts):
        """A VM its caller may kill: the pool's idle one for *opts* if it is
        healthy (it leaves the pool: one boot fewer when that configuration's
        last user ends it), else a fresh one.  The caller stops it."""
        from sbmdbg.vm import VM

        vm = self.vms.pop(self.key(opts), None)
        if vm is not None and self._healthy(vm):
            return vm
        if vm is not None:
            vm.close()
        return VM(_reference_opts(self.kernel_build, opts))

    def discard(self, vm) -> None:
        """Stop *vm* and forget it (its user left it unusable)."""
        for k, v in list(self.vms.items()):
            if v is vm:
                del self.vms[k]
        vm.close()

    def close(self) -> None:
        for vm in self.vms.values():
            vm.close()
        self.vms.clear()


_POOL = pytest.StashKey()


def _pool(config) -> VMPool:
    """The session's pool (one per pytest process: per xdist worker)."""
    pool = config.stash.get(_POOL, None)
    if pool is None:
        pool = config.stash[_POOL] = VMPool(ensure_kernel(), keep=5)
    return pool


@pytest.fixture(scope="session")
def vm_pool(request):
    """The VMPool; scenario files (sbmdbg.check.pytest_plugin) take their VMs
    from it too, so a guest configuration boots once per session."""
    return _pool(request.config)


def _check_vm_factory(config):
    """Scenario files' VMs come from the pool: (vm, release(vm, healthy))."""
    def factory(opts):
        pool = _pool(config)
        vm = pool.get(**{f.name: getattr(opts, f.name) for f in fields(opts)})

        def release(vm, healthy):
            if not healthy:
                pool.discard(vm)
        return vm, release
    return factory


@pytest.fixture
def shared_vm(vm_pool):
    """``vm = shared_vm(pti="off", kaslr=True)``: a VM of the session pool.
    The test must leave the guest as it found it (running, no background jobs)."""
    return vm_pool.get


@pytest.fixture
def end_vm(vm_pool):
    """``vm = end_vm(pti="off")``: a VM this test may kill or leave unusable
    (VMPool.take: the pool's idle one when there is one); stopped after the test."""
    vms = []

    def factory(**opts):
        vm = vm_pool.take(**opts)
        vms.append(vm)
        return vm

    yield factory
    for vm in vms:
        vm.close()


@pytest.fixture(scope="session")
def logged_vms(tmp_path_factory):
    """``vm, log = logged_vms(pti, last=False)``: a detached VM started by the CLI
    (`sbmdbg vm start --detach --json --pti PTI --qemu-log LOG`: QEMU's -d int
    log on, reachable with ``--id``), one per PTI setting for the session
    (the trace CLI test and test_trace_live share it).  ``last``: the caller
    is its last user and may kill it (it stops it too); the rest are stopped
    at the end of the session."""
    import subprocess
    import sys

    from sbmdbg.vm import VM

    vms: dict[str, tuple] = {}

    def get(pti: str, last: bool = False):
        if pti not in vms:
            log = tmp_path_factory.mktemp(f"qemu-log-pti-{pti}") / "qemu.log"
            r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "vm", "start", "--detach", "--json",
                                "--pti", pti, "--qemu-log", str(log)], capture_output=True, text=True,
                               timeout=300, stdin=subprocess.DEVNULL)
            assert r.returncode == 0, r.stderr[-3000:]
            get.started[pti] = json.loads(r.stdout)
            vms[pti] = (VM.attach(get.started[pti]["id"]), log)
        return vms.pop(pti) if last else vms[pti]

    get.started = {}      # pti -> the JSON `sbmdbg vm start --detach --json` printed
    yield get
    for vm, _ in vms.values():
        vm.stop()


@pytest.fixture
def gdb_session():
    """``g = gdb_session(vm)``: gdb (MI) attached to *vm*; closed after the test."""
    from sbmdbg.vm.gdbmi import GdbSession

    sessions = []

    def factory(vm, **kw) -> GdbSession:
        info = vm.info
        s = GdbSession(info["vmlinux"], info.get("tree"), info["gdb"], **kw)
        sessions.append(s)
        return s

    yield factory
    for s in reversed(sessions):
        s.close()


def pytest_collection_modifyitems(config, items):
    """Every test is marked unit or live: an unmarked test fails collection
    (`./run tests` selects -m "unit or live", so it would never run).  The
    ``ends_vm`` tests run last (see the module's docstring)."""
    unmarked = [it.nodeid for it in items
                if not (it.get_closest_marker("unit") or it.get_closest_marker("live"))]
    if unmarked:
        raise pytest.UsageError("tests without a unit or live marker (add pytestmark = "
                                "pytest.mark.unit or .live): " + ", ".join(unmarked[:20]))
    # the tests that end a shared VM last (stable: collection order otherwise)
    items.sort(key=lambda it: it.get_closest_marker("ends_vm") is not None)
