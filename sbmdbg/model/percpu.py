"""Per-CPU state, whatever the kernel version keeps it in.

x86_64 kernels keep the hot per-CPU fields in one of two layouts:

* ``pcpu_hot``: Linux 6.2 to 6.14, one ``struct pcpu_hot`` per CPU
  (current_task, preempt_count, cpu_number, top_of_stack, hardirq_stack_ptr,
  softirq_pending, hardirq_stack_inuse, call_depth ...);
* ``per-cpu variables``: Linux up to 6.1 and again from 6.15, one per-CPU
  variable per field (current_task, __preempt_count, cpu_number,
  cpu_current_top_of_stack, hardirq_stack_ptr, hardirq_stack_inuse,
  irq_stat.__softirq_pending or softirq_pending).

``percpu_layout(kernel)`` decides from the kernel under test: the
``pcpu_hot`` symbol together with ``struct pcpu_hot`` in DWARF, else the
separate variables (found in the symbol table, sizes from it, struct
members from DWARF).  Every field has the same logical name in both
layouts (``pcpu_hot``'s field names), so callers read ``current_task`` or
``top_of_stack`` and never care which layout the kernel has.  All reads go
through the kernel root.
"""
from __future__ import annotations

from dataclasses import dataclass

from sbmdbg.errors import SbmdbgError
from sbmdbg.model.layout import LayoutError, cstring
from sbmdbg.target.base import TargetError

SCALAR = ("int", "ptr", "bool", "enum")
PCPU_HOT = "pcpu_hot"
VARIABLES = "per-cpu variables"

#: logical field -> (kind, signed, candidates): a candidate is a per-CPU
#: symbol, or (symbol, struct tag, member path) for a member of a per-CPU struct.
SPLIT_FIELDS: dict[str, tuple[str, bool, tuple]] = {
    "current_task": ("ptr", False, ("current_task",)),
    "preempt_count": ("int", True, ("__preempt_count",)),
    "cpu_number": ("int", True, ("cpu_number",)),
    "call_depth": ("int", False, ("__x86_call_depth",)),
    "top_of_stack": ("ptr", False, ("cpu_current_top_of_stack",)),
    "hardirq_stack_ptr": ("ptr", False, ("hardirq_stack_ptr",)),
    "softirq_pending": ("int", False, ("softirq_pending",
                                       ("irq_stat", "irq_cpustat_t", "__softirq_pending"))),
    "hardirq_stack_inuse": ("bool", False, ("hardirq_stack_inuse",)),
}


class PercpuError(SbmdbgError):
    pass


@dataclass(frozen=True)
class Slot:
    """Where one logical field lives: ``symbol`` (zero-based per-CPU) + ``offset``."""
    name: str
    symbol: str
    offset: int
    size: int
    kind: str
    signed: bool = False

    @property
    def source(self) -> str:
        return self.symbol if self.symbol == self.name else \
            f"{self.symbol}+{self.offset:#x}" if self.offset else self.symbol

    def decode(self, data: bytes):
        v = int.from_bytes(data[:self.size], "little", signed=self.signed)
        return bool(v) if self.kind == "bool" else v


@dataclass(frozen=True)
class PercpuLayout:
    kind: str                   # PCPU_HOT or VARIABLES
    slots: dict                 # logical name -> Slot, in display order
    struct_size: int = 0        # sizeof(struct pcpu_hot) (PCPU_HOT)

    def describe(self) -> str:
        if self.kind == PCPU_HOT:
            return "pcpu_hot (struct pcpu_hot per CPU, Linux 6.2-6.14)"
        return "per-cpu variables (" + ", ".join(s.symbol for s in self.slots.values()) + ")"

    def to_json(self) -> dict:
        return {"kind": self.kind, "description": self.describe(),
                "fields": {n: {"symbol": s.symbol, "offset": s.offset, "size": s.size}
                           for n, s in self.slots.items()}}


def _pcpu_hot_layout(kernel) -> PercpuLayout | None:
    if "pcpu_hot" not in kernel.symbols:
        return None
    try:
        lay = kernel.layouts.layout("pcpu_hot")
    except LayoutError:
        return None
    slots = {}
    for name, f in lay.fields.items():
        if f.kind in SCALAR and f.size in (1, 2, 4, 8) and f.bit_size is None:
            slots[name] = Slot(name, "pcpu_hot", f.offset, f.size, f.kind, f.signed)
    return PercpuLayout(PCPU_HOT, slots, lay.size) if "current_task" in slots else None


