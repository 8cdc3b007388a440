"""The command table: every ``sbm`` command declared once, shared by every face.

A ``Command`` has its arguments (one argparse declaration), a compute function
``(kernel, args) -> JSON-able dict`` (sbmdbg.commands.compute) and a render
function ``(dict) -> [renderable]`` (sbmdbg.commands.render).  The faces are
built from ``TABLE``: gdb's ``sbm CMD`` commands (sbmdbg.gdbcmd.sbmcmds),
``sbmdbg inspect ... CMD`` (sbmdbg.inspect), the dashboard (compute) and
``sbmdbg check`` (the JSON keys a scenario may assert on, sbmdbg.check.known).

Not in the table: ``sbm target`` and ``sbm trace`` (they drive the gdb
session, not the kernel model).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from sbmdbg import validate as V
from sbmdbg.commands import compute as C
from sbmdbg.commands import render as R
from sbmdbg.commands import why as WHY
from sbmdbg.commands.parser import ArgError, HelpShown, Parser  # noqa: F401  (re-exported)

ROOT_HELP = "kernel | user | sandbox[=N] | a CR3 value"
SANDBOX_HELP = "cpuN (the sandbox of vCPU N), pid=N, N (pid or index), or the state address"


@dataclass(frozen=True)
class Command:
    name: str
    doc: str                                   # help text: summary line, then usage
    args: Callable[[argparse.ArgumentParser], None]
    compute: Callable[..., dict]
    render: Callable[[dict], list]
    keys: frozenset | None = None              # top-level JSON keys (None: free-form)
    complete: str | None = None                # positional words: "sandbox" | "cpu" | "root"
    addresses: tuple[str, ...] = ()            # arguments a face may give as an expression
    fails: Callable[[dict], str | None] | None = None  # a failure message for this result

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0]


# ---------------------------------------------------------------- arguments
def _no_args(p):
    pass


def _list_args(p):
    p.add_argument("--all", action="store_true", help="walk every task, not only the vCPUs' current ones")


def _sandbox_arg(p):
    p.add_argument("sandbox", nargs="?", help=SANDBOX_HELP + "; default: every active sandbox")


def _show_args(p):
    _sandbox_arg(p)
    p.add_argument("--no-map", action="store_true", help="skip the labeled page table")


def _cpu_arg(p):
    p.add_argument("cpu", nargs="?", default="all", help="CPU number or 'all' (default)")


def _diff_args(p):
    p.add_argument("root_a", help=ROOT_HELP)
    p.add_argument("root_b", help=ROOT_HELP)
    p.add_argument("--range", help="START-END virtual range")


def _vtop_args(p):
    p.add_argument("va", help="virtual address (in gdb: also an expression)")
    p.add_argument("--root", default="kernel", help=ROOT_HELP + " (default kernel)")


def _pt_args(p):
    p.add_argument("root", nargs="?", default="kernel", help=ROOT_HELP + " (default kernel)")
    p.add_argument("--range", help="START-END virtual range")
    p.add_argument("--flags", help="keep only mappings with these effective flags")
    p.add_argument("--raw", action="store_true", help="one line per page (no merging)")
    p.add_argument("--max-entries", type=V.arg_int(1, 100_000_000), default=4_000_000)


def _ptov_args(p):
    p.add_argument("pa", help="physical address (in gdb: also an expression)")
    p.add_argument("--root", default="kernel", help=ROOT_HELP + " (default kernel)")


def _audit_fails(d: dict) -> str | None:
    if not d["above_info"]:
        return None
    from sbmdbg.sbm.audit import severity_rank
    n = sum(1 for a in d["audits"] for f in a["findings"] if severity_rank(f["severity"]) > 0)
    return f"{n} finding(s) above info (worst: {d['worst']})"


# ---------------------------------------------------------------- the table
_STATUS_KEYS = frozenset({"sbm", "note", "cpus", "sandboxes"})

TABLE: dict[str, Command] = {c.name: c for c in (
    Command("status", """Per vCPU: mode (kernel/user/sandbox/transition), CPL, CR3 role, RIP, task,
stack class, sandbox.

Usage: sbm [--json]   (also: sbm status)""", _no_args, C.status, R.status, _STATUS_KEYS),
    Command("list", """List the active sandboxes (tasks with thread_info.sbm_state set).

Usage: sbm list [--all] [--json]
Looks at each vCPU's current task when the kernel keeps a sandbox's task on
its CPU (preemption off in arch_sbm_exec, or no in-kernel preemption); else,
and with --all, walks every task ("discovery" says which and why).""",
            _list_args, C.list_, R.sandbox_list, frozenset({"sandboxes", "discovery"})),
    Command("show", """Show a sandbox: x86_sbm_state, struct sbm and its buffers, the state page read
through the sandbox root and through the kernel root, the labeled page table.

