"""``sbmdbg fuzz lz4|zlib [--cases N] [--seed S] [--id ID] [--trace F] [--json]``."""
from __future__ import annotations

import json
import sys


def _fuzz(args) -> int:
    from sbmdbg.fuzz.campaign import run
    from sbmdbg.sbm import open_kernel
    from sbmdbg.target.qmp import QmpTarget
    from sbmdbg.target.shm import ShmTarget
    from sbmdbg.vm import VM, VMOptions

    if args.cases < 1:
        from sbmdbg.errors import SbmdbgError
        raise SbmdbgError("--cases must be at least 1")
    vm = VM.attach(args.id) if args.id else VM(VMOptions(smp=args.smp, pti=args.pti))
    try:
        k = open_kernel(ShmTarget(vm.info["ram"], vm.info["ram_size"],
                                  regs_source=QmpTarget(vm.hmp, vm.qmp)), vm.info["vmlinux"])

        def progress(done, total):
            if not args.json:
                print(f"\r{done}/{total} cases", end="", file=sys.stderr, flush=True)
        rep = run(vm, k, args.target, args.cases, args.seed, args.trace, progress=progress)
    finally:
        if args.id:
            vm.close()
        else:
            vm.stop()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(file=sys.stderr)
        print(render(rep))
    ok = rep["kernel"]["clean"] and not rep["valid_wrong"] and \
        rep["aborts_traced"] == rep["aborts_returned"]
    return 0 if ok else 1


def render(rep: dict) -> str:
    out = [f"fuzz {rep['target']}: {rep['cases']} cases (seed {rep['seed']}) in {rep['seconds']} s: "
           f"{rep['calls_per_s']} sandboxed calls/s, traced by the no-stop tracer",
           "  results: " + ", ".join(f"{v} {k}" for k, v in sorted(rep["classes"].items())),
           "  inputs:  " + ", ".join(f"{v} {k}" for k, v in rep["kinds"].items()),
           f"  valid inputs whose output differs from Python's: {len(rep['valid_wrong'])}",
           f"  aborts: {rep['aborts_returned']} returned -EFAULT, {rep['aborts_traced']} in the trace; "
           f"{rep['distinct_fault_sites']} distinct fault sites"]
    for g in rep["why_groups"]:
        out.append(f"  {g['count']:6d} aborts at {g['why']}  ({', '.join(f'{k} {v}' for k, v in g['codecs'].items())})")
        out.append(f"         e.g. {g['example']}")
    kn = rep["kernel"]
    out.append(f"  kernel: {'alive' if kn['alive'] else 'DEAD'}, {'clean' if kn['clean'] else 'NOT CLEAN'}"
               f" (sbm_codec/stats delta {kn['stats_delta']}"
               + (f"; dmesg: {kn['dmesg_problems']}" if kn["dmesg_problems"] else "") + ")")
    out.append(f"  trace: {rep['trace']['file']}")
    return "\n".join(out)


def add_parser(sub) -> None:
    f = sub.add_parser("fuzz", help="fuzz real kernel decompressors in the sandbox (patch 0007)")
    f.add_argument("target", choices=["lz4", "zlib"])
    f.add_argument("--cases", type=int, default=1000)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--id", help="detached VM id (default: boot one for the campaign)")
    f.add_argument("--smp", type=int, default=2)
    f.add_argument("--pti", choices=["on", "off"], default="on")
    f.add_argument("--trace", help="trace file (default: in the VM's work directory)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=_fuzz)
