"""No traceback ever (issue 14): what escapes a command is one line.

A user error is ``sbmdbg: error: ...`` (exit 1); a bug is ``sbmdbg:
internal error: <one line>; traceback written to <path>`` (exit 1) with the
traceback in that file; argparse errors are exit 2."""
from __future__ import annotations

import pytest

from sbmdbg import cli, guard
from sbmdbg.errors import SbmdbgError
from sbmdbg.text import has_raw_control

pytestmark = pytest.mark.unit


def _run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:   # argparse: usage errors exit 2
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and not has_raw_control(err), err
    return code, err


def test_internal_error_is_one_line_with_the_log(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SBMDBG_LOG_DIR", str(tmp_path))
    import sbmdbg.trace.cli as tc

    def boom(args):
        raise ValueError("bad \x1b[2J thing\nsecond line")
    monkeypatch.setattr(tc, "_show", boom)
    f = tmp_path / "t.jsonl"
    f.write_text('{"seq":0,"kind":"trace_start"}\n')
    code, err = _run(["trace", "show", str(f)], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("sbmdbg: internal error: ValueError: bad \\x1b[2J thing; traceback written to ")
    log = lines[0].rsplit(" ", 1)[1]
    assert log.startswith(str(tmp_path)) and "Traceback" in open(log).read()


def test_user_errors_are_one_line(tmp_path, capsys):
    from test_hostile_inputs import _vmcore   # tests/unit is on sys.path (pytest rootdir import)
    core = tmp_path / "core"
    core.write_bytes(_vmcore())
    elf = tmp_path / "vmlinux"
    elf.write_bytes(b"\x7fELF")                      # the truncated vmlinux
    code, err = _run(["inspect", "--vmcore", str(core), "--vmlinux", str(elf), "status"], capsys)
    assert code == 1 and err.startswith("sbmdbg: error: ") and "internal" not in err, err
    code, err = _run(["inspect", "--vmcore", str(core), "--vmlinux", str(elf), "pt", "--max-entries", "nan"],
                     capsys)
    assert code == 2 and "sbmdbg: error: argument --max-entries" in err, err   # before opening anything


def test_describe_sorts_user_errors_from_bugs(tmp_path, monkeypatch):
    monkeypatch.setenv("SBMDBG_LOG_DIR", str(tmp_path))
    assert guard.describe(SbmdbgError("x \x07 y")) == ("x \\x07 y", True)
    assert guard.describe(RecursionError())[1] is True
    line, user = guard.describe(KeyError("k"))
    assert not user and line.startswith("internal error: KeyError: 'k'; traceback written to ")
