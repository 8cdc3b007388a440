"""The command table (sbmdbg.commands.TABLE): every command has its arguments,
compute and render; gdb's ``sbm`` commands and ``sbmdbg inspect``'s commands
are built from it, and both faces print the same JSON and the same text for a
result (gdb's face runs here on a stand-in ``gdb`` module: the real one exists
only inside gdb)."""
import io
import json
import shlex
import sys
import types
from pathlib import Path

import pytest
from rich.console import Console

from sbmdbg.commands import TABLE, ArgError, Command, command_parser
from sbmdbg.commands.render import Plain
from sbmdbg.model.fixture import load_snapshot
from sbmdbg.sbm import open_kernel

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"


@pytest.fixture(scope="module")
def kernel():
    t, syms, lays, _ = load_snapshot(str(FIX / "sbm-in-sandbox.json.gz"))
    return open_kernel(t, symbols=syms, layouts=lays)


def _argv(k) -> dict[str, str]:
    """One command line per command, valid on the sbm-in-sandbox snapshot."""
    text = k.sym("_text")
    return {"status": "", "list": "", "show": "--no-map", "stack": "all", "audit": "", "pcpu": "0",
            "diff": f"kernel sandbox --range {text:#x}-{text + 0x200000:#x}",
            "vtop": f"{text:#x} --root kernel", "pt": f"kernel --range {text:#x}-{text + 0x4000:#x}",
            "ptov": f"{k.phys_base + 0x1000000:#x}", "kernel": ""}


def test_every_command_has_args_compute_render():
    assert {"status", "list", "show", "stack", "audit", "diff", "pcpu", "vtop", "pt", "ptov", "kernel",
            "why"} == set(TABLE)
    for name, c in TABLE.items():
        assert isinstance(c, Command) and c.name == name
        assert callable(c.args) and callable(c.compute) and callable(c.render), name
        assert c.summary and "Usage:" in c.doc, name
        assert c.complete in (None, "sandbox", "cpu", "root"), name


def test_inspect_commands_come_from_the_table():
    p = command_parser("sbmdbg inspect")
    for name in TABLE:
        assert p.parse_args([name] + (["0x1000"] if name in ("vtop", "ptov") else ["a", "b"] if name == "diff"
                                      else [])).cmd == name
    with pytest.raises(ArgError) as e:
        p.parse_args(["nosuch"])
    assert "(choose from " + ", ".join(repr(n) for n in TABLE) + ")" in str(e.value)   # exactly the table
    a = p.parse_args(["pt", "user", "--raw", "--range", "0x1000-0x2000", "--json"])
    assert (a.cmd, a.root, a.raw, a.range, a.json, a.max_entries) == ("pt", "user", True, "0x1000-0x2000", True,
                                                                      4_000_000)
    with pytest.raises(ArgError, match="unrecognized|invalid choice"):
        p.parse_args(["nosuch"])


# ---------------------------------------------------------------- gdb face on a stand-in gdb
class _FakeCommand:
    registered: dict = {}

    def __init__(self, name, cls=None, prefix=False):
        _FakeCommand.registered[name] = self


def _fake_gdb(out: list) -> types.ModuleType:
    g = types.ModuleType("gdb")

    class GdbError(Exception):
        pass

    class _Events:
        def __getattr__(self, name):
            return types.SimpleNamespace(connect=lambda fn: None)

    class _Any:
        def __init__(self, *a, **kw):
            pass

    g.Command, g.Function, g.Breakpoint = _FakeCommand, _Any, _Any
    g.COMMAND_USER, g.COMPLETE_NONE, g.STDERR = 13, 0, 1
    g.GdbError, g.error, g.MemoryError = GdbError, RuntimeError, RuntimeError
    g.events = _Events()
    g.write = lambda s, stream=0: out.append(s)
    g.string_to_argv = shlex.split
    g.parameter = lambda name: 160
    g.selected_thread = lambda: None
    g.parse_and_eval = lambda s: int(s, 0) if s.startswith("0x") else (_ for _ in ()).throw(RuntimeError(s))
    return g


