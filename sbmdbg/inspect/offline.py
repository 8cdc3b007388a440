"""The offline face: ``dump`` (QMP dump-guest-memory through the one QMP
client) and ``inspect`` (the command table on a vmcore: gdb's JSON and text)."""
from __future__ import annotations

import json
import os
import sys

from sbmdbg.errors import SbmdbgError


DUMP_TIMEOUT = 600.0  # seconds: QEMU writes the whole guest RAM (GiBs on a slow disk)


def dump(out: str, qmp_sock: str | None = None, vm_id: str | None = None) -> dict:
    """dump-guest-memory (paging=false, ELF) of a running or stopped VM."""
    path = os.path.abspath(out)
    args = {"paging": False, "protocol": f"file:{path}"}
    if qmp_sock:
        from sbmdbg.vm.qmp import QmpClient
        mon = QmpClient(qmp_sock, keep_open=False)
        mon.cmd("dump-guest-memory", timeout=DUMP_TIMEOUT, **args)
    else:
        from sbmdbg.vm import VM
        vm = VM.attach(vm_id)
        vm.qmp("dump-guest-memory", timeout=DUMP_TIMEOUT, **args)
    if not os.path.exists(path):
        raise SbmdbgError(f"QEMU wrote no {path}")
    return {"vmcore": path, "bytes": os.path.getsize(path)}


def open_vmcore(vmcore: str, vmlinux: str):
    from sbmdbg.sbm import open_kernel
    from sbmdbg.target.vmcore import VmcoreTarget
    t = VmcoreTarget(vmcore)
    try:
        return open_kernel(t, vmlinux)
    except BaseException:
        t.close()
        raise


def inspect(vmcore: str, vmlinux: str, argv: list[str], as_json: bool) -> int:
    """``CMD [ARGS]`` of the command table on a vmcore: the JSON of gdb's
    ``sbm CMD --json`` (with --json), else the same text."""
    from sbmdbg.commands import TABLE, command_parser
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = command_parser("sbmdbg inspect --vmcore F --vmlinux V").parse_args(argv)
    cmd = TABLE[args.cmd]
    k = open_vmcore(vmcore, vmlinux)
    try:
        d = cmd.compute(k, args)   # user / sandbox roots: vCPU 0's (no selected vCPU offline)
    finally:
        k.target.close()
    if cmd.name == "kernel":
        d["memory"] = {"memory": "vmcore", "vmcore": os.path.abspath(vmcore)}
    if as_json or args.json:
        print(json.dumps(d))
    else:
        from rich.console import Console
        from sbmdbg.commands.render import Plain
        con = Console(file=sys.stdout, width=160, highlight=False)
        for r in cmd.render(d):
            if isinstance(r, Plain):
                con.file.write(r + "\n")
            else:
                con.print(r)
    msg = cmd.fails(d) if cmd.fails else None
    if msg:
        print(f"sbmdbg: {cmd.name}: {msg}", file=sys.stderr)
        return 1
    return 0
