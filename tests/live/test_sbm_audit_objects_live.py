"""`sbm audit` checks the design, not our choices (issue 13): on a test-only
variant of the reference kernel (fixtures/kernel/broken/0301-...) that maps
(1) one page of `current` past its allocation (arch_task_struct_size), (2)
one writable page past the output buffer copy's page-rounded size, (3) the
#DF IST guard page, which the kernel does not map, onto physical page 0, ONE
boot shows each finding with the object named, checked against plain gdb
(arch_task_struct_size, sizeof(struct task_struct), page_offset_base, the
cpu_entry_area layout) and QEMU's own walk (`gva2gpa` through the sandbox
vCPU's CR3 and through the other vCPU's kernel CR3).  On the reference
kernel (a VM of the shared pool) the audit of the same stop stays clean."""
from __future__ import annotations

import contextlib
import re

import pytest

from sbmdbg.fixture.sources import gdb_int, gva2gpa
from sbmdbg.paths import REPO_ROOT

from demo_helpers import sbm_json, stopped_in_sandbox as stopped_at_thunk

pytestmark = [pytest.mark.live, pytest.mark.timeout(1200)]
BROKEN = REPO_ROOT / "fixtures" / "kernel" / "broken" / "0301-test-only-audit-out-of-object.patch"
PAGE = 0x1000
#: CPU_ENTRY_AREA_PER_CPU with 4-level paging (the VM runs without --la57):
#: the per-CPU cpu_entry_areas follow the read-only IDT page at 0xfffffe0000000000
CEA_PER_CPU = 0xFFFFFE0000001000


@contextlib.contextmanager
def stopped_in_sandbox(vm, g):
    """Stopped in the `ok` scenario's sandbox (demo_helpers): (vCPU, `sbm list`'s sandbox)."""
    with stopped_at_thunk(vm, g) as (cpu, _):
        sbs = sbm_json(g, "sbm list")["sandboxes"]
        assert len(sbs) == 1 and sbs[0]["cpus"] == [cpu], sbs
        yield cpu, sbs[0]


def test_reference_kernel_audit_stays_clean(shared_vm, gdb_session):
    """The same stop on the reference kernel: nothing above info; the
    task_struct's own pages only (its slab neighbours on them: info)."""
    vm = shared_vm(pti="on")
    g = gdb_session(vm)
    with stopped_in_sandbox(vm, g) as (cpu, sb):
        n = gdb_int(g, "arch_task_struct_size")
        d = sbm_json(g, "sbm audit")
        assert d["above_info"] is False and d["worst"] == "info", d
        (a,) = d["audits"]
        rules = {f["rule"] for f in a["findings"]}
        assert not rules & {"out_of_object", "pa_zero", "not_mapped_by_kernel", "unexplained"}, rules
        (nb,) = [f for f in a["findings"] if f["rule"] == "object_page_neighbours"]
        assert f"task_struct of {sb['comm']} (pid {sb['pid']}) (arch_task_struct_size={n})" in nb["message"]


@pytest.fixture(scope="module")
def broken():
    """One boot of the broken variant, stopped once in the sandbox: the
    audit's JSON and the facts the tests check it against."""
    from sbmdbg.kernel.build import ensure_kernel
    from sbmdbg.vm import VM, VMOptions
    from sbmdbg.vm.gdbmi import GdbSession

    kb = ensure_kernel(extra_patches=[BROKEN])
    with VM(VMOptions(smp=2, pti="on", kernel=str(kb.bzImage), vmlinux=str(kb.vmlinux),
                      tree=str(kb.tree), append="kunit.enable=0")) as vm, \
            GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"]) as g, \
            stopped_in_sandbox(vm, g) as (cpu, sb):
        with pytest.raises(Exception, match="finding.*above info.*high"):
            g.console("sbm audit")
        audit = g.sbm_json("sbm audit", fail_ok=True)
        (a,) = audit["audits"]
        yield {"vm": vm, "g": g, "cpu": cpu, "other": 1 - cpu, "sandbox": sb, "audit": audit,
               "findings": a["findings"]}


def _cr3(vm, cpu: int) -> int:
    m = re.search(r"CR3=([0-9a-f]+)", vm.hmp("info registers", cpu_index=cpu))
    return int(m.group(1), 16)


def _one(findings, rule, region):
    got = [f for f in findings if f["rule"] == rule and f["region"] == region]
    assert len(got) == 1, [(f["rule"], f["region"]) for f in findings]
    return got[0]