Usage: sbm show [SANDBOX] [--no-map] [--json]
SANDBOX: cpuN (the sandbox of vCPU N), pid=N, N (pid or index), or the state
address; default: every active sandbox.""", _show_args, C.show, R.show, frozenset({"sandboxes"}),
            complete="sandbox"),
    Command("stack", """Where each vCPU's rsp is, top_of_stack vs top_of_intr_stack, the pt_regs on the
SBM exception stack, and a backtrace across the sandbox boundary.

Usage: sbm stack [CPU|all] [--json]""", _cpu_arg, C.stack, R.stack, frozenset({"cpus"}), complete="cpu"),
    Command("audit", """Audit a sandbox page table against the SBM design's table (W+X, entry text
executable at CPL 3, user-accessible state page / exception stack, user half,
writable inputs or kernel data, global PTEs, unexplained mappings).

Usage: sbm audit [SANDBOX] [--json]
Fails (gdb error; exit status 1 offline) when a finding is above "info".""",
            _sandbox_arg, C.audit, R.audit, frozenset({"worst", "above_info", "audits"}),
            complete="sandbox", fails=_audit_fails),
    Command("diff", """What one page-table root maps that the other does not, and where permissions
differ (merged ranges).

Usage: sbm diff ROOT_A ROOT_B [--range A-B] [--json]   (ROOT: kernel|user|sandbox[=N]|CR3)""",
            _diff_args, C.diff, R.diff, complete="root"),
    Command("pcpu", """Decode the hot per-CPU fields (current task, preempt count, stacks, softirqs)
of each CPU: struct pcpu_hot (Linux 6.2-6.14) or the separate per-CPU
variables (current_task, __preempt_count, cpu_current_top_of_stack, ...:
Linux 6.1 and 6.15+), whichever the kernel has; the title says which.

Usage: sbm pcpu [CPU|all] [--json]
The layout comes from DWARF and the symbol table; memory is read physically
through the kernel root, so this works with a vCPU stopped in user mode
under PTI.  "vCPU mode" is the SBM model's (sandbox, transition, ...).""",
            _cpu_arg, C.pcpu, R.pcpu, frozenset({"layout", "layout_description", "cpus", "root", "slide"}),
            complete="cpu"),
    Command("vtop", """Translate a virtual address through a page-table root, showing every level.

Usage: sbm vtop VA [--root kernel|user|sandbox[=N]|CR3] [--json]""", _vtop_args, C.vtop, R.vtop,
            frozenset({"va", "root", "levels", "entries", "pa", "page_size", "perms", "global",
                       "pkey", "cache_index", "fault", "findings", "root_label"}), addresses=("va",)),
    Command("pt", """Dump a page-table root as merged ranges (same attributes, contiguous VA and PA).

Usage: sbm pt [ROOT] [--range A-B] [--flags w,x,u,s,ro,nx,g,ng] [--raw] [--json]""", _pt_args, C.pt, R.pt,
            frozenset({"root", "root_label", "mappings", "truncated", "more_ranges", "findings", "stats"}), complete="root"),
    Command("ptov", """Find the virtual addresses that map a physical address under a root.

Usage: sbm ptov PA [--root kernel|user|sandbox[=N]|CR3] [--json]""", _ptov_args, C.ptov, R.ptov,
            frozenset({"pa", "root", "root_label", "vas"}), addresses=("pa",)),
    Command("kernel", """Show what the kernel model found: root, paging levels, KASLR slide, bases,
the per-CPU layout (pcpu_hot or per-cpu variables), whether it has SandBox Mode.

Usage: sbm kernel [--json]""", _no_args, C.kernel_summary, R.kernel),
    Command("why", """Explain a sandbox abort: the faulting instruction (vmlinux), its source line and
inlined chain (DWARF), the access, what the address is (buffer, region, the
kernel's view), the sandbox and kernel page-table walks, the design rule.

Usage: sbm why [SANDBOX] [--rip X --cr2 X --error-code N --vector N] [--json]
Stop in the fault path (e.g. `break handle_sbm_fault`); offline: `sbmdbg trace why`.""",
            WHY.args, WHY.compute, WHY.render,
            frozenset({"fault", "instruction", "source", "access", "address", "walks", "denied",
                       "rule", "summary", "sandbox"}), complete="sandbox"),
)}

#: name -> compute function (the JSON of every face)
COMMANDS = {name: c.compute for name, c in TABLE.items()}


def add_arguments(cmd: Command, p: argparse.ArgumentParser) -> None:
    """A face's parser for ``cmd``: ``--json`` and the command's own arguments."""
    p.add_argument("--json", action="store_true", help="machine-readable output")
    cmd.args(p)


def command_parser(prog: str) -> Parser:
    """``CMD [ARGS]`` for any command of the table (``sbmdbg inspect``)."""
    p = Parser(prog=prog)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="CMD", parser_class=Parser)
    for cmd in TABLE.values():
        add_arguments(cmd, sub.add_parser(cmd.name, help=cmd.summary, description=cmd.doc.strip(),
                                          formatter_class=argparse.RawDescriptionHelpFormatter))
    return p
