"""A hostile guest, live (issue 14): one VM for the module.

A guest shell sets its own comm to ESC ``]0;pwned`` BEL ``[red`` (an OSC
title sequence and rich markup; /proc/PID/comm keeps 15 bytes) and runs a
sandbox demo from that task.  Stopped inside the sandbox, the gdb commands
(`sbm`, `sbm list`, `sbm show`, text and JSON), the dashboard frame
(``--once`` over QMP without --gdb, the issue's AttributeError reproducer)
and ``sbmdbg inspect`` on a vmcore dumped at that stop show the comm with
every control character visible and no raw control byte.  Bad arguments to
the gdb commands are one gdb error line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import has_raw_control

pytestmark = pytest.mark.live
EVIL_PRINTF = r"\033]0;pwned\007[red]X[/]\033[2J"
SHOWN = "\\x1b]0;pwned\\x07[red]"   # the first 15 bytes, as sbmdbg shows them


def _no_raw(text: str) -> None:
    stripped = re.sub(r"\x1b\[[0-9;]*m", "", text)   # rich's own styling, if any
    assert not has_raw_control(stripped), repr(stripped[:500])
    assert "\x07" not in text and "\x1b]" not in text


@pytest.fixture(scope="module")
def stopped(vm_pool, tmp_path_factory):
    """(vm, gdb session, vCPU) stopped in the sandbox run by the hostile task
    (the session's shared 2-vCPU PTI guest: the hostile comm is a short-lived
    task's, gone when the demo returns)."""
    from sbmdbg.vm.gdbmi import GdbSession
    vm = vm_pool.get(smp=2, pti="on")
    result = {}
    g = GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"])
    try:
        g.interrupt()
        g.console(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}")
        g.mi("-break-insert -t __sbm_thunk_sbm_demo_compute")
        g.cont()

        def run():
            result["run"] = vm.run(
                f"sh -c 'printf \"{EVIL_PRINTF}\" > /proc/$$/comm; "
                "echo ok > /sys/kernel/debug/sbm_demo/run; cat /sys/kernel/debug/sbm_demo/run'",
                timeout=180)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        stop = g.wait_stopped(120)
        assert stop.get("reason") == "breakpoint-hit", stop
        yield vm, g, int(stop["thread-id"]) - 1
        g.cont()
        t.join(120)
        assert "PASS" in result["run"].output   # the demo itself was not disturbed
    finally:
        g.close()


def test_gdb_commands_show_the_comm_visibly(stopped):
    vm, g, cpu = stopped
    lst = g.console("sbm list --json", timeout=120)
    sb = json.loads(lst[lst.index("{"):])["sandboxes"][0]
    assert sb["comm"] == SHOWN, sb["comm"]
    for cmd in ("sbm", "sbm list", f"sbm show cpu{cpu}", "sbm --json", f"sbm show cpu{cpu} --json"):
        out = g.console(cmd, timeout=120)
        _no_raw(out)
        if "list" in cmd or "show" in cmd:
            assert "pwned" in out, (cmd, out[:300])


def test_gdb_commands_bad_arguments_are_one_line(stopped):
    _, g, _ = stopped
    for cmd in ("sbm vtop zz", "sbm pt --range zz-yy", "sbm pt --range 5", "sbm show \x1b[2J"):
        with pytest.raises(SbmdbgError) as e:
            g.console(cmd, timeout=60)
        msg = str(e.value)
        assert msg.startswith("gdb: sbm ") and "Traceback" not in msg, msg
        assert "internal error" not in msg and not has_raw_control(msg), msg


def test_inspect_on_a_vmcore_of_the_stop(stopped, tmp_path):
    vm, _, _ = stopped
    core = tmp_path / "evil.vmcore"
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dump", "--qmp", vm.info["qmp"], "-o", str(core)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for cmd in (["list"], ["show"], ["status"], ["list", "--json"]):
        r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "inspect", "--vmcore", str(core),
                            "--vmlinux", vm.info["vmlinux"], *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode in (0, 1), r.stderr
        _no_raw(r.stdout)
        if cmd[0] in ("list", "show"):
            assert "pwned" in r.stdout


def test_dashboard_frame_over_qmp_without_gdb(stopped):
    """Last: the dashboard leaves the guest running when it exits."""
    vm, _, _ = stopped
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dashboard", "--qmp", vm.info["qmp"],
                        "--vmlinux", vm.info["vmlinux"], "--ram", vm.info["ram"], "--once",
                        "--width", "160", "--height", "50"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    _no_raw(r.stdout)
    assert "pwned" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr
    # the reproducer exactly: --qmp and --vmlinux only (no --gdb, no --ram)
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dashboard", "--qmp", vm.info["qmp"],
                        "--vmlinux", vm.info["vmlinux"], "--once"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "internal error" not in r.stderr, r.stderr
    _no_raw(r.stdout)
