"""Linux x86-64 kernel stacks: cpu_entry_area parts (GDT, TSS, entry stack, IST
stacks, RO IDT), the per-CPU IRQ stack, task stacks, pt_regs decoding and a
bounded frame-pointer walk.  Layouts from DWARF; reads through explicit roots.
"""
from __future__ import annotations

from sbmdbg.errors import SbmdbgError
from sbmdbg.model.layout import LayoutError, decode_struct
from sbmdbg.target.base import TargetError

U64 = (1 << 64) - 1
CPU_ENTRY_AREA_RO_IDT = 0xFFFFFE0000000000    # CPU_ENTRY_AREA_BASE (pgtable_areas.h)
CPU_ENTRY_AREA_PER_CPU = CPU_ENTRY_AREA_RO_IDT + 0x1000
ReadErrors = (SbmdbgError, TargetError)


def _static(kernel) -> dict:
    return kernel.cache("stacks", per_stop=False)


def cea_base(kernel, cpu: int) -> int | None:
    """Address of ``struct cpu_entry_area`` of ``cpu`` (get_cpu_entry_area()):
    the per-CPU ``cpu_entry_area`` pointer when the kernel has one, else the
    per-CPU ``cea_exception_stacks`` pointer minus offsetof(estacks), else
    CPU_ENTRY_AREA_PER_CPU + _cea_offset * sizeof(struct cpu_entry_area)."""
    key = ("cea", cpu)
    c = _static(kernel)
    if key in c:
        return c[key]
    lay = kernel.layouts
    base = None
    try:
        if "cpu_entry_area" in kernel.symbols and kernel.is_percpu_symbol(kernel.symbols.addr("cpu_entry_area")):
            base = kernel.read_u64(kernel.root, kernel.per_cpu_addr("cpu_entry_area", cpu)) or None
        if base is None and "cea_exception_stacks" in kernel.symbols:
            p = kernel.read_u64(kernel.root, kernel.per_cpu_addr("cea_exception_stacks", cpu))
            if p:
                base = (p - lay.offsetof("cpu_entry_area", "estacks")) & U64
        if base is None and "_cea_offset" in kernel.symbols:
            off = kernel.read_u64(kernel.root, kernel.per_cpu_addr("_cea_offset", cpu))
            base = CPU_ENTRY_AREA_PER_CPU + off * lay.sizeof("cpu_entry_area")
    except (*ReadErrors, LayoutError):
        base = None
    if base is not None:  # only cache real answers (early boot may have none yet)
        c[key] = base
    return base


def cea_parts(kernel, cpu: int) -> list[dict]:
    """[{kind, name, start, end, cpu}] of one CPU's cpu_entry_area, from the
    DWARF layout of struct cpu_entry_area / cea_exception_stacks."""
    base = cea_base(kernel, cpu)
    if base is None:
        return []
    try:
        lay = kernel.layouts.layout("cpu_entry_area")
    except LayoutError:
        return []
    out = []
    for name, f in lay.fields.items():
        start = base + f.offset
        if name == "estacks" and f.target:
            try:
                es = kernel.layouts.layout(f.target)
            except LayoutError:
                es = None
            for sname, sf in (es.fields.items() if es else ()):
                if sname.endswith("_guard"):
                    kind = "ist_guard"
                else:
                    kind = "ist_stack"
                out.append({"kind": kind, "name": f"IST {sname}", "start": start + sf.offset,
                            "end": start + sf.offset + sf.size, "cpu": cpu})
            continue
        kind = {"gdt": "gdt", "entry_stack_page": "entry_stack", "tss": "tss"}.get(name, "cea_other")
        out.append({"kind": kind, "name": name, "start": start, "end": start + f.size, "cpu": cpu})
    return out


def ro_idt(kernel) -> dict:
    return {"kind": "idt", "name": "read-only IDT", "start": CPU_ENTRY_AREA_RO_IDT,
            "end": CPU_ENTRY_AREA_RO_IDT + 0x1000, "cpu": None}


def irq_stack(kernel, cpu: int, pcpu: dict, irq_size: int) -> dict | None:
    """The per-CPU IRQ stack (hardirqs and, on x86_64, softirqs run on it):
    pcpu_hot.hardirq_stack_ptr = top - 8."""
    p = pcpu.get("hardirq_stack_ptr") or 0
    if not p:
        return None
    top = (p + 8) & U64
    return {"kind": "irq_stack", "name": "hardirq/softirq stack", "start": top - irq_size,
            "end": top, "cpu": cpu, "in_use": bool(pcpu.get("hardirq_stack_inuse"))}


