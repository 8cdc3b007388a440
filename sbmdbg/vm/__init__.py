"""The QEMU harness: ``VM``, ``VMOptions``, ``RunResult``, ``GdbSession``."""

from sbmdbg.vm.qemu import VMOptions
from sbmdbg.vm.serial import RunResult
from sbmdbg.vm.vm import VM, list_vms

__all__ = ["VM", "VMOptions", "RunResult", "list_vms"]
