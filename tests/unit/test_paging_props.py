"""Property tests: random (often hostile) page tables never crash or hang the
decoder, and walk() agrees with translate() everywhere.

Example counts add up to >= 10,000 cases per run (see EXAMPLES)."""
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
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


def build_memory(seed, nentries):
    """Random tables from a seed: cheap to generate, so hypothesis spends its
    time on cases rather than on drawing 4 KiB pages."""
    rng = random.Random(seed)
    tables = [[0] * 512 for _ in range(NTABLES)]
    for _ in range(nentries):
        idx = rng.choice(HOT_IDX) if rng.random() < 0.6 else rng.randrange(512)
        tables[rng.randrange(NTABLES)][idx] = _entry_value(rng)
    pages = {BASE + i * 0x1000: struct.pack("<512Q", *t) for i, t in enumerate(tables)}

    def read_phys(pa, n):
        page = pages.get(pa & ~0xFFF)
        if page is None:
            raise KeyError(pa)  # unbacked: the decoder must turn this into a finding
        off = pa & 0xFFF
        return page[off:off + n]
    root = BASE + rng.randrange(NTABLES) * 0x1000
    return read_phys, root


def memory():
    return st.builds(build_memory, st.integers(0, (1 << 64) - 1), st.integers(0, 24))


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
BUDGET = dict(max_entries=3000, max_seconds=2.0)


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


@SETTINGS
@given(memory(), st.booleans(), st.sampled_from([40, 46, 52]))
def test_walk_never_crashes_and_agrees_with_translate(mem, la57, maxphyaddr):
    read_phys, root = mem
    leaves, w = _check_walk(read_phys, root, la57, maxphyaddr)
    reader = pg.TableReader(read_phys)
    for m in leaves[:16]:
        for va in (m.va, m.end - 1):
            tr = pg.translate(reader, root, va, la57=la57, maxphyaddr=maxphyaddr)
            assert tr.pa == m.pa + (va - m.va), (hex(va), tr.fault)
            assert tr.perms == m.perms and tr.page_size == m.size


@SETTINGS
@given(memory(), st.booleans(), st.integers(0, (1 << 64) - 1))
def test_translate_random_va_matches_ranged_walk(mem, la57, va):
    read_phys, root = mem
    tr = pg.translate(read_phys, root, va, la57=la57)
    assert (tr.pa is None) == (tr.fault is not None)
    if tr.pa is None:
        return
    got, _ = pg.walk(read_phys, root, la57=la57, range=(va, va + 1), **BUDGET)
    assert len(got) == 1
    m = got[0]
    assert m.va <= va < m.end and m.pa + (va - m.va) == tr.pa and m.perms == tr.perms


@SETTINGS
@given(memory(), st.booleans(), st.sampled_from(["w", "u", "x", "s", "ro,nx", "g", "w,x,u"]))
def test_flag_filter_equals_post_filter(mem, la57, flags):
    read_phys, root = mem
    all_leaves, _ = pg.walk(read_phys, root, la57=la57, merge_runs=False, max_entries=100000)
    got, _ = pg.walk(read_phys, root, la57=la57, merge_runs=False, flags=flags, max_entries=100000)
    want_flags = pg.parse_flags(flags)

    def ok(m):
        return all((m.g if k == "g" else getattr(m.perms, k)) == v for k, v in want_flags.items())
    assert [m.va for m in got] == [m.va for m in all_leaves if ok(m)]
