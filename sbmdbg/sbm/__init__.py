"""The SBM model (no gdb import): sandboxes, per-vCPU mode, region labels,
isolation audit, stacks.

    open_kernel(target, vmlinux, *, symbols, layouts, cpu, verify) -> Kernel
        the one way faces open the kernel model: the SBM extension (the
        ``--root sandbox[=N]`` provider and the sandbox-CR3 -> kernel-root
        fixup) attached explicitly

API for other faces (tracer, dashboard); every function takes a
``sbmdbg.model.kernel.Kernel`` and caches per stop (until kernel.invalidate()):

    has_sbm(kernel) -> bool;  no_sbm_reason(kernel) -> str | None
    vcpu_status(kernel, cpu) -> dict   mode, cpl, cs, cr3, cr3_role, rip(+symbol),
                                       rsp, stack (class), task, sandbox, sbm_state
    vcpus_status(kernel) -> [dict]     the same for every vCPU (what `sbm` prints)
    sandboxes(kernel, all_tasks_walk=None) -> [Sandbox]
                                       None: as discovery() allows (O(vCPUs) where a
                                       sandbox cannot be off-CPU), True: every task
                                       .state .task .pid .comm .fields (x86_sbm_state)
                                       .sbm (error, buffers) .cpus .sbm_cr3 .pgd_pa .label
    discovery(kernel) -> dict          {"mode": "cpus"|"tasks", "reason"}: how sandboxes are found
    find_sandbox(kernel, spec) -> Sandbox  (cpuN | pid=N | N | 0xSTATE)
    state_page_views(kernel, sb) -> dict   x86_sbm_state via the sandbox and kernel roots
    classify_address(kernel, va, cpu=None) -> dict   which stack va is on
    top_of_intr_stack(kernel, cpu) -> int
    backtrace(kernel, cpu) -> dict     frames across the sandbox boundary
    labeled_map(kernel, sb) -> dict    every mapped range of the sandbox table, labeled
    sandbox_regions(kernel, sb) -> [dict]  the design's regions for a sandbox
    audit_ranges(ranges, ...) -> [finding]
    PREFETCH                           the structs the model reads (DwarfLayouts.prefetch)

The commands built on it (status, list, show, ...) are in sbmdbg.commands.
"""
from sbmdbg.sbm.model import (  # noqa: F401
    EXTENSION, PREFETCH, NoSandboxMode, Sandbox, SBM_CS, USER_CS, cpu_current, discovery, find_sandbox, has_sbm, no_sbm_reason,
    open_kernel, require_sbm, sandbox_roots, sandboxes, state_page_views, task_info, vcpu_status, vcpus_status)
from sbmdbg.sbm.stacks import (  # noqa: F401
    backtrace, classify_address, cpu_stack, pt_regs_on_exc_stack, top_of_intr_stack)
from sbmdbg.sbm.regions import labeled_map, sandbox_regions  # noqa: F401
from sbmdbg.sbm.audit import audit_ranges, diff_mappings, diff_roots  # noqa: F401
