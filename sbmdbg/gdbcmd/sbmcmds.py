"""gdb face of the SBM model: sbm (bare), sbm list/show/stack/audit/diff and
the convenience functions $sbm_state(cpu), $pcpu_hot(cpu), $sbm_mode(cpu),
$top_of_intr_stack(cpu) (alias $top_of_instr_stack)."""
from __future__ import annotations

import gdb

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.pcpu import PcpuCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.commands import compute as C
from sbmdbg.sbm import model as M
from sbmdbg.commands import render as R
from sbmdbg.sbm import stacks as S
from sbmdbg.sbm.audit import severity_rank

ROOT_HELP = "kernel | user | sandbox[=N] | a CR3 value"


def _sandbox_words(word):
    try:
        k = STATE.get_kernel()
        if not M.has_sbm(k):
            return []
        words = [f"cpu{c}" for s in M.sandboxes(k) for c in s.cpus] + \
                [str(s.pid) for s in M.sandboxes(k)] + [f"{s.state:#x}" for s in M.sandboxes(k)]
    except Exception:  # noqa: BLE001 - completion must never fail loudly
        return []
    return [w for w in words if w.startswith(word or "")]


class _SbmBase(SbmCommand):
    """A command backed by sbmdbg.sbm.commands.COMMANDS[key] and render.RENDER[key]."""
    key = ""

    def run(self, args):
        k = STATE.get_kernel()
        d = C.COMMANDS[self.key](k, args)
        if args.json:
            self.emit_json(d)
        else:
            self.emit_rich(*R.RENDER[self.key](d))
        self.after(d)

    def after(self, d):
        pass


class ListCommand(_SbmBase):
    """List the active sandboxes (tasks with thread_info.sbm_state set).

Usage: sbm list [--json]"""
    name = "list"
    key = "list"


class ShowCommand(_SbmBase):
    """Show a sandbox: x86_sbm_state, struct sbm and its buffers, the state page read
through the sandbox root and through the kernel root, the labeled page table.

Usage: sbm show [SANDBOX] [--no-map] [--json]
SANDBOX: cpuN (the sandbox of vCPU N), pid=N, N (pid or index), or the state
address; default: every active sandbox."""
    name = "show"
    key = "show"

    def add_args(self, p):
        p.add_argument("sandbox", nargs="?")
        p.add_argument("--no-map", action="store_true", help="skip the labeled page table")

    def complete_positional(self, text, word):
        return _sandbox_words(word)


class StackCommand(_SbmBase):
    """Where each vCPU's rsp is, top_of_stack vs top_of_intr_stack, the pt_regs on the
SBM exception stack, and a backtrace across the sandbox boundary.

Usage: sbm stack [CPU|all] [--json]"""
    name = "stack"
    key = "stack"

    def add_args(self, p):
        p.add_argument("cpu", nargs="?", default="all")

    complete_positional = PcpuCommand.complete_positional


class AuditCommand(_SbmBase):
    """Audit a sandbox page table against the SBM design's table (W+X, entry text
executable at CPL 3, user-accessible state page / exception stack, user half,
writable inputs or kernel data, global PTEs, unexplained mappings).

Usage: sbm audit [SANDBOX] [--json]
Fails (gdb error) when a finding is above "info"."""
    name = "audit"
    key = "audit"

    def add_args(self, p):
        p.add_argument("sandbox", nargs="?")

    def complete_positional(self, text, word):
        return _sandbox_words(word)

    def after(self, d):
        if d["above_info"]:
            n = sum(1 for a in d["audits"] for f in a["findings"] if severity_rank(f["severity"]) > 0)
            raise gdb.GdbError(f"sbm audit: {n} finding(s) above info (worst: {d['worst']})")


class DiffCommand(_SbmBase):
    """What one page-table root maps that the other does not, and where permissions
differ (merged ranges).

Usage: sbm diff ROOT_A ROOT_B [--range A-B] [--json]   (ROOT: kernel|user|sandbox[=N]|CR3)"""
    name = "diff"
    key = "diff"

    def add_args(self, p):
        p.add_argument("root_a", help=ROOT_HELP)
        p.add_argument("root_b", help=ROOT_HELP)
        p.add_argument("--range", help="START-END virtual range")

    def run(self, args):
        try:
            args.cpu = STATE.get_target().selected_cpu()
        except Exception:  # noqa: BLE001
            args.cpu = 0
        super().run(args)

    def complete_positional(self, text, word):
        return [w for w in ("kernel", "user", "sandbox") if w.startswith(word or "")]


class StatusCommand(_SbmBase):
    """Per vCPU: mode (kernel/user/sandbox/transition), CPL, CR3 role, RIP, task,
stack class, sandbox.

Usage: sbm [--json]   (also: sbm status)"""
    name = "status"
    key = "status"


_status = StatusCommand()
ListCommand()
ShowCommand()
StackCommand()
AuditCommand()
DiffCommand()


def bare_sbm(arg: str, from_tty: bool) -> None:
    """`sbm` with no subcommand (or only --json): the status table."""
    _status.invoke(arg, from_tty)


# ---------------------------------------------------------------- functions
def _cpu_arg(args) -> int:
    if args:
        return int(args[0])
    return STATE.get_target().selected_cpu()


class _Fn(gdb.Function):
    def __init__(self, name, fn):
        super().__init__(name)
        self.fn = fn

    def invoke(self, *args):
        try:
            return self.fn(STATE.get_kernel(), _cpu_arg(args))
        except gdb.GdbError:
            raise
        except SbmdbgError as e:
            raise gdb.GdbError(str(e).splitlines()[0]) from None


def _ulong(v: int):
    return gdb.Value(v & M.U64).cast(gdb.lookup_type("unsigned long"))


def _fn_sbm_state(k, cpu):
    M.require_sbm(k)
    st = M.task_info(k, M.cpu_current(k, cpu)).get("sbm_state") or 0
    return gdb.Value(st).cast(gdb.lookup_type("struct x86_sbm_state").pointer())


def _fn_pcpu_hot(k, cpu):
    """struct pcpu_hot of cpu, built from bytes read through the kernel root."""
    t = gdb.lookup_type("struct pcpu_hot")
    data = k.read_virt(k.root, k.per_cpu_addr("pcpu_hot", cpu), t.sizeof)
    return gdb.Value(data, t)


def _fn_mode(k, cpu):
    return gdb.Value(M.vcpu_status(k, cpu)["mode"])


def _fn_tois(k, cpu):
    return _ulong(S.top_of_intr_stack(k, cpu))


_Fn("sbm_state", _fn_sbm_state)
_Fn("pcpu_hot", _fn_pcpu_hot)
_Fn("sbm_mode", _fn_mode)
_Fn("top_of_intr_stack", _fn_tois)
_Fn("top_of_instr_stack", _fn_tois)   # the spelling of one reply on the list
