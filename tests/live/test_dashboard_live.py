"""The dashboard in a real terminal (tmux, 120x40): it boots its own VM,
shows both vCPUs, the tracer sees a fault scenario typed into the console
panel, pause/continue reach the guest (checked independently over the VM's
own QMP socket), and quitting leaves no QEMU or gdb behind."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from demo_helpers import wait_for

from sbmdbg.paths import REPO_ROOT, cache_root
from sbmdbg.target.qmp import parse_info_registers

# tmux is installed by ./run (apt): a missing tmux is a failure, not a skip.
pytestmark = pytest.mark.live


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen(name: str) -> str:
    return tmux("capture-pane", "-p", "-t", name)


def wait_screen(name: str, pred, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen(name)
        if pred(text):
            return text
        time.sleep(0.3)
    size = tmux("display", "-p", "-t", name, "#{window_width}x#{window_height}").strip()
    raise AssertionError(f"timed out waiting for {what}; screen ({size}):\n{text}")


def descendants(pid: int) -> dict[int, str]:
    """pid -> comm of every live descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    comm: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        c = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        kids.setdefault(int(fields[1]), []).append(int(d))
        comm[int(d)] = c
    out, todo = {}, [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out[k] = comm[k]
            todo.append(k)
    return out


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return st[st.rindex(")") + 2:].split()[0] != "Z"


def qmp_status(sock: str) -> str:
    from qemu.qmp.legacy import QEMUMonitorProtocol
    q = QEMUMonitorProtocol(sock)
    q.connect(negotiate=True)
    try:
        return q.cmd("query-status")["status"]
    finally:
        q.close()


def test_dashboard_in_tmux(kernel_build, tmp_path):
    name = f"sbmdbg-dash-{uuid.uuid4().hex[:6]}"
    done = tmp_path / "exit"
    # pytest exports COLUMNS/LINES of its own terminal: let the app see tmux's size
    cmd = (f"unset COLUMNS LINES; cd {REPO_ROOT} && {sys.executable} -m sbmdbg.cli dashboard --rate 4; "
           f"echo $? > {done}; sleep 600")
    tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", name, cmd)
    procs: dict[int, str] = {}
    try:
        shell = int(tmux("display", "-p", "-t", name, "#{pane_pid}").strip())
        text = wait_screen(name, lambda t: "RUNNING" in t and "vCPU 1" in t and "CR3 role" in t, 120,
                           "both vCPUs on a running guest")
        assert "vCPU 0" in text and "vCPU 1" in text
        vm_id = re.search(r"VM ([0-9a-f]{10})", text).group(1)
        user_qmp = str(cache_root() / "vms" / vm_id / "qmp.sock")   # the VM's own QMP, not the dashboard's
        procs = descendants(shell)
        assert "qemu-system-x86" in procs.values() and "gdb" in procs.values(), procs

        tmux("send-keys", "-t", name, "t")
        wait_screen(name, lambda t: "trace ON" in t and "RUNNING" in t, 60, "the tracer on")

        tmux("send-keys", "-t", name, "d")          # the scenario picker; Enter runs its first entry
        wait_screen(name, lambda t: "run a demo scenario" in t and "irq_in_sandbox" in t, 30, "the picker")
        tmux("send-keys", "-t", name, "Enter")
        wait_screen(name, lambda t: re.search(r"scenario=ok .*result=PASS", t), 60,
                    "the picked scenario's result on the console panel")

        footer = lambda t: t.rstrip("\n").splitlines()[-1]   # noqa: E731  (key bindings, or not while typing)
        tmux("send-keys", "-t", name, "c")
        wait_screen(name, lambda t: "pause/cont" not in footer(t), 30, "the console line focused")
        tmux("send-keys", "-t", name, "-l", "echo write_kernel_data > /sys/kernel/debug/sbm_demo/run; "
                                            "cat /sys/kernel/debug/sbm_demo/run")
        tmux("send-keys", "-t", name, "Enter")
        text = wait_screen(name, lambda t: "ABORT #PF" in t and "result=PASS" in t, 60,
                           "the abort in the transitions panel")
        size = tmux("display", "-p", "-t", name, "#{window_width}x#{window_height}").strip()
        assert re.search(r"abort 1\b", text) and "write from user @ data" in text, size + "\n" + text
        # the abort's one-line `sbm why` under it: the demo's source line, computed from vmlinux's DWARF
        text = wait_screen(name, lambda t: re.search(r"why: sbm_demo\.c:\d+ in \w+", t), 30,
                           "the abort's why line")
        tmux("send-keys", "-t", name, "Escape")
        wait_screen(name, lambda t: "pause/cont" in footer(t), 30, "the key bindings back")
        tmux("send-keys", "-t", name, "Space")
        wait_screen(name, lambda t: "PAUSED" in t and "backtrace of vCPU 0" in t, 30, "paused")
        assert qmp_status(user_qmp) in ("debug", "paused")   # stopped (by the gdbstub)
        tmux("send-keys", "-t", name, "s")
        wait_screen(name, lambda t: "stepi on vCPU 0" in t, 30, "stepi")
        tmux("send-keys", "-t", name, "Space")
        wait_screen(name, lambda t: "RUNNING" in t, 30, "running again")
        assert qmp_status(user_qmp) == "running"

        tmux("send-keys", "-t", name, "q")
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert done.exists(), screen(name)
        assert done.read_text().strip() == "0"
        closed = screen(name)
        assert "closed" in closed and "vm_stopped=True" in closed and "gdb_error" not in closed, closed
        try:
            wait_for(lambda: not any(alive(p) for p in procs), 30, "the dashboard's processes to exit")
        except AssertionError:
            pass
        left = {p: c for p, c in procs.items() if alive(p)}
        assert not left, f"left behind: {left}"
        assert not (cache_root() / "vms" / vm_id / "qmp.sock").exists()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        for p in procs:   # only the processes this test's dashboard started
            if alive(p):
                try:
                    os.kill(p, 9)
                except OSError:
                    pass


def _attach_args(vm, gdb: bool = True) -> list[str]:
    """Attach the dashboard to a harness VM (its public QMP socket; no serial:
    the harness holds it)."""
    i = vm.info
    return ([f"--gdb={i['gdb']}"] if gdb else []) + [
        f"--qmp={i['qmp']}", f"--vmlinux={i['vmlinux']}", f"--tree={i['tree']}",
        f"--ram={i['ram']}", f"--ram-size={i['ram_size']}"]


def test_dashboard_once_svg_and_timing(shared_vm, tmp_path):
    """--once --svg --json-timing attached to a running VM: one frame with both
    vCPUs, the timing document well formed (the figures are `sbmdbg bench`'s),
    and the guest left running (checked over the harness's own QMP)."""
    vm = shared_vm(pti="on")
    svg = tmp_path / "frame.svg"
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "dashboard", "--once", "--json-timing",
                        "--svg", str(svg), *_attach_args(vm, gdb=False)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stopped_refresh"]
    assert st["ncpus"] == 2 and st["repeat"] == 10
    assert 0 < st["min_ms"] <= st["median_ms"] <= st["max_ms"], st
    import html

    text = html.unescape(re.sub(r"<[^>]+>", "", svg.read_text())).replace("\xa0", " ")
    assert "vCPU 0" in text and "vCPU 1" in text and "CR3 role" in text
    assert vm.qmp("query-status")["status"] == "running"


def test_refresh_never_stops_the_guest(shared_vm):
    """Refreshes without gdb (registers over QMP, memory from the RAM file):
    QEMU's run state, polled over the harness's QMP all along, stays running,
    and the guest shell answers between refreshes."""
    import threading

    from sbmdbg.dashboard.backend import Backend, explicit_conn

    vm = shared_vm(pti="on")
    i = vm.info
    be = Backend(explicit_conn(None, i["qmp"], i["vmlinux"], i["ram"], i["ram_size"], None, i["tree"]),
                 use_gdb=False)
    states: list[str] = []
    done = threading.Event()

    def poll():
        while not done.is_set():
            states.append(vm.qmp("query-status")["status"])

    be.open()
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        assert be.g is None
        for n in range(20):
            snap = be.snapshot()
            assert snap["running"] and len(snap.get("cpus") or []) == 2, snap.get("cpus_error")
            if n % 5 == 0:
                assert vm.run("echo alive").output == "alive\n"
    finally:
        done.set()
        t.join(30)
        be.close()
    assert len(states) >= 20 and set(states) == {"running"}, dict(Counter(states))


def _rip(vm, cpu: int) -> int:
    return parse_info_registers(vm.hmp("info registers", cpu_index=cpu))["rip"]


def test_dashboard_keys_stepi_and_quit_while_paused(shared_vm, tmp_path):
    """Attached to a harness VM: v and 0-9 select the vCPU; stepi moves only
    the selected vCPU (QEMU's registers: the other one's RIP stays, the guest
    stays stopped); quitting while paused leaves the guest running."""
    vm = shared_vm(pti="on")
    # one busy loop pinned to each vCPU: a vCPU that ran would have moved (an
    # idle one sits in hlt, and a stepi on it waits for an interrupt)
    r = vm.run("taskset 1 sh -c 'while :; do :; done' & a=$!; taskset 2 sh -c 'while :; do :; done' & "
               "echo spinning $a $!")
    spinners = r.output.split()[1:3]
    assert r.output.startswith("spinning") and len(spinners) == 2, r.output
    name = f"sbmdbg-dash-{uuid.uuid4().hex[:6]}"
    done = tmp_path / "exit"
    cmd = (f"unset COLUMNS LINES; cd {REPO_ROOT} && {sys.executable} -m sbmdbg.cli dashboard --rate 4 "
           f"{' '.join(_attach_args(vm))}; echo $? > {done}; sleep 600")
    tmux("new-session", "-d", "-x", "120", "-y", "40", "-s", name, cmd)
    try:
        wait_screen(name, lambda t: "RUNNING" in t and "vCPU 1" in t and "CR3 role" in t, 120, "attached")
        tmux("send-keys", "-t", name, "Space")
        wait_screen(name, lambda t: "PAUSED" in t and "backtrace of vCPU 0" in t, 30, "paused")
        for key, cpu in (("v", 1), ("0", 0), ("1", 1), ("v", 0), ("1", 1)):
            tmux("send-keys", "-t", name, key)
            wait_screen(name, lambda t, c=cpu: f"backtrace of vCPU {c}" in t, 30, f"vCPU {cpu} after {key!r}")
        rip0, rip1 = _rip(vm, 0), _rip(vm, 1)
        tmux("send-keys", "-t", name, "s")
        wait_screen(name, lambda t: "stepi on vCPU 1" in t, 30, "stepi")
        assert vm.qmp("query-status")["status"] != "running"
        assert _rip(vm, 0) == rip0, "stepi on vCPU 1 moved vCPU 0"
        assert _rip(vm, 1) != rip1, "stepi did not move vCPU 1"
        tmux("send-keys", "-t", name, "q")            # quit while paused
        wait_for(done.exists, 60, "the dashboard to exit")
        assert done.read_text().strip() == "0", screen(name)
        closed = screen(name)
        assert "closed" in closed and "gdb_error" not in closed, closed
        wait_for(lambda: vm.qmp("query-status")["status"] == "running", 30, "the guest to run again")
        assert vm.run("echo still-here").output == "still-here\n"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        if vm.qmp("query-status")["status"] != "running":
            vm.qmp("cont")
        vm.run(f"kill {' '.join(spinners)}")


def test_dashboard_lost_terminal(kernel_build):
    """The terminal goes away (tmux kill-session = SIGHUP): no QEMU, gdb or
    dashboard survives."""
    name = f"sbmdbg-dash-{uuid.uuid4().hex[:6]}"
    cmd = f"unset COLUMNS LINES; cd {REPO_ROOT} && {sys.executable} -m sbmdbg.cli dashboard; sleep 600"
    tmux("new-session", "-d", "-x", "100", "-y", "30", "-s", name, cmd)
    procs: dict[int, str] = {}
    try:
        shell = int(tmux("display", "-p", "-t", name, "#{pane_pid}").strip())
        wait_screen(name, lambda t: "RUNNING" in t and "CR3 role" in t, 120, "the dashboard")
        procs = descendants(shell)
        assert "qemu-system-x86" in procs.values() and "gdb" in procs.values(), procs
        tmux("kill-session", "-t", name)
        try:
            wait_for(lambda: not any(alive(p) for p in procs), 30, "the dashboard's processes to exit")
        except AssertionError:
            pass
        assert not {p: c for p, c in procs.items() if alive(p)}
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
        for p in procs:
            if alive(p):
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
