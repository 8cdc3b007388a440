"""x86-64 paging decoder on hand-built tables (4/5 level, large pages, bits, hostile)."""
import pytest

from sbmdbg.target.base import DictTarget, UnbackedMemory
from sbmdbg.x86 import paging as pg
from sbmdbg.x86.paging import A, D, G, P, PAT_4K, PAT_LARGE, PCD, PS, PWT, RW, US, XD
from sbmdbg.x86.ptbuild import PageTableBuilder
from sbmdbg.x86.regs import decode_cr3, decode_cr4

pytestmark = pytest.mark.unit

KVA = 0xFFFFFFFF81000000


def test_4k_translate_every_level():
    b = PageTableBuilder()
    b.map(KVA, 0x1234000, flags=P | RW | G | A | D)
    tr = pg.translate(b.read_phys, b.root, KVA + 0x123)
    assert tr.pa == 0x1234123 and tr.page_size == 4096 and tr.fault is None
    assert [e.level for e in tr.entries] == [4, 3, 2, 1]
    assert [e.index for e in tr.entries] == [511, 510, 8, 0]
    assert tr.perms == pg.Perms(w=True, u=False, x=True)  # leaf not US
    assert tr.entries[-1].bits()["G"] and tr.entries[-1].bits()["D"]
    assert tr.entries[0].entry_pa == b.root + 511 * 8


def test_la57_and_1g_2m_pages():
    b = PageTableBuilder(la57=True)
    va1g = 0xFF11000000000000 & ~((1 << 30) - 1)
    b.map(va1g, 0x40000000, size=1 << 30, flags=P | RW | XD)
    b.map(0x200000, 0x600000, size=1 << 21, flags=P | US)
    assert not pg.canonical(0x0000800000000000, la57=False)
    assert pg.canonical(0x0000800000000000, la57=True)
    tr = pg.translate(b.read_phys, b.root, va1g + 0x12345678, la57=True)
    assert tr.levels == 5 and len(tr.entries) == 3 and tr.page_size == 1 << 30
    assert tr.pa == 0x40000000 + 0x12345678
    assert tr.perms == pg.Perms(w=True, u=False, x=False)
    tr = pg.translate(b.read_phys, b.root, 0x2FFFFF, la57=True)
    assert tr.pa == 0x6FFFFF and tr.page_size == 1 << 21
    assert tr.perms == pg.Perms(w=False, u=True, x=True)
    maps, w = pg.walk(b.read_phys, b.root, la57=True)
    assert [(m.va, m.size) for m in maps] == [(0x200000, 1 << 21), (va1g, 1 << 30)]
    assert not w.findings


def test_effective_perms_combine_levels():
    b = PageTableBuilder()
    b.map(0x400000, 0x800000, flags=P | RW | US, upper=P | US | XD)  # upper: RO, NX
    tr = pg.translate(b.read_phys, b.root, 0x400000)
    assert tr.perms == pg.Perms(w=False, u=True, x=False)
    b2 = PageTableBuilder()
    b2.map(0x400000, 0x800000, flags=P | RW | US, upper=P | RW)  # upper supervisor
    assert pg.translate(b2.read_phys, b2.root, 0x400000).perms.u is False


def test_pat_pkey_cache_index():
    b = PageTableBuilder()
    b.map(0x1000, 0x5000, flags=P | PAT_4K | PCD | (0xA << 59))
    b.map(0x40000000, 0x80000000, size=1 << 21, flags=P | PAT_LARGE | PWT | (3 << 59))
    t1 = pg.translate(b.read_phys, b.root, 0x1000)
    assert t1.entries[-1].pat and t1.entries[-1].pkey == 0xA
    assert t1.entries[-1].cache_index == 0b110
    t2 = pg.translate(b.read_phys, b.root, 0x40000000)
    assert t2.entries[-1].pat and t2.entries[-1].pkey == 3 and t2.entries[-1].cache_index == 0b101
    assert t2.pa == 0x80000000  # PAT bit 12 is not part of the address
    j = t2.to_json()
    assert j["pkey"] == 3 and j["entries"][-1]["bits"]["PAT"] is True


