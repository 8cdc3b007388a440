"""``./run demo``: build the kernel, boot it, attach gdb, print ``sbm pcpu``,
then stop inside a sandbox and print ``sbm``, ``sbm stack`` and ``sbm audit``."""

from __future__ import annotations

import re
import sys
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sbmdbg.errors import SbmdbgError


def _register_table(gdb, ncpus: int) -> Table:
    """Fallback while ``sbm pcpu`` does not exist: a few registers per vCPU."""
    regs = ["rip", "rsp", "cr3", "cr4", "cs", "gs_base"]
    table = Table(title="vCPUs (fallback: info registers; `sbm pcpu` not available)")
    table.add_column("cpu")
    for r in regs:
        table.add_column(r)
    for n in range(1, ncpus + 1):
        gdb.console(f"thread {n}")
        out = gdb.console("info registers " + " ".join(regs))
        vals = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2:
                vals[parts[0]] = parts[1]
        table.add_row(str(n - 1), *[vals.get(r, "?") for r in regs])
    return table


def _sandbox_stop(con, gdb, vm) -> None:
    """Stop at the first instruction of a sandboxed function (the demo's
    ``ok`` scenario) and show the vCPUs, the sandbox's stack and the audit."""
    if "list" not in gdb.console("help sbm"):
        return
    gdb.mi("-break-insert -t *__sbm_thunk_sbm_demo_compute")
    gdb.cont()
    vm.serial.send("echo ok > /sys/kernel/debug/sbm_demo/run\n")
    stop = gdb.wait_stopped(120)
    cpu = int(stop.get("thread-id", "1")) - 1
    con.print("[bold]stopped at the first sandbox instruction "
              "(breakpoint on __sbm_thunk_sbm_demo_compute, `echo ok > .../sbm_demo/run`)[/]")
    for cmd in ("sbm", f"sbm stack {cpu}", "sbm audit"):
        con.print(f"[bold]$ {cmd}[/]")
        sys.stdout.write(gdb.console(cmd, timeout=120))
    gdb.cont()
    out = vm.run("cat /sys/kernel/debug/sbm_demo/run").output.strip()
    con.print(f"[bold]guest:[/] {escape(out)}")


def demo(smp: int = 2, pti: str = "on") -> int:
    from sbmdbg.kernel.build import ensure_kernel
    from sbmdbg.vm import VM, VMOptions
    from sbmdbg.vm.gdbmi import GdbSession

    con = Console()
    t0 = time.monotonic()
    kb = ensure_kernel()
    con.print(f"[bold]kernel[/] {kb.key} ({time.monotonic() - t0:.1f} s)")
    t1 = time.monotonic()
    with VM(VMOptions(smp=smp, pti=pti)) as vm:
        con.print(f"[bold]VM[/] {vm.id} booted in {time.monotonic() - t1:.1f} s "
                  f"(pti={pti}, smp={smp}); guest: {vm.run('uname -r').output.strip()}")
        with GdbSession(kb.vmlinux, kb.tree, vm.info["gdb"]) as gdb:
            gdb.interrupt()
            try:
                has_sbm = "pcpu" in gdb.console("help sbm")
            except SbmdbgError:
                has_sbm = False
            if has_sbm:
                con.print("[bold]$ sbm pcpu[/]")
                sys.stdout.write(gdb.console("sbm pcpu", timeout=120))
                _sandbox_stop(con, gdb, vm)
            else:
                threads = gdb.console("info threads")
                ncpus = len(re.findall(r"Thread \d+\.\d+", threads)) or smp
                con.print(_register_table(gdb, ncpus))
            gdb.cont()
    con.print(f"[green]demo done in {time.monotonic() - t0:.1f} s[/] (QEMU and gdb stopped)")
    return 0
