"""The fast ``Walker`` equals a simple reference walker (one ``Entry`` per entry,
one ``Mapping`` per leaf, merged afterwards): on recorded kernel page tables
(4- and 5-level, also checked against QEMU's ``info tlb`` recorded at the same
moment) and on random, often hostile, tables with random ranges, flag
filters, MAXPHYADDR, NXE and budgets.  Mappings, merged ranges, findings and
stats must all be identical."""
import base64
import dataclasses
import gzip
import json
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbmdbg.target.base import DictTarget
from sbmdbg.target.qmp import info_tlb_flags, parse_info_tlb
from sbmdbg.x86 import paging as pg

pytestmark = pytest.mark.unit
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "pt"


# ---------------------------------------------------------------- reference
def ref_walk(read_phys, root, *, la57=False, start=0, end=1 << 64, flags=None,
             maxphyaddr=52, nxe=True, max_entries=4_000_000, max_findings=1000):
    """Straightforward recursive walk, written for clarity, not speed."""
    flags = flags or {}
    reader = pg.TableReader(read_phys)
    leaves, findings, aliased = [], [], set()
    stats = {"entries": 0, "tables": 0, "leaves": 0, "truncated": False}

    def finding(*a, **kw):
        if len(findings) < max_findings or a[0] in ("budget", "timeout"):  # why it stopped: always
            findings.append(pg.Finding(*a, **kw))

    def match(perms, g):
        return all((g if k == "g" else getattr(perms, k)) == v for k, v in flags.items())

    def visit(table_pa, level, base, w, u, x, path):
        table = reader.table(table_pa)
        stats["tables"] += 1
        if table is None:
            finding("unreadable", f"{pg.LEVEL_NAMES[level]} table at {table_pa:#x} is not readable",
                    pa=table_pa, level=level)
            return
        span = 1 << pg.LEVEL_SHIFT[level]
        for idx, raw in enumerate(table):
            if not raw & pg.P:
                continue
            raw_va = base | (idx << pg.LEVEL_SHIFT[level])
            va = pg.sign_extend(raw_va, la57)
            if va + span <= start or va >= end:
                continue
            stats["entries"] += 1
            if stats["entries"] > max_entries:
                stats["truncated"] = True
                finding("budget", f"walk stopped after {max_entries} entries", va=va)
                return
            e = pg.Entry(level, idx, table_pa + idx * 8, raw, maxphyaddr, nxe)
            if e.reserved_bits:
                finding("reserved", f"{e.name} {raw:#018x} at {e.entry_pa:#x} has reserved bits "
                        f"{e.reserved_bits:#x} set", va=va, pa=e.entry_pa, level=level)
                continue
            nw, nu = w and bool(raw & pg.RW), u and bool(raw & pg.US)
            nx = x and not (nxe and raw & pg.XD)
            if e.leaf:
                perms, g = pg.Perms(nw, nu, nx), bool(raw & pg.G)
                if match(perms, g):
                    stats["leaves"] += 1
                    leaves.append(pg.Mapping(va, va + span, e.target, span, perms, g,
                                             e.cache_index, e.pkey, raw))
                continue
            if ((flags.get("w") is True and not nw) or (flags.get("u") is True and not nu)
                    or (flags.get("x") is True and not nx)):
                continue
            nxt = e.target
            if nxt in path:
                finding("loop", f"{e.name} at {e.entry_pa:#x} points back to the table at {nxt:#x} "
                        "on its own path", va=va, pa=e.entry_pa, level=level)
                continue
            if nxt in aliased:
                finding("alias", f"table {nxt:#x} is referenced by more than one entry (again from "
                        f"{e.entry_pa:#x})", va=va, pa=nxt, level=level - 1)
            aliased.add(nxt)
            visit(nxt, level - 1, raw_va, nw, nu, nx, path + [nxt])
            if stats["truncated"]:
                return

    root_pa = root & pg.ADDR_MASK_52
    visit(root_pa, 5 if la57 else 4, 0, True, True, True, [root_pa])
    return leaves, findings, stats


