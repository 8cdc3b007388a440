"""Offline faces: ``sbmdbg dump`` (QMP dump-guest-memory) and ``sbmdbg inspect``
(the non-live commands on a vmcore, same JSON as in gdb)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from sbmdbg.errors import SbmdbgError


def dump(out: str, qmp_sock: str | None = None, vm_id: str | None = None) -> dict:
    """dump-guest-memory (paging=false, ELF) of a running or stopped VM."""
    path = os.path.abspath(out)
    args = {"paging": False, "protocol": f"file:{path}"}
    if qmp_sock:
        from qemu.qmp.legacy import QEMUMonitorProtocol
        mon = QEMUMonitorProtocol(qmp_sock)
        try:
            mon.connect(negotiate=True)
            mon.settimeout(300)
            resp = mon.cmd_obj({"execute": "dump-guest-memory", "arguments": args})
        except Exception as e:  # noqa: BLE001 - qemu.qmp raises its own types
            raise SbmdbgError(f"QMP at {qmp_sock}: {e}") from None
        finally:
            try:
                mon.close()
            except Exception:  # noqa: BLE001
                pass
        if "error" in resp:
            raise SbmdbgError(f"dump-guest-memory: {resp['error'].get('desc')}")
    else:
        from sbmdbg.vm import VM
        vm = VM.attach(vm_id)
        vm.qmp("dump-guest-memory", **args)
    if not os.path.exists(path):
        raise SbmdbgError(f"QEMU wrote no {path}")
    return {"vmcore": path, "bytes": os.path.getsize(path)}


PREFETCH = ["pcpu_hot", "task_struct", "thread_info", "x86_sbm_state", "sbm", "sbm_buf", "pt_regs",
            "cpu_entry_area", "cea_exception_stacks", "exception_stacks", "thread_union", "irq_stack",
            "mm_struct", "signal_struct", "cpuinfo_x86", "list_head"]


def open_vmcore(vmcore: str, vmlinux: str):
    import sbmdbg.sbm  # noqa: F401  (registers the sandbox root hooks)
    from sbmdbg.model.kernel import Kernel
    from sbmdbg.model.layout import DwarfLayouts
    from sbmdbg.model.symbols import Symbols
    from sbmdbg.target.vmcore import VmcoreTarget
    t = VmcoreTarget(vmcore)
    try:
        lays = DwarfLayouts(vmlinux)
        lays.prefetch(PREFETCH)   # one pass over the CUs instead of one per struct
        return Kernel(t, Symbols.from_elf(vmlinux), lays)
    except BaseException:
        t.close()
        raise


def command_parser() -> argparse.ArgumentParser:
    """The CMD part of ``sbmdbg inspect``: the same options as the gdb commands."""
    from sbmdbg.cli import _Parser
    from sbmdbg import validate as V
    p = _Parser(prog="sbmdbg inspect ... CMD")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    for name in ("status", "list"):
        sub.add_parser(name)
    s = sub.add_parser("show")
    s.add_argument("sandbox", nargs="?")
    s.add_argument("--no-map", action="store_true")
    s = sub.add_parser("stack")
    s.add_argument("cpu", nargs="?", default="all")
    s = sub.add_parser("audit")
    s.add_argument("sandbox", nargs="?")
    s = sub.add_parser("diff")
    s.add_argument("root_a")
    s.add_argument("root_b")
    s.add_argument("--range", type=V.arg_range())
    s = sub.add_parser("pcpu")
    s.add_argument("cpu", nargs="?", default="all")
    s = sub.add_parser("vtop")
    s.add_argument("va", type=V.arg_address("vtop ADDRESS"))
    s.add_argument("--root", default="kernel")
    s = sub.add_parser("pt")
    s.add_argument("root", nargs="?", default="kernel")
    s.add_argument("--range", type=V.arg_range())
    s.add_argument("--flags")
    s.add_argument("--raw", action="store_true")
    s.add_argument("--max-entries", type=V.arg_int(1, 100_000_000), default=4_000_000)
    return p


def inspect(vmcore: str, vmlinux: str, argv: list[str], as_json: bool) -> int:
    from sbmdbg.sbm import commands as C
    from sbmdbg.sbm import render as R
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if "--json" in argv:
        as_json = True
        argv = [a for a in argv if a != "--json"]
    args = command_parser().parse_args(argv)
    args.cpu = getattr(args, "cpu", 0) if args.cmd not in ("diff", "vtop", "pt") else 0
    k = open_vmcore(vmcore, vmlinux)
    try:
        d = C.COMMANDS[args.cmd](k, args)
    finally:
        k.target.close()
    if as_json:
        print(json.dumps(d))
    elif args.cmd in R.RENDER:
        from rich.console import Console
        con = Console(file=sys.stdout, width=160, highlight=False)
        for r in R.RENDER[args.cmd](d):
            con.print(r)
    else:
        print(json.dumps(d, indent=1))
    return 1 if d.get("above_info") else 0
