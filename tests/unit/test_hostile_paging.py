"""Fuzz: the page-table decoder on hostile tables (issue 14).

Fan-out at every level and page size (every entry of a table pointing to the
same next table), self-loops, reserved bits, LA57 mismatch, garbage tables,
roots past memory.  Every walk must end with findings, never raise, keep its
results within its memory budget (tracemalloc peak) and, when it ran past its
deadline, say so with its own ``timeout`` finding (no wall-clock asserts).

>= 10,000 cases in all (CASES below); the figures are printed with -s and
quoted in README.md ("Reliability")."""
from __future__ import annotations

import collections
import random
import struct
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sbmdbg.x86 import paging as pg

pytestmark = pytest.mark.unit

CASES = {"fanout": 4000, "mixed": 3500, "translate": 2500}
BASE = 0x100000
NT = 6
# What a walk may hold besides its kept results: the leaf buffer between
# flushes (8192 + 512 tuples), findings (<= max_findings + 2), the alias set,
# the table cache of this test's few tables.
SLACK = 3 << 20
FIGURES: dict[str, dict] = {}


def _memory(tables: dict[int, tuple]):
    packed = {pa: struct.pack("<512Q", *t) for pa, t in tables.items()}

    def read_phys(pa: int, n: int) -> bytes:
        page = packed.get(pa & ~0xFFF)
        if page is None:
            raise KeyError(f"unbacked {pa:#x}")
        o = pa & 0xFFF
        return page[o:o + n]
    return read_phys


FLAG_CHOICES = (pg.P | pg.RW | pg.US, pg.P, pg.P | pg.RW | pg.XD, pg.P | pg.US | pg.G,
                pg.P | pg.RW | pg.US | pg.PS, pg.P | pg.PS | pg.XD)
RESERVED = (0, 0, 0, 1 << 51, 1 << 13, 1 << 45, pg.PS)   # bits reserved at some level/MAXPHYADDR


@st.composite
def fanout_tables(draw):
    """Root -> ... -> a table whose 512 entries all point to the next table
    (or are all leaves), at a chosen level and page size."""
    la57 = draw(st.booleans())
    levels = 5 if la57 else 4
    leaf_level = draw(st.sampled_from((1, 2, 3)))          # 4K, 2M or 1G leaves
    page = {1: 0x1000, 2: 1 << 21, 3: 1 << 30}[leaf_level]
    fan_from = draw(st.integers(leaf_level, levels))       # levels from here down fan out
    tables = {}
    pas = [BASE + i * 0x1000 for i in range(levels + 1)]
    upper = draw(st.sampled_from(FLAG_CHOICES[:4]))
    for i, level in enumerate(range(levels, leaf_level - 1, -1)):
        if level == leaf_level:
            frame = draw(st.sampled_from((0, page, 5 * page, BASE)))
            e = frame | pg.P | pg.RW | (pg.PS if level > 1 else 0) | draw(st.sampled_from(RESERVED))
        else:
            e = pas[i + 1] | upper
        n = 512 if level <= fan_from else draw(st.sampled_from((1, 2, 256)))
        tables[pas[i]] = tuple([e] * n + [0] * (512 - n))
    # walk a 4-level tree as 5-level (or the reverse) now and then: LA57 mismatch
    walk_la57 = la57 if draw(st.integers(0, 4)) else not la57
    event(f"fanout level<={fan_from} page={page:#x}")
    return tables, pas[0], walk_la57


@st.composite
def mixed_tables(draw):
    """A few tables with self-loops, cross-links, reserved bits, garbage,
    pointers past memory, all sizes of leaves."""
    tables = {}
    pas = [BASE + i * 0x1000 for i in range(NT)]
    for pa in pas:
        kind = draw(st.sampled_from(("sparse", "fan", "garbage", "empty")))
        if kind == "garbage":
            rng = random.Random(draw(st.integers(0, 1 << 30)))
            tables[pa] = tuple(rng.getrandbits(64) for _ in range(512))
            continue
        if kind == "empty":
            tables[pa] = (0,) * 512
            continue
        target = draw(st.sampled_from(pas + [pa, pa, pas[0], 1 << 40, 0x200000, 0x40000000]))  # pa: self-loop
        e = target | draw(st.sampled_from(FLAG_CHOICES)) | draw(st.sampled_from(RESERVED))
        if kind == "fan":
            tables[pa] = (e,) * 512
        else:
            t = [0] * 512
            for idx in draw(st.lists(st.sampled_from((0, 1, 255, 256, 257, 510, 511)), max_size=4)):
                t[idx] = e
            tables[pa] = tuple(t)
    if draw(st.integers(0, 3)) == 0:   # plant a cycle root -> table 1 -> root
        for here, there in ((pas[0], pas[1]), (pas[1], pas[0])):
            t = list(tables[here])
            t[5] = there | pg.P | pg.RW | pg.US
            tables[here] = tuple(t)
        event("planted cycle")
    root = draw(st.sampled_from(pas[:2] + [1 << 45]))   # 1 << 45: a root past memory
    event("garbage" if any(len(set(t)) > 8 for t in tables.values()) else "structured")
    return tables, root, draw(st.booleans())


BUDGETS = st.fixed_dictionaries({
    "max_entries": st.sampled_from((300, 2_000, 8_000)),
    "max_bytes": st.sampled_from((64 << 10, 1 << 20, 4 << 20)),
    "max_seconds": st.sampled_from((0.0, 0.02, 30.0)),
    "maxphyaddr": st.sampled_from((36, 46, 52)),
    "nxe": st.booleans(),
})


class _TickClock:
    """A clock that advances TICK per reading: the walk's deadline logic is
    tested deterministically (no wall-clock asserts on a loaded machine)."""

    TICK = 0.001

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += self.TICK
        return self.now


