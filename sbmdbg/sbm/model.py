"""The SBM model: sandboxes from ``thread_info.sbm_state``, per-vCPU mode.

Everything is read physically through an explicit root (no gdb import):
kernel structures through the kernel root, the sandbox's own view through
its ``sbm_cr3``.  Struct layouts come from DWARF (``kernel.layouts``).

Per-stop caching: results live in the kernel model's caches
(``kernel.cache(...)``), emptied when ``kernel.invalidate()`` ran, so a refresh
after a stop costs one pass over the few pages involved.

``open_kernel(target, vmlinux, ...)`` opens the kernel model with the SBM
extension attached (``--root sandbox[=N]``, the sandbox-CR3 -> kernel-root
fixup): the one constructor every face calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sbmdbg.errors import SbmdbgError
from sbmdbg.model import kernel as km
from sbmdbg.model import percpu
from sbmdbg.model.kernel import Extension, RootSpec
from sbmdbg.model.layout import LayoutError, cstring, decode_field, decode_struct
from sbmdbg.target.base import TargetError
from sbmdbg.x86.regs import decode_cr3

U64 = (1 << 64) - 1
USER_CS = 0x33                 # GDT_ENTRY_DEFAULT_USER_CS * 8 + 3 (x86_64 ABI)
SBM_CS = USER_CS & ~3          # __SBM_CS: the user CS with RPL 0 (asm/sbm.h)
KERNEL_CS = 0x10
MAX_TASKS = 4096               # bound on the init_task.tasks walk
MAX_THREADS = 1024             # bound per thread group
MAX_BUFS = 256                 # bound per sbm_buf list
BUF_LISTS = ("input", "output", "io")

# The structs the SBM model reads (read from DWARF in one pass by open_kernel).
PREFETCH = ("pcpu_hot", "task_struct", "thread_info", "x86_sbm_state", "sbm", "sbm_buf", "pt_regs",
           "cpu_entry_area", "cea_exception_stacks", "exception_stacks", "thread_union", "irq_stack",
           "mm_struct", "signal_struct", "cpuinfo_x86", "list_head")

# The one vocabulary of every face (`sbm --json`, both tracers' events, the
# dashboard): CR3 roles (role_of_cr3) and vCPU modes (mode_of); stack classes
# are sbmdbg.sbm.stacks.STACK_KINDS.
CR3_ROLES = ("kernel", "kernel (other mm)", "user (PTI)", "sandbox:<pid>")
MODES = ("kernel", "user", "sandbox", "sandbox (in kernel handler)", "transition", "cpl<N>")
PA_MASK = ((1 << 52) - 1) & ~0xFFF

# What a kernel needs to count as an SBM kernel (see no_sbm_reason()).
SBM_SYMBOLS = ("x86_sbm_state", "x86_sbm_exec")
SBM_TYPES = ("x86_sbm_state", "sbm")


class NoSandboxMode(SbmdbgError):
    """The kernel has no SandBox Mode (symbols/types missing)."""


ReadErrors = (SbmdbgError, TargetError)


# ---------------------------------------------------------------- caching
def stop_cache(kernel) -> dict:
    """The SBM model's per-stop cache (emptied by kernel.invalidate())."""
    return kernel.cache("sbm")


def _cached(kernel, key, fn, static=False):
    c = kernel.cache("sbm", per_stop=not static)
    if key not in c:
        c[key] = fn()
    return c[key]


# ---------------------------------------------------------------- detection
NO_SBM = "this kernel has no SandBox Mode: no x86_sbm_state, no thread_info.sbm_state"


def no_sbm_reason(kernel) -> str | None:
    """None on an SBM kernel, else the one line every SBM command (and the
    tracer) says: ``NO_SBM`` for a kernel without SBM at all, or "this kernel
    has no SandBox Mode: no <what is missing>" for a partial one."""
    def check():
        missing = [s for s in SBM_SYMBOLS if s not in kernel.symbols]
        for t in SBM_TYPES:
            if not kernel.layouts.has_layout(t):
                missing.append(f"struct {t}")
        try:
            kernel.layouts.resolve("thread_info", "sbm_state")
        except LayoutError:
            missing.append("thread_info.sbm_state")
        if not missing:
            return None
        if {"x86_sbm_state", "struct x86_sbm_state", "thread_info.sbm_state"} <= set(missing):
            return NO_SBM
        return "this kernel has no SandBox Mode: " + ", ".join(f"no {x}" for x in missing)
    return _cached(kernel, "no_sbm", check, static=True)


