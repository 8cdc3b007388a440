"""The in-gdb source: registers per vCPU thread, physical memory through the
QEMU gdbstub's physical mode (``maintenance packet Qqemu.PhyMemMode:1``) or
through a memory-backend-file when one is known.

A Target (sbmdbg.target.base) that lives in the gdb face: the only
package that imports ``gdb``.
"""
from __future__ import annotations

import contextlib

import gdb  # noqa: F401  (only importable inside gdb)

from sbmdbg.target.base import PAGE, Target, TargetError, UnbackedMemory
from sbmdbg.target.shm import RamLayout

# gdb register name -> our name
_REGS = {
    "rax": "rax", "rbx": "rbx", "rcx": "rcx", "rdx": "rdx", "rsi": "rsi", "rdi": "rdi",
    "rbp": "rbp", "rsp": "rsp", "r8": "r8", "r9": "r9", "r10": "r10", "r11": "r11",
    "r12": "r12", "r13": "r13", "r14": "r14", "r15": "r15", "rip": "rip",
    "eflags": "rflags", "cs": "cs", "ss": "ss", "ds": "ds", "es": "es", "fs": "fs", "gs": "gs",
    "fs_base": "fs_base", "gs_base": "gs_base", "k_gs_base": "k_gs_base",
    "cr0": "cr0", "cr2": "cr2", "cr3": "cr3", "cr4": "cr4", "cr8": "cr8", "efer": "efer",
}
U64 = (1 << 64) - 1


def _cpu_of(thread) -> int:
    lwp = thread.ptid[1]
    return (lwp - 1) if lwp > 0 else thread.num - 1


@contextlib.contextmanager
def selected_thread(thread):
    """Switch gdb's selected thread (and frame) temporarily; always restore."""
    old = gdb.selected_thread()
    try:
        old_frame = gdb.selected_frame()
    except gdb.error:
        old_frame = None
    try:
        if thread is not old:
            thread.switch()
        yield
    finally:
        if old is not None and old.is_valid() and gdb.selected_thread() is not old:
            old.switch()
        if old_frame is not None:
            with contextlib.suppress(gdb.error, RuntimeError):
                if old_frame.is_valid():
                    old_frame.select()


class GdbTarget(Target):
    name = "gdb"

    def __init__(self, mem: Target | None = None, layout: RamLayout | None = None):
        """``mem``: read physical memory from this target instead (e.g. ShmTarget).
        ``layout``: when known, addresses outside guest RAM raise UnbackedMemory
        (the gdbstub itself returns junk for them)."""
        super().__init__()
        self.mem = mem
        self.layout = layout or (getattr(mem, "layout", None))
        self._thread_map: dict[int, object] | None = None   # per stop (invalidate)
        self._thread_key = None

    def _threads(self) -> dict[int, object]:
        """vCPU -> gdb thread.  ``Inferior.threads()`` costs 0.4-6 ms (a refresh
        of `sbm` asked it a dozen times): kept while every thread is valid and
        gdb reports no new one (``forget_threads``, on gdb.events.new_thread)."""
        inf = gdb.selected_inferior()
        if inf is None or inf.pid == 0:
            raise TargetError("gdb is not connected to a target (target remote ...)")
        key = (inf.num, inf.pid)
        m = self._thread_map
        if m is None or self._thread_key != key or not all(t.is_valid() for t in m.values()):
            m = self._thread_map = {_cpu_of(t): t for t in inf.threads()}
            self._thread_key = key
        return m

    def forget_threads(self, *_args) -> None:
        self._thread_map = None

    @property
    def ncpus(self) -> int:
        return len(self._threads())

    def thread_for_cpu(self, cpu: int):
        th = self._threads().get(cpu)
        if th is not None and not th.is_valid():
            self._thread_map = None
            th = self._threads().get(cpu)
        if th is None:
            raise TargetError(f"no vCPU {cpu} in gdb's thread list")
        return th

    def selected_cpu(self) -> int:
        th = gdb.selected_thread()
        if th is None:
            raise TargetError("no thread selected")
        return _cpu_of(th)

    def _registers(self, cpu: int) -> dict:
        th = self.thread_for_cpu(cpu)
        if th == gdb.selected_thread():    # no switch, no selection to restore
            return self._read_registers()
        with selected_thread(th):
            return self._read_registers()

    @staticmethod
    def _read_registers() -> dict:
        """The selected thread's registers (gdb caches them per stop)."""
        out: dict[str, int] = {}
        frame = gdb.newest_frame()
        ulong = None
        for gname, name in _REGS.items():
            try:
                v = frame.read_register(gname)
                if v.type.code == gdb.TYPE_CODE_PTR:
                    ulong = ulong or gdb.lookup_type("unsigned long")
                    out[name] = int(v.cast(ulong)) & U64
                else:
                    out[name] = int(v) & U64
            except (gdb.error, ValueError):
                continue
        if "cr3" not in out:
            raise TargetError("the gdbstub does not expose control registers (QEMU >= 6 needed)")
        return out

    def prefetch_registers(self) -> None:
        """Every vCPU's registers in one pass over gdb's threads (one thread
        switch each, the selection restored once): what `sbm` and `sbm pcpu`
        need, without a switch-and-restore per vCPU."""
        todo = {c: th for c, th in self._threads().items() if c not in self._regs and th.is_valid()}
        if len(todo) < 2:
            return
        sel = gdb.selected_thread()
        for c, th in todo.items():          # the selected thread first: no switch
            if th == sel:
                self._regs[c] = self._read_registers()
        with selected_thread(sel):
            for c, th in sorted(todo.items()):
                if c not in self._regs:
                    th.switch()
                    self._regs[c] = self._read_registers()

    # -- physical memory ------------------------------------------------
    def _check(self, pa: int, n: int) -> None:
        if self.layout is not None:
            self.layout.offset(pa, n)

    def _read_pages(self, pfn: int, count: int) -> list[bytes]:
        pa, n = pfn << 12, count * PAGE
        if self.mem is not None:
            data = self.mem.read_phys(pa, n)
        else:
            self._check(pa, n)
            data = phys_read_gdbstub(pa, n)
        return [data[i * PAGE:(i + 1) * PAGE] for i in range(count)]

    def _read_page(self, pfn: int) -> bytes:
        return self._read_pages(pfn, 1)[0]

    def read_table(self, pa: int) -> tuple[int, ...]:
        if self.mem is not None:
            return self.mem.read_table(pa)
        return super().read_table(pa)

    def read_table_bytes(self, pa: int) -> bytes:
        if self.mem is not None:
            return self.mem.read_table_bytes(pa)
        return super().read_table_bytes(pa)

    def invalidate(self) -> None:
        super().invalidate()
        if self.mem is not None:
            self.mem.invalidate()


def phys_read_gdbstub(pa: int, n: int) -> bytes:
    """Read guest-physical memory via the QEMU gdbstub's physical mode; the
    mode is always switched back to virtual, even on error."""
    inf = gdb.selected_inferior()
    out = gdb.execute("maintenance packet Qqemu.PhyMemMode:1", to_string=True)
    if "OK" not in out:
        raise TargetError("the gdbstub refused physical memory mode (not QEMU?)")
    try:
        return bytes(inf.read_memory(pa, n))
    except gdb.MemoryError as e:
        raise UnbackedMemory(pa, n, str(e)) from None
    finally:
        gdb.execute("maintenance packet Qqemu.PhyMemMode:0", to_string=True)
