"""Helpers of the live tests, one per job: the demo module, gdb JSON, waits."""
from __future__ import annotations

import contextlib
import json
import re
import threading
import time

# plain gdb and the guest as independent sources: the same readers the fixture recorder uses
from sbmdbg.fixture.sources import U64, gdb_int, kallsyms  # noqa: F401

DEMO = "/sys/kernel/debug/sbm_demo"

# The demo's fault scenarios: scenario -> (vector, #PF error bits that must be
# set, bits that must be clear).  Insertion order = the order tests run them.
FAULTS = {
    "write_ro_input": (14, {"P", "W", "U"}, set()),
    "read_guard": (14, {"U"}, {"P", "W"}),
    "write_kernel_data": (14, {"P", "W", "U"}, set()),
    "write_kernel_bss": (14, {"P", "W", "U"}, set()),
    "write_stack": (14, {"P", "W", "U"}, set()),
    "stack_overflow": (14, {"W", "U"}, {"P"}),
    "noncanonical": (13, set(), set()),
    "read_null": (14, {"U"}, {"P", "W"}),
}


def demo_stats(vm) -> tuple[int, int, int]:
    """(calls, returns, aborts) from the demo module's own counters."""
    m = re.search(r"calls=(\d+) returns=(\d+) aborts=(\d+)", vm.run(f"cat {DEMO}/stats").output)
    assert m, "no sbm_demo stats in the guest"
    return tuple(int(x) for x in m.groups())


def run_scenario(vm, name: str, timeout: float = 120, expect_pass: bool = True) -> dict:
    """Run one demo scenario; its report line as fields (``scenario``, ``ret``,
    ``sbm_error``, ``result``, ...).  With *expect_pass*, result must be PASS."""
    r = vm.run(f"echo {name} > {DEMO}/run && cat {DEMO}/run", timeout=timeout)
    assert r.status == 0, r.output
    fields = dict(re.findall(r"(\w+)=(\S+)", r.output))
    assert fields.get("scenario") == name.split()[0], r.output
    if expect_pass:
        assert fields.get("result") == "PASS", r.output
    return fields


def sbm_json(g, cmd: str, timeout: float = 120) -> dict:
    """``CMD --json`` in gdb, parsed (GdbSession.sbm_json)."""
    return g.sbm_json(cmd, timeout=timeout)


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    """Poll *pred* until it returns a true value (returned); fail after *timeout*."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """No such process, or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
    except OSError:
        return True
    return st[st.rindex(")") + 2:].split()[0] in ("Z", "X")


class Stop:
    """Break at ``sym`` (gdb MI session ``g``), run a demo scenario in the
    background, wait for the hit; ``finish()`` continues and returns its output."""

    def __init__(self, vm, g, sym: str, scenario: str, timeout: float = 90):
        self.vm, self.g, self.result, self.timeout = vm, g, {}, timeout
        g.interrupt()
        g.mi(f"-break-insert -t {sym}")
        g.cont()
        self.t = threading.Thread(target=self._run, args=(scenario,), daemon=True)
        self.t.start()
        self.stop = stop = g.wait_stopped(timeout)
        assert stop.get("reason") == "breakpoint-hit", stop
        self.cpu = int(stop["thread-id"]) - 1

    def _run(self, scenario):
        self.result["run"] = self.vm.run(f"echo {scenario} > {DEMO}/run; cat {DEMO}/run",
                                         timeout=max(180, self.timeout))

    def finish(self) -> str:
        self.g.cont()
        self.t.join(max(120, self.timeout))
        r = self.result.get("run")
        assert r is not None, "the demo scenario did not finish"
        return r.output


@contextlib.contextmanager
def stopped_in_sandbox(vm, g, timeout: float = 300):
    """The guest stopped (temporary breakpoint) at the first instruction of
    the `ok` scenario's sandboxed function; yields (the vCPU in the sandbox,
    the stop record).  Afterwards the guest runs on and the scenario has
    finished with PASS."""
    s = Stop(vm, g, "__sbm_thunk_sbm_demo_compute", "ok", timeout)
    try:
        yield s.cpu, s.stop
    finally:
        out = s.finish()
    assert "scenario=ok" in out and "result=PASS" in out, out


@contextlib.contextmanager
def shm_gdb(vm):
    """One gdb on ``vm`` with sbmdbg reading guest RAM from its shared-memory
    file (``sbm target shm``), the guest running; closed afterwards."""
    from sbmdbg.vm.gdbmi import GdbSession
    g = GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"])
    try:
        g.interrupt()
        g.console(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}")
        g.cont()
        yield g
    finally:
        g.close()
