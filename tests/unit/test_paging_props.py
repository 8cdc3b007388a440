"""Property tests: random (often hostile) page tables never crash or hang the
decoder, and walk() agrees with translate() everywhere.

Example counts add up to >= 10,000 cases per run (see EXAMPLES).  Most
generated tables carry one well-formed chain to a leaf under the random
entries, and each test asserts the share of cases that reached the check it
exists for (MIN_HIT_RATE; `hypothesis.event` labels them for
--hypothesis-show-statistics)."""
import random
import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sbmdbg.x86 import paging as pg

pytestmark = pytest.mark.unit

EXAMPLES = 3400   # x 3 tests
NTABLES = 6
BASE = 0x10000
FLAGBITS = [pg.P, pg.RW, pg.US, pg.PWT, pg.PCD, pg.A, pg.D, pg.PS, pg.G, pg.XD,
            1 << 12, 1 << 14, 1 << 45, 1 << 51, 0xF << 59, 1 << 9]
HOT_IDX = (0, 1, 2, 255, 256, 257, 510, 511)


def _entry_value(rng):
    kind = rng.randrange(10)
    if kind == 0:
        return rng.getrandbits(64)                                # garbage
    if kind <= 6:                                                 # a table (maybe a loop)
        target = BASE + rng.randrange(NTABLES) * 0x1000
    elif kind == 7:
        target = rng.getrandbits(40) & ~0xFFF                     # maybe unbacked
    else:
        target = rng.choice((0x200000, 0x40000000, 0x1000))
    flags = pg.P
    for _ in range(rng.randrange(6)):
        flags |= rng.choice(FLAGBITS)
    if rng.random() < 0.5:
        flags &= ~pg.PS
    return target | flags


LEAF_FLAGS = [pg.RW, pg.US, pg.PWT, pg.PCD, pg.A, pg.D, pg.G, pg.XD]


def _skeleton(rng, tables, root_i, la57):
    """A well-formed chain from the root to one leaf (4K, 2M or 1G) through
    distinct tables, so that the cases exercise the mapped paths too."""
    levels = 5 if la57 else 4
    leaf_level = rng.choice((1, 2, 3))
    order = [root_i] + rng.sample([i for i in range(NTABLES) if i != root_i], NTABLES - 1)
    t = 0
    for level in range(levels, leaf_level, -1):
        nxt = order[t + 1]
        idx = rng.choice(HOT_IDX) if rng.random() < 0.5 else rng.randrange(512)
        tables[order[t]][idx] = (BASE + nxt * 0x1000) | pg.P | pg.RW | pg.US
        t += 1
    size = 1 << pg.LEVEL_SHIFT[leaf_level]
    flags = pg.P | (pg.PS if leaf_level > 1 else 0)
    for _ in range(rng.randrange(4)):
        flags |= rng.choice(LEAF_FLAGS)
    pa = rng.randrange(0, 1 << 39, size)
    tables[order[t]][rng.randrange(512)] = pa | flags


def build_memory(seed, nentries, la57):
    """Random tables from a seed: cheap to generate, so hypothesis spends its
    time on cases rather than on drawing 4 KiB pages.  Most cases carry one
    well-formed chain to a leaf under the random (often hostile) entries."""
    rng = random.Random(seed)
    tables = [[0] * 512 for _ in range(NTABLES)]
    root_i = rng.randrange(NTABLES)
    for _ in range(nentries):
        idx = rng.choice(HOT_IDX) if rng.random() < 0.6 else rng.randrange(512)
        tables[rng.randrange(NTABLES)][idx] = _entry_value(rng)
    if rng.random() < 0.85:
        _skeleton(rng, tables, root_i, la57)
    pages = {BASE + i * 0x1000: struct.pack("<512Q", *t) for i, t in enumerate(tables)}

    def read_phys(pa, n):
        page = pages.get(pa & ~0xFFF)
        if page is None:
            raise KeyError(pa)  # unbacked: the decoder must turn this into a finding
        off = pa & 0xFFF
        return page[off:off + n]
    return read_phys, BASE + root_i * 0x1000, la57


def memory():
    """(read_phys, root, la57)."""
    return st.builds(build_memory, st.integers(0, (1 << 64) - 1), st.integers(0, 24), st.booleans())


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
# Only the entry budget: a time budget would make the outcome depend on the
# machine's load (the time budget has its own test in test_paging.py).
BUDGET = dict(max_entries=3000, max_seconds=3600.0)
# The share of cases that must reach the checks the tests exist for.
MIN_HIT_RATE = 0.5


