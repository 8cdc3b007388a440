"""Stacks of an SBM kernel: top_of_intr_stack(), address classification,
pt_regs on the SBM exception stack, and a backtrace across the sandbox
boundary (sandbox frames through the sandbox root, then [sandbox tos-8] ->
x86_sbm_exec's saved registers -> the caller's kernel frames)."""
from __future__ import annotations

from sbmdbg.sbm import model as m
from sbmdbg.model import stacks as xs

U64 = m.U64
PAGE = 4096
# The stack classes of every face (`sbm --json` rows' stack.kind, the tracers'
# stack / fault_stack): what classify_address / classify_in answer.
STACK_KINDS = ("task_stack", "irq_stack", "entry_stack", "ist_stack", "ist_guard",
               "sbm_sandbox_stack", "sbm_sandbox_guard", "sbm_exception_stack", "unknown")
CEA_STACK_KINDS = ("entry_stack", "ist_stack", "ist_guard")   # the cpu_entry_area parts that are stacks


def top_of_intr_stack(kernel, cpu: int) -> int:
    """As sync_regs() computes it: while the current task's sbm_state is set,
    state->exc_stack + EXCEPTION_STKSZ; else pcpu_hot.top_of_stack."""
    task = m.cpu_current(kernel, cpu)
    st = m.task_info(kernel, task).get("sbm_state") if m.has_sbm(kernel) else 0
    if st:
        exc = kernel.read_field("x86_sbm_state", st, "exc_stack")
        return (exc + m.sizes(kernel)["exception_stksz"]) & U64
    return m.pcpu_fields(kernel, cpu)["top_of_stack"] & U64


def stack_ranges(kernel, cpu: int | None = None) -> list[dict]:
    """Every known stack (and cpu_entry_area part) as {kind, name, start, end, ...}.
    cpu=None: all CPUs.  Task stacks of the CPUs' current tasks and of the
    sandboxes' tasks only (use classify_address for any task)."""
    def get():
        sz = m.sizes(kernel)
        out = []
        ncpu = kernel.target.ncpus
        for c in range(ncpu):
            try:
                pc = m.pcpu_fields(kernel, c)
            except m.ReadErrors:
                continue
            irq = xs.irq_stack(kernel, c, pc, sz["irq_stack_size"])
            if irq:
                out.append(irq)
            out += [p for p in xs.cea_parts(kernel, c) if p["kind"] in CEA_STACK_KINDS]
            task = pc.get("current_task") or 0
            if task:
                out += _task_stack(kernel, task, c)
        if m.has_sbm(kernel):
            for sb in m.sandboxes(kernel, all_tasks_walk=False):
                out += sbm_stacks(kernel, sb) + sbm_guard(sb.fields, sb.label)
        return out
    rs = m._cached(kernel, "stack_ranges", get)
    return rs if cpu is None else [r for r in rs if r.get("cpu") in (None, cpu)]


def _task_stack(kernel, task: int, cpu=None) -> list[dict]:
    t = m.task_info(kernel, task)
    return task_stack_of(kernel, task, t.get("stack"), cpu, t.get("pid"), t.get("comm"))


def task_stack_of(kernel, task: int, base: int | None, cpu, pid, comm) -> list[dict]:
    """The thread stack of ``task`` (task_struct.stack = ``base``)."""
    if not base:
        return []
    return [{"kind": "task_stack", "name": f"task stack of {comm} (pid {pid})",
             "start": base, "end": base + m.sizes(kernel)["thread_size"], "cpu": cpu,
             "task": task, "pid": pid, "comm": comm}]


def sbm_stacks(kernel, sb) -> list[dict]:
    return sbm_stacks_of(kernel, sb.fields, sb.label)


def sbm_stacks_of(kernel, f: dict, label: str) -> list[dict]:
    """The sandbox and exception stacks of the x86_sbm_state fields ``f``."""
    sz = m.sizes(kernel)
    out = []
    if f.get("stack"):
        out.append({"kind": "sbm_sandbox_stack", "name": f"SBM sandbox stack ({label})",
                    "start": f["stack"], "end": f["stack"] + sz["thread_size"], "cpu": None,
                    "sandbox": label})
    if f.get("exc_stack"):
        out.append({"kind": "sbm_exception_stack", "name": f"SBM exception stack ({label})",
                    "start": f["exc_stack"], "end": f["exc_stack"] + sz["exception_stksz"],
                    "cpu": None, "sandbox": label})
    return out