def decode_pt_regs(kernel, va: int, root: int) -> dict:
    lay = kernel.layouts.layout("pt_regs")
    d = decode_struct(lay, kernel.read_virt(root, va, lay.size))
    return {k: (v & U64 if isinstance(v, int) else v) for k, v in d.items()}


# ---------------------------------------------------------------- unwinding
def prologue_state(kernel, root: int, pc: int) -> str:
    """Where ``pc`` is in its function's frame setup: 'entry' (before push
    %rbp: the return address is at [rsp]), 'pushed' (after push %rbp, before
    mov %rsp,%rbp: at [rsp+8]) or 'body' (a normal frame at rbp)."""
    s = kernel.lookup(pc)
    if s is None or s[1] > 64:
        return "body"
    start = pc - s[1]
    try:
        code = kernel.read_virt(root, start, 24)
    except ReadErrors:
        return "body"
    i = code.find(b"\x55\x48\x89\xe5")   # push %rbp; mov %rsp,%rbp
    if i < 0 or i > 16:
        return "body" if s[1] else "entry"
    if s[1] <= i:
        return "entry"
    if s[1] == i + 1:
        return "pushed"
    return "body"


def fp_walk(kernel, root: int, pc: int, rsp: int, rbp: int, *, max_frames: int = 64,
            in_stack=None, stop_pcs: set[int] = frozenset(), first_from_regs: bool = True):
    """Frame-pointer walk from (pc, rsp, rbp) through ``root``.

    Yields dicts {pc, sp, bp, how} and finally may yield {"end": reason,
    "bp": ...}.  ``in_stack(va) -> bool`` bounds the frames; an odd rbp is an
    ENCODE_FRAME_POINTER link to a pt_regs (yielded as {"pt_regs": addr}).
    Walking stops at a pc in ``stop_pcs`` (the caller continues elsewhere)."""
    frames = 0
    state = prologue_state(kernel, root, pc) if first_from_regs else "body"
    yield {"pc": pc, "sp": rsp, "bp": rbp, "how": "registers" if first_from_regs else "link"}
    frames += 1
    if pc in stop_pcs:
        yield {"end": "boundary", "pc": pc, "bp": rbp, "sp": rsp}
        return
    try:
        if state == "entry":
            pc = kernel.read_u64(root, rsp)
            rsp += 8
            yield {"pc": pc, "sp": rsp, "bp": rbp, "how": "return address at [rsp] (prologue)"}
            frames += 1
        elif state == "pushed":
            pc = kernel.read_u64(root, rsp + 8)
            rsp += 16
            yield {"pc": pc, "sp": rsp, "bp": rbp, "how": "return address at [rsp+8] (prologue)"}
            frames += 1
    except ReadErrors as e:
        yield {"end": f"unreadable stack: {e}", "bp": rbp}
        return
    if pc in stop_pcs:
        yield {"end": "boundary", "pc": pc, "bp": rbp, "sp": rsp}
        return
    prev = None
    while frames < max_frames:
        if rbp == 0:
            yield {"end": "rbp is 0 (outermost frame)", "bp": rbp}
            return
        if rbp & 1:
            yield {"pt_regs": rbp - 1, "bp": rbp}
            return
        if rbp & 7 or (in_stack is not None and not in_stack(rbp)):
            yield {"end": f"rbp {rbp:#x} is not a frame on this stack", "bp": rbp}
            return
        if prev is not None and rbp <= prev:
            yield {"end": f"rbp {rbp:#x} does not grow (loop?)", "bp": rbp}
            return
        try:
            nbp = kernel.read_u64(root, rbp)
            ret = kernel.read_u64(root, rbp + 8)
        except ReadErrors as e:
            yield {"end": f"unreadable frame at {rbp:#x}: {e}", "bp": rbp}
            return
        prev = rbp
        rsp = rbp + 16
        yield {"pc": ret, "sp": rsp, "bp": nbp, "how": "frame pointer", "frame": rbp}
        frames += 1
        if ret in stop_pcs:
            yield {"end": "boundary", "pc": ret, "bp": nbp, "sp": rsp, "frame": rbp}
            return
        if ret == 0:
            yield {"end": "return address 0", "bp": nbp}
            return
        rbp = nbp
    yield {"end": f"stopped after {max_frames} frames", "bp": rbp}
