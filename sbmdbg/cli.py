"""``sbmdbg`` command line.

    sbmdbg kernel build [--source 6.12|6.1] [--patches DIR|none] [--config FRAGMENT]... [--json]
    sbmdbg vm start [--detach] [--json] [VM options]
    sbmdbg vm run [--id ID] [--timeout S] 'CMD'
    sbmdbg vm list [--json]
    sbmdbg vm stop [ID | --all]
    sbmdbg gdb [--gdb HOST:PORT] [--vmlinux V] [--tree T] [--id ID] [-- GDB ARGS...]
    sbmdbg demo
    sbmdbg gdb-script                      (the path to `source` in any gdb)
    sbmdbg dump (--qmp SOCK | --vm ID) -o FILE
    sbmdbg inspect --vmcore F --vmlinux V [--json] CMD [ARGS]   (status, list, show, stack, audit, ...)
    sbmdbg fixture record [--out DIR] [NAME...]                  (regenerate fixtures/pt/, see sbmdbg.fixture)
    sbmdbg bench status [--json]
    sbmdbg dashboard [--vm ID | --gdb H:P --qmp SOCK --vmlinux V] [--rate HZ] [--once] [--svg F]
    sbmdbg check FILE... [--junit OUT.xml] [--json OUT.json] [--kernel BZ --vmlinux V] [--extra-patch F]

Bad input: one ``sbmdbg: error: ...`` line on stderr, exit 1 (argparse: 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg import validate as V


# ---------------------------------------------------------------- kernel

def cmd_kernel_build(args) -> int:
    from sbmdbg.kernel import build

    kb = build.build_kernel(args.source, args.patches, args.config, args.extra_patch or ())
    if args.json:
        print(json.dumps(kb.to_json(), indent=2))
    else:
        print(f"vmlinux  {kb.vmlinux}\nbzImage  {kb.bzImage}\ntree     {kb.tree}\n"
              f"build-id {kb.build_id}\nkey      {kb.key}\nsource   {kb.source}\n"
              f"patches  {kb.patches}\nconfig   {' + '.join(kb.config)}")
    return 0


def cmd_gdb_script(args) -> int:
    from sbmdbg.paths import gdb_script

    path = gdb_script()
    if not path.is_file():
        raise SbmdbgError(f"the gdb script {path} is missing from this installation")
    print(path)
    return 0


# ---------------------------------------------------------------- vm

def _vm_options(args):
    from sbmdbg.vm import VMOptions

    if (args.kernel is None) != (args.vmlinux is None) and args.kernel is None:
        raise SbmdbgError("--vmlinux needs --kernel (the matching bzImage)")
    for p in (args.kernel, args.vmlinux):
        if p is not None and not Path(p).is_file():
            raise SbmdbgError(f"{p} not found")
    # a pipeline build's tree (vmlinux-gdb.py beside vmlinux): `sbmdbg gdb --id` gets lx-*
    tree = None
    if args.vmlinux and (Path(args.vmlinux).resolve().parent / "vmlinux-gdb.py").exists():
        tree = str(Path(args.vmlinux).resolve().parent)
    return VMOptions(smp=args.smp, mem=args.mem, pti=args.pti, kaslr=args.kaslr, la57=args.la57,
                     append=args.append, kernel=args.kernel, vmlinux=args.vmlinux,
                     qemu_log=args.qemu_log, boot_timeout=args.timeout, tree=tree)


def cmd_vm_start(args) -> int:
    from sbmdbg.vm import VM

    opts = _vm_options(args)
    vm = VM(opts, detach=True)
    info = vm.info
    if args.json:
        print(json.dumps(info, indent=2), flush=True)
    else:
        print(f"VM {info['id']} ready in {info['boot_seconds']} s: gdb {info['gdb']}, "
              f"pid {info['pid']}\n  sbmdbg vm run 'CMD'   sbmdbg gdb   sbmdbg vm stop {info['id']}",
              flush=True)
    if args.detach:
        return 0
    # Foreground: stay until Ctrl-C / SIGTERM or QEMU exits, then stop it.
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        while not stop["now"] and vm.alive():
            time.sleep(0.5)
    finally:
        vm.stop()
    return 0


def cmd_vm_run(args) -> int:
    from sbmdbg.vm import VM

    vm = VM.attach(args.id)
    try:
        res = vm.run(args.command, timeout=args.timeout)
    finally:
        vm.close()
    sys.stdout.write(res.output)
    sys.stdout.flush()
    return res.status


def cmd_vm_list(args) -> int:
    from sbmdbg.vm import list_vms

    vms = list_vms()
    if args.json:
        print(json.dumps(vms, indent=2))
    elif not vms:
        print("no VMs running")
    else:
        for i in vms:
            print(f"{i['id']}  pid {i['pid']}  gdb {i['gdb']}  smp {i['smp']}  pti {i['pti']}  "
                  f"kaslr {i['kaslr']}")
    return 0


def cmd_vm_stop(args) -> int:
    from sbmdbg.vm import VM, list_vms

    if args.all:
        ids = [i["id"] for i in list_vms()]
    elif args.id:
        ids = [args.id]
    else:
        ids = [None]
    for vm_id in ids:
        vm = VM.attach(vm_id)
        vm.stop()
        print(f"stopped {vm.id}")
    return 0


# ---------------------------------------------------------------- gdb

def gdb_argv(vmlinux: Path, gdb_addr: str | None, tree: Path | None, extra=()) -> list[str]:
    """The gdb command line of ``sbmdbg gdb``."""
    from sbmdbg.vm.gdbmi import GDB_SCRIPT

    from sbmdbg.kernel.build import foreign_comp_dirs

    argv = ["gdb", "-q"]
    if tree is not None:
        argv += ["-iex", f"add-auto-load-safe-path {tree}"]
        for d in foreign_comp_dirs(tree, vmlinux):  # ccache'd objects name other trees
            argv += ["-ex", f"set substitute-path {d} {tree}"]
        gdbpy = tree / "vmlinux-gdb.py"
        auto = (vmlinux.resolve().parent == tree.resolve())
        if gdbpy.exists() and not auto:
            argv += ["-ex", f"source {gdbpy}"]
    argv += ["-x", str(GDB_SCRIPT)]
    if gdb_addr:
        argv += ["-ex", f"target remote {gdb_addr}"]
    argv += list(extra)
    argv += [str(vmlinux)]
    return argv


def cmd_gdb(args) -> int:
    from sbmdbg.vm.gdbmi import check_listening

    vmlinux, tree, addr = args.vmlinux, args.tree, args.gdb
    if addr is None or vmlinux is None:
        from sbmdbg.vm import VM

        if addr is None:
            info = VM.attach(args.id).info
            addr = info["gdb"]
            vmlinux = vmlinux or info.get("vmlinux")
            tree = tree or info.get("tree")
        else:
            raise SbmdbgError("--gdb needs --vmlinux (the kernel the stub runs)")
    if vmlinux is None:
        raise SbmdbgError("no vmlinux known for this VM; pass --vmlinux")
    from sbmdbg.paths import check_vmlinux

    vml = check_vmlinux(vmlinux)
    tree_p = Path(tree) if tree else None
    if tree_p is not None and not tree_p.is_dir():
        raise SbmdbgError(f"--tree {tree} is not a directory")
    check_listening(addr)
    extra = args.gdb_args[1:] if args.gdb_args[:1] == ["--"] else args.gdb_args
    argv = gdb_argv(vml, addr, tree_p, extra)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        raise SbmdbgError(f"cannot run gdb: {exc.strerror}") from None
    return 0  # not reached


def cmd_demo(args) -> int:
    from sbmdbg.demo import demo

    return demo(smp=args.smp, pti=args.pti)


# ---------------------------------------------------------------- parser

def _add_vm_options(p) -> None:
    p.add_argument("--smp", type=V.arg_int(1, 64), default=2, help="vCPUs (default 2)")
    p.add_argument("--mem", default="512M", help="guest RAM (default 512M)")
    p.add_argument("--pti", choices=["on", "off"], default="off", help="kernel pti= (default off)")
    p.add_argument("--kaslr", action="store_true", help="boot with kaslr (default nokaslr)")
    p.add_argument("--la57", action="store_true", help="allow 5-level paging (default no5lvl)")
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--kernel", help="bzImage (default: the reference kernel build)")
    p.add_argument("--vmlinux", help="vmlinux matching --kernel")
    p.add_argument("--qemu-log", help="QEMU -d int -D FILE")
    p.add_argument("--timeout", type=V.arg_float(0, 86400, lo_open=True), default=60.0,
                   help="boot timeout in seconds")


def build_parser() -> argparse.ArgumentParser:
    from sbmdbg.commands.parser import Parser

    ap = Parser(prog="sbmdbg", description="Debugger for Linux SandBox Mode (SBM) kernels")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    k = sub.add_parser("kernel", help="the reference kernel").add_subparsers(
        dest="kcmd", required=True, parser_class=Parser)
    kb = k.add_parser("build", help="build (or reuse) a kernel: by default the reference SBM kernel")
    kb.add_argument("--json", action="store_true", help="print result.json")
    kb.add_argument("--source", metavar="6.12|6.1|TARBALL",
                    help="Debian's linux-source-VERSION (default 6.12) or a .tar.xz")
    kb.add_argument("--patches", metavar="DIR|none",
                    help="patch directory, or none: a kernel without SBM "
                         "(default: the reference series on 6.12, none on 6.1)")
    kb.add_argument("--config", action="append", metavar="FRAGMENT",
                    help="config fragment merged on tinyconfig, repeatable "
                         "(default fixtures/kernel/config, + config-6.1 on 6.1)")
    kb.add_argument("--extra-patch", action="append", metavar="FILE", help="apply after the patches")
    kb.set_defaults(func=cmd_kernel_build)

    v = sub.add_parser("vm", help="the QEMU test VM").add_subparsers(
        dest="vcmd", required=True, parser_class=Parser)
    vs = v.add_parser("start", help="boot a VM (foreground, or --detach)")
    vs.add_argument("--detach", action="store_true", help="leave it running and return")
    vs.add_argument("--json", action="store_true", help="print the VM's info as JSON")
    _add_vm_options(vs)
    vs.set_defaults(func=cmd_vm_start)
    vr = v.add_parser("run", help="run a shell command in a detached VM")
    vr.add_argument("command")
    vr.add_argument("--id", help="VM id (default: the only one running)")
    vr.add_argument("--timeout", type=V.arg_float(0, 86400, lo_open=True), default=30.0)
    vr.set_defaults(func=cmd_vm_run)
    vl = v.add_parser("list", help="list detached VMs")
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=cmd_vm_list)
    vp = v.add_parser("stop", help="stop a detached VM")
    vp.add_argument("id", nargs="?")
    vp.add_argument("--all", action="store_true")
    vp.set_defaults(func=cmd_vm_stop)

    g = sub.add_parser("gdb", help="gdb attached to the VM with the sbm commands loaded")
    g.add_argument("--gdb", metavar="HOST:PORT", help="gdb stub (default: the detached VM's)")
    g.add_argument("--vmlinux", help="kernel ELF with symbols")
    g.add_argument("--tree", help="kernel tree (for scripts/gdb)")
    g.add_argument("--id", help="detached VM id")
    g.add_argument("gdb_args", nargs=argparse.REMAINDER, help="-- extra gdb arguments")
    g.set_defaults(func=cmd_gdb)
    gs = sub.add_parser("gdb-script", help="print the path of the gdb script to `source` in any gdb")
    gs.set_defaults(func=cmd_gdb_script)

    from sbmdbg.bench import add_parser as _add_bench_parser
    _add_bench_parser(sub, _add_vm_options)  # sbmdbg bench pt|status|trace

    from sbmdbg.inspect import add_parsers as _add_inspect_parsers
    _add_inspect_parsers(sub)  # sbmdbg dump, sbmdbg inspect (the command table on a vmcore)

    from sbmdbg.fuzz.cli import add_parser as _add_fuzz_parser
    _add_fuzz_parser(sub)
    from sbmdbg.trace.cli import add_parser as _add_trace_parser
    _add_trace_parser(sub)  # sbmdbg trace record|show|export|check
    from sbmdbg.fixture.live import add_parser as _add_fixture_parser
    _add_fixture_parser(sub)  # sbmdbg fixture record

    from sbmdbg.check import add_parser as _add_check_parser
    _add_check_parser(sub)  # sbmdbg check FILE... (scripted regression checks, docs/checks.md)

    from sbmdbg.dashboard.cli import add_parser as _add_dashboard_parser
    _add_dashboard_parser(sub)  # sbmdbg dashboard (live Textual view, --once/--svg frames)

    d = sub.add_parser("demo", help="build, boot, attach and print `sbm pcpu`")
    d.add_argument("--smp", type=V.arg_int(1, 64), default=2)
    d.add_argument("--pti", choices=["on", "off"], default="on")
    d.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Bad input: one ``sbmdbg: error: ...`` line (exit 1, usage 2); a bug: one
    ``sbmdbg: internal error: ...; traceback written to PATH`` line (exit 1)."""
    from sbmdbg.commands.parser import ArgError, HelpShown
    from sbmdbg.guard import run_cli
    from sbmdbg.text import clean

    def go() -> int:
        try:
            args = build_parser().parse_args(argv)
            return args.func(args)
        except ArgError as exc:  # one line, exit 2 (argparse's convention)
            exc.parser.print_usage(sys.stderr)
            print(f"sbmdbg: error: {clean(str(exc), limit=2000)}", file=sys.stderr)
            return 2
        except HelpShown as exc:
            return exc.status
    return run_cli(go)


if __name__ == "__main__":
    sys.exit(main())
