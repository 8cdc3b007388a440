"""Sandbox discovery (issue 17): the O(vCPUs) path (each vCPU's current task)
where the kernel keeps a sandbox's task on its CPU, the walk of every task
where it does not, and the walk's one read per task.  Offline, on the
snapshots recorded from the reference kernel (a vCPU stopped in a sandbox)
and on hand-built code bytes."""
import types
from pathlib import Path

import pytest

from sbmdbg.commands import compute as C
from sbmdbg.model.fixture import load_snapshot
from sbmdbg.model.symbols import Symbols
from sbmdbg.sbm import model as M

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"
SNAPS = ["sbm-in-sandbox", "sbm-in-handler"]


def kernel(name, extra_symbols=()):
    t, syms, lays, _ = load_snapshot(str(FIX / f"{name}.json.gz"))
    for n in extra_symbols:   # the recorded table is a subset: add what a full vmlinux has
        syms.table[n] = (0xFFFFFFFF81F00000 + 0x40 * len(syms.table), 0x40, "FUNC")
    return M.open_kernel(t, symbols=syms, layouts=lays)


def brief(sbs):
    return [(s.pid, s.state, s.cpus, s.sbm_cr3) for s in sbs]


@pytest.mark.parametrize("name", SNAPS)
def test_fast_path_on_a_kernel_without_preemption(name):
    """No preempt_schedule (CONFIG_PREEMPTION off): the current tasks suffice,
    and find what the walk of every task finds, without that walk."""
    k = kernel(name, ["preempt_schedule_irq"])
    d = M.discovery(k)
    assert d["mode"] == "cpus" and "CONFIG_PREEMPTION" in d["reason"]
    fast = M.sandboxes(k)
    assert ("all_tasks" not in M.stop_cache(k)), "the fast path walked every task"
    assert len(fast) == 1 and fast[0].cpus == [1]
    assert brief(fast) == brief(M.sandboxes(k, all_tasks_walk=True))
    lst = C.list_(k, types.SimpleNamespace())
    assert lst["discovery"]["mode"] == "cpus" and [s["pid"] for s in lst["sandboxes"]] == [fast[0].pid]
    every = C.list_(k, types.SimpleNamespace(all=True))
    assert every["discovery"]["mode"] == "tasks" and every["sandboxes"] == lst["sandboxes"]


@pytest.mark.parametrize("extra, why", [
    (["preempt_schedule_irq", "preempt_schedule"], "preempts kernel code"),   # CONFIG_PREEMPTION
    ([], "cannot tell"),                                                       # symbols incomplete
])
def test_fallback_walks_every_task(extra, why):
    k = kernel("sbm-in-sandbox", extra)
    d = M.discovery(k)
    assert d["mode"] == "tasks" and why in d["reason"]
    sbs = M.sandboxes(k)
    assert "all_tasks" in M.stop_cache(k) and len(sbs) == 1


def test_why_the_fallback_exists():
    """A sandbox whose task is on no vCPU (preempted): only the walk of every
    task sees it, with no CPU; the O(vCPUs) path does not."""
    k = kernel("sbm-in-sandbox", ["preempt_schedule_irq", "preempt_schedule"])
    [sb] = M.sandboxes(k, all_tasks_walk=True)
    k.invalidate()
    init = k.sym("init_task")
    for c in range(k.target.ncpus):    # as if the scheduler had switched the sandbox's task out
        M.stop_cache(k)[("current", c)] = init
    assert M.sandboxes(k, all_tasks_walk=False) == []
    [off_cpu] = M.sandboxes(k)          # discovery says "tasks" on this kernel
    assert (off_cpu.pid, off_cpu.state, off_cpu.cpus) == (sb.pid, sb.state, [])


