"""The tracer's per-event view of the guest: a thin accessor over the SBM
model (``sbmdbg.sbm``).  Offsets come from the kernel's layouts once; each
event costs a few reads of guest RAM; every word it answers -- CR3 role, mode,
stack class -- and every size or bound (THREAD_SIZE, EXCEPTION_STKSZ, the
buffer-list bound) is the SBM model's, so the tracers' events and ``sbm
--json`` speak one vocabulary (sbm.model.CR3_ROLES / MODES,
sbm.stacks.STACK_KINDS).

Reads take fast paths where the mapping is fixed: the kernel image
(``va - __START_KERNEL_map + phys_base``) and the direct map
(``va - page_offset_base``); anything else (vmalloc'ed stacks) is a page
walk from the kernel root.  No per-stop cache is kept here: the no-stop
tracer reads while the guest runs.
"""
from __future__ import annotations

import struct

from sbmdbg.model import percpu
from sbmdbg.model import stacks as xs
from sbmdbg.model.kernel import START_KERNEL_MAP
from sbmdbg.model.layout import cstring
from sbmdbg.sbm import model as M
from sbmdbg.sbm import regions as RG
from sbmdbg.sbm import stacks as S
from sbmdbg.x86 import paging as pg

U64 = (1 << 64) - 1
DIRECT_MAP_SPAN = 1 << 46
CPU_ENTRY_AREA = (0xFFFFFE0000000000, 0xFFFFFE8000000000)   # 4-level: one P4D slot
USER_TOP = 1 << 47

STATE_FIELDS = ("sbm", "pgd", "stack", "exc_stack", "return_sp", "kernel_cr3", "sbm_cr3")
REGS_FIELDS = ("ip", "cs", "flags", "sp", "ss", "ax", "orig_ax")


def s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