def assert_same(read_phys, root, **kw):
    want_leaves, want_findings, want_stats = ref_walk(read_phys, root, **kw)
    w = pg.Walker(read_phys, root, **kw)
    got_leaves = list(w.leaves())
    assert got_leaves == want_leaves
    assert list(w.merged()) == list(pg.merge(want_leaves))
    assert [f.to_json() for f in w.findings] == [f.to_json() for f in want_findings]
    got_stats = {k: v for k, v in vars(w.stats).items() if k not in ("seconds", "more_ranges", "bytes_est")}
    assert got_stats == want_stats
    # walk() (fresh walker) gives the same
    flags = kw.pop("flags", None)
    start, end = kw.pop("start", 0), kw.pop("end", 1 << 64)
    maps, _ = pg.walk(read_phys, root, range=(start, end), flags=flags, merge_runs=False, **kw)
    assert maps == want_leaves
    return got_leaves, w


# ---------------------------------------------------------------- recorded
def load_kroot(name):
    with gzip.open(FIXTURES / name, "rt") as fh:
        d = json.load(fh)
    pages = {int(k, 16): base64.b64decode(v) for k, v in d["pages"].items()}
    return DictTarget(pages), d


@pytest.mark.parametrize("name", ["kroot-4level.json.gz", "kroot-5level.json.gz"])
def test_recorded_kernel_tables_match_reference_and_info_tlb(name):
    t, d = load_kroot(name)
    la57 = d["la57"]
    assert la57 == name.startswith("kroot-5")
    leaves, w = assert_same(t.read_phys, d["cr3"], la57=la57)
    assert not w.findings and len(leaves) > 3000
    ours = [(m.va, m.pa, info_tlb_flags(m.leaf_raw, m.page_size)) for m in leaves]
    assert ours == parse_info_tlb(d["info_tlb"])
    # ranges, filters, a budget
    kva = 0xFFFFFFFF81000000
    assert_same(t.read_phys, d["cr3"], la57=la57, start=kva, end=kva + (5 << 21) + 0x3000)
    assert_same(t.read_phys, d["cr3"], la57=la57, start=0x400123, end=0x7FFF_FFFF_F000)
    for f in ({"w": True}, {"x": True, "u": False}, {"g": False}, {"w": False, "x": False}):
        assert_same(t.read_phys, d["cr3"], la57=la57, flags=f)
    assert_same(t.read_phys, d["cr3"], la57=la57, max_entries=1000)
    # every leaf translates to what the walk says
    reader = pg.TableReader(t.read_phys)
    for m in leaves[::97]:
        tr = pg.translate(reader, d["cr3"], m.va + 0x10, la57=la57)
        assert tr.pa == m.pa + 0x10 and tr.perms == m.perms and tr.page_size == m.page_size


def test_recorded_snapshot_kernel_half():
    from sbmdbg.model.fixture import load_snapshot
    t, _, _, exp = load_snapshot(str(FIXTURES / "kaslr-pti-smp2.json.gz"))
    cr3 = t.registers(0)["cr3"] & ~0x1FFF
    assert_same(t.read_phys, cr3, start=1 << 63)
    assert_same(t.read_phys, cr3)  # user half not recorded: unreadable findings


def test_shm_read_table_equals_read_phys(tmp_path):
    from sbmdbg.target.shm import ShmTarget
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(range(256)) * (4 * 16 * 16))  # 256 KiB
    s = ShmTarget(str(ram))
    try:
        assert s.read_table(0x3000) == struct.unpack("<512Q", s.read_phys(0x3000, 4096))
        r = pg.TableReader(s.read_phys)
        raw = s.read_table(0x5000)   # the cache keeps present entries only; entry() rereads
        assert r.table(0x5123) == tuple(e if e & 1 else 0 for e in raw)
        assert [r.entry(0x5000, i, r.table(0x5000)[i]) for i in range(512)] == list(raw)
        assert r.table(1 << 40) is None  # unbacked: a finding, not an exception
    finally:
        s.close()


# ---------------------------------------------------------------- random
NTABLES = 8
BASE = 0x10000
FLAGBITS = [pg.P, pg.RW, pg.US, pg.PWT, pg.PCD, pg.A, pg.D, pg.PS, pg.G, pg.XD,
            1 << 12, 1 << 14, 1 << 45, 1 << 51, 0xF << 59, 1 << 9]