def _check_walk(tables, root, la57, kw, merge_runs, counts, fig, monkeypatch=None):
    read_phys = _memory(tables)
    clock = _TickClock()
    real_time = pg.time
    pg.time = clock
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    try:
        maps, w = pg.walk(read_phys, root, la57=la57, merge_runs=merge_runs, **kw)
        wall = time.perf_counter() - t0   # a figure for the README, never asserted
        kinds = {f.kind for f in w.findings}
        out = [m.to_json() for m in maps[:50]]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pg.time = real_time
    counts["cases"] += 1
    for k in kinds:
        counts[k] += 1
        event(f"finding {k}")
    # memory: what the walk kept stays within its budget, the process within budget + slack
    assert w.stats.bytes_est <= kw["max_bytes"]
    assert peak <= kw["max_bytes"] + SLACK, (peak, kw)
    # entries: never past the budget (+1: the one that tripped it)
    assert w.stats.entries <= kw["max_entries"] + 1
    # time (in clock readings): the walk and its results end within the
    # deadline + 10%, and a walk cut by its deadline says so itself
    assert w.stats.seconds <= kw["max_seconds"] * 1.1 + 4 * _TickClock.TICK, (w.stats.seconds, kw)
    if w.stats.seconds > kw["max_seconds"]:
        assert "timeout" in kinds, (w.stats.seconds, kw)
    if kw["max_seconds"] == 0.0 and root in tables:
        assert "timeout" in kinds and w.stats.truncated
    if w.stats.more_ranges:
        assert w.stats.truncated and kinds & {"budget", "timeout"}
    assert all(o["end"] > o["va"] for o in out)
    fig["worst_seconds"] = max(fig.get("worst_seconds", 0.0), wall)
    fig["worst_peak"] = max(fig.get("worst_peak", 0), peak)


def _settings(n):
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _report(name, counts, fig):
    FIGURES[name] = dict(fig, cases=counts["cases"])
    print(f"\nhostile page tables [{name}]: {counts['cases']} cases, worst walk "
          f"{fig.get('worst_seconds', 0):.3f} s, worst peak {fig.get('worst_peak', 0) / (1 << 20):.1f} MiB; "
          f"findings {dict(counts)}")


def test_fanout_every_level_and_page_size():
    counts, fig = collections.Counter(), {}

    @_settings(CASES["fanout"])
    @given(case=fanout_tables(), kw=BUDGETS, merge_runs=st.booleans())
    def run(case, kw, merge_runs):
        tables, root, la57 = case
        _check_walk(tables, root, la57, kw, merge_runs, counts, fig)

    run()
    _report("fanout", counts, fig)
    n = counts["cases"]
    assert n >= CASES["fanout"]
    # the interesting paths are hit, not just reachable
    assert counts["budget"] >= n * 0.2
    assert counts["timeout"] >= n * 0.2
    assert counts["alias"] >= n * 0.3
    assert counts["reserved"] >= n * 0.05


def test_mixed_hostile_tables():
    counts, fig = collections.Counter(), {}

    @_settings(CASES["mixed"])
    @given(case=mixed_tables(), kw=BUDGETS, merge_runs=st.booleans())
    def run(case, kw, merge_runs):
        tables, root, la57 = case
        _check_walk(tables, root, la57, kw, merge_runs, counts, fig)

    run()
    _report("mixed", counts, fig)
    n = counts["cases"]
    assert n >= CASES["mixed"]
    for kind, rate in (("loop", 0.03), ("reserved", 0.1), ("unreadable", 0.1), ("timeout", 0.2),
                       ("alias", 0.04)):
        assert counts[kind] >= n * rate, (kind, dict(counts))


def test_translate_agrees_on_hostile_tables():
    """translate() on hostile tables: never raises; every fault is a string;
    a translation that succeeds lands inside a mapping walk() reports."""
    counts = collections.Counter()

    @_settings(CASES["translate"])
    @given(case=st.one_of(fanout_tables(), mixed_tables()),
           va=st.one_of(st.sampled_from((0, 0x1000, 1 << 47, (1 << 64) - 4096, 0xffff800000000000)),
                        st.integers(0, (1 << 64) - 1)))
    def run(case, va):
        tables, root, la57 = case
        reader = pg.TableReader(_memory(tables))
        tr = pg.translate(reader, root, va, la57=la57)
        counts["cases"] += 1
        if tr.pa is None:
            assert isinstance(tr.fault, str) and tr.fault
            counts["fault"] += 1
            event("fault")
        else:
            counts["translated"] += 1
            event("translated")
            assert tr.page_size in (pg.PAGE_4K, pg.PAGE_2M, pg.PAGE_1G)
        assert tr.to_json()["levels"] in (4, 5)

    run()
    assert counts["cases"] >= CASES["translate"]
    assert counts["translated"] >= counts["cases"] * 0.05
    assert counts["fault"] >= counts["cases"] * 0.2


def test_table_cache_holds_present_entries_within_its_bound():
    """512 garbage tables through one reader: the cache never passes its
    bound, zeroes non-present entries, and entry() still gives the raw value."""
    rng = random.Random(14)
    tables = {BASE + i * 0x1000: tuple(rng.getrandbits(64) for _ in range(512)) for i in range(512)}
    r = pg.TableReader(_memory(tables), max_bytes=256 << 10)
    for pa, raw in tables.items():
        t = r.table(pa)
        assert r.bytes <= r.max_bytes
        assert all(e == 0 or e & 1 for e in t)
        assert [r.entry(pa, i, t[i]) for i in (0, 7, 511)] == [raw[0], raw[7], raw[511]]
    assert r.evictions > 0