def test_reserved_bits_are_a_fault_and_finding():
    b = PageTableBuilder()
    b.map(0x1000, 0x5000)
    # PS in a PML4E is reserved
    b.tables[b.root][0] |= PS
    tr = pg.translate(b.read_phys, b.root, 0x1000)
    assert tr.pa is None and "reserved" in tr.fault and tr.findings[0].kind == "reserved"
    maps, w = pg.walk(b.read_phys, b.root)
    assert maps == [] and w.findings[0].kind == "reserved"
    # bits above MAXPHYADDR
    b2 = PageTableBuilder()
    b2.map(0x1000, 1 << 45)
    assert pg.translate(b2.read_phys, b2.root, 0x1000, maxphyaddr=40).fault
    assert pg.translate(b2.read_phys, b2.root, 0x1000, maxphyaddr=52).pa == 1 << 45
    # 2M leaf with bits 13..20 set
    b3 = PageTableBuilder()
    b3.map(0x200000, 0x200000 | (1 << 14), size=1 << 21)
    assert "reserved" in pg.translate(b3.read_phys, b3.root, 0x200000).fault
    # XD reserved when EFER.NXE=0
    b4 = PageTableBuilder()
    b4.map(0x1000, 0x2000, flags=P | XD)
    assert pg.translate(b4.read_phys, b4.root, 0x1000, nxe=False).fault


def test_noncanonical_and_not_present():
    b = PageTableBuilder()
    tr = pg.translate(b.read_phys, b.root, 0x0000900000000000)
    assert tr.fault == "non-canonical address" and tr.findings[0].kind == "noncanonical"
    tr = pg.translate(b.read_phys, b.root, 0x1000)
    assert tr.fault == "PML4E not present" and len(tr.entries) == 1


def test_self_loop_and_upper_loop():
    b = PageTableBuilder()
    b.tables[b.root][0] = b.root | P | RW  # PML4 points at itself
    tr = pg.translate(b.read_phys, b.root, 0x1000)
    assert tr.pa is None and tr.findings[0].kind == "loop"
    maps, w = pg.walk(b.read_phys, b.root)
    assert maps == [] and any(f.kind == "loop" for f in w.findings)
    # PT pointing back up to the PDPT (as a leaf: that is legal, maps the table)
    b2 = PageTableBuilder()
    b2.map(0x1000, 0x9000)
    pdpt = b2.tables[b2.root][0] & ~0xFFF
    pd = b2.tables[pdpt][0] & ~0xFFF
    b2.tables[pd][1] = pdpt | P | RW  # PDE -> PDPT as next table: loop
    maps, w = pg.walk(b2.read_phys, b2.root)
    assert [m.va for m in maps] == [0x1000]
    assert any(f.kind == "loop" for f in w.findings)


def test_fanout_is_bounded():
    b = PageTableBuilder()
    pdpt, pd, pt = b.alloc(), b.alloc(), b.alloc()
    for i in range(512):
        b.tables[b.root][i] = pdpt | P
        b.tables[pdpt][i] = pd | P
        b.tables[pd][i] = pt | P
        b.tables[pt][i] = (i << 12) | P
    maps, w = pg.walk(b.read_phys, b.root, max_entries=20000, merge_runs=False)
    assert w.stats.truncated and any(f.kind == "budget" for f in w.findings)
    assert len(maps) < 20000
    assert len(w.findings) <= w.max_findings


def test_walk_time_budget_gives_a_timeout_finding(monkeypatch):
    """The time budget (not the entry budget) stops the walk, with a finding.
    A fake clock that moves 1 s per reading: no dependence on the machine's load."""
    b = PageTableBuilder()
    for i in range(64):
        b.map(i << 30, i << 21)            # 64 PDPT entries -> 64 separate tables
    clock = iter(range(10**6))
    monkeypatch.setattr(pg.time, "monotonic", lambda: float(next(clock)))
    maps, w = pg.walk(b.read_phys, b.root, max_seconds=5, max_entries=10**6, merge_runs=False)
    kinds = [f.kind for f in w.findings]
    assert w.stats.truncated and kinds.count("timeout") >= 1 and "budget" not in kinds, kinds
    assert 0 < len(maps) < 64 and w.stats.entries < 10**6
    assert "after 5.0s" in next(f for f in w.findings if f.kind == "timeout").message