def sbm_guard(f: dict, label: str) -> list[dict]:
    """The guard page below the sandbox stack (a stack overflow lands there)."""
    if not f.get("stack"):
        return []
    return [{"kind": "sbm_sandbox_guard", "name": f"SBM sandbox stack guard page ({label})",
             "start": f["stack"] - PAGE, "end": f["stack"], "cpu": None, "sandbox": label}]


def classify_in(ranges: list[dict], va: int, cpu: int | None = None) -> dict | None:
    """The first of ``ranges`` holding ``va`` (that CPU's first), as
    classify_address answers it; None when none does."""
    va &= U64
    if cpu is not None:
        ranges = sorted(ranges, key=lambda r: r.get("cpu") != cpu)
    for r in ranges:
        if r["start"] <= va < r["end"]:
            return _hit(r, va)
    return None


def classify_address(kernel, va: int, cpu: int | None = None, all_tasks: bool = False) -> dict:
    """Which stack ``va`` is on: {kind, name, start, end, offset_from_top, ...}
    or {kind: "unknown"}; kinds: STACK_KINDS.
    ``cpu`` prefers that CPU's stacks; ``all_tasks`` also scans every task's
    stack (bounded walk of the task list)."""
    va &= U64
    hit = classify_in(stack_ranges(kernel), va, cpu)
    if hit is not None:
        return hit
    if all_tasks or cpu is None:
        for t in m.all_tasks(kernel):
            for r in _task_stack(kernel, t):
                if r["start"] <= va < r["end"]:
                    return _hit(r, va)
    return {"kind": "unknown", "name": "not a known stack", "va": va}


def _hit(r: dict, va: int) -> dict:
    d = dict(r)
    d["va"] = va
    d["offset_from_top"] = r["end"] - va
    return d


# ---------------------------------------------------------------- backtrace
def _frame(kernel, f: dict, where: str, root_label: str) -> dict:
    if f.get("how") == "registers":
        s = m.symbolize(kernel, f["pc"])
        text = s["text"] if s else None
    else:  # a return address: the call is just before it (noreturn calls end functions)
        s = m.symbolize(kernel, f["pc"])
        if s is None or s["offset"] != 0 or s["symbol"].startswith("__pfx_"):  # x86_sbm_return: pushed
            s = m.symbolize(kernel, f["pc"] - 1)
            if s is not None:
                s = {**s, "text": f"{s['symbol']}+{s['offset'] + 1:#x}"}
        text = s["text"] if s else None
    return {"pc": f["pc"], "symbol": text, "sp": f.get("sp"),
            "frame": f.get("frame"), "how": f.get("how"), "context": where, "root": root_label}