class GuestContext:
    def __init__(self, kernel):
        self.k = kernel
        k, lay = kernel, kernel.layouts
        sym = k.symbols

        def opt(name):
            return k.sym(name) if name in sym else None
        self.text = k.sym("_text")
        self.end = opt("_end") or self.text
        self._pcpu_off = k.cache("trace.per_cpu_offset", per_stop=False)   # cpu -> offset
        self._cea = k.cache("trace.cea_stacks", per_stop=False)            # cpu -> [ranges]
        # zero-based per-CPU addresses of current_task / hardirq_stack_ptr, in
        # whichever layout the kernel has (pcpu_hot or separate variables)
        slots = percpu.percpu_layout(k).slots
        self.pcpu_current = sym.addr(slots["current_task"].symbol) + slots["current_task"].offset
        hs = slots.get("hardirq_stack_ptr")
        self.pcpu_hardirq = sym.addr(hs.symbol) + hs.offset if hs else None
        self.off_pid = lay.offsetof("task_struct", "pid")
        self.off_comm = lay.offsetof("task_struct", "comm")
        self.off_stack = lay.offsetof("task_struct", "stack")
        self.off_active_mm = lay.offsetof("task_struct", "active_mm")
        self.off_pgd = lay.offsetof("mm_struct", "pgd")
        self.task_size = lay.sizeof("task_struct")
        self.off_sbm_state = lay.offsetof("task_struct", "thread_info.sbm_state")
        st = lay.layout("x86_sbm_state")
        self.state_off = {f: st.field(f).offset for f in STATE_FIELDS}
        sb = lay.layout("sbm")
        self.sbm_off = {f: sb.field(f).offset for f in ("error", "private", *M.BUF_LISTS)}
        self.buf_off = {f: lay.offsetof("sbm_buf", f) for f in ("next", "kern_ptr", "sbm_ptr", "size")}
        pr = lay.layout("pt_regs")
        self.regs_off = {f: pr.field(f).offset for f in REGS_FIELDS}
        self.regs_size = pr.size
        sizes = M.sizes(kernel)
        self.thread_size = sizes["thread_size"]
        self.exc_stksz = sizes["exception_stksz"]
        self.pti = kernel.pti_enabled()       # X86_FEATURE_PTI: whether CR3 bit 12 means a PTI user PGD
        self.irq_size = sizes["irq_stack_size"]
        self.jiffies = opt("jiffies") or opt("jiffies_64")
        # the SBM model's section table, the innermost first (entry text is in .text)
        self.sections = sorted(((k.sym(a), k.sym(b), name) for _kind, name, a, b in RG.SECTIONS
                                if a in sym and b in sym), key=lambda s: s[1] - s[0])
        self.state_page = opt("x86_sbm_state") or 0
        self.per_cpu_size = kernel.per_cpu_end or 0
        # The direct map ends where the next region begins: with KASLR
        # (RANDOMIZE_MEMORY) vmalloc/vmemmap may start well within 64 TB of
        # page_offset_base, so a fixed span would take vmalloc'ed stacks for
        # direct-map addresses.
        pob = kernel.page_offset_base
        self.direct_end = min([b for b in (kernel.vmalloc_base, kernel.vmemmap_base) if b and b > pob]
                              + [pob + DIRECT_MAP_SPAN])
        init_pgd = opt("init_top_pgt") or opt("swapper_pg_dir")
        self.static_pgds = {k.root} | ({self.pa(init_pgd)} if init_pgd else set())

    # ------------------------------------------------------------ reads
    def read(self, va: int, n: int) -> bytes:
        k = self.k
        va &= U64
        if self.text <= va and va + n <= self.end:
            return k.target.read_phys((va - START_KERNEL_MAP + k.phys_base) & U64, n)
        pob = k.page_offset_base
        if pob <= va and va + n <= self.direct_end and (va >> 12) == ((va + n - 1) >> 12):
            return k.target.read_phys(va - pob, n)
        return k.read_virt(k.root, va, n)

    def pa(self, va: int) -> int | None:
        k = self.k
        if k.page_offset_base <= va < self.direct_end:
            return va - k.page_offset_base
        if self.text <= va < self.end:
            return (va - START_KERNEL_MAP + k.phys_base) & U64
        return k.translate(k.root, va).pa

    def u64(self, va: int) -> int:
        return struct.unpack("<Q", self.read(va, 8))[0]

    def per_cpu(self, cpu: int) -> int:
        off = self._pcpu_off.get(cpu)
        if off is None:
            off = self._pcpu_off[cpu] = self.k.per_cpu_offset(cpu)
        return off

    def current_task(self, cpu: int) -> int:
        return self.u64(self.pcpu_current + self.per_cpu(cpu))

    def task_brief(self, task: int) -> tuple[int | None, str | None]:
        if not task:
            return None, None
        pid = struct.unpack("<i", self.read(task + self.off_pid, 4))[0]
        comm = cstring(self.read(task + self.off_comm, 16))
        return pid, comm

    def sbm_state(self, task: int) -> int:
        return self.u64(task + self.off_sbm_state) if task else 0

    def state(self, state: int) -> dict:
        data = self.read(state, max(self.state_off.values()) + 8)
        return {f: struct.unpack_from("<Q", data, o)[0] for f, o in self.state_off.items()}

    def sbm_error(self, sbm: int) -> int:
        return struct.unpack("<i", self.read(sbm + self.sbm_off["error"], 4))[0]

    def pt_regs(self, va: int) -> dict:
        data = self.read(va, self.regs_size)
        return {f: struct.unpack_from("<Q", data, o)[0] for f, o in self.regs_off.items()}

    def jiffies_now(self) -> int | None:
        return self.u64(self.jiffies) if self.jiffies else None

    def sbm_buffers(self, sbm: int, limit: int = M.MAX_BUFS) -> list[tuple[str, int, int, int]]:
        """(list name, index, sbm_ptr, size) of the sandbox's buffers (bounded
        walk, as the SBM model's read_bufs: a loop ends the list)."""
        out = []
        for lst in M.BUF_LISTS:
            p = self.u64(sbm + self.sbm_off[lst])
            i, seen = 0, set()
            while p and p not in seen and i < limit:
                seen.add(p)
                d = self.read(p, max(self.buf_off.values()) + 8)
                nxt, sptr, size = (struct.unpack_from("<Q", d, self.buf_off[f])[0]
                                   for f in ("next", "sbm_ptr", "size"))
                out.append((lst, i, sptr, size))
                p, i = nxt, i + 1
        return out

    # ------------------------------------------------------------ the SBM model's words
    def stack_ranges(self, task: int, st: dict | None, cpu: int | None = None,
                     pid: int | None = None) -> list[dict]:
        """The stacks an event can be on (the SBM model's ranges): the
        sandbox's, the task's, the vCPU's IRQ stack and cpu_entry_area stacks."""
        k = self.k
        out = []
        if st:
            label = M.sandbox_label(pid)
            out += S.sbm_stacks_of(k, st, label) + S.sbm_guard(st, label)
        if task:
            try:
                out += S.task_stack_of(k, task, self.u64(task + self.off_stack), cpu, pid, None)
            except Exception:  # noqa: BLE001 - the task may be gone (read after the fact)
                pass
        for c in ([cpu] if cpu is not None else range(k.target.ncpus)):
            out += self.cea_stacks(c)
            if cpu is not None and self.pcpu_hardirq is not None:
                try:
                    ptr = self.u64(self.pcpu_hardirq + self.per_cpu(c))
                except Exception:  # noqa: BLE001
                    continue
                irq = xs.irq_stack(k, c, {"hardirq_stack_ptr": ptr}, self.irq_size)
                out += [irq] if irq else []
        return out

    def cea_stacks(self, cpu: int) -> list[dict]:
        parts = self._cea.get(cpu)
        if parts is None:
            parts = [p for p in xs.cea_parts(self.k, cpu) if p["kind"] in S.CEA_STACK_KINDS]
            if parts:   # only real answers (early boot may have none yet)
                self._cea[cpu] = parts
        return parts

    def stack_class(self, rsp: int, task: int, st: dict | None, cpu: int | None = None) -> str:
        """A word of sbm.stacks.STACK_KINDS."""
        hit = S.classify_in(self.stack_ranges(task, st, cpu), rsp, cpu)
        return hit["kind"] if hit else "unknown"

    def kernel_pgds(self, task: int) -> set[int]:
        """As the SBM model counts them: its root, init_mm's, the task's active_mm's."""
        out = set(self.static_pgds)
        if task:
            try:
                mm = self.u64(task + self.off_active_mm)
                pa = self.pa(self.u64(mm + self.off_pgd)) if mm else None
                if pa is not None:
                    out.add(pa)
            except Exception:  # noqa: BLE001
                pass
        return out

    def cr3_role(self, cr3: int, st: dict | None, task: int = 0, pid: int | None = None) -> str:
        """A word of sbm.model.CR3_ROLES."""
        sbs = [(st["sbm_cr3"], M.sandbox_label(pid), None)] if st else []
        role, _ = M.role_of_cr3(cr3, self.k.cr4, sbs, lambda: self.kernel_pgds(task), self.pti)
        return role

    @staticmethod
    def mode(cpl: int, role: str | None, st: dict | None, sym: str | None, stack: str | None,
             handler_stack: str | None = None) -> str:
        """A word of sbm.model.MODES (``sym``: "name+0x.." as sym() gives it;
        ``handler_stack``: the stack class handlers of sandbox exceptions run
        on, ``self.handler_stack``)."""
        return M.mode_of(cpl, M.is_sandbox_role(role), bool(st), (sym or "").partition("+")[0] or None,
                         stack, handler_stack)

    @property
    def handler_stack(self) -> str | None:
        """The kernel's (sbm.variant, detected from its code once)."""
        return M.handler_stack(self.k)

    def sym(self, va: int | None) -> str | None:
        if va is None:
            return None
        r = self.k.lookup(va)
        if r is None:
            return None
        name, off = r
        return f"{name}+{off:#x}" if off else name

    def region(self, addr: int, task: int = 0, st: dict | None = None, sbm: int = 0,
               cpu: int | None = None) -> str:
        """Which region ``addr`` falls in, plus how the sandbox maps it."""
        where = self.where(addr, task, st, sbm, cpu)
        if st and pg.canonical(addr, self.k.la57) and addr >= USER_TOP:
            try:
                tr = pg.translate(self.k.target.read_phys, st["sbm_cr3"], addr, la57=self.k.la57,
                                  nxe=self.k.nxe)
                if tr.pa is None:
                    where += "; sandbox: not mapped"
                else:
                    p = tr.perms
                    where += f"; sandbox: {'W' if p.w else 'RO'},{'U' if p.u else 'S'},{'X' if p.x else 'NX'}"
            except Exception:  # noqa: BLE001
                pass
        return where

    def where(self, addr: int, task: int = 0, st: dict | None = None, sbm: int = 0,
              cpu: int | None = None) -> str:
        """The region ``addr`` falls in (no page walk: safe after the fact)."""
        k = self.k
        if not pg.canonical(addr, k.la57):
            return "non-canonical"
        if addr < USER_TOP:
            return "NULL page (user half, empty in a sandbox)" if addr < 4096 else \
                "user half (empty in a sandbox)"
        ts, page = self.thread_size, 4096
        if st:
            if st["stack"] <= addr < st["stack"] + ts:
                return "sandbox stack"
            if st["stack"] - page <= addr < st["stack"]:
                return "sandbox stack guard page (overflow)"
            if st["exc_stack"] <= addr < st["exc_stack"] + self.exc_stksz:
                return "sandbox exception stack"
        if sbm:
            try:
                for lst, i, sptr, size in self.sbm_buffers(sbm):
                    if sptr <= addr < sptr + size:
                        return f"{lst} buffer #{i} +{addr - sptr:#x}"
                    end = (sptr + size + page - 1) & ~(page - 1)
                    if sptr + size <= addr < end + page:
                        return f"past {lst} buffer #{i} (+{addr - sptr:#x} of {size:#x}: guard page)"
            except Exception:  # noqa: BLE001
                pass
        if self.state_page <= addr < self.state_page + page:
            return "x86_sbm_state page"
        for a, b, name in self.sections:
            if a <= addr < b:
                s = self.sym(addr)
                return f"{name}: {s}" if s else name
        if task:
            try:
                base = self.u64(task + self.off_stack)
                if base <= addr < base + ts:
                    return "task thread stack"
            except Exception:  # noqa: BLE001
                pass
            if task <= addr < task + self.task_size:
                return "task_struct"
        if self.per_cpu_size:
            for c in range(k.target.ncpus):
                try:
                    off = self.per_cpu(c)
                except Exception:  # noqa: BLE001
                    continue
                if off <= addr < off + self.per_cpu_size:
                    s = self.sym(addr - off)
                    return f"per-CPU area of cpu {c}" + (f": {s}" if s else "")
        if CPU_ENTRY_AREA[0] <= addr < CPU_ENTRY_AREA[1]:
            return "cpu_entry_area"
        if k.page_offset_base <= addr < self.direct_end:
            return "direct map"
        if k.vmalloc_base <= addr < k.vmalloc_base + (32 << 40):
            return "vmalloc"
        if k.vmemmap_base <= addr < k.vmemmap_base + (1 << 40):
            return "vmemmap"
        if addr >= START_KERNEL_MAP:
            return "kernel image / modules"
        return "kernel half"
