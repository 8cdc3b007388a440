"""``sbmdbg bench pt``: full kernel-root dump via shm vs QEMU ``info tlb`` (QMP)
vs the gdbstub-only path; one ``sbm vtop`` vs scripts/gdb ``translate-vm``."""
from __future__ import annotations

import statistics
import time

from sbmdbg.errors import SbmdbgError


def _t(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _in_gdb_time(g, cmd: str, n: int, cold: bool = False) -> float:
    """Mean seconds of ``cmd`` run ``n`` times inside gdb (``sbm time``: no MI
    round trip); ``cold``: drop the memory caches before each run (not timed)."""
    return g.sbm_json(f"sbm time --json --repeat {n} {'--cold ' if cold else ''}{cmd}", timeout=600)["mean_ms"] / 1e3


def bench_pt(opts, repeat: int = 3) -> dict:
    from sbmdbg.vm import VM
    from sbmdbg.vm.gdbmi import GdbSession

    with VM(opts) as vm, GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"]) as g:
        g.interrupt()
        return measure_pt(vm, g, repeat)


def measure_pt(vm, g, repeat: int = 3) -> dict:
    """The figures of ``bench pt`` on a booted VM with gdb attached and stopped."""
    from sbmdbg.sbm import open_kernel
    from sbmdbg.target.qmp import QmpTarget
    from sbmdbg.target.shm import ShmTarget
    from sbmdbg.x86 import paging as pg

    res: dict = {"repeat": repeat}
    q = QmpTarget(vm.hmp, vm.qmp)
    shm = ShmTarget(vm.info["ram"], vm.info["ram_size"], regs_source=q)
    try:
        k = open_kernel(shm, vm.info["vmlinux"])
        cr3 = q.registers(0)["cr3"]

        def shm_walk():
            shm.invalidate()
            leaves, _ = pg.walk(shm.read_phys, cr3, la57=k.la57, merge_runs=False)
            return len(leaves)
        res["shm_walk_s"], res["leaves"] = _t(shm_walk, repeat)

        def shm_walk_mappings():   # the same, and a Mapping object made for every leaf
            shm.invalidate()
            leaves, _ = pg.walk(shm.read_phys, cr3, la57=k.la57, merge_runs=False)
            return sum(1 for _ in leaves)
        res["shm_walk_mappings_s"], _ = _t(shm_walk_mappings, repeat)

        def shm_walk_merged():
            shm.invalidate()
            maps, w = pg.walk(shm.read_phys, cr3, la57=k.la57)
            return len(maps), w.stats.tables
        res["shm_walk_merged_s"], (res["ranges"], res["tables"]) = _t(shm_walk_merged, repeat)

        def tlb():
            return len([ln for ln in vm.hmp("info tlb", cpu_index=0).splitlines() if ": " in ln])
        res["qmp_info_tlb_s"], res["info_tlb_lines"] = _t(tlb, repeat)

        # in gdb: the RAM file is found by itself (sbm target auto)
        res["gdb_memory_auto"] = g.sbm_json("sbm target --json")["memory"]
        shm_cmd = f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}"

        def in_gdb(source_cmd):
            g.console(source_cmd)

            def run():
                return len(g.sbm_json(f"sbm pt {cr3:#x} --raw --json", timeout=600)["mappings"])
            return run
        res["gdbstub_walk_s"], n_gdb = _t(in_gdb("sbm target gdb"), 1)
        res["gdb_shm_walk_s"], n_gshm = _t(in_gdb(shm_cmd), repeat)
        res["agree"] = res["leaves"] == res["info_tlb_lines"] == n_gdb == n_gshm
        # the same walk timed inside gdb (model built, caches dropped before
        # each run): what the gdbstub-only path costs without MI and JSON transfer
        pt = f"sbm pt {cr3:#x} --json"
        for src, cmd in (("gdbstub", "sbm target gdb"), ("shm", shm_cmd)):
            g.console(cmd)
            g.console("sbm kernel")
            res[f"pt_{src}_in_gdb_s"] = _in_gdb_time(g, pt, 1 if src == "gdbstub" else repeat, cold=True)

        # one translation: wall clock of one MI command, and the time
        # inside gdb (N runs of the command in one gdb Python loop: no MI)
        va = k.sym("linux_banner")
        vtop = f"sbm vtop {va:#x} --root {cr3:#x} --json"
        n = max(20, 10 * repeat)
        for src, cmd in (("gdbstub", "sbm target gdb"), ("shm", shm_cmd)):
            g.console(cmd)
            t0 = time.perf_counter()
            g.console(vtop)  # builds the kernel model
            res[f"vtop_sbm_{src}_first_s"] = time.perf_counter() - t0
            res[f"vtop_sbm_{src}_s"], _ = _t(lambda: g.console(vtop), repeat)
            res[f"vtop_sbm_{src}_in_gdb_s"] = _in_gdb_time(g, vtop, n)
        res["vtop_sbm_shm_text_in_gdb_s"] = _in_gdb_time(g, vtop.replace(" --json", ""), n)  # source: shm
        try:
            tv = f"translate-vm {va:#x}"
            res["vtop_translate_vm_s"], _ = _t(lambda: g.console(tv), repeat)
            res["vtop_translate_vm_in_gdb_s"] = _in_gdb_time(g, tv, n)
        except SbmdbgError:  # no scripts/gdb loaded (no kernel tree)
            res["vtop_translate_vm_s"] = res["vtop_translate_vm_in_gdb_s"] = None
        g.console("sbm target auto")
    finally:
        shm.close()
        q.close()
    r = res
    r["ratio_info_tlb_over_shm"] = r["qmp_info_tlb_s"] / r["shm_walk_s"]
    r["ratio_info_tlb_over_shm_merged"] = r["qmp_info_tlb_s"] / r["shm_walk_merged_s"]
    r["ratio_shm_mappings_over_info_tlb"] = r["shm_walk_mappings_s"] / r["qmp_info_tlb_s"]
    r["ratio_gdbstub_over_shm"] = r["gdbstub_walk_s"] / r["shm_walk_s"]
    tv, tvg = r["vtop_translate_vm_s"], r["vtop_translate_vm_in_gdb_s"]
    r["ratio_translate_vm_over_vtop_shm"] = tv / r["vtop_sbm_shm_s"] if tv else None
    r["ratio_translate_vm_over_vtop_shm_in_gdb"] = tvg / r["vtop_sbm_shm_in_gdb_s"] if tvg else None
    r["ratio_translate_vm_over_vtop_shm_text_in_gdb"] = tvg / r["vtop_sbm_shm_text_in_gdb_s"] if tvg else None
    return r