def has_sbm(kernel) -> bool:
    return no_sbm_reason(kernel) is None


def require_sbm(kernel) -> None:
    why = no_sbm_reason(kernel)
    if why:
        raise NoSandboxMode(why)


def sizes(kernel) -> dict:
    """THREAD_SIZE, EXCEPTION_STKSZ, IRQ_STACK_SIZE, sizeof(pt_regs) from DWARF."""
    def get():
        lay = kernel.layouts
        out = {"thread_size": 16384, "exception_stksz": 8192, "irq_stack_size": 16384,
               "pt_regs": 168, "task_struct": 0}
        for key, struct_name in (("thread_size", "thread_union"), ("irq_stack_size", "irq_stack"),
                                 ("pt_regs", "pt_regs"), ("task_struct", "task_struct")):
            try:
                out[key] = lay.sizeof(struct_name)
            except LayoutError:
                pass
        try:  # char DF_stack[EXCEPTION_STKSZ]
            out["exception_stksz"] = lay.resolve("exception_stacks", "DF_stack").size
        except LayoutError:
            try:
                out["exception_stksz"] = lay.resolve("cea_exception_stacks", "DF_stack").size
            except LayoutError:
                pass
        return out
    return _cached(kernel, "sizes", get, static=True)


# ---------------------------------------------------------------- tasks
def phys(kernel, root: int, va: int) -> int | None:
    """va -> pa through root (page offset applied here: kernel.translate caches
    one Translation per page)."""
    tr = kernel.translate(root, va)
    return None if tr.pa is None else (tr.pa & ~0xFFF) | (va & 0xFFF)


class TaskLayout:
    """The task_struct fields the SBM model reads, resolved once from DWARF:
    one read of ``span`` bytes per task gives all of them (the walk's links,
    pid, tgid, comm, stack, thread_info.sbm_state).  ``span`` stops at the
    last field used: DWARF's sizeof(task_struct) (with the largest FPU state)
    exceeds the allocation (arch_task_struct_size), and past the allocation
    may lie a page the kernel does not map (the top of RAM)."""

    def __init__(self, kernel):
        lay = kernel.layouts
        f = lay.layout("task_struct").fields
        self.pid, self.comm = f["pid"], f["comm"]
        self.tgid, self.stack = f.get("tgid"), f.get("stack")
        self.sbm_state = (lay.resolve("task_struct", "thread_info.sbm_state") if has_sbm(kernel) else None)
        self.tasks = lay.offsetof("task_struct", "tasks")
        try:
            self.thread_node = lay.offsetof("task_struct", "thread_node")
            self.signal = lay.offsetof("task_struct", "signal")
            self.thread_head = lay.offsetof("signal_struct", "thread_head")
        except LayoutError:
            self.thread_node = self.signal = self.thread_head = None
        used = [x for x in (self.pid, self.tgid, self.comm, self.stack, self.sbm_state) if x is not None]
        ends = [x.offset + x.size for x in used] + [self.tasks + 8]
        if self.thread_node is not None:
            ends += [self.thread_node + 8, self.signal + 8]
        self.span = max(ends)

    def decode(self, task: int, data: bytes) -> dict:
        pid = decode_field(self.pid, data)
        out = {"task": task, "pid": pid,
               "tgid": decode_field(self.tgid, data) if self.tgid else pid,
               "comm": cstring(decode_field(self.comm, data)),
               "stack": decode_field(self.stack, data) if self.stack else None,
               "sbm_state": decode_field(self.sbm_state, data) if self.sbm_state else 0}
        return out

    def link(self, data: bytes, off: int) -> int:
        return int.from_bytes(data[off:off + 8], "little")


def task_layout(kernel) -> TaskLayout:
    return _cached(kernel, "task_layout", lambda: TaskLayout(kernel), static=True)


def _task_record(kernel, task: int) -> tuple[dict, bytes | None]:
    """(task_info, the raw bytes) of one task: one read (cached per stop)."""
    c = stop_cache(kernel)
    key = ("task_raw", task)
    if key not in c:
        tl = task_layout(kernel)
        try:
            data = kernel.read_virt(kernel.root, task, tl.span)
        except ReadErrors as e:
            c[key] = ({"task": task, "error": str(e)}, None)
        else:
            c[key] = (tl.decode(task, data), data)
        c[("task", task)] = c[key][0]
    return c[key]


