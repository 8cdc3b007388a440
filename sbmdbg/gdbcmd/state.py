"""Per-gdb-session state: the target, the kernel model, cache invalidation.

Physical memory comes from the RAM file when one is known (``sbm target shm
PATH [SIZE]`` or $SBMDBG_RAM_FILE / $SBMDBG_RAM_SIZE), else from the gdbstub's
physical mode.  Every cache is dropped when the guest resumes
(``gdb.events.cont``) or gdb writes memory.
"""
from __future__ import annotations

import os

import gdb

from sbmdbg.errors import SbmdbgError
from sbmdbg.target.gdbtarget import GdbTarget


class State:
    def __init__(self):
        self.target: GdbTarget | None = None
        self.kernel = None
        self.ram_file: str | None = os.environ.get("SBMDBG_RAM_FILE") or None
        size = os.environ.get("SBMDBG_RAM_SIZE")
        self.ram_size: int | None = int(size, 0) if size else None
        self._shm = None

    def set_ram_file(self, path: str | None, size: int | None = None) -> None:
        self.close()
        self.ram_file, self.ram_size = path, size

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self.target = None
        self.kernel = None

    def get_target(self) -> GdbTarget:
        if self.target is None:
            mem = None
            if self.ram_file:
                from sbmdbg.target.shm import ShmTarget
                self._shm = mem = ShmTarget(self.ram_file, self.ram_size)
            self.target = GdbTarget(mem=mem)
        return self.target

    def vmlinux(self) -> str:
        fn = gdb.current_progspace().filename
        if not fn:
            raise SbmdbgError("no vmlinux loaded (file /path/to/vmlinux)")
        return fn

    def get_kernel(self):
        if self.kernel is None:
            from sbmdbg.model.kernel import Kernel
            from sbmdbg.model.symbols import Symbols
            from sbmdbg.gdbcmd.gdbtypes import GdbLayouts
            t = self.get_target()
            if t.ncpus == 0:
                raise SbmdbgError("not connected to a guest (target remote HOST:PORT)")
            self.kernel = Kernel(t, Symbols.from_elf(self.vmlinux()), GdbLayouts())
        return self.kernel

    def invalidate(self, *_args) -> None:
        if self.kernel is not None:
            self.kernel.invalidate()
        elif self.target is not None:
            self.target.invalidate()

    def forget(self, *_args) -> None:
        """A new objfile or target: rebuild everything next time."""
        self.close()


STATE = State()


def _connect_events():
    ev = gdb.events
    ev.cont.connect(STATE.invalidate)
    if hasattr(ev, "memory_changed"):
        ev.memory_changed.connect(STATE.invalidate)
    if hasattr(ev, "register_changed"):
        ev.register_changed.connect(STATE.invalidate)
    if hasattr(ev, "new_objfile"):
        ev.new_objfile.connect(STATE.forget)
    if hasattr(ev, "exited"):
        ev.exited.connect(STATE.forget)


_connect_events()