def backtrace(kernel, cpu: int, max_frames: int = 64) -> dict:
    """Frames of vCPU ``cpu`` from its registers, crossing the sandbox boundary.

    In the sandbox (CR3 = sbm_cr3): frame-pointer walk through the sandbox
    root until the return address x86_sbm_return / rbp 0, then the back-link
    word [sandbox tos-8] = state->return_sp: x86_sbm_exec pushed rbp, rbx,
    r12..r15 there, so [return_sp+5*8] is its saved rbp and [return_sp+6*8]
    the return address into arch_sbm_exec; kernel frames continue through the
    kernel root.  In a kernel handler: kernel frames until an encoded pt_regs
    link; a pt_regs with CS == __SBM_CS continues in the sandbox."""
    r = kernel.target.registers(cpu)
    st = m.vcpu_status(kernel, cpu)
    sb = None
    if m.has_sbm(kernel) and st.get("sandbox_state"):
        sb = next((s for s in m.sandboxes(kernel) if s.state == st["sandbox_state"]), None)
    ret_pc = kernel.sym("x86_sbm_return") if "x86_sbm_return" in kernel.symbols else None
    frames: list[dict] = []
    notes: list[str] = []
    pc, sp, bp = r.get("rip", 0), r.get("rsp", 0), r.get("rbp", 0)
    ctx = "sandbox" if st["mode"] == "sandbox" else "kernel"
    first = True
    budget = max_frames
    for _hop in range(8):  # contexts: kernel <-> sandbox <-> kernel ...
        if ctx == "sandbox" and sb is None:
            notes.append("sandbox context without a known sandbox")
            break
        root = sb.pgd_pa if ctx == "sandbox" else kernel.root
        root_label = sb.label if ctx == "sandbox" else "kernel"
        stops = {ret_pc} if (ctx == "sandbox" and ret_pc) else set()
        # sandbox frames live on the sandbox stack: an rbp elsewhere is the
        # kernel's (the v1 series enters the sandbox with it), not a frame
        in_stack = _on_sandbox_stack(kernel, sb) if ctx == "sandbox" else None
        last = None
        for f in xs.fp_walk(kernel, root, pc, sp, bp, max_frames=budget, stop_pcs=stops,
                            first_from_regs=first, in_stack=in_stack):
            if "pc" in f and "end" not in f:
                if frames and f["how"] == "link" and frames[-1]["pc"] == f["pc"]:
                    continue
                frames.append(_frame(kernel, f, ctx, root_label))
            last = f
        first = False
        budget = max_frames - len(frames)
        if last is None or budget <= 0:
            break
        if "pt_regs" in last:
            regs_va = last["pt_regs"]
            try:
                regs = xs.decode_pt_regs(kernel, regs_va, kernel.root)
            except m.ReadErrors as e:
                notes.append(f"pt_regs at {regs_va:#x} unreadable: {e}")
                break
            cs = regs.get("cs", 0)
            frames.append({"pt_regs": regs_va, "cs": cs, "context": ctx,
                           "symbol": f"--- pt_regs (cs={cs:#x}{' __SBM_CS: from the sandbox' if cs == m.SBM_CS else ''}) ---"})
            pc, sp, bp = regs.get("ip", 0), regs.get("sp", 0), regs.get("bp", 0)
            if cs == m.SBM_CS or (cs & 3 == 3 and sb is not None):
                ctx = "sandbox"
            elif cs & 3:
                notes.append("interrupted user mode: end of kernel frames")
                break
            else:
                ctx = "kernel"
            first = True   # a fresh register set: the interrupted pc may be in a prologue
            continue
        end = str(last.get("end", ""))
        if ctx == "sandbox" and sb is not None and (end == "boundary" or end.startswith("rbp is 0")
                                                    or end.endswith("is not a frame on this stack")):
            if end.endswith("is not a frame on this stack"):
                notes.append(f"sandbox rbp {last.get('bp', 0):#x} is not on the sandbox stack "
                             "(the kernel's rbp at entry): not followed")
            tos = sb.fields.get("stack", 0) + m.sizes(kernel)["thread_size"]
            try:
                ksp = kernel.read_u64(sb.pgd_pa, tos - 8)
            except m.ReadErrors as e:
                notes.append(f"back-link [tos-8] unreadable: {e}")
                break
            frames.append({"boundary": True, "context": "boundary", "sp": ksp,
                           "symbol": f"--- sandbox boundary: [tos-8] = kernel rsp {ksp:#x}"
                                     f"{' (= state->return_sp)' if ksp == sb.fields.get('return_sp') else ''} ---"})
            try:
                bp = kernel.read_u64(kernel.root, ksp + 5 * 8)
                pc = kernel.read_u64(kernel.root, ksp + 6 * 8)
            except m.ReadErrors as e:
                notes.append(f"x86_sbm_exec frame at {ksp:#x} unreadable: {e}")
                break
            sp = ksp + 7 * 8
            ctx = "kernel"
            frames.append(_frame(kernel, {"pc": pc, "sp": sp, "how": "x86_sbm_exec saved frame"},
                                 "kernel", "kernel"))
            continue
        if last.get("end"):
            notes.append(last["end"])
        break
    return {"cpu": cpu, "mode": st["mode"], "frames": frames, "notes": notes}


def _on_sandbox_stack(kernel, sb):
    if sb is None or not sb.fields.get("stack"):
        return None
    lo = sb.fields["stack"]
    hi = lo + m.sizes(kernel)["thread_size"]
    return lambda va: lo <= va < hi


