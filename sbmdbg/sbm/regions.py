"""Region labels of a sandbox page table: every mapped range gets the
region(s) of the design that explain it (kernel text, entry text, rodata,
data, bss, static per-CPU areas, the task and its stack, the sandbox and
exception stacks, the state page, cpu_entry_area parts, buffers) or
"unknown".  Bounds from symbols, DWARF and the sandbox's own state."""
from __future__ import annotations

import bisect

from sbmdbg.model.layout import LayoutError
from sbmdbg.sbm import model as m
from sbmdbg.x86 import paging as pg
from sbmdbg.model import stacks as xs

PAGE = 0x1000

# kind -> (user, writable, executable) the design's table expects; None = any.
EXPECTED: dict[str, tuple] = {
    "kernel_text": (True, False, True),
    "entry_text": (False, False, True),
    "rodata": (True, False, False),
    "data": (True, False, False),
    "bss": (True, False, False),
    "percpu": (True, False, False),
    "task_struct": (True, False, False),
    "task_stack": (True, False, False),
    "sandbox_stack": (True, True, False),
    "exception_stack": (False, True, False),
    "state_page": (False, True, False),
    "gdt": (False, False, False),
    "tss": (False, False, False),
    "entry_stack": (False, True, False),
    "ist_stack": (False, True, False),
    "ist_guard": (False, None, False),
    "idt": (False, False, False),
    "cea_other": (False, None, False),
    "input_buffer": (True, False, False),
    "output_buffer": (True, True, False),
    "io_buffer": (True, True, False),
}
KERNEL_DATA = {"kernel_text", "entry_text", "rodata", "data", "bss", "percpu", "task_struct",
               "task_stack", "gdt", "tss", "idt"}
# Later wins where two regions share a page (the order sbm_map_kernel(),
# sbm_exec() and arch_sbm_exec() map them in).
PRIORITY = ["kernel_text", "entry_text", "rodata", "data", "bss", "percpu", "gdt", "entry_stack",
            "tss", "ist_guard", "ist_stack", "idt", "cea_other", "sandbox_stack", "exception_stack",
            "state_page", "input_buffer", "output_buffer", "io_buffer", "task_struct", "task_stack"]


def _r(kind, name, start, end, **extra) -> dict:
    d = {"kind": kind, "name": name, "start": start & ~(PAGE - 1),
         "end": (end + PAGE - 1) & ~(PAGE - 1), "exact_start": start, "exact_end": end}
    d.update(extra)
    return d


# The kernel image's sections: (kind, name, start symbol, end symbol).
SECTIONS = (("kernel_text", "kernel text", "_stext", "_etext"),
            ("entry_text", "entry text", "__entry_text_start", "__entry_text_end"),
            ("rodata", "rodata", "__start_rodata", "__end_rodata"),
            ("data", "data", "_sdata", "_edata"),
            ("bss", "bss", "__bss_start", "__bss_stop"))


def _sym_range(kernel, kind, name, a, b):
    if a in kernel.symbols and b in kernel.symbols:
        return [_r(kind, name, kernel.sym(a), kernel.sym(b))]
    return []


def sandbox_regions(kernel, sb) -> list[dict]:
    """The design's regions for sandbox ``sb`` (page-rounded; exact bounds kept)."""
    out = []
    for kind, name, a, b in SECTIONS:
        out += _sym_range(kernel, kind, name, a, b)
    sym = kernel.symbols
    if "__per_cpu_start" in sym and "__per_cpu_end" in sym:
        size = sym.addr("__per_cpu_end") - sym.addr("__per_cpu_start")
        for c in range(_possible_cpus(kernel)):
            base = (kernel.per_cpu_offset(c) + sym.addr("__per_cpu_start")) & m.U64
            out.append(_r("percpu", f"static per-CPU area of cpu {c}", base, base + size, cpu=c))
    for c in range(_possible_cpus(kernel)):
        for p in xs.cea_parts(kernel, c):
            out.append(_r(p["kind"], f"cpu_entry_area {p['name']} (cpu {c})", p["start"],
                          p["end"], cpu=c))
    out.append(_r("idt", "cpu_entry_area read-only IDT", xs.CPU_ENTRY_AREA_RO_IDT,
                  xs.CPU_ENTRY_AREA_RO_IDT + PAGE))
    sz = m.sizes(kernel)
    f = sb.fields
    if f.get("stack"):
        out.append(_r("sandbox_stack", "SBM sandbox stack", f["stack"], f["stack"] + sz["thread_size"]))
    if f.get("exc_stack"):
        out.append(_r("exception_stack", "SBM exception stack", f["exc_stack"],
                      f["exc_stack"] + sz["exception_stksz"]))
    if "x86_sbm_state" in sym:
        a = kernel.sym("x86_sbm_state")
        out.append(_r("state_page", "x86_sbm_state page", a, a + PAGE))
    for b in (sb.sbm or {}).get("buffers", []):
        if b.get("sbm_ptr") and b.get("size") is not None:
            out.append(_r(f"{b['direction']}_buffer", f"{b['direction']} buffer (copy of {b.get('kern_ptr', 0):#x})",
                          b["sbm_ptr"], b["sbm_ptr"] + max(b["size"], 1), size=b["size"],
                          size_source="sbm_buf.size"))
    if sb.task:
        tsize, tsource = _task_struct_size(kernel)
        out.append(_r("task_struct", f"task_struct of {sb.comm} (pid {sb.pid})", sb.task, sb.task + tsize,
                      size=tsize, size_source=tsource))
        t = m.task_info(kernel, sb.task)
        if t.get("stack"):
            out.append(_r("task_stack", f"thread stack of {sb.comm} (pid {sb.pid})", t["stack"],
                          t["stack"] + sz["thread_size"]))
    return out