@pytest.fixture
def gdb_face(monkeypatch, kernel):
    out: list[str] = []
    monkeypatch.setitem(sys.modules, "gdb", _fake_gdb(out))
    for m in [m for m in sys.modules if m.startswith("sbmdbg.gdbcmd")]:
        monkeypatch.delitem(sys.modules, m)
    _FakeCommand.registered = {}
    import sbmdbg.gdbcmd  # noqa: F401
    from sbmdbg.gdbcmd import sbmcmds
    from sbmdbg.gdbcmd.state import STATE
    monkeypatch.setattr(STATE, "get_kernel", lambda: kernel)
    monkeypatch.setattr(STATE, "memory_source", lambda: {"memory": "shm", "ram_file": "/dev/shm/x.ram",
                                                         "ram_size": 1 << 29, "how": "test"})
    yield sbmcmds, out, _FakeCommand.registered
    for m in [m for m in sys.modules if m.startswith("sbmdbg.gdbcmd")]:
        del sys.modules[m]   # built on the stand-in: never left for another test


def _text(renderables) -> str:
    buf = io.StringIO()
    con = Console(file=buf, width=160, highlight=False)
    for r in renderables:
        if isinstance(r, Plain):
            buf.write(r + "\n")
        else:
            con.print(r)
    return buf.getvalue()


def test_gdb_commands_come_from_the_table(gdb_face):
    sbmcmds, _, registered = gdb_face
    subs = {n.split(" ", 1)[1] for n in registered if n.startswith("sbm ")}
    assert subs - {"target", "trace", "time"} == set(TABLE)   # session commands, not the model's
    assert set(sbmcmds.GDB_COMMANDS) == set(TABLE)
    for name, cmd in sbmcmds.GDB_COMMANDS.items():
        assert cmd.spec is TABLE[name] and cmd.__doc__ == TABLE[name].doc


def test_gdb_and_inspect_print_the_same(gdb_face, kernel):
    """For every command: gdb's ``sbm CMD --json`` is the table's compute JSON
    (what ``sbmdbg inspect --json`` prints), and gdb's text is the table's render
    (what ``sbmdbg inspect`` prints), tables included (vtop, pt, pcpu)."""
    sbmcmds, out, _ = gdb_face
    p = command_parser("sbmdbg inspect")
    for name, argv in _argv(kernel).items():
        args = p.parse_args([name] + shlex.split(argv))
        args.root_cpu = 0
        want = json.loads(json.dumps(TABLE[name].compute(kernel, args)))
        if name == "kernel":
            want["memory"] = {"memory": "shm", "ram_file": "/dev/shm/x.ram", "ram_size": 1 << 29, "how": "test"}
        out.clear()
        try:
            sbmcmds.GDB_COMMANDS[name].invoke(argv + " --json", False)
        except Exception as e:  # audit above info: the JSON is printed first
            assert TABLE[name].fails and TABLE[name].fails(want), (name, e)
        got = json.loads("".join(out))
        if name == "pt":   # the walk's own duration differs from run to run
            got["stats"].pop("seconds"), want["stats"].pop("seconds")
        assert got == want, name
        out.clear()
        try:
            sbmcmds.GDB_COMMANDS[name].invoke(argv, False)
        except Exception:  # noqa: BLE001
            pass
        assert "".join(out) == _text(TABLE[name].render(want)), name
        assert "".join(out).strip(), name
    out.clear()
    sbmcmds.GDB_COMMANDS["pt"].invoke(_argv(kernel)["pt"], False)
    text = "".join(out)
    assert "kernel root" in text and "perms" in text and "{" not in text   # a table, not JSON


def test_gdb_expression_addresses(gdb_face, kernel):
    sbmcmds, out, _ = gdb_face
    with pytest.raises(Exception, match="bad va"):
        sbmcmds.GDB_COMMANDS["vtop"].invoke("no_such_symbol --json", False)
    with pytest.raises(Exception, match="bad range"):
        sbmcmds.GDB_COMMANDS["pt"].invoke("kernel --range 0x1000", False)
