"""Per-CPU views built on the kernel model: ``pcpu_hot`` of each CPU."""
from __future__ import annotations

from sbmdbg.errors import SbmdbgError
from sbmdbg.model.layout import cstring, decode_field
from sbmdbg.target.base import TargetError

SCALAR = ("int", "ptr", "bool", "enum")


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
    """Every scalar field of ``pcpu_hot`` on ``cpu`` (layout from DWARF), plus
    the current task's pid and comm.  Reads go through the kernel root, so the
    result does not depend on which CR3 any vCPU has loaded."""
    lay = kernel.layouts.layout("pcpu_hot")
    va = kernel.per_cpu_addr("pcpu_hot", cpu)
    data = kernel.read_virt(kernel.root, va, lay.size)
    fields = {name: decode_field(f, data) for name, f in lay.fields.items() if f.kind in SCALAR}
    out = {"cpu": cpu, "address": va, "fields": fields}
    task = fields.get("current_task")
    if task:
        out["current"] = task_brief(kernel, task)
    return out


def vcpu_state(kernel, cpu: int) -> dict:
    r = kernel.target.registers(cpu)
    return {"cpl": r.get("cs", 0) & 3, "rip": r.get("rip"), "cr3": r.get("cr3"),
            "rsp": r.get("rsp"), "gs_base": r.get("gs_base")}