def task_info(kernel, task: int) -> dict:
    """pid, tgid, comm, stack, sbm_state of one task_struct (one read, cached per stop)."""
    c = stop_cache(kernel)
    got = c.get(("task", task))
    return got if got is not None else _task_record(kernel, task)[0]


def _ring(kernel, head: int, first: int, member_off: int, bound: int):
    """Entries of a list_head ring (``first`` = head->next), as containing
    struct addresses; each entry's next link comes from the same one read per
    task that gives its task_info (``_task_record``).  Bounded, loop-safe."""
    seen = {head}
    nxt, n = first, 0
    while nxt and nxt not in seen and n < bound:
        seen.add(nxt)
        t = (nxt - member_off) & U64
        yield t
        n += 1
        data = _task_record(kernel, t)[1]
        if data is None:
            return
        nxt = int.from_bytes(data[member_off:member_off + 8], "little")


def all_tasks(kernel) -> list[int]:
    """Every task_struct: init_task, the init_task.tasks ring, and each
    group's threads (signal->thread_head via task_struct.thread_node).
    One read per task (TaskLayout) plus one per thread group.  Bounded."""
    def get():
        tl = task_layout(kernel)
        init = kernel.sym("init_task")
        out, seen = [], set()
        data = _task_record(kernel, init)[1]
        leaders = [init]
        if data is not None:
            leaders += list(_ring(kernel, init + tl.tasks, tl.link(data, tl.tasks), tl.tasks, MAX_TASKS))
        for t in leaders:
            if t not in seen:
                seen.add(t)
                out.append(t)
            if tl.thread_node is None:
                continue
            data = _task_record(kernel, t)[1]
            sig = tl.link(data, tl.signal) if data is not None else 0
            if not sig:
                continue
            head = (sig + tl.thread_head) & U64
            try:
                first = kernel.read_u64(kernel.root, head)
            except ReadErrors:
                continue
            for th in _ring(kernel, head, first, tl.thread_node, MAX_THREADS):
                if th not in seen:
                    seen.add(th)
                    out.append(th)
        return out
    return _cached(kernel, "all_tasks", get)


def cpu_current(kernel, cpu: int) -> int:
    """The current task of ``cpu`` (pcpu_hot.current_task or the per-CPU
    current_task, whichever the kernel has; through the kernel root)."""
    return _cached(kernel, ("current", cpu), lambda: percpu.current_task(kernel, cpu))


def pcpu_fields(kernel, cpu: int) -> dict:
    """The hot per-CPU fields of ``cpu`` by logical name (model.percpu)."""
    def get():
        d, addrs = percpu.read_fields(kernel, cpu)
        d["_address"] = addrs["current_task"]
        return d
    return _cached(kernel, ("pcpu", cpu), get)


# ---------------------------------------------------------------- discovery
# How sandboxes are found (``discovery``): "cpus" = each vCPU's current task
# (O(vCPUs)), "tasks" = every task (O(tasks)).
MAX_SCAN = 1 << 16             # bound on the bytes of arch_sbm_exec scanned for calls


def _calls(code: bytes, base: int) -> set[int]:
    """Targets of the ``call rel32`` (E8) byte patterns in ``code`` at
    address ``base`` (a byte scan: may see a false call, never misses one)."""
    out = set()
    for i in range(len(code) - 4):
        if code[i] == 0xE8:
            rel = int.from_bytes(code[i + 1:i + 5], "little", signed=True)
            out.add((base + i + 5 + rel) & U64)
    return out


def _calls_symbol(kernel, caller: str, callee: str) -> bool | None:
    """Does ``caller`` call ``callee`` (or the 16 bytes of padding before it,
    where call-depth-tracking kernels point their calls)?  Read from the
    vmlinux file (link addresses), else from guest memory through the kernel
    root (slid addresses); None when neither can be read."""
    syms = kernel.symbols
    if caller not in syms or callee not in syms:
        return None
    size = min(syms.size(caller), MAX_SCAN)
    if not size:
        return None
    link, slid = syms.addr(caller), kernel.sym(caller)
    code = None
    try:
        code = syms.read_file_bytes(link, size) if syms.path else None
    except OSError:
        code = None
    base, target = (link, syms.addr(callee)) if code is not None else (slid, kernel.sym(callee))
    if code is None:
        try:
            code = kernel.read_virt(kernel.root, slid, size)
        except ReadErrors:
            return None
    return any(target - 16 <= t <= target for t in _calls(code, base))