def test_audit_fails_with_exactly_the_broken_mappings(broken):
    above = sorted((f["rule"], f["region"], f["severity"]) for f in broken["findings"] if f["severity"] != "info")
    # the two over-mapped pages are also unexplained by the design (and the buffer's is writable)
    assert above == [("not_mapped_by_kernel", "ist_guard", "high"), ("out_of_object", "output_buffer", "high"),
                     ("out_of_object", "task_struct", "medium"), ("pa_zero", "ist_guard", "high"),
                     ("unexplained", "unknown", "medium"), ("writable_unexplained", "unknown", "high")], above
    assert broken["audit"]["worst"] == "high" and broken["audit"]["above_info"] is True


def test_task_struct_past_arch_task_struct_size(broken):
    g, vm, cpu = broken["g"], broken["vm"], broken["cpu"]
    n, dwarf = gdb_int(g, "arch_task_struct_size"), gdb_int(g, "sizeof(struct task_struct)")
    assert 0 < n != dwarf       # the allocation is the kernel variable, not DWARF's sizeof
    f = _one(broken["findings"], "out_of_object", "task_struct")
    sb = broken["sandbox"]
    assert f"task_struct of {sb['comm']} (pid {sb['pid']}) (arch_task_struct_size={n})" in f["message"]
    assert f["object_size"] == n and f["size_source"] == "arch_task_struct_size"
    task = sb["task"]
    assert f["object_start"] == task and f["object_end"] == task + n
    last = (task + n + PAGE - 1) & ~(PAGE - 1)       # the first page past the allocation's last page
    assert [(r["va"], r["end"], r["perms"]) for r in f["ranges"]] == [(last, last + PAGE, "r-- user")]
    assert f"{last + PAGE - (task + n)} bytes past its end" in f["message"]
    # QEMU: the sandbox vCPU's CR3 maps that page onto the direct map's frame, and not the next
    assert gva2gpa(vm, cpu, last) == last - gdb_int(g, "page_offset_base")
    assert gva2gpa(vm, cpu, last + PAGE) is None


def test_output_buffer_past_its_page_rounded_size(broken):
    (out,) = [b for b in broken["sandbox"]["sbm"]["buffers"] if b["direction"] == "output"]
    f = _one(broken["findings"], "out_of_object", "output_buffer")
    assert f["message"].startswith(f"output buffer (copy of {out['kern_ptr']:#x}) of {out['size']} bytes "
                                   "mapped beyond the object: 1 page(s) past its last page")
    end = (out["sbm_ptr"] + out["size"] + PAGE - 1) & ~(PAGE - 1)
    assert [(r["va"], r["end"], r["perms"]) for r in f["ranges"]] == [(end, end + PAGE, "rw- user")]
    assert f["severity"] == "high" and "(writable)" in f["message"]
    # QEMU: mapped through the sandbox CR3
    assert gva2gpa(broken["vm"], broken["cpu"], end) is not None
    assert gva2gpa(broken["vm"], broken["cpu"], end + PAGE) is None


def test_unmapped_guard_page_onto_pa_zero(broken):
    g, vm, cpu, other = broken["g"], broken["vm"], broken["cpu"], broken["other"]
    sandbox_cr3 = broken["sandbox"]["fields"]["sbm_cr3"]
    assert _cr3(vm, cpu) & ~0xFFF == sandbox_cr3 and _cr3(vm, other) & ~0xFFF != sandbox_cr3
    size, off = gdb_int(g, "sizeof(struct cpu_entry_area)"), gdb_int(g, "&((struct cpu_entry_area *)0)->estacks.DF_stack_guard")
    guards = [CEA_PER_CPU + c * size + off for c in range(2)]
    for rule in ("pa_zero", "not_mapped_by_kernel"):
        f = _one(broken["findings"], rule, "ist_guard")
        assert [(r["va"], r["end"]) for r in f["ranges"]] == [(va, va + PAGE) for va in guards], rule
        assert [r["name"] for r in f["ranges"]] == [f"cpu_entry_area IST DF_stack_guard (cpu {c})"
                                                    for c in range(2)]
        assert all(r["perms"] == "rw- supv" for r in f["ranges"])
    for va in guards:
        assert gva2gpa(vm, cpu, va) == 0                # QEMU, the sandbox CR3: physical page 0
        assert gva2gpa(vm, other, va) is None           # QEMU, the other vCPU's (kernel) CR3: not mapped
