"""The kernel model and walker on a snapshot recorded from the real kernel
(KASLR on, PTI on, 2 vCPUs, `sbmdbg fixture record kaslr-pti-smp2`), checked
against the answers of other sources taken at the same stop: the guest's
/proc/kallsyms and dmesg, QEMU's `info tlb` and `gva2gpa`, drgn's pcpu_hot."""
from pathlib import Path

import pytest

from sbmdbg.model.fixture import load_independent, load_snapshot
from sbmdbg.model.kernel import KernelError, open_kernel
from sbmdbg.model.percpu import pcpu_hot
from sbmdbg.target.qmp import info_tlb_flags, parse_info_tlb
from sbmdbg.x86 import paging as pg

pytestmark = pytest.mark.unit
SNAP = Path(__file__).resolve().parents[2] / "fixtures" / "pt" / "kaslr-pti-smp2.json.gz"


@pytest.fixture(scope="module")
def snap():
    t, syms, lays, exp = load_snapshot(str(SNAP))
    return t, syms, lays, exp, load_independent(str(SNAP))


def test_discovery_against_the_guest(snap):
    t, syms, lays, exp, ind = snap
    k = open_kernel(t, symbols=syms, layouts=lays)
    text = ind["guest"]["kallsyms"]["_text"]
    assert k.sym("_text") == text
    assert k.slide == text - syms.addr("_text") != 0          # KASLR moved it, by this much
    assert k.slide == ind["guest"]["kallsyms"]["_stext"] - syms.addr("_stext")
    assert ind["guest"]["pti"] is True and k.pti_enabled()


def test_pcpu_against_drgn(snap):
    t, syms, lays, exp, ind = snap
    k = open_kernel(t, symbols=syms, layouts=lays)
    theirs = ind["drgn"]["pcpu"]
    assert len(theirs) == t.ncpus == 2
    for d in theirs:
        got = pcpu_hot(k, d["cpu"])
        for f in ("current_task", "top_of_stack", "cpu_number", "hardirq_stack_ptr"):
            assert (got["fields"][f] & ((1 << 64) - 1)) == d[f], (d["cpu"], f)
        assert got["current"]["pid"] == d["pid"] and got["current"]["comm"] == d["comm"]


def _walk_root(exp):
    return exp["walk_root"], str(exp["walk_cpu"])


def test_kernel_half_walk_against_info_tlb(snap):
    t, syms, lays, exp, ind = snap
    root, cpu = _walk_root(exp)
    maps, w = pg.walk(t.read_phys, root, range=(1 << 63, 1 << 64), merge_runs=False)
    ours = [(m.va, m.pa, info_tlb_flags(m.leaf_raw, m.page_size)) for m in maps]
    theirs = [x for x in parse_info_tlb(ind["qemu"]["info_tlb"][cpu]) if x[0] >= 1 << 63]
    assert not w.findings and len(theirs) > 1000
    assert ours == theirs, next((a, b) for a, b in zip(ours, theirs) if a != b)


def test_vtop_against_gva2gpa(snap):
    t, syms, lays, exp, ind = snap
    k = open_kernel(t, symbols=syms, layouts=lays)
    root, cpu = _walk_root(exp)
    samples = ind["qemu"]["gva2gpa"][cpu]
    assert len(samples) >= 4 and all(pa is not None for pa in samples.values())
    for va, pa in samples.items():
        assert pg.translate(t.read_phys, root, int(va)).pa == pa, va
        assert k.translate(root, int(va)).pa == pa, va        # the model's cached path
    # text is read-only executable and the direct map is NX
    tr = pg.translate(t.read_phys, root, k.sym("_text"))
    assert tr.perms == pg.Perms(w=False, u=False, x=True)
    assert not pg.translate(t.read_phys, root, k.page_offset_base + 0x100000).perms.x


def test_wrong_vmlinux_is_a_clear_error(snap):
    t, syms, lays, exp, ind = snap
    bad = type(syms)(dict(syms.table), syms.build_id,
                     {a: b"Linux version 0.0.1-not-this-one" + bytes(32) for a in syms.blobs})
    with pytest.raises(KernelError, match="does not match the running kernel"):
        open_kernel(t, symbols=bad, layouts=lays)


def test_translate_cache_keeps_the_offset(snap):
    """Kernel.translate caches per 4 KiB page; each address keeps its offset."""
    t, syms, lays, exp, ind = snap
    k = open_kernel(t, symbols=syms, layouts=lays)
    root, cpu = _walk_root(exp)
    text = k.sym("_text")
    want = ind["qemu"]["gva2gpa"][cpu][str(text + 0x1234)]
    a = k.translate(root, text + 0x1234)
    b = k.translate(root, text + 0x123c)     # same page: served from the cache
    assert a.pa == want and b.va == text + 0x123c and b.pa == want + 8