def _check_walk(read_phys, root, la57, maxphyaddr):
    leaves, w = pg.walk(read_phys, root, la57=la57, merge_runs=False,
                        maxphyaddr=maxphyaddr, **BUDGET)
    assert w.stats.entries <= BUDGET["max_entries"] + 1
    prev_end = None
    for m in leaves:
        assert pg.canonical(m.va, la57) and m.size in (pg.PAGE_4K, pg.PAGE_2M, pg.PAGE_1G)
        assert m.va % m.size == 0 and m.pa % m.size == 0
        if prev_end is not None:
            # VA order; with aliased tables the same VA can't repeat
            assert m.va >= prev_end or m.va >= 1 << 63 > prev_end
        prev_end = m.end
    merged = list(pg.merge(leaves))
    assert sum(m.size for m in merged) == sum(m.size for m in leaves)
    return leaves, w


def _assert_hit_rate(hits: Counter, path: str):
    assert hits["cases"] >= EXAMPLES // 2, hits
    assert hits[path] >= MIN_HIT_RATE * hits["cases"], (
        f"only {hits[path]} of {hits['cases']} cases reached {path!r}: the generator misses the "
        f"path this test exists for ({dict(hits)})")


def test_walk_never_crashes_and_agrees_with_translate():
    hits = Counter()

    @SETTINGS
    @given(memory(), st.sampled_from([40, 46, 52]))
    def case(mem, maxphyaddr):
        read_phys, root, la57 = mem
        leaves, w = _check_walk(read_phys, root, la57, maxphyaddr)
        hits["cases"] += 1
        event("leaves" if leaves else "no leaf")
        if leaves:
            hits["translated"] += 1
        reader = pg.TableReader(read_phys)
        for m in leaves[:16]:
            for va in (m.va, m.end - 1):
                tr = pg.translate(reader, root, va, la57=la57, maxphyaddr=maxphyaddr)
                assert tr.pa == m.pa + (va - m.va), (hex(va), tr.fault)
                assert tr.perms == m.perms and tr.page_size == m.size

    case()
    _assert_hit_rate(hits, "translated")


def test_translate_mapped_va_matches_ranged_walk():
    """A VA taken inside a leaf of the generated table (when it has one; a
    random VA otherwise): translate() == the ranged walk == the full walk."""
    hits = Counter()

    @SETTINGS
    @given(memory(), st.integers(0, (1 << 64) - 1))
    def case(mem, pick):
        read_phys, root, la57 = mem
        hits["cases"] += 1
        leaves, _ = pg.walk(read_phys, root, la57=la57, merge_runs=False, **BUDGET)
        want = leaves[pick % len(leaves)] if leaves else None
        va = want.va + pick % want.size if want else pick
        tr = pg.translate(read_phys, root, va, la57=la57)
        assert (tr.pa is None) == (tr.fault is not None)
        if want is not None:
            assert tr.pa == want.pa + (va - want.va), (hex(va), tr.fault)
        if tr.pa is None:
            event("unmapped va")
            return
        event("mapped va")
        hits["mapped"] += 1
        got, _ = pg.walk(read_phys, root, la57=la57, range=(va, va + 1), **BUDGET)
        assert len(got) == 1
        m = got[0]
        assert m.va <= va < m.end and m.pa + (va - m.va) == tr.pa and m.perms == tr.perms

    case()
    _assert_hit_rate(hits, "mapped")


def test_flag_filter_equals_post_filter():
    hits = Counter()

    @SETTINGS
    @given(memory(), st.sampled_from(["w", "u", "x", "s", "ro,nx", "g", "w,x,u"]))
    def case(mem, flags):
        read_phys, root, la57 = mem
        all_leaves, _ = pg.walk(read_phys, root, la57=la57, merge_runs=False, max_entries=100000)
        got, _ = pg.walk(read_phys, root, la57=la57, merge_runs=False, flags=flags, max_entries=100000)
        want_flags = pg.parse_flags(flags)

        def ok(m):
            return all((m.g if k == "g" else getattr(m.perms, k)) == v for k, v in want_flags.items())
        hits["cases"] += 1
        if all_leaves:
            hits["leaves"] += 1
        if len(got) < len(all_leaves):
            hits["filtered"] += 1
        event("some leaves filtered out" if len(got) < len(all_leaves) else "none filtered out")
        assert [m.va for m in got] == [m.va for m in all_leaves if ok(m)]

    case()
    _assert_hit_rate(hits, "leaves")
    assert hits["filtered"] >= 0.2 * hits["cases"], dict(hits)   # the filter did remove leaves
