"""model.percpu decides the per-CPU layout from the kernel's symbols and DWARF:
struct pcpu_hot (6.2-6.14) or separate per-CPU variables (6.1, 6.15+), and
reads the same logical fields from either."""
import struct

import pytest

from sbmdbg.model import percpu
from sbmdbg.model.layout import DictLayouts, Field, Layout
from sbmdbg.model.symbols import Symbols

pytestmark = pytest.mark.unit

PER_CPU_OFF = [0x10000000, 0x20000000]


class FakeKernel:
    """Just what model.percpu uses: symbols, layouts, per-CPU addresses, reads."""

    root = 0x1000

    def __init__(self, table, layouts, mem):
        self.symbols = Symbols(table)
        self.layouts = DictLayouts(layouts)
        self.mem = mem          # va -> bytes
        self.per_cpu_end = 0x20000

    def is_percpu_symbol(self, addr):
        return 0 <= addr < self.per_cpu_end

    def per_cpu_addr(self, name, cpu):
        return self.symbols.addr(name) + PER_CPU_OFF[cpu]

    def read_virt(self, root, va, n):
        assert root == self.root
        for base, data in self.mem.items():
            if base <= va and va + n <= base + len(data):
                return data[va - base:va - base + n]
        raise AssertionError(f"unexpected read {va:#x}+{n}")

    def read_field(self, struct_name, va, path):
        f = self.layouts.resolve(struct_name, path)
        raw = self.read_virt(self.root, va + f.offset, f.size)
        return raw if f.kind == "array" else int.from_bytes(raw, "little")


def _task_layout():
    return Layout("task_struct", 64, {"pid": Field("pid", 0, 4, "int", "pid_t", True),
                                      "comm": Field("comm", 8, 16, "array", "char [16]", count=16,
                                                    elem_size=1, elem_kind="int")})


def _tasks(mem):
    mem[0xffff888000100000] = struct.pack("<i4x16s", 7, b"sh\0") + bytes(40)
    mem[0xffff888000200000] = struct.pack("<i4x16s", 0, b"swapper/1\0") + bytes(40)


def split_kernel(with_irq_stat=True):
    """Linux 6.1: current_task, __preempt_count, cpu_number, ... as variables."""
    names = {"current_task": (0x100, 8), "__preempt_count": (0x108, 4), "cpu_number": (0x10c, 4),
             "cpu_current_top_of_stack": (0x110, 8), "hardirq_stack_ptr": (0x118, 8),
             "hardirq_stack_inuse": (0x120, 1), "irq_stat": (0x140, 64)}
    table = {n: (a, s, "OBJECT") for n, (a, s) in names.items()}
    table["__per_cpu_end"] = (0x20000, 0, "NOTYPE")
    layouts = {"task_struct": _task_layout()}
    if with_irq_stat:
        layouts["irq_cpustat_t"] = Layout("irq_cpustat_t", 64, {
            "__softirq_pending": Field("__softirq_pending", 0, 2, "int", "u16"),
            "__nmi_count": Field("__nmi_count", 4, 4, "int", "unsigned int")})
    mem = {}
    tasks = [0xffff888000100000, 0xffff888000200000]
    for cpu, off in enumerate(PER_CPU_OFF):
        blob = bytearray(0x80)
        struct.pack_into("<QiiQQ?", blob, 0, tasks[cpu], -0x7fffffff if cpu else 0x80000001 & 0x7fffffff,
                         cpu, 0xffffc90000004000 + cpu * 0x4000, 0xffffc90000100ff8 + cpu, bool(cpu))
        mem[0x100 + off] = bytes(blob[:0x40])
        mem[0x140 + off] = struct.pack("<H2xI", 0x82 + cpu, 5) + bytes(56)
    _tasks(mem)
    return FakeKernel(table, layouts, mem)


