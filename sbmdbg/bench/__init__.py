"""``sbmdbg bench all|pt|status|trace``: the benchmarks (each boots a VM).

    all     every figure of issue 17 beside its peer, ratios, goals met (bench/all.py)
    pt      kernel page-table dump: shm vs QEMU info tlb vs gdbstub (bench/pt.py)
    status  per-stop refresh of `sbm` in gdb (bench/status.py)
    trace   tracer throughput and slowdown (bench/trace.py; its floor: bench/stopfloor.py)
"""
from __future__ import annotations

import json


def cmd_bench_pt(args) -> int:
    from sbmdbg.bench.pt import bench_pt, render
    from sbmdbg.vm import VMOptions

    opts = VMOptions(smp=args.smp, mem=args.mem, pti=args.pti, kaslr=args.kaslr, la57=args.la57,
                     append=args.append, kernel=args.kernel, vmlinux=args.vmlinux,
                     qemu_log=args.qemu_log, boot_timeout=args.timeout, tree=args.tree)
    r = bench_pt(opts, repeat=args.repeat)  # VM boots the reference kernel when opts.kernel is None
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


def cmd_bench_status(args) -> int:
    from sbmdbg.bench.status import bench_status, render
    from sbmdbg.vm import VMOptions

    opts = VMOptions(smp=args.smp, pti=args.pti)  # kernel=None: the VM builds/uses the reference one
    r = bench_status(opts, repeat=args.repeat)
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


def cmd_bench_all(args) -> int:
    from sbmdbg.bench.all import bench_all, render

    r = bench_all(repeat=args.repeat, scale=not args.no_scale, trace=not args.no_trace,
                  trace_repeat=args.trace_repeat, ntasks=args.tasks, pti=args.pti)
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


def cmd_bench_trace(args) -> int:
    from sbmdbg.bench.trace import bench_trace, render

    r = bench_trace(repeat=args.repeat, pti=args.pti, levels=args.levels if isinstance(args.levels, list) else args.levels.split(","))
    print(json.dumps(r, indent=2) if args.json else render(r))
    return 0


def add_parser(sub, add_vm_options) -> None:
    """``sbmdbg bench ...``; ``add_vm_options(p)`` adds the VM options of ``sbmdbg vm start``."""
    from sbmdbg import validate as V
    from sbmdbg.commands.parser import Parser

    b = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bcmd", required=True, parser_class=Parser)
    ba = b.add_parser("all", help="every speed figure beside its peer (info tlb, translate-vm, $lx_per_cpu, "
                                  "lx-ps, the untraced guest), ratios and goals")
    ba.add_argument("--json", action="store_true")
    ba.add_argument("--repeat", type=V.arg_int(1, 1000), default=5)
    ba.add_argument("--tasks", type=V.arg_int(0, 20_000), default=3000, help="extra tasks on the scale VM")
    ba.add_argument("--trace-repeat", type=V.arg_int(1, 100_000), default=300)
    ba.add_argument("--pti", choices=["on", "off"], default="on")
    ba.add_argument("--no-scale", action="store_true", help="skip the 4-vCPU 2G scale VM")
    ba.add_argument("--no-trace", action="store_true", help="skip the tracer figure")
    ba.set_defaults(func=cmd_bench_all)

    bp = b.add_parser("pt", help="kernel page-table dump: shm vs QEMU info tlb vs gdbstub")
    bp.add_argument("--json", action="store_true")
    bp.add_argument("--repeat", type=V.arg_int(1, 10_000), default=3)
    bp.add_argument("--tree", help="kernel tree with scripts/gdb (for translate-vm)")
    add_vm_options(bp)
    bp.set_defaults(func=cmd_bench_pt)

    bs = b.add_parser("status", help="per-stop refresh of `sbm` (all vCPUs) in gdb, shm target")
    bs.add_argument("--json", action="store_true")
    bs.add_argument("--repeat", type=V.arg_int(1, 100_000), default=50)
    bs.add_argument("--smp", type=V.arg_int(1, 64), default=2)
    bs.add_argument("--pti", choices=["on", "off"], default="on")
    bs.set_defaults(func=cmd_bench_status)

    bt = b.add_parser("trace", help="tracer throughput and slowdown during `repeat N`")
    bt.add_argument("--repeat", type=V.arg_int(1, 1_000_000), default=100, help="N of `repeat N` (default 100)")
    bt.add_argument("--pti", choices=["on", "off"], default="on")
    bt.add_argument("--levels", default="plugin,full,lean", type=V.arg_choices(("plugin", "plugin-dint", "full", "fast", "lean")),
                    help="comma-separated: plugin (no-stop tracer, exception frames), plugin-dint (the same on QEMU's -d int log) and/or gdb levels full, fast, lean")
    bt.add_argument("--json", action="store_true")
    bt.set_defaults(func=cmd_bench_trace)