def _split_layout(kernel) -> PercpuLayout | None:
    syms = kernel.symbols
    slots = {}
    for name, (kind, signed, cands) in SPLIT_FIELDS.items():
        for c in cands:
            if isinstance(c, str):
                if c in syms and kernel.is_percpu_symbol(syms.addr(c)):
                    size = syms.size(c) or 8
                    slots[name] = Slot(name, c, 0, min(size, 8), kind, signed)
                    break
                continue
            sym, tag, path = c
            if sym not in syms or not kernel.is_percpu_symbol(syms.addr(sym)):
                continue
            try:
                f = kernel.layouts.resolve(tag, path)
            except LayoutError:
                continue
            slots[name] = Slot(name, sym, f.offset, f.size, kind, signed)
            break
    return PercpuLayout(VARIABLES, slots) if "current_task" in slots else None


def percpu_layout(kernel) -> PercpuLayout:
    """The kernel's per-CPU layout (decided once per Kernel object)."""
    got = getattr(kernel, "_percpu_layout", None)
    if got is None:
        got = _pcpu_hot_layout(kernel) or _split_layout(kernel)
        if got is None:
            raise PercpuError("cannot find the per-CPU current task: neither pcpu_hot (symbol and "
                              "struct pcpu_hot in DWARF) nor a per-CPU current_task variable")
        kernel._percpu_layout = got
    return got


def field_addr(kernel, name: str, cpu: int) -> int:
    """Kernel VA of logical field *name* on *cpu*."""
    s = percpu_layout(kernel).slots.get(name)
    if s is None:
        raise PercpuError(f"this kernel keeps no per-CPU {name} ({percpu_layout(kernel).kind})")
    return (kernel.per_cpu_addr(s.symbol, cpu) + s.offset) & ((1 << 64) - 1)


def read_field(kernel, name: str, cpu: int):
    s = percpu_layout(kernel).slots.get(name)
    if s is None:
        raise PercpuError(f"this kernel keeps no per-CPU {name} ({percpu_layout(kernel).kind})")
    return s.decode(kernel.read_virt(kernel.root, field_addr(kernel, name, cpu), s.size))


def current_task(kernel, cpu: int) -> int:
    return read_field(kernel, "current_task", cpu)


def read_fields(kernel, cpu: int) -> tuple[dict, dict]:
    """(fields, addresses) of every logical per-CPU field of *cpu*."""
    lay = percpu_layout(kernel)
    if lay.kind == PCPU_HOT:  # one read for the whole struct
        base = kernel.per_cpu_addr("pcpu_hot", cpu)
        data = kernel.read_virt(kernel.root, base, lay.struct_size)
        return ({n: s.decode(data[s.offset:s.offset + s.size]) for n, s in lay.slots.items()},
                {n: base + s.offset for n, s in lay.slots.items()})
    fields, addrs = {}, {}
    for n, s in lay.slots.items():
        va = field_addr(kernel, n, cpu)
        addrs[n] = va
        fields[n] = s.decode(kernel.read_virt(kernel.root, va, s.size))
    return fields, addrs


def task_brief(kernel, task: int) -> dict:
    """pid and comm of a task_struct (read through the kernel root)."""
    out: dict = {}
    try:
        out["pid"] = kernel.read_field("task_struct", task, "pid")
        out["comm"] = cstring(kernel.read_field("task_struct", task, "comm"))
    except (SbmdbgError, TargetError) as e:
        out["error"] = str(e)
    return out


def pcpu_hot(kernel, cpu: int) -> dict:
    """Every hot per-CPU field of ``cpu``, in whichever layout the kernel has
    (``layout``: pcpu_hot or per-cpu variables), plus the current task's pid
    and comm.  ``address`` is struct pcpu_hot's (pcpu_hot layout) or
    current_task's; ``addresses`` has every field's.  Reads go through the
    kernel root, so the result does not depend on which CR3 any vCPU has."""
    lay = percpu_layout(kernel)
    fields, addrs = read_fields(kernel, cpu)
    address = kernel.per_cpu_addr("pcpu_hot", cpu) if lay.kind == PCPU_HOT else addrs["current_task"]
    out = {"cpu": cpu, "layout": lay.kind, "address": address, "addresses": addrs, "fields": fields}
    task = fields.get("current_task")
    if task:
        out["current"] = task_brief(kernel, task)
    return out


def vcpu_state(kernel, cpu: int) -> dict:
    r = kernel.target.registers(cpu)
    return {"cpl": r.get("cs", 0) & 3, "rip": r.get("rip"), "cr3": r.get("cr3"),
            "rsp": r.get("rsp"), "gs_base": r.get("gs_base")}


__all__ = ["PCPU_HOT", "VARIABLES", "PercpuLayout", "Slot", "percpu_layout", "field_addr",
           "read_field", "read_fields", "current_task", "pcpu_hot", "task_brief", "vcpu_state"]