def test_unreadable_table():
    b = PageTableBuilder()
    b.tables[b.root][3] = 0x7FFF0000 | P  # no table there
    tr = pg.translate(b.read_phys, b.root, 3 << 39)
    assert tr.findings[0].kind == "unreadable"
    maps, w = pg.walk(b.read_phys, b.root)
    assert w.findings[0].kind == "unreadable"


def test_walk_merges_and_filters_and_prunes():
    b = PageTableBuilder()
    for i in range(8):
        b.map(0x10000 + i * 4096, 0x500000 + i * 4096, flags=P | RW | US)
    b.map(0x18000, 0x900000, flags=P | RW | US)         # PA discontiguous
    b.map(0x19000, 0x901000, flags=P | US)              # RO
    b.map(KVA, 0x1000000, size=1 << 21, flags=P | RW | G, upper=P | RW)
    maps, w = pg.walk(b.read_phys, b.root)
    assert [(m.va, m.size) for m in maps] == [
        (0x10000, 0x8000), (0x18000, 0x1000), (0x19000, 0x1000), (KVA, 1 << 21)]
    assert maps[0].npages == 8
    maps, _ = pg.walk(b.read_phys, b.root, flags="u,ro")
    assert [m.va for m in maps] == [0x19000]
    maps, _ = pg.walk(b.read_phys, b.root, flags="g")
    assert [m.va for m in maps] == [KVA]
    # range filter: subtrees outside are never read
    reads = []

    def rp(pa, n):
        reads.append(pa)
        return b.read_phys(pa, n)
    maps, w = pg.walk(rp, b.root, range=(KVA, KVA + 0x1000))
    assert [m.va for m in maps] == [KVA]
    user_pdpt = b.tables[b.root][0] & ~0xFFF
    assert user_pdpt not in reads
    # flags prune: 'u' skips the supervisor kernel subtree without reading it
    reads.clear()
    pg.walk(rp, b.root, flags="u")
    kpdpt = b.tables[b.root][511] & ~0xFFF
    assert kpdpt not in reads
    with pytest.raises(pg.PagingError):
        pg.parse_flags("w,bogus")


def test_ptov():
    b = PageTableBuilder()
    b.map(0x10000, 0x500000, flags=P | RW)
    b.map(KVA, 0x500000, flags=P)
    hits, _ = pg.ptov(b.read_phys, b.root, 0x500123)
    assert sorted(va for va, _ in hits) == [0x10123, KVA + 0x123]


def test_cr3_cr4_decode():
    c = decode_cr3(0x8000000012345801 | (1 << 12), cr4=1 << 17)
    assert c.pcid == 0x801 and c.pti_user and c.noflush
    assert c.kernel_pgd_pa == 0x12344000 and c.pgd_pa == 0x12345000
    c2 = decode_cr3(0x1234018)
    assert c2.pcid is None and c2.to_json()["pwt"] and c2.to_json()["pcd"]
    d = decode_cr4((1 << 12) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 11) | (1 << 17))
    assert d["la57"] and d["smep"] and d["smap"] and d["pke"] and d["umip"] and d["pcide"]
    assert "LA57" in d["flags"]


def test_dict_target_cache_and_errors():
    t = DictTarget({0x1000: bytes(range(256)) * 16}, regs=[{"cr3": 0x1000}])
    assert t.read_phys(0x1010, 4) == bytes([16, 17, 18, 19])
    assert t.page_reads == 1
    t.read_phys(0x1000, 8)
    assert t.page_reads == 1
    with pytest.raises(UnbackedMemory):
        t.read_phys(0xFFF, 2)
    t.invalidate()
    t.read_phys(0x1000, 1)
    assert t.page_reads == 2
    assert t.registers(0)["cr3"] == 0x1000
