"""What a scenario may name, checked before any VM boots: the demo scenarios
of the reference kernel, the ``sbm`` gdb subcommands and the top-level keys
of their ``--json`` output, and the fields of trace events.

The ``sbm`` commands and their key sets come from the command table
(``sbmdbg.commands.TABLE``); a unit test runs the commands on the recorded
kernel snapshot and checks that the sets still match
(``tests/unit/test_check_spec.py``).
"""
from __future__ import annotations

from sbmdbg.commands import TABLE

DEMO_DIR = "/sys/kernel/debug/sbm_demo"

#: demo scenario -> sbm_error the reference kernel gives (0 = returns normally)
DEMO_SCENARIOS = {
    "ok": 0,
    "io": 0,
    "write_ro_input": -14,
    "read_guard": -14,
    "write_kernel_data": -14,
    "write_kernel_bss": -14,
    "write_stack": -14,
    "stack_overflow": -14,
    "noncanonical": -14,
    "read_null": -14,
    "irq_in_sandbox": 0,
}
#: the attack catalogue (issue 15; fixtures/kernel/README.md "Hostile
#: sandboxes"): scenario -> sbm_error of the attack on the reference kernel
#: (each also runs a positive control); ``nmi_storm [N [external]]`` as well
ATTACK_SCENARIOS = {
    "gs_selector": 0,
    "wrgsbase": 0,
    "wrfsbase": 0,
    "syscall": -14,
    "int80": -14,
    "lret32": -14,
    "int1": -14,
    "trap_flag": -14,
    "alignment_check": -14,        # 0 where the CPU model raises no #AC (TCG)
    "sse_unmasked": -14,
    "warn_ud2": -14,
    "pkru_write": -14,
    "endless_loop": -110,          # -ETIMEDOUT: the sandbox time limit
    "nested_from_irq": 0,
    "irqs_off_caller": -14,
    "unaligned_output": -22,       # -EINVAL: the in-place writable map is refused
}
#: every scenario name `demo =` accepts (besides "repeat N" and "nmi_storm [N]")
ALL_DEMO_SCENARIOS = {**DEMO_SCENARIOS, **ATTACK_SCENARIOS}
#: ``repeat N`` runs ``ok`` N times (1 <= N <= 1000000)
DEMO_REPEAT_MAX = 1_000_000

#: ``sbm`` subcommand ("" = bare ``sbm``) -> top-level keys of its --json
#: output (None: not checked; the command exists but its JSON is free-form).
SBM_COMMANDS: dict[str, frozenset[str] | None] = {
    "": TABLE["status"].keys,
    **{name: cmd.keys for name, cmd in TABLE.items()},
    "target": None,   # gdb session commands, not in the table
    "trace": None,
}

#: Commands a stop-point assertion must not run: they change what the checker
#: relies on (the tracer is driven by ``transitions``, the source by the runner).
SBM_COMMANDS_FORBIDDEN = {"trace": "use a step's `transitions` table instead of `sbm trace`",
                          "target": "the checker chooses the memory source"}

#: trace event kinds and the count names of a ``transitions`` table
TRACE_COUNTS = {
    "enters": "enter", "returns": "return", "aborts": "abort", "exits": "exit",
    "irqs": "irq", "nmis": "nmi", "irq_returns": "irq_return", "spurious": "spurious",
    "calls": "call", "insns": "sandbox_insn",
}
#: per-kind tables of a ``transitions`` table (every event of that kind must match)
TRACE_KINDS = {"enter", "return", "abort", "exit", "irq", "nmi", "irq_return", "spurious", "call",
               "sandbox_insn"}
#: fields of trace events (sbmdbg.trace.events schema 2)
TRACE_FIELDS = frozenset({
    "seq", "kind", "host_ns", "jiffies", "vcpu", "point", "pid", "comm", "task", "sandbox", "cr3",
    "cr3_role", "cpl", "mode", "rip", "sym", "rsp", "stack",
    "sbm", "func", "func_sym", "data", "sticky_error", "args", "sbm_tos", "exc_tos", "sbm_cr3",
    "ret", "vector", "vector_name", "error_code", "error_bits", "error_desc", "stub", "cr2", "cr2_region",
    "fault_rip", "fault_sym", "fault_rsp", "fault_stack", "via", "address", "error", "aborted",
    "to_rip", "to_sym", "to_rsp", "agrees", "read_error", "attack", "attack_insn", "attack_evidence",
    "insn", "bytes",
})
TRACE_LEVELS = ("lean", "fast", "full", "plugin")   # plugin: the no-stop tracer (sbmdbg.trace.fast)
