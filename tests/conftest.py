"""Shared fixtures.  Teammates' live tests use these; keep names and signatures.

    kernel_build                 session: KernelBuild (ensure_kernel())
    make_vm(**VMOptions fields)  factory: a booted VM, always stopped at test end
    gdb_session(vm, **kw)        factory: a GdbSession attached to vm, always closed
"""

from __future__ import annotations

import signal

import pytest

from sbmdbg.kernel.build import KernelBuild, ensure_kernel


def pytest_configure(config):
    """SIGTERM (CI time-out, kill) unwinds like Ctrl-C so fixtures stop QEMU and gdb."""
    def on_term(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        pass


@pytest.fixture(scope="session")
def kernel_build() -> KernelBuild:
    """The reference kernel (built once, then a cache hit)."""
    return ensure_kernel()


@pytest.fixture
def make_vm(kernel_build):
    """``vm = make_vm(pti="on", kaslr=True, ...)``: boots; stopped after the test."""
    from sbmdbg.vm import VM, VMOptions

    vms = []

    def factory(**opts) -> VM:
        o = VMOptions(**opts)
        if o.kernel is None:
            o.kernel, o.vmlinux, o.tree = (str(kernel_build.bzImage), str(kernel_build.vmlinux),
                                           str(kernel_build.tree))
        vm = VM(o)
        vms.append(vm)
        return vm

    yield factory
    for vm in vms:
        vm.close()


@pytest.fixture
def gdb_session():
    """``g = gdb_session(vm)``: gdb (MI) attached to *vm*; closed after the test."""
    from sbmdbg.vm.gdbmi import GdbSession

    sessions = []

    def factory(vm, **kw) -> GdbSession:
        info = vm.info
        s = GdbSession(info["vmlinux"], info.get("tree"), info["gdb"], **kw)
        sessions.append(s)
        return s

    yield factory
    for s in reversed(sessions):
        s.close()


def pytest_collection_modifyitems(config, items):
    """Tests under tests/unit/ or tests/live/ get that marker if they have neither."""
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("live"):
            continue
        parts = item.path.parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "live" in parts:
            item.add_marker(pytest.mark.live)
