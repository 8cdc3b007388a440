"""pytest plugin (entry point ``pytest11``): scenario files are tests.

``pytest checks/`` collects ``check_*.toml`` and ``*.check.toml`` files;
each file is ONE test item (its steps share a VM and depend on each other's
guest state, so they pass or fail together), marked ``live``.  A failure
shows every failing step's "expected ..., saw ..." lines and the console
tail.  A malformed file fails at once with FILE:LINE messages, no VM booted.
One Runner per session: consecutive files with the same kernel and VM
options share a VM (taken from the test suite's VM pool when a conftest
provides one, see VM_FACTORY).

Options: ``--check-extra-patch FILE`` (repeatable) builds the reference
kernel with that patch for every scenario file (as ``sbmdbg check
--extra-patch``).
"""
from __future__ import annotations

import pytest

from sbmdbg.check.spec import is_scenario_file

_RUNNER = pytest.StashKey()
#: a conftest may set ``config.stash[VM_FACTORY] = factory``: the Runner then
#: takes its VMs from it (``factory(VMOptions) -> (vm, release(vm, healthy))``,
#: the test suite's VM pool) instead of booting and stopping its own
VM_FACTORY = pytest.StashKey()


def pytest_addoption(parser):
    g = parser.getgroup("sbmdbg check")
    g.addoption("--check-extra-patch", action="append", default=[], metavar="FILE",
                help="build the reference kernel with this patch for every scenario file")


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".toml" and is_scenario_file(file_path.name):
        return ScenarioFile.from_parent(parent, path=file_path)
    return None


def _runner(config):
    r = config.stash.get(_RUNNER, None)
    if r is None:
        from pathlib import Path

        from sbmdbg.check.runner import Runner

        extra = [str(Path(p).resolve()) for p in config.getoption("--check-extra-patch") or ()]
        r = Runner(extra_patches=extra, vm_factory=config.stash.get(VM_FACTORY, None))
        config.stash[_RUNNER] = r
    return r


def _vm_key(item) -> str:
    from sbmdbg.check import spec

    try:
        sc = spec.load(item.path)
    except spec.ScenarioError:
        return ""
    return repr((sc.kernel, [str(p) for p in sc.extra_patches], sorted(sc.vm.items())))


def pytest_collection_modifyitems(config, items):
    """Scenario files with the same kernel and VM options run one after the
    other (in the slots the scenario items already take), so they share a VM."""
    slots = [i for i, it in enumerate(items) if isinstance(it, ScenarioItem)]
    ordered = sorted((items[i] for i in slots), key=_vm_key)   # stable: file order within a key
    for i, it in zip(slots, ordered):
        items[i] = it


def pytest_unconfigure(config):
    r = config.stash.get(_RUNNER, None)
    if r is not None:
        r.close()


SCENARIO_FILE_TIMEOUT = 2400


class ScenarioFile(pytest.File):
    def collect(self):
        item = ScenarioItem.from_parent(self, name=self.path.name)
        item.add_marker(pytest.mark.live)
        # a whole scenario file is one item: its steps' own timeouts (up to
        # 900 s for one step) bound it, pytest's 600 s default would not
        item.add_marker(pytest.mark.timeout(SCENARIO_FILE_TIMEOUT))
        yield item


class CheckFailed(Exception):
    pass


class ScenarioItem(pytest.Item):
    def runtest(self):
        from sbmdbg.check import spec
        from sbmdbg.check.report import failure_text

        try:
            sc = spec.load(self.path)
        except spec.ScenarioError as e:
            raise CheckFailed("\n".join(spec.fmt_problem(*p) for p in e.problems)) from None
        runner = _runner(self.config)
        try:
            fr = runner.run_one(sc)
        finally:
            if runner.vm_factory is not None:
                runner.close()      # gdb detached, the VM back in the pool for the next test
        self.user_properties.append(("check_seconds", fr.seconds))
        if not fr.passed:
            raise CheckFailed(failure_text(fr))

    def repr_failure(self, excinfo, style=None):
        if excinfo.errisinstance(CheckFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return self.path, 0, f"scenario {self.path.name}"
