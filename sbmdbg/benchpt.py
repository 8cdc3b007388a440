"""``sbmdbg bench pt``: full kernel-root dump via shm vs QEMU ``info tlb`` (QMP)
vs the gdbstub-only path; one ``sbm vtop`` vs scripts/gdb ``translate-vm``."""
from __future__ import annotations

import json
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


def bench_pt(opts, repeat: int = 3) -> dict:
    from sbmdbg.model.kernel import Kernel
    from sbmdbg.model.layout import DwarfLayouts
    from sbmdbg.model.symbols import Symbols
    from sbmdbg.target.qmp import QmpTarget
    from sbmdbg.target.shm import ShmTarget
    from sbmdbg.vm import VM
    from sbmdbg.vm.gdbmi import GdbSession
    from sbmdbg.x86 import paging as pg

    res: dict = {"repeat": repeat}
    with VM(opts) as vm, GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"]) as g:
        g.interrupt()
        q = QmpTarget(vm.hmp, vm.qmp)
        shm = ShmTarget(vm.info["ram"], vm.info["ram_size"], regs_source=q)
        try:
            k = Kernel(shm, Symbols.from_elf(vm.info["vmlinux"]), DwarfLayouts(vm.info["vmlinux"]))
            cr3 = q.registers(0)["cr3"]

            def shm_walk():
                shm.invalidate()
                leaves, _ = pg.walk(shm.read_phys, cr3, la57=k.la57, merge_runs=False)
                return len(leaves)
            res["shm_walk_s"], res["leaves"] = _t(shm_walk, repeat)
            res["tables"] = pg.walk(shm.read_phys, cr3, la57=k.la57)[1].stats.tables

            def tlb():
                return len([ln for ln in vm.hmp("info tlb", cpu_index=0).splitlines() if ": " in ln])
            res["qmp_info_tlb_s"], res["info_tlb_lines"] = _t(tlb, repeat)

            def in_gdb(source_cmd):
                g.console(source_cmd)

                def run():
                    out = g.console(f"sbm pt {cr3:#x} --raw --json", timeout=600)
                    return len(json.loads(out[out.index("{"):])["mappings"])
                return run
            res["gdbstub_walk_s"], n_gdb = _t(in_gdb("sbm target gdb"), 1)
            res["gdb_shm_walk_s"], n_gshm = _t(
                in_gdb(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}"), repeat)
            res["agree"] = res["leaves"] == res["info_tlb_lines"] == n_gdb == n_gshm

            va = k.sym("linux_banner")
            g.console("sbm target gdb")
            res["vtop_sbm_gdbstub_s"], _ = _t(lambda: g.console(f"sbm vtop {va:#x} --root {cr3:#x} --json"), repeat)
            g.console(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}")
            res["vtop_sbm_shm_s"], _ = _t(lambda: g.console(f"sbm vtop {va:#x} --root {cr3:#x} --json"), repeat)
            try:
                res["vtop_translate_vm_s"], _ = _t(lambda: g.console(f"translate-vm {va:#x}"), repeat)
            except SbmdbgError:  # no scripts/gdb loaded (no kernel tree)
                res["vtop_translate_vm_s"] = None
            g.console("sbm target gdb")
        finally:
            shm.close()
            q.close()
    r = res
    r["ratio_info_tlb_over_shm"] = r["qmp_info_tlb_s"] / r["shm_walk_s"]
    r["ratio_gdbstub_over_shm"] = r["gdbstub_walk_s"] / r["shm_walk_s"]
    tv = r["vtop_translate_vm_s"]
    r["ratio_translate_vm_over_vtop_shm"] = tv / r["vtop_sbm_shm_s"] if tv else None
    return r


def render(r: dict) -> str:
    lines = [
        f"kernel root dump ({r['leaves']} leaf entries, {r['tables']} tables; median of {r['repeat']}):",
        f"  shm walk (host mmap)          {r['shm_walk_s'] * 1e3:9.1f} ms",
        f"  QEMU info tlb via QMP         {r['qmp_info_tlb_s'] * 1e3:9.1f} ms  ({r['ratio_info_tlb_over_shm']:.2f}x shm)",
        f"  sbm pt in gdb, gdbstub phys   {r['gdbstub_walk_s'] * 1e3:9.1f} ms  ({r['ratio_gdbstub_over_shm']:.1f}x shm)",
        f"  sbm pt in gdb, shm            {r['gdb_shm_walk_s'] * 1e3:9.1f} ms  (includes MI + JSON)",
        f"  all agree on the leaf count:  {r['agree']}",
        "one translation (wall clock through gdb/MI):",
        f"  sbm vtop (gdbstub phys)       {r['vtop_sbm_gdbstub_s'] * 1e3:9.1f} ms",
        f"  sbm vtop (shm)                {r['vtop_sbm_shm_s'] * 1e3:9.1f} ms",
    ]
    if r["vtop_translate_vm_s"]:
        lines.append(f"  scripts/gdb translate-vm      {r['vtop_translate_vm_s'] * 1e3:9.1f} ms  "
                     f"({r['ratio_translate_vm_over_vtop_shm']:.2f}x sbm vtop shm)")
    else:
        lines.append("  scripts/gdb translate-vm      not loaded (pass --tree)")
    return "\n".join(lines)