def discovery(kernel) -> dict:
    """How this kernel's sandboxes are found: ``{"mode": "cpus"|"tasks", "reason"}``.

    A sandbox runs only inside arch_sbm_exec with the task's
    thread_info.sbm_state set, and the kernel clears it before the task
    leaves arch_sbm_exec.  The per-vCPU current tasks find every sandbox
    ("cpus") when that task cannot be scheduled out meanwhile: arch_sbm_exec
    keeps preemption disabled (kernel_fpu_begin, the hardening patch), or the
    kernel has no in-kernel preemption (no preempt_schedule: CONFIG_PREEMPTION
    off; nothing in the sandbox path sleeps).  Otherwise an interrupt can
    preempt a sandbox and its task waits on a run queue, on no CPU: every
    task is walked ("tasks").  A task that died inside a sandbox (an oops)
    keeps sbm_state set off-CPU; ``sbm list --all`` walks every task."""
    def get():
        syms = kernel.symbols
        if _calls_symbol(kernel, "arch_sbm_exec", "kernel_fpu_begin_mask"):
            return {"mode": "cpus", "reason": "arch_sbm_exec disables preemption (kernel_fpu_begin) "
                                              "while sbm_state is set: a sandbox's task is current on a vCPU"}
        if "preempt_schedule_irq" in syms and "preempt_schedule" not in syms:
            return {"mode": "cpus", "reason": "no in-kernel preemption (no preempt_schedule: CONFIG_PREEMPTION "
                                              "off): a sandbox's task is current on a vCPU"}
        if "preempt_schedule" in syms:
            return {"mode": "tasks", "reason": "the kernel preempts kernel code (preempt_schedule) and "
                                               "arch_sbm_exec does not disable preemption: a preempted "
                                               "sandbox's task is on no vCPU, every task is walked"}
        return {"mode": "tasks", "reason": "cannot tell whether a sandbox can be preempted (symbol table "
                                           "incomplete): every task is walked"}
    return _cached(kernel, "discovery", get, static=True)


# ---------------------------------------------------------------- sandboxes
@dataclass
class Sandbox:
    """One active sandbox instance (a task with thread_info.sbm_state set)."""
    index: int
    state: int                  # struct x86_sbm_state * (kernel VA)
    task: int
    pid: int
    comm: str
    fields: dict                # struct x86_sbm_state
    state_pa: int | None = None
    sbm: dict = field(default_factory=dict)   # struct sbm (+ buffer lists)
    cpus: list = field(default_factory=list)  # vCPUs whose current task it is
    errors: list = field(default_factory=list)

    @property
    def sbm_cr3(self) -> int:
        return self.fields.get("sbm_cr3", 0)

    @property
    def pgd_pa(self) -> int:
        return self.sbm_cr3 & ~0xFFF & ((1 << 52) - 1)

    @property
    def label(self) -> str:
        return sandbox_label(self.pid)

    def to_json(self) -> dict:
        return {"index": self.index, "label": self.label, "state": self.state,
                "state_pa": self.state_pa, "task": self.task, "pid": self.pid, "comm": self.comm,
                "cpus": self.cpus, "fields": self.fields, "sbm": self.sbm, "errors": self.errors}


def read_bufs(kernel, head: int) -> list[dict]:
    out, seen, p = [], set(), head
    lay = kernel.layouts.layout("sbm_buf")
    while p and p not in seen and len(out) < MAX_BUFS:
        seen.add(p)
        try:
            b = decode_struct(lay, kernel.read_virt(kernel.root, p, lay.size))
        except ReadErrors as e:
            out.append({"address": p, "error": str(e)})
            break
        out.append({"address": p, "kern_ptr": b.get("kern_ptr"), "sbm_ptr": b.get("sbm_ptr"),
                    "size": b.get("size")})
        p = b.get("next") or 0
    return out


def decode_sbm(kernel, sbm_va: int) -> dict:
    """struct sbm with its three buffer lists (bounded walks)."""
    lay = kernel.layouts.layout("sbm")
    d = decode_struct(lay, kernel.read_virt(kernel.root, sbm_va, lay.size))
    out = {"address": sbm_va, "error": d.get("error"), "private": d.get("private")}
    bufs = []
    for direction in BUF_LISTS:
        head = d.get(direction) or 0
        for b in read_bufs(kernel, head):
            b["direction"] = direction
            bufs.append(b)
    out["buffers"] = bufs
    return out


