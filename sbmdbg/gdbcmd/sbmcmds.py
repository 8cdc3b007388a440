"""gdb face of the command table: one ``sbm CMD`` gdb command per entry of
sbmdbg.commands.TABLE (bare ``sbm`` = status), and the convenience functions
$sbm_state(cpu), $pcpu_hot(cpu), $sbm_mode(cpu), $top_of_intr_stack(cpu)
(alias $top_of_instr_stack)."""
from __future__ import annotations

import argparse

import gdb

from sbmdbg.commands import TABLE, ArgError, Command, HelpShown
from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.base import SbmCommand
from sbmdbg.gdbcmd.state import STATE
from sbmdbg.sbm import model as M
from sbmdbg.sbm import stacks as S


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


def _cpu_words(word):
    try:
        n = STATE.get_target().ncpus
    except Exception:  # noqa: BLE001
        n = 0
    return [c for c in ["all"] + [str(i) for i in range(n)] if c.startswith(word or "")]


def _root_words(word):
    return [w for w in ("kernel", "user", "sandbox") if w.startswith(word or "")]


COMPLETERS = {"sandbox": _sandbox_words, "cpu": _cpu_words, "root": _root_words}


def _selected_cpu() -> int:
    try:
        return STATE.get_target().selected_cpu()
    except Exception:  # noqa: BLE001 - no thread selected: vCPU 0
        return 0


def _address(s: str, what: str) -> str:
    """A number as is, else a gdb expression evaluated here (hex string)."""
    try:
        int(s, 0)
        return s
    except ValueError:
        pass
    try:
        return hex(int(gdb.parse_and_eval(s)) & M.U64)
    except Exception:  # noqa: BLE001
        raise SbmdbgError(f"bad {what} {s!r}") from None


class TableCommand(SbmCommand):
    """``sbm CMD`` built from a sbmdbg.commands.Command (``spec``)."""
    spec: Command

    PARSED_CACHE = 64

    def add_args(self, p):
        self.spec.args(p)
        self._parsed: dict[tuple, dict] = {}

    def parse_argv(self, argv):
        """argparse once per distinct command line (two parser passes cost
        more than a whole cached `sbm vtop`); the table's arguments have no
        side effects, so the same words parse the same way."""
        key = tuple(argv)
        got = self._parsed.get(key)
        if got is None:
            got = vars(super().parse_argv(argv))
            if len(self._parsed) >= self.PARSED_CACHE:
                self._parsed.clear()
            self._parsed[key] = got
        return argparse.Namespace(**got)

    def prepare(self, args):
        args.root_cpu = _selected_cpu()   # user / sandbox roots: the selected vCPU's
        for name in self.spec.addresses:
            setattr(args, name, _address(getattr(args, name), name))
        return args

    def parse(self, argv: list[str]):
        """The arguments of ``sbm CMD ARGV`` ready for compute (``sbm time``)."""
        try:
            return self.prepare(self.parser.parse_intermixed_args(argv))
        except (ArgError, HelpShown) as e:
            raise SbmdbgError(f"sbm {self.name}: bad arguments {argv!r}: {e}") from None

    def run(self, args):
        c = self.spec
        d = c.compute(STATE.get_kernel(), self.prepare(args))
        if c.name == "kernel":
            d["memory"] = STATE.memory_source()
        if args.json:
            self.emit_json(d)
        else:
            self.emit_rich(*c.render(d))
        msg = c.fails(d) if c.fails else None
        if msg:
            raise gdb.GdbError(f"sbm {c.name}: {msg}")

    def complete_positional(self, text, word):
        fn = COMPLETERS.get(self.spec.complete)
        return fn(word) if fn else gdb.COMPLETE_NONE


def _define(spec: Command) -> TableCommand:
    cls = type(f"Sbm{spec.name.capitalize()}Command", (TableCommand,),
               {"__doc__": spec.doc, "name": spec.name, "spec": spec})
    return cls()


GDB_COMMANDS = {name: _define(spec) for name, spec in TABLE.items()}


def bare_sbm(arg: str, from_tty: bool) -> None:
    """`sbm` with no subcommand (or only --json): the status table."""
    GDB_COMMANDS["status"].invoke(arg, from_tty)


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
    from sbmdbg.model.percpu import PCPU_HOT, percpu_layout
    if percpu_layout(k).kind != PCPU_HOT:
        raise SbmdbgError("this kernel has no struct pcpu_hot (it keeps separate per-CPU "
                          "variables: see sbm pcpu, or $lx_per_cpu(\"current_task\", N) on 6.1)")
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
