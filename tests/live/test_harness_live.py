"""Live tests of the harness: kernel cache, boot, console, PTI/KASLR, gdb, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from demo_helpers import kallsyms, pid_gone, wait_for

from sbmdbg.errors import SbmdbgError
from sbmdbg.vm.vm import pid_alive

pytestmark = [pytest.mark.live, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[2]


def _all_gone(pids, timeout=30):
    """Every pid in *pids* (the QEMUs this test started, from the harness's
    boot log: other jobs' QEMUs on the machine do not count) exits."""
    wait_for(lambda: all(pid_gone(p) for p in pids), timeout, f"QEMU {sorted(pids)} to exit")


def test_kernel_build_cache_hit(kernel_build):
    """A second ensure_kernel() is a cache hit: the same build, nothing rebuilt
    (the tree's vmlinux is not rewritten).  Timings are `sbmdbg bench`'s job."""
    from sbmdbg.kernel.build import ensure_kernel

    mtime = kernel_build.vmlinux.stat().st_mtime_ns
    again = ensure_kernel()
    assert again == kernel_build
    assert kernel_build.vmlinux.stat().st_mtime_ns == mtime
    assert kernel_build.vmlinux.is_file() and kernel_build.bzImage.is_file()
    assert len(kernel_build.build_id) == 40
    assert (kernel_build.tree / "vmlinux-gdb.py").exists()
    result = json.loads((kernel_build.tree.parent / "result.json").read_text())
    assert result["build_id"] == kernel_build.build_id and result["key"] == kernel_build.key


def test_kernel_build_cli_json_cache_hit(kernel_build):
    mtime = kernel_build.vmlinux.stat().st_mtime_ns
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "kernel", "build", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["vmlinux"] == str(kernel_build.vmlinux) and d["build_id"] == kernel_build.build_id
    assert kernel_build.vmlinux.stat().st_mtime_ns == mtime


def test_vm_boots_and_runs(shared_vm):
    vm = shared_vm()
    res = vm.run("echo hi; false")
    assert res.output == "hi\n" and res.status == 1
    assert vm.run("uname -r").output.strip().startswith("6.12")
    assert "debugfs on /sys/kernel/debug type debugfs" in vm.run("mount").output
    assert vm.run("nproc").output.strip() == "2"
    assert vm.run("exit 3").status == 3  # a subshell: the guest shell survives
    assert vm.run("true").status == 0
    # A long command goes through the chunked path.
    long = vm.run("echo " + "y" * 3000 + " | wc -c")
    assert long.output.strip() == "3001"
    assert "SBMDBG-READY" in vm.console_text()
    assert Path(vm.info["ram"]).stat().st_size == vm.info["ram_size"]
    assert vm.qmp("query-status")["status"] == "running"
    assert "RIP=" in vm.hmp("info registers", cpu_index=1)
    # Another client holding the public QMP socket does not block the harness.
    from qemu.qmp.legacy import QEMUMonitorProtocol

    other = QEMUMonitorProtocol(vm.info["qmp"])
    other.connect()
    try:
        assert other.cmd("query-status")["status"] == "running"
        assert vm.qmp("query-status")["status"] == "running"
    finally:
        other.close()


@pytest.mark.ends_vm
def test_vm_cleanup_on_exception(end_vm):
    """A VM used as a context manager is stopped, its RAM file and QMP socket
    removed, when the block raises.  The VM is the pool's PTI + KASLR guest at
    its last use (ends_vm: after every other test; alone: a fresh boot)."""
    vm = end_vm(pti="on", kaslr=True)
    pid, ram, qmp = vm.pid, Path(vm.info["ram"]), Path(vm.info["qmp"])
    assert pid_alive(pid) and ram.exists() and qmp.exists()
    with pytest.raises(RuntimeError):
        with vm:
            raise RuntimeError("boom")
    assert not pid_alive(pid)
    assert not ram.exists() and not qmp.exists()


@pytest.mark.parametrize("pti", ["on", "off"])
def test_pti_on_off(shared_vm, pti):
    vm = shared_vm(pti=pti)
    dmesg = vm.run("dmesg").output
    if pti == "on":
        assert "Kernel/User page tables isolation: enabled" in dmesg
    else:
        assert "Kernel/User page tables isolation: enabled" not in dmesg
    assert f"pti={pti}" in vm.run("cat /proc/cmdline").output


def test_kaslr_on_off(shared_vm):
    off = shared_vm(pti="on")
    assert kallsyms(off, "_stext") == 0xffffffff81000000
    on = shared_vm(pti="on", kaslr=True)
    assert "kaslr" in on.run("cat /proc/cmdline").output
    # KASLR picks a random slide; the odds of landing on the default are tiny.
    assert kallsyms(on, "_stext") != 0xffffffff81000000


@pytest.mark.parametrize("la57", [False, True])
def test_la57_option(shared_vm, la57):
    vm = shared_vm(la57=la57)
    flags = vm.run("grep -m1 ^flags /proc/cpuinfo").output.split()
    assert ("la57" in flags) == la57
    assert ("no5lvl" in vm.run("cat /proc/cmdline").output) != la57


def test_boot_failure_raises_with_tail(make_vm, boots):
    with pytest.raises(SbmdbgError) as ei:
        make_vm(append="rdinit=/nonexistent init=/nonexistent", smp=1, boot_timeout=60)
    msg = str(ei.value)
    assert "boot failed" in msg and "console tail" in msg
    assert "nonexistent" in msg or "panic" in msg.lower()
    assert len(boots.pids()) == 1
    _all_gone(boots.pids())


def test_bogus_kernel_raises(tmp_path, make_vm, boots):
    """A file that is not a bzImage is refused before QEMU starts (no boot in
    the harness's log), by the library and by the CLI: one line."""
    bogus = tmp_path / "bzImage"
    bogus.write_bytes(b"not a kernel" * 100)
    with pytest.raises(SbmdbgError, match=r"kernel image .*bzImage is not a bzImage \(no 'HdrS'") as ei:
        make_vm(kernel=str(bogus), boot_timeout=20)
    assert "\n" not in str(ei.value)
    r = _cli("vm", "start", "--detach", "--kernel", str(bogus), "--vmlinux", str(bogus), timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("sbmdbg: error: kernel image "), r.stderr
    assert r.stderr.count("\n") == 1 and "is not a bzImage" in r.stderr, r.stderr
    assert boots.pids() == []


def test_gdb_session_attach_interrupt_continue(shared_vm, gdb_session):
    vm = shared_vm()
    g = gdb_session(vm)
    assert not g.running  # attaching stops the guest
    # Sources resolve to a real file even for objects ccache compiled in other
    # trees (gdb gets substitute-path rules for their comp_dirs).
    assert Path(g.last_stop["frame"]["fullname"]).is_file(), g.last_stop["frame"]
    threads = g.console("info threads")
    assert "Thread 1.1" in threads and "Thread 1.2" in threads
    assert g.console("p $lx_current().pid").strip().endswith("= 0")
    g.cont()
    assert g.running
    assert vm.run("echo alive").output == "alive\n"
    stop = g.interrupt()
    assert not g.running and stop.get("frame")
    with pytest.raises(SbmdbgError, match="gdb:"):
        g.console("definitely-not-a-command")
    g.cont()
    # Breakpoint on a syscall the guest is about to make.
    g.interrupt()
    g.mi("-break-insert -t __x64_sys_newuname")
    g.cont()
    out = {}
    t = threading.Thread(target=lambda: out.update(r=vm.run("uname -n")))
    t.start()
    stop = g.wait_stopped(60)
    assert stop["reason"] == "breakpoint-hit" and stop["frame"]["func"] == "__x64_sys_newuname"
    g.cont()
    t.join(60)
    assert out["r"].output.strip() == "sbmdbg"


def test_gdb_session_break_and_wait(shared_vm, gdb_session):
    vm = shared_vm()
    g = gdb_session(vm)
    hit = threading.Event()

    def poke():   # opens /proc/version until the breakpoint has been hit (no sleep, no race)
        while not hit.is_set():
            vm.run("cat /proc/version", timeout=120)

    t = threading.Thread(target=poke, daemon=True)
    t.start()
    stop = g.break_and_wait("proc_reg_open", timeout=60)
    hit.set()
    assert stop["frame"]["func"] == "proc_reg_open"
    g.cont()
    t.join(120)
    assert not t.is_alive()


def _cli(*args, timeout=180, **kw):
    return subprocess.run([sys.executable, "-m", "sbmdbg.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout, **kw)


@pytest.mark.ends_vm
def test_cli_detached_start_run_stop(logged_vms):
    """`sbmdbg vm start --detach --json` (the session's detached PTI guest,
    started by the logged_vms fixture through the CLI: its JSON here), `vm
    run --id`, `gdb --id`, `vm list`, then `vm stop`: that VM's last user
    (ends_vm: after every other test; alone: the fixture boots it)."""
    vm, _ = logged_vms("on", last=True)
    info = logged_vms.started["on"]
    if vm.serial is not None:    # the guest's serial console takes one client: the CLI's now
        vm.serial.close()
        vm.serial = None
    try:
        for key in ("gdb", "qmp", "serial", "pid", "vmlinux", "tree", "ram", "ram_size",
                    "console_log", "id"):
            assert key in info
        assert pid_alive(info["pid"], info["id"])
        r = _cli("vm", "run", "--id", info["id"], "echo detached; exit 0")
        assert r.returncode == 0 and r.stdout == "detached\n", r.stderr
        r = _cli("vm", "run", "--id", info["id"], "false")
        assert r.returncode == 1
        r = _cli("vm", "run", "--id", info["id"], "uname -r")  # reconnects again
        assert r.stdout.startswith("6.12")
        # sbmdbg gdb against the detached VM, batch mode.
        r = _cli("gdb", "--id", info["id"], "--", "-batch", "-ex", "info threads")
        assert r.returncode == 0, r.stderr
        assert "Thread 1.1" in r.stdout
        r = _cli("vm", "list", "--json")
        assert info["id"] in [i["id"] for i in json.loads(r.stdout)]
    finally:
        r = _cli("vm", "stop", info["id"])
    assert r.returncode == 0, r.stderr
    _all_gone([info["pid"]])
    assert not pid_alive(info["pid"])
    assert not Path(info["ram"]).exists()
    r = _cli("vm", "run", "--id", info["id"], "true")
    assert r.returncode == 1 and r.stderr.count("\n") == 1


# `sbmdbg demo` end to end (what `./run demo` runs): tests/live/test_wheel_live.py
# runs it once, from the installed wheel, with the same checks (one boot, not two).