def _build_sandbox(kernel, idx: int, state: int, t: dict) -> Sandbox:
    lay = kernel.layouts.layout("x86_sbm_state")
    sb = Sandbox(idx, state, t["task"], t.get("pid", -1), t.get("comm", "?"), {})
    try:
        sb.fields = decode_struct(lay, kernel.read_virt(kernel.root, state, lay.size))
        sb.state_pa = phys(kernel, kernel.root, state)
    except ReadErrors as e:
        sb.errors.append(f"state {state:#x}: {e}")
        return sb
    sbm_va = sb.fields.get("sbm") or 0
    if sbm_va:
        try:
            sb.sbm = decode_sbm(kernel, sbm_va)
            if sb.sbm.get("private") != state:
                sb.errors.append(f"sbm->private {sb.sbm.get('private', 0):#x} != state {state:#x}")
        except ReadErrors as e:
            sb.errors.append(f"struct sbm at {sbm_va:#x}: {e}")
    return sb


def sandboxes(kernel, all_tasks_walk: bool | None = None) -> list[Sandbox]:
    """Active sandboxes: tasks whose thread_info.sbm_state is set.
    CPU-current tasks first (in CPU order), then the rest of the task list.
    ``all_tasks_walk``: None = what ``discovery(kernel)`` says suffices (the
    vCPUs' current tasks where a sandbox cannot be off-CPU, else every task);
    True = every task (``sbm list --all``); False = current tasks only."""
    require_sbm(kernel)
    if all_tasks_walk is None:
        all_tasks_walk = discovery(kernel)["mode"] == "tasks"
    key = ("sandboxes", all_tasks_walk)

    def get():
        found: dict[int, Sandbox] = {}
        order: list[int] = []
        cur = {}
        for c in range(kernel.target.ncpus):
            try:
                cur[c] = cpu_current(kernel, c)
            except ReadErrors:
                continue
        tasks = list(dict.fromkeys(cur.values()))
        if all_tasks_walk:
            tasks += [t for t in all_tasks(kernel) if t not in tasks]
        for task in tasks:
            t = task_info(kernel, task)
            st = t.get("sbm_state") or 0
            if not st or st in found:
                continue
            found[st] = _build_sandbox(kernel, len(order), st, t)
            order.append(st)
        for c, task in cur.items():
            st = task_info(kernel, task).get("sbm_state") or 0
            if st in found:
                found[st].cpus.append(c)
        return [found[s] for s in order]
    if not all_tasks_walk and ("sandboxes", True) in stop_cache(kernel):
        return stop_cache(kernel)[("sandboxes", True)]
    return _cached(kernel, key, get)


def find_sandbox(kernel, spec: str | None, cpu: int | None = None) -> Sandbox:
    """SANDBOX spec: 'cpuN' (the sandbox of vCPU N's current task), 'pid=N',
    '0x...' (a state address), N (a pid, else an index), or None (the
    selected vCPU's, else the first)."""
    sbs = sandboxes(kernel)
    if not sbs:
        raise SbmdbgError("no sandbox is active (no task has thread_info.sbm_state set)")
    have = ", ".join(f"{s.label} (state {s.state:#x})" for s in sbs)
    if spec is None:
        if cpu is not None:
            for s in sbs:
                if cpu in s.cpus:
                    return s
        return sbs[0]
    spec = spec.strip().lower()
    if spec.startswith("cpu"):
        try:
            c = int(spec[3:].lstrip("=") or "x", 0)
        except ValueError:
            raise SbmdbgError(f"bad CPU in {spec!r}") from None
        for s in sbs:
            if c in s.cpus:
                return s
        raise SbmdbgError(f"vCPU {c} runs no sandbox (active: {have})")
    if spec.startswith("pid="):
        spec = spec[4:]
    if spec.startswith("sandbox:"):
        spec = spec[8:]
    try:
        v = int(spec, 0)
    except ValueError:
        raise SbmdbgError(f"bad sandbox {spec!r}: cpuN, pid=N, N, or a state address") from None
    for s in sbs:
        if v in (s.pid, s.state):
            return s
    if 0 <= v < len(sbs) and not spec.startswith("0x"):
        return sbs[v]
    raise SbmdbgError(f"no sandbox {spec!r} (active: {have})")


