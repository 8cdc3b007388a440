"""Per-gdb-session state: the target, the kernel model, cache invalidation.

Physical memory comes from the RAM file when one is known, else from the
gdbstub's physical mode.  The RAM file is known from ``sbm target shm PATH
[SIZE]``, from $SBMDBG_RAM_FILE / $SBMDBG_RAM_SIZE, or found automatically:
when gdb is connected to a local gdbstub, the QEMU process serving that port
is looked up in /proc and, if it backs the machine's RAM with a shared
memory-backend-file, that file is used (``sbm target gdb`` turns this off).  Every cache is dropped when the guest resumes
(``gdb.events.cont``), when it stops (``gdb.events.stop``) or gdb writes memory.
"""
from __future__ import annotations

import os

import gdb

from sbmdbg.errors import SbmdbgError
from sbmdbg.gdbcmd.gdbtarget import GdbTarget


class State:
    def __init__(self):
        self.target: GdbTarget | None = None
        self.kernel = None
        self.ram_file: str | None = os.environ.get("SBMDBG_RAM_FILE") or None
        size = os.environ.get("SBMDBG_RAM_SIZE")
        self.ram_size: int | None = int(size, 0) if size else None
        self.ram_how = "$SBMDBG_RAM_FILE" if self.ram_file else None
        self.auto = True          # look for the RAM file of a local QEMU
        self._found: dict | None = None
        self._shm = None

    def set_ram_file(self, path: str | None, size: int | None = None) -> None:
        """``sbm target shm PATH [SIZE]``; ``None``: the gdbstub (no discovery)."""
        self.close()
        self.ram_file, self.ram_size = path, size
        self.ram_how = "sbm target shm" if path else None
        self.auto = False

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        self.target = None
        self.kernel = None
        self._found = None

    def _discover_ram(self) -> dict | None:
        """The shared RAM file of the local QEMU serving gdb's remote target."""
        try:
            conn = gdb.selected_inferior().connection
            details = getattr(conn, "details", None) or ""
        except (AttributeError, gdb.error, RuntimeError):
            return None
        host, sep, port = details.rpartition(":")
        if not sep or not port.isdigit() or host not in ("127.0.0.1", "localhost", "::1", "[::1]", ""):
            return None
        from sbmdbg.target.shm import find_ram_file
        return find_ram_file(int(port))

    def memory_source(self) -> dict:
        """Where physical memory comes from (for ``sbm target`` / ``sbm kernel``)."""
        if self._shm is not None:
            return {"memory": "shm", "ram_file": self._shm.path, "ram_size": self._shm.layout.ram_size,
                    "how": self.ram_how or "found"}
        if self.ram_file:
            return {"memory": "shm", "ram_file": self.ram_file, "ram_size": self.ram_size,
                    "how": self.ram_how}
        return {"memory": "gdbstub", "ram_file": None, "ram_size": None,
                "how": "sbm target gdb" if not self.auto else "no RAM file found"}

    def get_target(self) -> GdbTarget:
        if self.target is None:
            mem = None
            if self.ram_file:
                from sbmdbg.target.shm import ShmTarget
                self._shm = mem = ShmTarget(self.ram_file, self.ram_size)
            elif self.auto:
                found = self._discover_ram()
                if found:
                    from sbmdbg.target.shm import ShmTarget
                    from sbmdbg.target.base import TargetError
                    try:
                        self._shm = mem = ShmTarget(found["path"], found["size"], found["machine"],
                                                    max_ram_below_4g=found["max_ram_below_4g"])
                        self.ram_how = "found: the local QEMU's memory-backend-file"
                    except TargetError:
                        mem = None
            t = GdbTarget(mem=mem)
            if mem is None and self.auto and not self._connected():
                return t  # not connected yet: look for the RAM file again next time
            self.target = t
        return self.target

    @staticmethod
    def _connected() -> bool:
        try:
            return gdb.selected_inferior().pid != 0
        except (gdb.error, RuntimeError):
            return False

    def vmlinux(self) -> str:
        fn = gdb.current_progspace().filename
        if not fn:
            raise SbmdbgError("no vmlinux loaded (file /path/to/vmlinux)")
        return fn

    def get_kernel(self):
        if self.kernel is None:
            from sbmdbg.gdbcmd.gdbtypes import GdbLayouts
            from sbmdbg.model.symbols import Symbols
            from sbmdbg.sbm import open_kernel
            t = self.get_target()
            if t.ncpus == 0:
                raise SbmdbgError("not connected to a guest (target remote HOST:PORT)")
            self.kernel = open_kernel(t, symbols=Symbols.from_elf(self.vmlinux()), layouts=GdbLayouts())
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
    # Also on every stop: a resume that gdb did not report as `cont` (seen
    # under MI async) must not leave the previous stop's view behind.
    ev.stop.connect(STATE.invalidate)
    if hasattr(ev, "memory_changed"):
        ev.memory_changed.connect(STATE.invalidate)
    if hasattr(ev, "register_changed"):
        ev.register_changed.connect(STATE.invalidate)
    if hasattr(ev, "new_thread"):
        ev.new_thread.connect(lambda *_a: STATE.target is not None and STATE.target.forget_threads())
    if hasattr(ev, "new_objfile"):
        ev.new_objfile.connect(STATE.forget)
    if hasattr(ev, "exited"):
        ev.exited.connect(STATE.forget)


_connect_events()