@pytest.mark.parametrize("name", SNAPS)
def test_one_read_per_task(name):
    k = kernel(name)
    reads = []
    real = k.read_virt
    k.read_virt = lambda root, va, n: (reads.append(va), real(root, va, n))[1]
    tasks = M.all_tasks(k)
    groups = len({M.task_info(k, t)["tgid"] for t in tasks})
    assert len(tasks) == 36 and len(set(tasks)) == len(tasks)
    # one read per task_struct, one per thread group (signal->thread_head)
    assert len(reads) <= len(tasks) + groups
    assert len([va for va in reads if va in set(tasks)]) == len(tasks)
    n = len(reads)
    for t in tasks:                     # task_info is served by the walk's reads
        assert M.task_info(k, t)["pid"] >= 0
    assert len(reads) == n
    assert [M.task_info(k, t)["pid"] for t in tasks][:2] == [0, 1]


# ---------------------------------------------------------------- arch_sbm_exec calls
TEXT = 0xFFFFFFFF81000000


def _fake_kernel(tmp_path, code: bytes, callee_off: int):
    """A kernel with arch_sbm_exec = ``code`` at TEXT+0x100 in a vmlinux file."""
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\0" * 0x1000 + code + b"\xcc" * 64)
    table = {"arch_sbm_exec": (TEXT + 0x100, len(code), "FUNC"),
             "kernel_fpu_begin_mask": (TEXT + callee_off, 0x40, "FUNC"),
             "preempt_schedule_irq": (TEXT + 0x9000, 0x40, "FUNC"),
             "preempt_schedule": (TEXT + 0x9100, 0x40, "FUNC")}
    syms = Symbols(table, "x", {".text": (TEXT, 0x10000, 0x1000 - 0x100)}, str(path))
    caches = {}

    def no_read(*a):
        raise M.TargetError("no guest memory here")
    return types.SimpleNamespace(symbols=syms, sym=lambda n: syms.addr(n) + 0x200000, root=0,
                                 read_virt=no_read, cache=lambda name, per_stop=True: caches.setdefault(name, {}))


def _call(at: int, target: int) -> bytes:
    return b"\xe8" + (target - (at + 5)).to_bytes(4, "little", signed=True)


@pytest.mark.parametrize("callee_off, padding, want", [
    (0x4000, 0, "cpus"),     # call kernel_fpu_begin_mask
    (0x4000, 16, "cpus"),    # call-depth tracking: the call lands in the padding before it
    (0x4000, 32, "tasks"),   # some other function
])
def test_kernel_fpu_begin_in_arch_sbm_exec(tmp_path, callee_off, padding, want):
    at = TEXT + 0x100 + 3
    code = b"\x55\x48\x89" + _call(at, TEXT + callee_off - padding) + b"\x90" * 20 + b"\xc3"
    k = _fake_kernel(tmp_path, code, callee_off)
    assert M.discovery(k)["mode"] == want


def test_calls_scan_is_bounded_and_signed():
    code = _call(0x1000, 0x0F00) + _call(0x1005, 0x2000)
    assert M._calls(code, 0x1000) >= {0x0F00, 0x2000}
    assert M._calls(b"\xe8\x00", 0) == set()


def test_a_stranger_cpl3_cr3_is_looked_up_in_every_task():
    """`sbm` on a kernel with the O(vCPUs) path: a vCPU at CPL 3 on a CR3
    that is neither its current task's nor a current sandbox's (here: the
    sandbox's task made not current) is still named, by the walk of every
    task; the vCPUs on their own task's CR3 cost no walk."""
    k = kernel("sbm-in-sandbox", ["preempt_schedule_irq"])
    [sb] = M.sandboxes(k)
    others = [c for c in range(k.target.ncpus) if c not in sb.cpus]
    assert [M.vcpu_status(k, c)["cr3_role"] for c in others] and "all_tasks" not in M.stop_cache(k)
    k.invalidate()
    for c in range(k.target.ncpus):
        M.stop_cache(k)[("current", c)] = k.sym("init_task")
    row = M.vcpu_status(k, sb.cpus[0])
    assert row["cpl"] == 3 and row["cr3_role"] == sb.label and row["mode"] == "sandbox"
    assert "all_tasks" in M.stop_cache(k)