# ---------------------------------------------------------------- state page
def state_page_views(kernel, sb: Sandbox) -> dict:
    """The ``x86_sbm_state`` symbol read through the sandbox root (must be the
    instance's state page) and through the kernel root (reads zeros)."""
    va = kernel.sym("x86_sbm_state")
    lay = kernel.layouts.layout("x86_sbm_state")
    out = {"va": va}
    for name, root in (("sandbox_root", sb.pgd_pa), ("kernel_root", kernel.root)):
        v = {"root": root}
        try:
            tr = kernel.translate(root, va)
            v["pa"] = phys(kernel, root, va)
            if tr.pa is None:
                v["error"] = tr.fault
            else:
                data = kernel.read_virt(root, va, lay.size)
                v["fields"] = decode_struct(lay, data)
                v["all_zero"] = not any(data)
                v["global"] = bool(tr.leaf.raw & 0x100)
                v["user"] = tr.perms.u
        except ReadErrors as e:
            v["error"] = str(e)
        out[name] = v
    sbv, kv = out["sandbox_root"], out["kernel_root"]
    out["sandbox_maps_state_page"] = sbv.get("pa") is not None and sbv.get("pa") == sb.state_pa
    out["kernel_reads_zero"] = bool(kv.get("all_zero"))
    out["note"] = ("sandbox_root: x86_sbm_state as the sandbox (and the entry code on its CR3) "
                   "sees it = this instance's state page; kernel_root: the same VA under the "
                   "kernel CR3 = the kernel's own (zero) x86_sbm_state in .bss")
    return out


# ---------------------------------------------------------------- vCPU mode
def _in(va, lo, n) -> bool:
    return lo <= va < lo + n


def _kernel_pgds(kernel, task: int) -> set[int]:
    """PGD physical addresses that count as "kernel root" for a vCPU running
    ``task``: the model's root, init_mm's and the task's active_mm's."""
    out = {kernel.root}
    for name in ("init_top_pgt", "swapper_pg_dir"):
        if name in kernel.symbols:
            try:
                pa = phys(kernel, kernel.root, kernel.sym(name))
                if pa is not None:
                    out.add(pa)
            except ReadErrors:
                pass
            break
    try:
        mm = kernel.read_field("task_struct", task, "active_mm")
        if mm:
            pgd = kernel.read_field("mm_struct", mm, "pgd")
            pa = phys(kernel, kernel.root, pgd)
            if pa is not None:
                out.add(pa)
    except (*ReadErrors, LayoutError):
        pass
    return out


def sandbox_label(pid) -> str:
    return f"sandbox:{pid}"


def is_sandbox_role(role: str | None) -> bool:
    return bool(role) and role.startswith("sandbox:")


def role_of_cr3(cr3: int, cr4: int, sandboxes, kernel_pgds, pti: bool = True) -> tuple[str, object]:
    """The role of ``cr3`` (a word of CR3_ROLES) and the matching sandbox.
    ``sandboxes``: [(sbm_cr3, label, obj)]; ``kernel_pgds()``: the PGD
    physical addresses that count as the kernel's (called only when needed);
    ``pti``: the kernel isolates page tables (else bit 12 means nothing)."""
    for sbm_cr3, label, obj in sandboxes:
        if sbm_cr3 and cr3 & PA_MASK == sbm_cr3 & PA_MASK:
            return label, obj
    d = decode_cr3(cr3, cr4)
    if pti and d.pti_user:
        return "user (PTI)", None
    if d.pgd_pa in kernel_pgds():
        return "kernel", None
    return "kernel (other mm)", None


def cr3_role(kernel, cr3: int, task: int | None, sbs: list[Sandbox]) -> tuple[str, Sandbox | None]:
    return role_of_cr3(cr3, kernel.cr4, [(s.sbm_cr3, s.label, s) for s in sbs],
                       lambda: _kernel_pgds(kernel, task) if task else {kernel.root}, kernel.pti_enabled())


def mode_of(cpl: int, in_sandbox: bool, own_sandbox: bool, rip_symbol: str | None,
            stack_kind: str | None, handler_stack: str | None = None) -> str:
    """The vCPU mode (a word of MODES): ``in_sandbox`` = CR3 is a sandbox's,
    ``own_sandbox`` = the current task has thread_info.sbm_state set,
    ``handler_stack`` = the stack class the kernel's handlers of sandbox
    exceptions run on (sbm.variant: the SBM exception stack, or v1's entry
    stack); the SBM exception stack always counts (NMIs from the sandbox)."""
    if cpl == 3:
        return "sandbox" if in_sandbox else "user"
    if cpl == 0 and own_sandbox:
        if in_sandbox or rip_symbol in ("x86_sbm_exec", "x86_sbm_return"):
            return "transition"
        if stack_kind == "sbm_exception_stack" or (handler_stack and stack_kind == handler_stack):
            return "sandbox (in kernel handler)"
        return "transition"
    if cpl == 0:
        return "kernel"
    return f"cpl{cpl}"


