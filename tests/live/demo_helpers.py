"""Driving the reference kernel's demo module from live tests."""
import re


def demo_stats(vm) -> tuple[int, int, int]:
    """(calls, returns, aborts) from /sys/kernel/debug/sbm_demo/stats."""
    m = re.search(r"calls=(\d+) returns=(\d+) aborts=(\d+)", vm.run("cat /sys/kernel/debug/sbm_demo/stats").output)
    assert m, "no sbm_demo stats in the guest"
    return tuple(int(x) for x in m.groups())


def run_scenario(vm, name: str, timeout: float = 120) -> str:
    """Run one demo scenario; its report line must say result=PASS."""
    out = vm.run(f"echo {name} > /sys/kernel/debug/sbm_demo/run && cat /sys/kernel/debug/sbm_demo/run",
                 timeout=timeout).output
    assert "result=PASS" in out, out
    return out