def build(seed, dense):
    rng = random.Random(seed)
    tables = [[0] * 512 for _ in range(NTABLES)]
    for ti in range(NTABLES):
        n = rng.randrange(512) if dense else rng.randrange(12)
        run_pa = rng.getrandbits(30) & ~0xFFF
        common = pg.P | rng.choice([0, pg.RW, pg.US | pg.RW, pg.XD, pg.G | pg.RW])
        for _ in range(n):
            idx = rng.randrange(512)
            kind = rng.randrange(12)
            if kind < 5:      # contiguous-ish run: mergeable leaves
                v = (run_pa + idx * 4096) | common
            elif kind < 9:    # another table (loops, aliases)
                v = (BASE + rng.randrange(NTABLES) * 0x1000) | pg.P | rng.choice([0, pg.RW, pg.US, pg.XD])
            elif kind < 10:
                v = rng.getrandbits(64)
            else:
                v = (rng.getrandbits(40) & ~0xFFF) | pg.P
            for _ in range(rng.randrange(3)):
                v ^= rng.choice(FLAGBITS)
            tables[ti][idx] = v
    pages = {BASE + i * 0x1000: struct.pack("<512Q", *t) for i, t in enumerate(tables)}

    def read_phys(pa, n):
        page = pages.get(pa & ~0xFFF)
        if page is None:
            raise KeyError(pa)
        return page[pa & 0xFFF:(pa & 0xFFF) + n]
    return read_phys, BASE + rng.randrange(NTABLES) * 0x1000


FLAG_SPECS = [None, {"w": True}, {"u": True}, {"x": True}, {"u": False}, {"g": True},
              {"w": False, "x": False}, {"w": True, "x": True, "u": True}, {"g": False, "u": True}]


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, (1 << 64) - 1), st.booleans(), st.booleans(),
       st.sampled_from(FLAG_SPECS), st.sampled_from([40, 46, 52]), st.booleans(),
       st.one_of(st.none(), st.tuples(st.integers(0, (1 << 64) - 1), st.integers(1, 1 << 40))),
       st.sampled_from([5000, 50, 700]))
def test_random_tables_match_reference(seed, dense, la57, flags, maxphyaddr, nxe, rng_spec, budget):
    read_phys, root = build(seed, dense)
    kw = dict(la57=la57, flags=flags, maxphyaddr=maxphyaddr, nxe=nxe, max_entries=budget)
    if rng_spec:
        start, length = rng_spec
        kw.update(start=start, end=min(start + length, 1 << 64))
    assert_same(read_phys, root, **kw)


def test_leaves_sequence_and_memory_cap_on_recorded_tables():
    """walk(merge_runs=False) hands out a Leaves sequence (page tables kept as
    one row each): indexing, slicing, iteration and equality behave as the
    list of Mappings they stand for; a memory cap keeps exactly a prefix."""
    t, d = load_kroot("kroot-4level.json.gz")
    want, _, _ = ref_walk(t.read_phys, d["cr3"])
    got, w = pg.walk(t.read_phys, d["cr3"], merge_runs=False)
    assert isinstance(got, pg.Leaves) and len(got) == len(want) == w.stats.leaves
    assert any(type(r) is pg._PageRun for r in got._kept)   # the per-table rows were used
    assert got == want and want == list(got) and got != want[:-1]
    assert got[0] == want[0] and got[-1] == want[-1] and got[1234] == want[1234]
    assert got[100:700:7] == want[100:700:7]
    assert got.index(want[2000]) == 2000 and want[5] in got
    # a walk's Mapping derives pa, perms, ... from its raw leaf when read: the
    # same value, hash and repr as one built field by field, and as frozen
    m, r = got[3000], want[3000]
    assert hash(m) == hash(r) and repr(m) == repr(r) and m.to_json() == r.to_json()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.pa = 0
    assert dataclasses.asdict(got[7]) == dataclasses.asdict(want[7])
    with pytest.raises(AttributeError):
        m.no_such_field
    # a memory cap in the middle of a page table's row: the first leaves are kept
    cap = 1000
    per_leaf = pg.RAW_COST + pg.MAPPING_COST
    some, w2 = pg.walk(t.read_phys, d["cr3"], merge_runs=False, max_bytes=cap * per_leaf + 5)
    assert len(some) == cap and some == want[:cap]
    assert w2.stats.truncated and w2.stats.more_ranges == len(want) - cap
    assert w2.stats.bytes_est <= cap * per_leaf + 5
    assert any(f.kind == "budget" for f in w2.findings)