def handler_stack(kernel) -> str | None:
    """The stack class handlers of sandbox exceptions run on, detected from
    the kernel's code (sbm.variant); None when the code cannot be read."""
    from sbmdbg.sbm.variant import detect
    hs = detect(kernel).handler_stack
    return hs if hs in ("sbm_exception_stack", "entry_stack") else None


def vcpu_status(kernel, cpu: int, sbs: list[Sandbox] | None = None) -> dict:
    """Mode of one vCPU: kernel / user / sandbox / sandbox (in kernel handler) /
    transition, with CPL, CR3 role, RIP symbol, task, stack class, sandbox."""
    from sbmdbg.sbm.stacks import classify_address
    r = kernel.target.registers(cpu)
    cs, cr3, rip, rsp = r.get("cs", 0), r.get("cr3", 0), r.get("rip", 0), r.get("rsp", 0)
    cpl = cs & 3
    sbm_on = has_sbm(kernel)
    out = {"cpu": cpu, "cpl": cpl, "cs": cs, "cr3": cr3, "rip": rip, "rsp": rsp,
           "rip_symbol": symbolize(kernel, rip)}
    task = None
    try:
        task = cpu_current(kernel, cpu)
        t = task_info(kernel, task)
        out["task"] = {"task": task, "pid": t.get("pid"), "comm": t.get("comm")}
    except ReadErrors as e:
        out["task"] = {"error": str(e)}
    if sbs is None:
        sbs = sandboxes(kernel, all_tasks_walk=False) if sbm_on else []
    role, sb = cr3_role(kernel, cr3, task, sbs)
    if sb is None and sbm_on and cpl == 3 and role == "kernel (other mm)":
        # CPL 3 on a CR3 that is neither the current task's nor a current
        # sandbox's: a sandbox CR3 of a task that is not current anywhere?
        # look at every task (a process's own CR3, PTI or not, needs no walk)
        role, sb = cr3_role(kernel, cr3, task, sandboxes(kernel, all_tasks_walk=True))
    own = None
    if sbm_on and task:
        st = task_info(kernel, task).get("sbm_state") or 0
        own = next((s for s in sandboxes(kernel, all_tasks_walk=False) if s.state == st), None) if st else None
    out["sbm_state"] = own.state if own else 0
    out["cr3_role"] = role
    stack = classify_address(kernel, rsp, cpu=cpu)
    out["stack"] = stack
    out["mode"] = mode_of(cpl, sb is not None, own is not None,
                          (out["rip_symbol"] or {}).get("symbol"), stack.get("kind"),
                          handler_stack(kernel) if own is not None else None)
    sbx = sb or own
    out["sandbox"] = sbx.label if sbx else None
    out["sandbox_state"] = sbx.state if sbx else None
    if sbx is not None:
        ev = _gs_base_evidence(kernel, cpu, r.get("gs_base"))
        if task:
            ev += _fs_base_evidence(kernel, cpu, r.get("fs_base"), task, out.get("task") or {})
            ev += _pkru_evidence(kernel, cpu, r.get("pkru"), task)
        if ev:
            out["attack_evidence"] = ev
    return out


def _task_thread(kernel, task: int, field: str, size: int = 8) -> int | None:
    """task->thread.<field> (little-endian, ``size`` bytes) or None (no
    such field in this kernel, or unreadable)."""
    try:
        off = kernel.layouts.offsetof("task_struct", f"thread.{field}")
        return int.from_bytes(kernel.read_virt(kernel.root, task + off, size), "little")
    except Exception:  # noqa: BLE001 - a kernel without the field, a page we cannot read
        return None