def hot_kernel():
    """Linux 6.12: struct pcpu_hot."""
    f = {"current_task": Field("current_task", 0, 8, "ptr", "struct task_struct *", target="task_struct"),
         "preempt_count": Field("preempt_count", 8, 4, "int", "int", True),
         "cpu_number": Field("cpu_number", 12, 4, "int", "int", True),
         "top_of_stack": Field("top_of_stack", 16, 8, "int", "unsigned long"),
         "hardirq_stack_ptr": Field("hardirq_stack_ptr", 24, 8, "ptr", "void *"),
         "softirq_pending": Field("softirq_pending", 32, 2, "int", "u16"),
         "hardirq_stack_inuse": Field("hardirq_stack_inuse", 34, 1, "bool", "bool"),
         "pad": Field("pad", 0, 64, "array", "u8 [64]", count=64, elem_size=1, elem_kind="int")}
    table = {"pcpu_hot": (0x200, 64, "OBJECT"), "current_task": (0xffffffff82000000, 8, "OBJECT"),
             "__per_cpu_end": (0x20000, 0, "NOTYPE")}
    mem = {}
    for cpu, off in enumerate(PER_CPU_OFF):
        mem[0x200 + off] = struct.pack("<QiiQQH?", [0xffff888000100000, 0xffff888000200000][cpu],
                                       1, cpu, 0xffffc90000004000, 0xffffc90000100ff8, 0x82, False
                                       ).ljust(64, b"\0")
    _tasks(mem)
    return FakeKernel(table, {"pcpu_hot": Layout("pcpu_hot", 64, f), "task_struct": _task_layout()}, mem)


def test_split_layout_6_1():
    k = split_kernel()
    lay = percpu.percpu_layout(k)
    assert lay.kind == percpu.VARIABLES
    assert lay.slots["top_of_stack"].symbol == "cpu_current_top_of_stack"
    assert lay.slots["softirq_pending"].symbol == "irq_stat" and lay.slots["softirq_pending"].size == 2
    assert "call_depth" not in lay.slots and "cpu_current_top_of_stack" in lay.describe()
    d0, d1 = percpu.pcpu_hot(k, 0), percpu.pcpu_hot(k, 1)
    assert d0["layout"] == "per-cpu variables"
    assert d0["fields"] == {"current_task": 0xffff888000100000, "preempt_count": 1, "cpu_number": 0,
                            "top_of_stack": 0xffffc90000004000, "hardirq_stack_ptr": 0xffffc90000100ff8,
                            "softirq_pending": 0x82, "hardirq_stack_inuse": False}
    assert d1["fields"]["preempt_count"] == -0x7fffffff and d1["fields"]["hardirq_stack_inuse"] is True
    assert d1["fields"]["cpu_number"] == 1 and d1["fields"]["softirq_pending"] == 0x83
    assert d0["current"] == {"pid": 7, "comm": "sh"} and d1["current"]["comm"] == "swapper/1"
    assert d1["addresses"]["cpu_number"] == 0x10c + PER_CPU_OFF[1] and d1["address"] == 0x100 + PER_CPU_OFF[1]
    assert percpu.current_task(k, 1) == 0xffff888000200000


def test_split_layout_without_irq_stat_type():
    """No irq_cpustat_t in DWARF: softirq_pending is left out, the rest stays."""
    lay = percpu.percpu_layout(split_kernel(with_irq_stat=False))
    assert "softirq_pending" not in lay.slots and "current_task" in lay.slots


def test_pcpu_hot_layout_6_12():
    """struct pcpu_hot wins over a (non-per-CPU) current_task symbol."""
    k = hot_kernel()
    lay = percpu.percpu_layout(k)
    assert lay.kind == percpu.PCPU_HOT and "pad" not in lay.slots
    d = percpu.pcpu_hot(k, 1)
    assert d["layout"] == "pcpu_hot" and d["address"] == 0x200 + PER_CPU_OFF[1]
    assert d["fields"]["current_task"] == 0xffff888000200000 and d["fields"]["cpu_number"] == 1
    assert d["addresses"]["top_of_stack"] == 0x200 + PER_CPU_OFF[1] + 16
    assert percpu.read_field(k, "softirq_pending", 0) == 0x82


def test_no_per_cpu_current_task_is_one_line():
    k = FakeKernel({"__per_cpu_end": (0x20000, 0, "NOTYPE")}, {}, {})
    with pytest.raises(percpu.PercpuError, match="neither pcpu_hot") as e:
        percpu.percpu_layout(k)
    assert "\n" not in str(e.value)