def _possible_cpus(kernel) -> int:
    """Number of CPUs with a per-CPU area: __per_cpu_offset entries that differ
    from the boot-time default (bounded by nr_cpu_ids when known)."""
    n = kernel.target.ncpus
    if "nr_cpu_ids" in kernel.symbols:
        try:
            v = int.from_bytes(kernel.read_virt(kernel.root, kernel.sym("nr_cpu_ids"), 4), "little")
            if 0 < v <= 8192:
                n = v
        except m.ReadErrors:
            pass
    return n


def _task_struct_size(kernel) -> tuple[int, str]:
    """(size, where it came from) of a task_struct allocation: the kernel
    variable arch_task_struct_size (x86: sizeof(task_struct) minus the static
    FPU register area plus the CPU's xstate size; what the task_struct slab
    cache allocates), else DWARF's sizeof, else a page."""
    if "arch_task_struct_size" in kernel.symbols:
        try:
            v = int.from_bytes(kernel.read_virt(kernel.root, kernel.sym("arch_task_struct_size"), 4), "little")
            if 0 < v < 1 << 20:
                return v, "arch_task_struct_size"
        except m.ReadErrors:
            pass
    try:
        return kernel.layouts.sizeof("task_struct"), "sizeof(struct task_struct)"
    except LayoutError:
        return PAGE, "a page (no size known)"


class RegionMap:
    """Page -> winning region (elementary segments, bisect lookup)."""

    def __init__(self, regs: list[dict]):
        rank = {k: i for i, k in enumerate(PRIORITY)}
        bounds = sorted({r["start"] for r in regs} | {r["end"] for r in regs})
        self.starts = bounds[:-1]
        self.ends = bounds[1:]
        self.labels: list[dict | None] = []
        for a, b in zip(self.starts, self.ends):
            best = None
            for r in regs:
                if r["start"] <= a and b <= r["end"]:
                    if best is None or rank.get(r["kind"], 0) >= rank.get(best["kind"], 0):
                        best = r
            self.labels.append(best)

    def lookup(self, va: int) -> dict | None:
        i = bisect.bisect_right(self.starts, va) - 1
        if i < 0 or va >= self.ends[i]:
            return None
        return self.labels[i]

    def next_boundary(self, va: int) -> int:
        i = bisect.bisect_right(self.starts, va)
        return self.starts[i] if i < len(self.starts) else 1 << 64


def labeled_map(kernel, sb, max_entries: int = 200_000,
                max_ranges: int = pg.OUTPUT_MAX_RANGES) -> dict:
    """Walk the sandbox root and label every mapped range.  Ranges merge
    contiguous VAs with the same region, permissions and global bit; at most
    ``max_ranges`` are kept (the walk's ``truncated``/``more_ranges`` say so)."""
    regs = sandbox_regions(kernel, sb)
    rmap = RegionMap(regs)
    # merged walk runs label the same as single pages (labels ignore PA and size)
    maps, w = kernel.walk(sb.pgd_pa, max_entries=max_entries, max_ranges=4 * max_ranges)
    out: list[dict] = []
    more = 0
    for mp in maps:
        if len(out) > max_ranges:
            more += 1
            continue
        va = mp.va
        while va < mp.end:
            reg = rmap.lookup(va)
            end = min(mp.end, rmap.next_boundary(va))
            kind = reg["kind"] if reg else "unknown"
            name = reg["name"] if reg else "unknown"
            perms = {"u": mp.perms.u, "w": mp.perms.w, "x": mp.perms.x}
            last = out[-1] if out else None
            if (last and last["end"] == va and last["kind"] == kind and last["name"] == name
                    and last["perms"] == perms and last["global"] == mp.g):
                last["end"] = end
                last["pages"] += (end - va) // PAGE
            else:
                out.append({"va": va, "end": end, "kind": kind, "name": name, "perms": perms,
                            "global": mp.g, "pages": (end - va) // PAGE,
                            "pa": mp.pa + (va - mp.va)})
            va = end
    if len(out) > max_ranges:
        more += len(out) - max_ranges
        del out[max_ranges:]
    return {"root": sb.pgd_pa, "sandbox": sb.label, "ranges": out, "regions": regs,
            "walk": {"findings": [f.to_json() for f in w.findings], "entries": w.stats.entries,
                     **_truncation(w, more)}}


def _truncation(w, more: int) -> dict:
    """``truncated`` always; ``more_ranges`` (ranges left out) when truncated."""
    t = pg.truncation(w, more)
    return t if t["truncated"] else {"truncated": False}


def perm_str(p: dict) -> str:
    return "r" + ("w" if p["w"] else "-") + ("x" if p["x"] else "-") + (" user" if p["u"] else " supv")