def _fs_base_evidence(kernel, cpu: int, fs_base, task: int, who: dict) -> list[str]:
    """(issue 15) In or just out of a sandbox, the FS base is the caller's
    user TLS base: the sandbox's task is current on this CPU, and while a task
    is current x86_64 Linux keeps its user FS base in the register (the
    kernel never uses FS; __switch_to saves it to thread.fsbase when the task
    is switched out and loads the next task's).  So the expected value is the
    current task's thread.fsbase.  It can be stale only if the task's user
    code wrote its own FS base with WRFSBASE since it was last switched in
    (arch_prctl(ARCH_SET_FS) updates both); a kernel thread's is 0."""
    if fs_base is None:
        return []
    want = _task_thread(kernel, task, "fsbase")
    if want is None or fs_base == want:
        return []
    name = f"{who.get('pid')} {who.get('comm')}" if "pid" in who else f"task {task:#x}"
    return [f"FS base {fs_base:#x} on cpu {cpu}: not {name}'s thread.fsbase {want:#x} "
            "(its user TLS: a WRFSBASE or FS load in the sandbox)"]


def _pkru_evidence(kernel, cpu: int, pkru, task: int) -> list[str]:
    """(issue 15) PKRU in or just out of a sandbox must be the current
    task's (thread.pkru, loaded at its last switch-in) or 0 (all keys
    accessible: what the reference kernel gives a sandbox); anything else is
    a WRPKRU by the sandbox, which could deny the kernel its own pages (key
    0) after the exit.  Only where the target reads PKRU (QEMU 7.2's gdb
    stub and QMP expose none: then nothing is checked)."""
    if pkru is None:
        return []
    want = _task_thread(kernel, task, "pkru", 4)
    if want is None or pkru in (0, want):
        return []
    return [f"PKRU {pkru:#x} on cpu {cpu}: neither the task's thread.pkru {want:#x} nor 0 "
            "(a WRPKRU in the sandbox)"]


def _gs_base_evidence(kernel, cpu: int, gs_base) -> list[str]:
    """(issue 15) In or around a sandbox the GS base must be the CPU's
    per-CPU base: the entry code reads `current` through it."""
    if gs_base is None:
        return []
    try:
        want = kernel.per_cpu_offset(cpu) & ((1 << 64) - 1)
    except Exception:  # noqa: BLE001 - no per-CPU offsets (not an SMP x86_64 kernel)
        return []
    if gs_base == want:
        return []
    return [f"GS base {gs_base:#x} on cpu {cpu}: not its per-CPU base {want:#x} "
            "(a segment load or WRGSBASE in the sandbox)"]


def symbolize(kernel, va: int) -> dict | None:
    s = kernel.lookup(va)
    if s is None or s[1] >= 1 << 20:
        return None
    return {"symbol": s[0], "offset": s[1], "text": f"{s[0]}+{s[1]:#x}"}


def vcpus_status(kernel) -> list[dict]:
    getattr(kernel.target, "prefetch_registers", lambda: None)()
    sbs = sandboxes(kernel, all_tasks_walk=False) if has_sbm(kernel) else []
    return [vcpu_status(kernel, c, sbs) for c in range(kernel.target.ncpus)]


# ---------------------------------------------------------------- hooks
def sandbox_roots(kernel) -> list[RootSpec]:
    """The extension's sandbox roots: ``--root sandbox[=N]`` in vtop/pt/ptov."""
    if not has_sbm(kernel):
        raise NoSandboxMode(no_sbm_reason(kernel))
    return [RootSpec(s.label, s.pgd_pa, s.sbm_cr3,
                     {"pid": s.pid, "state": s.state, "index": s.index}) for s in sandboxes(kernel)]


def kernel_root_fixup(kernel) -> int | None:
    """The extension's root fixup: if the discovered root is a sandbox's (the vCPU was
    stopped in a sandbox), x86_sbm_state.kernel_cr3 under it is non-zero --
    the same test the entry code does -- and names the kernel root."""
    if "x86_sbm_state" not in kernel.symbols:
        return None
    try:
        off = kernel.layouts.offsetof("x86_sbm_state", "kernel_cr3")
        kcr3 = kernel.read_u64(kernel.root, kernel.sym("x86_sbm_state") + off)
    except (*ReadErrors, LayoutError):
        return None
    if not kcr3:
        return None
    return decode_cr3(kcr3, kernel.cr4).kernel_pgd_pa


EXTENSION = Extension("sbm", sandbox_roots=sandbox_roots, root_fixup=kernel_root_fixup)


def open_kernel(target, vmlinux: str | None = None, **kw):
    """The kernel model with the SBM model attached: what every face opens
    (``kw`` as sbmdbg.model.kernel.open_kernel: symbols, layouts, cpu, verify)."""
    ext = tuple(kw.pop("extensions", ()))
    kw.setdefault("prefetch", PREFETCH)
    return km.open_kernel(target, vmlinux, extensions=ext + (EXTENSION,), **kw)
