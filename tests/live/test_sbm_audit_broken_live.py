"""`sbm audit` on a deliberately broken kernel (fixtures/kernel/broken/: entry
text mapped with _PAGE_USER) reports exactly that finding, and fails."""
from __future__ import annotations

import pytest

from sbmdbg.paths import REPO_ROOT

pytestmark = pytest.mark.live
BROKEN = REPO_ROOT / "fixtures" / "kernel" / "broken" / "0001-test-only-entry-text-user-executable.patch"


def test_audit_finds_user_executable_entry_text():
    from sbmdbg.kernel.build import ensure_kernel
    from sbmdbg.vm import VM, VMOptions
    from sbmdbg.vm.gdbmi import GdbSession
    kb = ensure_kernel(extra_patches=[BROKEN])
    # With user-executable entry text, x86_sbm_exec (in .entry.text) faults on SMEP as soon
    # as it loads the sandbox CR3 at CPL 0: boot without SMEP; and skip the boot-time KUnit
    # sandbox_mode suite (kunit.enable=0).
    with VM(VMOptions(smp=2, pti="on", kernel=str(kb.bzImage), vmlinux=str(kb.vmlinux),
                      tree=str(kb.tree), append="kunit.enable=0 clearcpuid=smep")) as vm, \
            GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"]) as g:
        g.interrupt()
        g.console(f"sbm target shm {vm.info['ram']} {vm.info['ram_size']}")
        g.mi("-break-insert -t __sbm_thunk_sbm_demo_compute")
        g.cont()
        # Fire and forget: the guest stays stopped and the VM is killed at the
        # end, so nothing waits for the command to finish.
        vm.serial.send("echo ok > /sys/kernel/debug/sbm_demo/run\n")
        g.wait_stopped(300)
        with pytest.raises(Exception, match="finding.*above info.*critical"):
            g.console("sbm audit")
        # the JSON it printed before failing
        with pytest.raises(Exception, match="finding.*above info.*critical"):
            g.sbm_json("sbm audit")
        d = g.sbm_json("sbm audit", fail_ok=True)
        above = [f for a in d["audits"] for f in a["findings"] if f["severity"] != "info"]
        assert len(above) == 1, above
        f = above[0]
        assert f["rule"] == "entry_text_user" and f["severity"] == "critical" and f["region"] == "entry_text"
        assert all(r["perms"] == "r-x user" for r in f["ranges"])
        # the guest is not resumed: leaving the broken sandbox is not this test's business