# ---------------------------------------------------------------- sbm stack
def pt_regs_on_exc_stack(kernel, sb, cpu: int | None = None) -> dict | None:
    """The sandbox's saved frame, where the kernel under test keeps it
    (sbm.variant, from its code): a pt_regs whose IRET part is the frame
    x86_sbm_exec built at exc_top (reference) or below the kernel rsp at
    [exc_top-8] (v1); on a kernel whose handlers run on the entry stack
    (v1), with ``cpu`` in such a handler, the pt_regs at the top of that
    CPU's entry stack."""
    from sbmdbg.sbm.variant import detect
    var = detect(kernel)
    sz = m.sizes(kernel)
    exc = sb.fields.get("exc_stack") or 0
    if not exc:
        return None
    exc_top = exc + sz["exception_stksz"]
    gap = var.exc_frame_gap or 0
    top, where = exc_top - gap, "sbm_exception_stack"
    if cpu is not None and var.handler_stack == "entry_stack":
        st = m.vcpu_status(kernel, cpu)
        kind = st["stack"].get("kind")
        if st.get("mode") == "sandbox (in kernel handler)" and kind == "entry_stack":
            top, where = st["stack"]["end"], "entry_stack"
        elif st.get("mode") == "sandbox (in kernel handler)" and kind == "sbm_exception_stack":
            top = exc_top       # an NMI from the sandbox: its pt_regs at the very top
    va = top - sz["pt_regs"]
    out = {"address": va, "top": top}
    if where != "sbm_exception_stack":
        out["stack"] = where
    if gap:
        out["exc_top"] = exc_top
        out["kernel_rsp_slot"] = exc_top - gap
        try:
            ksp = kernel.read_u64(kernel.root, exc_top - gap)
            out["kernel_rsp"] = ksp
            out["kernel_rsp_is_return_sp"] = ksp == sb.fields.get("return_sp")
        except m.ReadErrors as e:
            out["kernel_rsp_error"] = str(e)
    try:
        regs = xs.decode_pt_regs(kernel, va, kernel.root)
    except m.ReadErrors as e:
        out["error"] = str(e)
        return out
    out["regs"] = regs
    cs = regs.get("cs", 0)
    out["from_sandbox"] = cs == m.SBM_CS
    out["cs_meaning"] = ("__SBM_CS (a frame saved from the sandbox)" if cs == m.SBM_CS else
                         "user CS" if cs == m.USER_CS else "kernel CS" if cs == m.KERNEL_CS else
                         "empty (nothing saved yet)" if cs == 0 else "unexpected")
    if cs == m.USER_CS and regs.get("sp") == (sb.fields.get("stack", 0) + m.sizes(kernel)["thread_size"] - 16):
        out["cs_meaning"] = "user CS: the IRET frame x86_sbm_exec built to enter the sandbox"
    out["valid"] = cs in (m.SBM_CS, m.USER_CS, m.KERNEL_CS)
    s = m.symbolize(kernel, regs.get("ip", 0))
    out["ip_symbol"] = s["text"] if s else None
    return out


def cpu_stack(kernel, cpu: int) -> dict:
    r = kernel.target.registers(cpu)
    st = m.vcpu_status(kernel, cpu)
    pc = m.pcpu_fields(kernel, cpu)
    out = {"cpu": cpu, "mode": st["mode"], "rsp": r.get("rsp"), "rsp_class": st["stack"],
           "top_of_stack": pc.get("top_of_stack", 0) & U64,
           "top_of_intr_stack": top_of_intr_stack(kernel, cpu),
           "sbm_state": st.get("sbm_state") or 0, "sandbox": st.get("sandbox")}
    out["intr_stack_is_sbm"] = out["top_of_intr_stack"] != out["top_of_stack"]
    if st.get("sbm_state"):
        sb = next((s for s in m.sandboxes(kernel) if s.state == st["sbm_state"]), None)
        if sb is not None:
            out["sbm_stacks"] = sbm_stacks(kernel, sb)
            out["exc_pt_regs"] = pt_regs_on_exc_stack(kernel, sb, cpu)
            out["return_sp"] = sb.fields.get("return_sp")
    out["backtrace"] = backtrace(kernel, cpu)
    return out