def render(r: dict) -> str:
    ms = lambda s: f"{s * 1e3:9.2f} ms"  # noqa: E731
    lines = [
        f"kernel root dump (CPU 0's CR3: {r['leaves']} leaf entries, {r['ranges']} merged ranges, "
        f"{r['tables']} tables; median of {r['repeat']}):",
        f"  shm walk, every leaf (host mmap) {ms(r['shm_walk_s'])}",
        f"  shm walk, every leaf + a Mapping object per leaf {ms(r['shm_walk_mappings_s'])}",
        f"  shm walk, merged ranges          {ms(r['shm_walk_merged_s'])}",
        f"  QEMU info tlb via QMP            {ms(r['qmp_info_tlb_s'])}  "
        f"({r['ratio_info_tlb_over_shm']:.2f}x the leaf walk, {r['ratio_info_tlb_over_shm_merged']:.2f}x merged)",
        f"  leaf walk / info tlb             {1 / r['ratio_info_tlb_over_shm']:.2f}x  "
        f"(with a Mapping object per leaf {r['ratio_shm_mappings_over_info_tlb']:.2f}x)",
        f"  sbm pt --raw --json via MI, gdbstub {ms(r['gdbstub_walk_s'])}  (MI carries ~1 MB of JSON: that dominates)",
        f"  sbm pt --raw --json via MI, shm     {ms(r['gdb_shm_walk_s'])}",
        f"  sbm pt (merged) in gdb, no MI:   gdbstub {ms(r['pt_gdbstub_in_gdb_s'])}, shm {ms(r['pt_shm_in_gdb_s'])}"
        f"  ({r['pt_gdbstub_in_gdb_s'] / r['pt_shm_in_gdb_s']:.0f}x)",
        f"  all agree on the leaf count:     {r['agree']}",
        f"  gdb found the RAM file itself:   {r['gdb_memory_auto'] == 'shm'}",
        "one translation (MI: one command's wall clock; in gdb: mean of a gdb Python loop, no MI):",
        f"  sbm vtop --json, gdbstub   MI {ms(r['vtop_sbm_gdbstub_s'])}   in gdb {ms(r['vtop_sbm_gdbstub_in_gdb_s'])}"
        f"   (first call, builds the model: {r['vtop_sbm_gdbstub_first_s'] * 1e3:.0f} ms)",
        f"  sbm vtop --json, shm       MI {ms(r['vtop_sbm_shm_s'])}   in gdb {ms(r['vtop_sbm_shm_in_gdb_s'])}"
        f"   (first call, builds the model: {r['vtop_sbm_shm_first_s'] * 1e3:.0f} ms)",
    ]
    lines.append(f"  sbm vtop, shm, text table                in gdb {ms(r['vtop_sbm_shm_text_in_gdb_s'])}")
    if r["vtop_translate_vm_s"]:
        lines.append(f"  scripts/gdb translate-vm   MI {ms(r['vtop_translate_vm_s'])}   in gdb "
                     f"{ms(r['vtop_translate_vm_in_gdb_s'])}")
        lines.append(f"  translate-vm / sbm vtop (shm): {r['ratio_translate_vm_over_vtop_shm']:.2f}x through MI, "
                     f"{r['ratio_translate_vm_over_vtop_shm_in_gdb']:.1f}x in gdb (--json), "
                     f"{r['ratio_translate_vm_over_vtop_shm_text_in_gdb']:.1f}x in gdb (text)")
    else:
        lines.append("  scripts/gdb translate-vm   not loaded (pass --tree)")
    return "\n".join(lines)
