"""The offline face: ``sbmdbg dump`` (QMP dump-guest-memory of a VM) and
``sbmdbg inspect`` (the command table, sbmdbg.commands, on a vmcore: the
JSON of gdb's ``sbm CMD --json``, the same text otherwise)."""
from __future__ import annotations

import argparse
import json

from sbmdbg import validate as V


def cmd_dump(args) -> int:
    from sbmdbg.errors import SbmdbgError
    from sbmdbg.inspect.offline import dump

    if bool(args.qmp) == bool(args.vm):
        raise SbmdbgError("give exactly one of --qmp SOCK or --vm ID")
    r = dump(args.output, qmp_sock=args.qmp, vm_id=args.vm)
    print(json.dumps(r) if args.json else f"wrote {r['vmcore']} ({r['bytes']} bytes)")
    return 0


def cmd_inspect(args) -> int:
    from sbmdbg.commands import TABLE
    from sbmdbg.errors import SbmdbgError
    from sbmdbg.inspect.offline import inspect
    from sbmdbg.paths import check_vmlinux

    if not args.cmd:
        raise SbmdbgError("inspect needs a command: " + ", ".join(TABLE))
    check_vmlinux(args.vmlinux)
    return inspect(args.vmcore, args.vmlinux, args.cmd, args.json)


def add_parsers(sub) -> None:
    from sbmdbg.commands import TABLE

    du = sub.add_parser("dump", help="QMP dump-guest-memory (ELF vmcore, paging=false)")
    du.add_argument("--qmp", metavar="SOCK", help="QEMU QMP socket")
    du.add_argument("--vm", metavar="ID", help="a detached VM")
    du.add_argument("-o", "--output", required=True, metavar="FILE", type=V.arg_out_file("--output"))
    du.add_argument("--json", action="store_true")
    du.set_defaults(func=cmd_dump)

    ins = sub.add_parser("inspect", help=f"run {'/'.join(TABLE)} on a vmcore")
    ins.add_argument("--vmcore", required=True)
    ins.add_argument("--vmlinux", required=True)
    ins.add_argument("--json", action="store_true")
    ins.add_argument("cmd", nargs=argparse.REMAINDER, help="CMD [ARGS] (as the gdb `sbm` commands)")
    ins.set_defaults(func=cmd_inspect)
