"""x86-64 paging: decode entries, translate one address, walk a whole tree.

Everything here reads page-table pages through ``read_phys(pa, n) -> bytes``
(any ``sbmdbg.target`` Target's ``read_phys``) and an explicit root (a CR3
value or a table physical address).  Guest memory is untrusted: walks are
bounded in entries and time, loops and reserved bits are reported as
findings, and nothing here hangs or raises on hostile tables.
"""
from __future__ import annotations

import gc
import operator
import struct
import time
from contextlib import contextmanager
from collections.abc import Sequence
from itertools import compress, islice
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sbmdbg.errors import SbmdbgError
from sbmdbg.x86.regs import CR3, decode_cr3

# Entry bits (SDM Vol. 3, 4.5).
P, RW, US, PWT, PCD, A, D, PS, G = (1 << i for i in (0, 1, 2, 3, 4, 5, 6, 7, 8))
PAT_4K = 1 << 7           # bit 7 of a PTE is PAT
PAT_LARGE = 1 << 12       # bit 12 of a 2M/1G leaf is PAT
XD = 1 << 63
PKEY_SHIFT = 59
PKEY_MASK = 0xF << PKEY_SHIFT
ADDR_MASK_52 = ((1 << 52) - 1) & ~0xFFF

PAGE_4K, PAGE_2M, PAGE_1G = 1 << 12, 1 << 21, 1 << 30
LEVEL_NAMES = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
LEVEL_SHIFT = {5: 48, 4: 39, 3: 30, 2: 21, 1: 12}

ReadPhys = Callable[[int, int], bytes]


class PagingError(SbmdbgError):
    """Raised only for caller errors (bad arguments), never for guest data."""


def canonical(va: int, la57: bool = False) -> bool:
    bits = 57 if la57 else 48
    top = va >> (bits - 1)
    return top == 0 or top == (1 << (64 - bits + 1)) - 1


def sign_extend(va: int, la57: bool = False) -> int:
    bits = 57 if la57 else 48
    va &= (1 << bits) - 1
    if va >> (bits - 1):
        va |= ((1 << 64) - 1) ^ ((1 << bits) - 1)
    return va


def _addr_mask(maxphyaddr: int) -> int:
    return ((1 << maxphyaddr) - 1) & ~0xFFF


def reserved_mask(level: int, leaf: bool, maxphyaddr: int = 52, nxe: bool = True) -> int:
    """Bits that must be zero in a present entry (a #PF with RSVD otherwise)."""
    m = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)  # bits maxphyaddr..51
    if not nxe:
        m |= XD
    if level in (4, 5):
        m |= PS  # PS is reserved in PML4E/PML5E
    elif leaf and level == 3:
        m |= ((1 << 30) - 1) & ~((1 << 13) - 1)  # bits 13..29
    elif leaf and level == 2:
        m |= ((1 << 21) - 1) & ~((1 << 13) - 1)  # bits 13..20
    return m


@dataclass(frozen=True)
class Entry:
    """One paging-structure entry as read during a translation or walk."""
    level: int          # 5..1
    index: int
    entry_pa: int       # where the entry itself lives
    raw: int
    maxphyaddr: int = 52
    nxe: bool = True

    @property
    def name(self) -> str:
        return LEVEL_NAMES[self.level]

    @property
    def present(self) -> bool:
        return bool(self.raw & P)

    @property
    def leaf(self) -> bool:
        return self.level == 1 or (self.level in (2, 3) and bool(self.raw & PS))

    @property
    def page_size(self) -> int:
        return 1 << LEVEL_SHIFT[self.level] if self.leaf else 0

    @property
    def target(self) -> int:
        """Next table PA, or page frame PA for a leaf."""
        mask = _addr_mask(self.maxphyaddr)
        if self.leaf and self.level > 1:
            mask &= ~(self.page_size - 1)
        return self.raw & mask

    @property
    def reserved_bits(self) -> int:
        if not self.present:
            return 0
        return self.raw & reserved_mask(self.level, self.leaf, self.maxphyaddr, self.nxe)

    @property
    def pat(self) -> bool:
        if not self.leaf:
            return False
        return bool(self.raw & (PAT_4K if self.level == 1 else PAT_LARGE))

    @property
    def pkey(self) -> int:
        return (self.raw >> PKEY_SHIFT) & 0xF if self.leaf else 0

    @property
    def cache_index(self) -> int:
        """PAT index = PAT:PCD:PWT."""
        return (int(self.pat) << 2) | (int(bool(self.raw & PCD)) << 1) | int(bool(self.raw & PWT))

    def bits(self) -> dict:
        r = self.raw
        d = {
            "P": bool(r & P), "RW": bool(r & RW), "US": bool(r & US),
            "PWT": bool(r & PWT), "PCD": bool(r & PCD), "A": bool(r & A),
            "XD": bool(r & XD),
        }
        if self.level == 1:
            d.update(D=bool(r & D), PAT=bool(r & PAT_4K), G=bool(r & G))
        elif self.level in (2, 3):
            d["PS"] = bool(r & PS)
            if r & PS:
                d.update(D=bool(r & D), G=bool(r & G), PAT=bool(r & PAT_LARGE))
        else:
            d["PS(rsvd)"] = bool(r & PS)
        if self.leaf:
            d["PKEY"] = self.pkey
        d["avl"] = ((r >> 9) & 0x7) | (((r >> 52) & 0x7F if not self.leaf else (r >> 52) & 0x7) << 3)
        return d

    def flags_str(self) -> str:
        r = self.raw
        out = [
            "P" if r & P else "-", "W" if r & RW else "-", "U" if r & US else "S",
            "T" if r & PWT else "-", "C" if r & PCD else "-", "A" if r & A else "-",
        ]
        if self.leaf:
            out += ["D" if r & D else "-", "G" if r & G else "-", "p" if self.pat else "-"]
        else:
            out += ["H" if r & PS else "-"]
        out.append("X" if r & XD else "x")
        return "".join(out)

    def to_json(self) -> dict:
        d = {
            "level": self.level, "name": self.name, "index": self.index,
            "entry_pa": self.entry_pa, "raw": self.raw, "present": self.present,
            "leaf": self.leaf, "target": self.target if self.present else None,
            "bits": self.bits(),
        }
        if self.reserved_bits:
            d["reserved_bits"] = self.reserved_bits
        return d


@dataclass(frozen=True)
class Perms:
    """Effective permissions combined across all levels."""
    w: bool
    u: bool
    x: bool

    def __str__(self) -> str:
        return ("r" + ("w" if self.w else "-") + ("x" if self.x else "-")
                + (" user" if self.u else " supv"))


@dataclass
class Finding:
    kind: str     # loop, alias, reserved, unreadable, budget, timeout, noncanonical
    message: str
    va: int | None = None
    pa: int | None = None
    level: int | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "message": self.message, "va": self.va,
                "pa": self.pa, "level": self.level}


@dataclass
class Translation:
    va: int
    root: int
    levels: int
    entries: list[Entry] = field(default_factory=list)
    pa: int | None = None
    page_size: int = 0
    perms: Perms | None = None
    fault: str | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def leaf(self) -> Entry | None:
        return self.entries[-1] if self.pa is not None else None

    def to_json(self) -> dict:
        leaf = self.leaf
        return {
            "va": self.va, "root": self.root, "levels": self.levels,
            "entries": [e.to_json() for e in self.entries],
            "pa": self.pa, "page_size": self.page_size,
            "perms": None if self.perms is None else
            {"r": True, "w": self.perms.w, "u": self.perms.u, "x": self.perms.x},
            "global": bool(leaf.raw & G) if leaf else None,
            "pkey": leaf.pkey if leaf else None,
            "cache_index": leaf.cache_index if leaf else None,
            "fault": self.fault,
            "findings": [f.to_json() for f in self.findings],
        }


_U512 = struct.Struct("<512Q")


#: Host bytes a cached table costs: the 512-slot tuple, the dict slot, and
#: one int object per non-zero entry (zero is a shared object).
_TABLE_COST = 4136 + 100
_INT_COST = 32
_ODD = bytes(i & 1 for i in range(256))


class TableReader:
    """Reads 4 KiB page-table pages as 512 little-endian u64, with a cache.

    When ``read_phys`` is a bound method of a target that has
    ``read_table_bytes(pa)`` (e.g. the shm source: one pread, no page cache),
    that is used instead of ``read_phys(pa, 4096)``.

    Guest memory is hostile (512 MiB of garbage "tables"): the cache holds
    only present entries (non-present ones read as 0; ``entry()`` rereads
    one raw entry) and at most ``max_bytes`` of host memory; when full it is
    emptied and refilled (a cache miss costs one read, never correctness)."""

    def __init__(self, read_phys: ReadPhys, max_bytes: int = 16 << 20):
        self._read = read_phys
        self._read_table = getattr(getattr(read_phys, "__self__", None), "read_table_bytes", None)
        self._cache: dict[int, tuple[int, ...] | None] = {}
        self._zeroed: set[int] = set()   # tables whose non-present non-zero entries read as 0
        self.max_bytes = max_bytes
        self.bytes = 0
        self.pages_read = 0
        self.evictions = 0

    def table(self, pa: int) -> tuple[int, ...] | None:
        pa &= ~0xFFF
        try:
            return self._cache[pa]
        except KeyError:
            pass
        try:
            data = self._read_table(pa) if self._read_table is not None else self._read(pa, 4096)
            t = _U512.unpack(data) if len(data) == 4096 else None
        except Exception:  # noqa: BLE001 - unbacked/unreadable memory is a finding
            t = None
        self.pages_read += 1
        cost, zeroed = 100, False
        if t is not None:
            nonzero = 512 - t.count(0)
            if nonzero:
                # P is bit 0 of each entry's first byte: one 0/1 byte per entry (C speed)
                present = bytes(data[::8]).translate(_ODD)
                npresent = present.count(1)
                if npresent < nonzero:   # keep only present entries
                    t = tuple(map(operator.mul, t, present))
                    zeroed = True
                    nonzero = npresent
            cost = _TABLE_COST + _INT_COST * nonzero
        if self.bytes + cost > self.max_bytes:
            self._cache.clear()
            self._zeroed.clear()
            self.bytes = 0
            self.evictions += 1
        if zeroed:
            self._zeroed.add(pa)
        self._cache[pa] = t
        self.bytes += cost
        return t

    def entry(self, table_pa: int, idx: int, cached: int) -> int:
        """The raw entry ``idx`` of a table (``cached``: its cached value),
        reread from memory when the cache zeroed a non-present entry."""
        if cached or (table_pa & ~0xFFF) not in self._zeroed:
            return cached
        try:
            data = self._read(table_pa + idx * 8, 8)
            return struct.unpack("<Q", data)[0] if len(data) == 8 else cached
        except Exception:  # noqa: BLE001
            return cached


def _root_pa(root: int | CR3) -> int:
    if isinstance(root, CR3):
        return root.pgd_pa
    return root & ADDR_MASK_52


def translate(read_phys: ReadPhys | TableReader, root: int | CR3, va: int, *,
              la57: bool = False, maxphyaddr: int = 52, nxe: bool = True) -> Translation:
    """Translate ``va`` through ``root``; every level's entry is returned."""
    reader = read_phys if isinstance(read_phys, TableReader) else TableReader(read_phys)
    levels = 5 if la57 else 4
    va &= (1 << 64) - 1
    tr = Translation(va=va, root=_root_pa(root), levels=levels)
    if not canonical(va, la57):
        tr.fault = "non-canonical address"
        tr.findings.append(Finding("noncanonical", f"{va:#x} is not canonical", va=va))
        return tr
    table_pa = tr.root
    w = u = x = True
    seen: set[int] = set()
    for level in range(levels, 0, -1):
        if table_pa in seen:
            tr.fault = f"loop: {LEVEL_NAMES[level]} table {table_pa:#x} already used above"
            tr.findings.append(Finding("loop", tr.fault, va=va, pa=table_pa, level=level))
            return tr
        seen.add(table_pa)
        table = reader.table(table_pa)
        idx = (va >> LEVEL_SHIFT[level]) & 511
        if table is None:
            tr.fault = f"{LEVEL_NAMES[level]} table at {table_pa:#x} is not readable"
            tr.findings.append(Finding("unreadable", tr.fault, va=va, pa=table_pa, level=level))
            return tr
        e = Entry(level, idx, table_pa + idx * 8, reader.entry(table_pa, idx, table[idx]),
                  maxphyaddr, nxe)
        tr.entries.append(e)
        if not e.present:
            tr.fault = f"{e.name} not present"
            return tr
        if e.reserved_bits:
            tr.fault = f"{e.name} has reserved bits {e.reserved_bits:#x} set"
            tr.findings.append(Finding("reserved", tr.fault, va=va, pa=e.entry_pa, level=level))
            return tr
        w &= bool(e.raw & RW)
        u &= bool(e.raw & US)
        x &= not (nxe and e.raw & XD)
        if e.leaf:
            tr.page_size = e.page_size
            tr.pa = e.target | (va & (e.page_size - 1))
            tr.perms = Perms(w, u, x)
            return tr
        table_pa = e.target
    return tr  # unreachable: level 1 is always a leaf


@dataclass(frozen=True)
class Mapping:
    """A run of leaves with the same attributes, contiguous in VA and PA."""
    va: int
    end: int             # exclusive
    pa: int
    page_size: int
    perms: Perms
    g: bool
    cache_index: int
    pkey: int
    leaf_raw: int        # raw leaf entry of the first page

    def __getattr__(self, name: str):
        # A Mapping made by a walk (_mapping, _leaf_mappings) stores va,
        # page_size, leaf_raw and its perms index; the other fields are derived
        # from the raw leaf when first read (most of a dump's are never read).
        d = self.__dict__
        if name not in _DERIVED or "_p" not in d:
            raise AttributeError(name)
        e, span = d["leaf_raw"], d["page_size"]
        if name == "end":
            v = d["va"] + span
        elif name == "pa":
            v = e & d["_amask"] & -span
        elif name == "perms":
            v = _PERMS[d["_p"]]
        elif name == "g":
            v = (e & G) != 0
        elif name == "cache_index":
            v = ((e >> (5 if span == PAGE_4K else 10)) & 4) | ((e >> 3) & 3)
        else:
            v = (e >> PKEY_SHIFT) & 0xF
        d[name] = v
        return v

    @property
    def size(self) -> int:
        return self.end - self.va

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def key(self) -> tuple:
        return (self.page_size, self.perms, self.g, self.cache_index, self.pkey)

    def to_json(self) -> dict:
        return {
            "va": self.va, "end": self.end, "pa": self.pa, "size": self.size,
            "page_size": self.page_size, "npages": self.npages,
            "perms": {"r": True, "w": self.perms.w, "u": self.perms.u, "x": self.perms.x},
            "global": self.g, "cache_index": self.cache_index, "pkey": self.pkey,
            "leaf": self.leaf_raw,
        }


_DERIVED = frozenset(("end", "pa", "perms", "g", "cache_index", "pkey"))


# Flag filter: names accepted by walk(flags=...) and the ``sbm pt --flags`` option.
FLAG_NAMES = {
    "w": ("w", True), "ro": ("w", False), "x": ("x", True), "nx": ("x", False),
    "u": ("u", True), "s": ("u", False), "g": ("g", True), "ng": ("g", False),
}


def parse_flags(spec: str | None) -> dict[str, bool]:
    """'w,x,u' -> {'w': True, 'x': True, 'u': True}; '-w' means 'ro'."""
    out: dict[str, bool] = {}
    if not spec:
        return out
    for tok in spec.replace(" ", "").split(","):
        if not tok:
            continue
        neg = tok.startswith(("-", "!"))
        name = tok.lstrip("-!").lower()
        if name not in FLAG_NAMES:
            raise PagingError(f"unknown flag {tok!r} (known: {', '.join(sorted(FLAG_NAMES))})")
        attr, want = FLAG_NAMES[name]
        out[attr] = (not want) if neg else want
    return out


@dataclass
class WalkStats:
    entries: int = 0
    tables: int = 0
    leaves: int = 0
    seconds: float = 0.0
    truncated: bool = False
    more_ranges: int = 0     # ranges found but not kept (memory budget / max_ranges / deadline)
    bytes_est: int = 0       # host memory the kept results cost (estimate)


#: Host bytes per kept result (measured with tracemalloc, rounded up): a raw
#: leaf tuple in a list, a merged-run tuple, a Mapping built from either.
RAW_COST, RUN_COST, MAPPING_COST = 120, 170, 270
#: Default memory budget of one walk (results; the table cache has its own).
MAX_BYTES = 64 << 20
_FLUSH = 8192


# Effective permissions by index (bit 0 = W, bit 1 = U, bit 2 = X): shared instances.
_PERMS = tuple(Perms(bool(i & 1), bool(i & 2), bool(i & 4)) for i in range(8))
# Leaf bits that make two adjacent pages "the same attributes" (G, PAT index, PKEY).
_ATTR = {PAGE_4K: G | PCD | PWT | PAT_4K | PKEY_MASK,
         PAGE_2M: G | PCD | PWT | PAT_LARGE | PKEY_MASK,
         PAGE_1G: G | PCD | PWT | PAT_LARGE | PKEY_MASK}
_new = object.__new__
_IDX = range(512)


@contextmanager
def _gc_paused():
    """The walk allocates thousands of small acyclic objects: keep the cyclic
    GC from scanning the whole process (gdb's, pyelftools') in the middle."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_set = object.__setattr__


def _mapping(va: int, end: int, span: int, e: int, p: int, amask: int) -> Mapping:
    """A Mapping from a raw leaf, without the frozen-dataclass __init__: the
    fields that follow from the raw leaf are derived when first read."""
    m = _new(Mapping)
    _set(m, "__dict__", {"va": va, "end": end, "page_size": span, "leaf_raw": e, "_p": p, "_amask": amask})
    return m


class Walker:
    """Bounded depth-first walk of one root.  ``leaves()``: one ``Mapping`` per
    page or large page, in VA order; ``merged()``: runs joined.  Findings and
    stats are collected on the instance.

    The walk itself runs once (on the first ``leaves()``/``merged()``) and keeps
    each matching leaf as a small tuple (va, size, raw entry, perms index);
    ``leaf_list()`` hands those rows out as a ``Leaves`` sequence (a Mapping
    per row only when read), ``merged()`` builds one Mapping per merged run.  Per-level reserved-bit masks, the flag filter and the flag
    prune are precomputed tables; non-present entries cost one test; the
    deadline is checked once per table (at most 512 entries)."""

    def __init__(self, read_phys: ReadPhys | TableReader, root: int | CR3, *,
                 la57: bool = False, start: int = 0, end: int = 1 << 64,
                 flags: dict[str, bool] | None = None, maxphyaddr: int = 52,
                 nxe: bool = True, max_entries: int = 4_000_000,
                 max_seconds: float = 30.0, max_findings: int = 1000,
                 max_bytes: int = MAX_BYTES, max_ranges: int | None = None):
        self.reader = read_phys if isinstance(read_phys, TableReader) else TableReader(read_phys)
        self.root = _root_pa(root)
        self.la57 = la57
        self.levels = 5 if la57 else 4
        self.start, self.end = start, end
        self.flags = flags or {}
        self.maxphyaddr, self.nxe = maxphyaddr, nxe
        self.max_entries, self.max_seconds = max_entries, max_seconds
        self.max_findings = max_findings
        self.max_bytes, self.max_ranges = max_bytes, max_ranges
        self.findings: list[Finding] = []
        self.stats = WalkStats()
        self._aliased: set[int] = set()
        self._raw: list[tuple[int, int, int, int]] | None = None
        self._mode = "raw"       # "raw": keep leaves; "merged": fold them into runs as they come
        self._kept: list = []    # raw leaves (raw mode) or runs (va, end, span, e, p) (merged mode)
        self._nkept = 0          # leaves in _kept (raw mode: a _PageRun row holds many)
        self._nbuf = 0           # leaves in _raw (raw mode)
        self._cur: list | None = None   # the run being extended (merged mode)
        self._full = False       # memory budget reached: count, do not keep
        self._stop = False       # entry budget or deadline reached: the walk ends
        # precomputed per walk
        self._amask = _addr_mask(maxphyaddr)
        self._rsv_table = {lv: reserved_mask(lv, False, maxphyaddr, nxe) for lv in LEVEL_SHIFT}
        self._rsv_leaf = {lv: reserved_mask(lv, True, maxphyaddr, nxe) for lv in (1, 2, 3)}
        self._xmask = XD if nxe else 0
        # _ok[perms index | G << 3]: does a leaf pass the flag filter (None: no filter)
        self._ok = ([self._match(_PERMS[i & 7], bool(i & 8)) for i in range(16)]
                    if self.flags else None)
        self._pruned = [self._prune(bool(i & 1), bool(i & 2), bool(i & 4)) for i in range(8)]

    def _finding(self, kind: str, *a, **kw) -> None:
        # why the walk or its results stopped is always told, past max_findings too
        if len(self.findings) < self.max_findings or kind in ("budget", "timeout"):
            self.findings.append(Finding(kind, *a, **kw))

    def _match(self, perms: Perms, g: bool) -> bool:
        for attr, want in self.flags.items():
            have = g if attr == "g" else getattr(perms, attr)
            if have != want:
                return False
        return True

    def _prune(self, w: bool, u: bool, x: bool) -> bool:
        """True when no leaf below can match a required-true w/u/x flag."""
        f = self.flags
        return ((f.get("w") is True and not w) or (f.get("u") is True and not u)
                or (f.get("x") is True and not x))

    # ------------------------------------------------------------------ walk
    def _run(self, mode: str = "raw") -> list:
        """Walk once: ``raw`` keeps every leaf (va, size, raw, perms index);
        ``merged`` folds leaves into runs as they come (memory per run, not
        per page).  Both stop keeping at the memory budget and go on counting."""
        if self._raw is None:
            self._mode = mode
            self._raw = []
            self._kept = []
            self._nkept = self._nbuf = 0
            self._t0 = time.monotonic()
            # the descent gets 85% of the time, building the results the rest
            self._deadline = self._t0 + 0.85 * self.max_seconds
            self._end_by = self._t0 + self.max_seconds
            cost = RAW_COST + MAPPING_COST if mode == "raw" else RUN_COST + MAPPING_COST
            self._cap = max(1, self.max_bytes // cost)
            if self.max_ranges is not None:
                self._cap = min(self._cap, max(0, self.max_ranges))
            try:
                with _gc_paused():
                    self._table(self.root, self.levels, 0, 7, [self.root])
                    self._flush(final=True)
            finally:
                self.stats.seconds = time.monotonic() - self._t0
                self.stats.bytes_est = (self._nkept if mode == "raw" else len(self._kept)) * cost
        return self._kept

    def _keep_full(self) -> None:
        if not self._full:
            self._full = True
            self.stats.truncated = True
            why = (f"{self.max_ranges} ranges (max_ranges)" if self.max_ranges is not None
                   and self._cap == self.max_ranges else
                   f"its memory budget ({self.max_bytes >> 20} MiB, {self._cap} ranges)")
            self._finding("budget", f"walk results stopped at {why}; the walk goes on counting")

    def _flush(self, final: bool = False) -> None:
        """Move the leaf buffer into the kept results (or only count it)."""
        buf = self._raw
        if self._mode == "raw":
            room = self._cap - self._nkept
            if self._nbuf <= room:
                self._kept += buf
                self._nkept += self._nbuf
            else:
                kept, more = self._kept, 0
                for row in buf:
                    n = 1 if type(row) is tuple else len(row.raw)
                    if n <= room:
                        kept.append(row)
                        room -= n
                        self._nkept += n
                    else:
                        if room > 0:   # the head of a page table's run fits
                            kept.append(row.head(room))
                            self._nkept += room
                        more += n - max(room, 0)
                        room = 0
                self.stats.more_ranges += more
                self._keep_full()
            buf.clear()
            self._nbuf = 0
            return
        amask = self._amask
        kept, cap = self._kept, self._cap
        cur = self._cur
        if cur is not None:
            cva, cend, cpa_end, cspan, cp, ce, ckey = cur
        else:
            cva = cend = cpa_end = cspan = cp = ce = ckey = -1
        more = 0
        for va, span, e, p in buf:
            pa = e & amask & -span
            key = e & _ATTR[span]
            if va == cend and pa == cpa_end and span == cspan and p == cp and key == ckey:
                cend += span
                cpa_end += span
                continue
            if cva >= 0:
                if len(kept) < cap:
                    kept.append((cva, cend, cspan, ce, cp))
                else:
                    more += 1
            cva, cend, cpa_end, cspan, cp, ce, ckey = va, va + span, pa + span, span, p, e, key
        buf.clear()
        self._cur = [cva, cend, cpa_end, cspan, cp, ce, ckey] if cva >= 0 else None
        if final and cva >= 0:
            if len(kept) < cap:
                kept.append((cva, cend, cspan, ce, cp))
            else:
                more += 1
            self._cur = None
        if more:
            self.stats.more_ranges += more
            self._keep_full()

    def _read(self, table_pa: int, level: int, va: int) -> tuple[int, ...] | None:
        st = self.stats
        st.tables += 1
        if len(self._raw) >= _FLUSH or self._nbuf >= _FLUSH:
            self._flush()
        if time.monotonic() > self._deadline:   # checked for every table, readable or not
            st.truncated = self._stop = True
            self._finding("timeout", f"walk stopped at {0.85 * self.max_seconds:.2f}s, the rest of its "
                          f"deadline (after {self.max_seconds:.1f}s) left to build the results", va=va)
            return None
        t = self.reader.table(table_pa)
        if t is None:
            self._finding("unreadable", f"{LEVEL_NAMES[level]} table at {table_pa:#x} is not readable",
                          pa=table_pa, level=level)
            return None
        return t

    def _budget(self, va: int) -> None:
        self.stats.truncated = self._stop = True
        self._finding("budget", f"walk stopped after {self.max_entries} entries", va=va)

    def _reserved(self, level: int, table_pa: int, idx: int, e: int, rsv: int, va: int) -> None:
        if len(self.findings) >= self.max_findings:
            return   # hostile tables: millions of these; no message built past the cap
        pa = table_pa + idx * 8
        self._finding("reserved", f"{LEVEL_NAMES[level]} {e:#018x} at {pa:#x} has reserved bits {rsv:#x} set",
                      va=va, pa=pa, level=level)

    def _table(self, table_pa: int, level: int, tbase: int, p: int, path: list[int]) -> None:
        """A PML5/PML4/PDPT/PD table whose entry 0 maps ``tbase`` (sign-extended,
        except for the root); ``p`` is the perms index of the path above."""
        t = self._read(table_pa, level, tbase)
        if t is None:
            return
        st = self.stats
        shift = LEVEL_SHIFT[level]
        span = 1 << shift
        start, end, maxe = self.start, self.end, self.max_entries
        rsv_t, rsv_l = self._rsv_table[level], self._rsv_leaf.get(level, 0)
        can_leaf = level in (2, 3)
        xmask, ok, pruned, amask = self._xmask, self._ok, self._pruned, self._amask
        is_root = level == self.levels
        top_bit = 56 if self.la57 else 47
        sx = ((1 << 64) - 1) ^ ((1 << (top_bit + 1)) - 1)
        aliased = self._aliased
        out = self._raw
        # (index, entry) of the non-zero entries only, found at C speed
        for idx, e in zip(compress(_IDX, t), filter(None, t)):
            if not e & 1:
                continue
            va = tbase + (idx << shift)
            if is_root and va >> top_bit:
                va |= sx
            if va + span <= start or va >= end:
                continue
            st.entries += 1
            if st.entries > maxe:
                self._budget(va)
                return
            leaf = can_leaf and e & PS
            rsv = e & (rsv_l if leaf else rsv_t)
            if rsv:
                self._reserved(level, table_pa, idx, e, rsv, va)
                continue
            np = p & (((e >> 1) & 3) | (0 if e & xmask else 4))
            if leaf:
                if ok is None or ok[np | ((e >> 5) & 8)]:
                    st.leaves += 1
                    self._nbuf += 1
                    out.append((va, span, e, np))
                continue
            if pruned[np]:
                continue
            nxt = e & amask
            if nxt in path:
                pa = table_pa + idx * 8
                self._finding("loop", f"{LEVEL_NAMES[level]} at {pa:#x} points back to the table at {nxt:#x} "
                              "on its own path", va=va, pa=pa, level=level)
                continue
            if nxt in aliased and len(self.findings) < self.max_findings:
                self._finding("alias", f"table {nxt:#x} is referenced by more than one entry (again from "
                              f"{table_pa + idx * 8:#x})", va=va, pa=nxt, level=level - 1)
            aliased.add(nxt)
            if level == 2:
                self._pt(nxt, va, np)
            else:
                path.append(nxt)
                self._table(nxt, level - 1, va, np, path)
                path.pop()
            if self._stop:
                return

    def _pt(self, table_pa: int, tbase: int, p: int) -> None:
        """A page table (level 1): every present entry is a 4 KiB leaf."""
        t = self._read(table_pa, 1, tbase)
        if t is None:
            return
        st = self.stats
        start, end = self.start, self.end
        lo = 0
        if tbase < start or tbase + (512 << 12) > end:
            lo = max(0, (start - tbase) >> 12)
            t = t[:max(0, (end - tbase + 0xFFF) >> 12)][lo:]
        rsv, xmask, ok = self._rsv_leaf[1], self._xmask, self._ok
        out = self._raw
        append = out.append
        n0 = len(out)
        cnt, maxe = st.entries, self.max_entries
        idx_range = range(lo, lo + len(t))
        if ok is None and not (rsv and any(map(rsv.__and__, t))):
            # No filter, no reserved bit anywhere (most page tables are full
            # of 4 KiB leaves).  Keeping every leaf: the table's present
            # entries become one row, found at C speed (the cache zeroed the
            # non-present ones); the per-page work is left to whoever reads them.
            if self._mode == "raw":
                idx = list(compress(idx_range, t))
                n = len(idx)
                if cnt + n <= maxe:
                    if n:
                        out.append(_PageRun(tbase, p, idx, list(filter(None, t))))
                        self._nbuf += n
                    st.entries = cnt + n
                    st.leaves += n
                    return
            new = [(tbase + (idx << 12), 4096, e, p & (((e >> 1) & 3) | (0 if e & xmask else 4)))
                   for idx, e in zip(compress(idx_range, t), filter(None, t)) if e & 1]
            if cnt + len(new) <= maxe:
                out += new
                self._nbuf += len(new)
                st.entries = cnt + len(new)
                st.leaves += len(new)
                return
        try:
            for idx, e in zip(compress(idx_range, t), filter(None, t)):
                if not e & 1:
                    continue
                cnt += 1
                if cnt > maxe:
                    st.entries = cnt
                    self._budget(tbase + (idx << 12))
                    return
                if e & rsv:
                    self._reserved(1, table_pa, idx, e, e & rsv, tbase + (idx << 12))
                    continue
                np = p & (((e >> 1) & 3) | (0 if e & xmask else 4))
                if ok is None or ok[np | ((e >> 5) & 8)]:
                    append((tbase + (idx << 12), 4096, e, np))
        finally:
            st.entries = cnt
            st.leaves += len(out) - n0
            self._nbuf += len(out) - n0

    # ---------------------------------------------------------------- output
    def _late(self, done: int, total: int) -> bool:
        """Building results passed the walk's deadline: keep what is built."""
        if time.monotonic() <= self._end_by:
            return False
        self.stats.truncated = True
        self.stats.more_ranges += total - done
        self._finding("timeout", f"results stopped after {self.max_seconds:.1f}s "
                      f"({done} of {total} ranges built)")
        return True

    def leaf_list(self) -> "Leaves":
        """Every matching leaf, in VA order, as a ``Leaves`` sequence (compact
        rows; a ``Mapping`` is built for a row only when it is asked for)."""
        if self._raw is not None and self._mode != "raw":
            self._raw = None   # walked merged: walk again keeping the pages
            self.stats = WalkStats()
            self.findings = []
            self._aliased = set()
            self._full = self._stop = False
        with _gc_paused():
            raw = self._run("raw")
        self.stats.seconds = time.monotonic() - self._t0
        return Leaves(raw, self._amask, self._xmask, self._nkept)

    def leaves(self) -> Iterator[Mapping]:
        return iter(self.leaf_list())

    def merged(self) -> Iterator[Mapping]:
        """Runs of leaves contiguous in VA and PA with the same page size,
        effective perms, G, PAT index and PKEY (what ``merge(leaves())`` gives)."""
        amask = self._amask
        out: list[Mapping] = []
        with _gc_paused():    # one pause for the walk and the results
            if self._raw is not None and self._mode == "raw":
                # walked keeping the pages already: fold them
                runs = [(m.va, m.end, m.page_size, m.leaf_raw, _PERMS.index(m.perms))
                        for m in merge(Leaves(self._kept, amask, self._xmask, self._nkept))]
            else:
                runs = self._run("merged")
            for n, (va, end, span, e, p) in enumerate(runs):
                if not (n + 1) & 1023 and self._late(n, len(runs)):
                    break
                out.append(_mapping(va, end, span, e, p, amask))
        self.stats.seconds = time.monotonic() - self._t0
        return iter(out)


def _leaf_mappings(rows, amask: int) -> list[Mapping]:
    """One Mapping per raw leaf row (va, size, raw entry, perms index)."""
    # _mapping() inlined (end derived too): this loop runs once per page of the tree
    out: list[Mapping] = []
    append, new, set_ = out.append, _new, _set
    for va, span, e, p in rows:
        m = new(Mapping)
        set_(m, "__dict__", {"va": va, "page_size": span, "leaf_raw": e, "_p": p, "_amask": amask})
        append(m)
    return out


class _PageRun:
    """The present entries of one page table as one row of a walk's leaves:
    the table's base VA, the perms index of the path above it, the entries'
    indices and raw values (4 KiB leaves, all kept)."""

    __slots__ = ("base", "p", "idx", "raw")

    def __init__(self, base: int, p: int, idx: list[int], raw: list[int]):
        self.base, self.p, self.idx, self.raw = base, p, idx, raw

    def head(self, n: int) -> "_PageRun":
        return _PageRun(self.base, self.p, self.idx[:n], self.raw[:n])

    def rows(self, xmask: int) -> list[tuple[int, int, int, int]]:
        base, p = self.base, self.p
        return [(base + (i << 12), 4096, e, p & (((e >> 1) & 3) | (0 if e & xmask else 4)))
                for i, e in zip(self.idx, self.raw)]


def _rows(kept, xmask: int) -> Iterator[tuple[int, int, int, int]]:
    for r in kept:
        if type(r) is tuple:
            yield r
        else:
            yield from r.rows(xmask)


class Leaves(Sequence):
    """The leaves of one walk (``walk(merge_runs=False)``), in VA order.

    Kept as the walk's compact rows: (va, page size, raw leaf entry, effective
    perms index) per leaf, or one row per page table of 4 KiB leaves (its
    present entries as they are in memory): the walk itself builds no object
    per page.  Indexing and iteration build a ``Mapping`` for each leaf asked
    for (none is kept), so a consumer pays only for what it reads.  Compares
    equal to any sequence of the same Mappings (a list of them, another Leaves)."""

    __slots__ = ("_kept", "_amask", "_xmask", "_n", "_flat")
    _CHUNK = 1024

    def __init__(self, kept: list, amask: int = ADDR_MASK_52, xmask: int = XD, n: int | None = None):
        self._kept = kept
        self._amask, self._xmask = amask, xmask
        self._n = sum(1 if type(r) is tuple else len(r.raw) for r in kept) if n is None else n
        self._flat: list | None = None

    def rows(self) -> list[tuple[int, int, int, int]]:
        """(va, page size, raw entry, perms index) of every leaf."""
        if self._flat is None:
            self._flat = list(_rows(self._kept, self._xmask))
        return self._flat

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        rows = self.rows()
        if isinstance(i, slice):
            return _leaf_mappings(rows[i], self._amask)
        va, span, e, p = rows[i]
        return _mapping(va, va + span, span, e, p, self._amask)

    def __iter__(self) -> Iterator[Mapping]:
        it, n, amask = _rows(self._kept, self._xmask), self._CHUNK, self._amask
        while chunk := list(islice(it, n)):   # a chunk at a time: bounded memory
            yield from _leaf_mappings(chunk, amask)

    def __eq__(self, other) -> bool:
        if isinstance(other, Leaves) and other._amask == self._amask:
            return self.rows() == other.rows()
        if isinstance(other, (list, tuple, Leaves)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Leaves({len(self)} leaves)"


#: Ranges an interactive output (``sbm pt``, ``sbm show``'s map) keeps at most.
OUTPUT_MAX_RANGES = 20_000
#: Rows a terminal table shows at most (the JSON keeps OUTPUT_MAX_RANGES).
RENDER_MAX_ROWS = 2_000


def truncation(w: "Walker", extra: int = 0) -> dict:
    """What a walk's output left out, for its JSON: ``truncated`` and ``more_ranges``."""
    more = w.stats.more_ranges + extra
    return {"truncated": bool(w.stats.truncated or more), "more_ranges": more}


def truncated_line(more: int, truncated: bool = True) -> str | None:
    """The one line every face prints when an output stopped at a limit."""
    if not truncated and not more:
        return None
    return (f"truncated: {more} more ranges" if more else "truncated: the walk stopped at a limit") + \
        " (see the findings; narrow with --range/--flags)"


def merge(leaves) -> Iterator[Mapping]:
    cur: Mapping | None = None
    for m in leaves:
        if (cur is not None and m.va == cur.end and m.pa == cur.pa + cur.size
                and m.key() == cur.key()):
            cur = Mapping(cur.va, m.end, cur.pa, cur.page_size, cur.perms, cur.g,
                          cur.cache_index, cur.pkey, cur.leaf_raw)
            continue
        if cur is not None:
            yield cur
        cur = m
    if cur is not None:
        yield cur


def walk(read_phys: ReadPhys | TableReader, root: int | CR3, *, la57: bool = False,
         range: tuple[int, int] | None = None, flags: dict[str, bool] | str | None = None,
         merge_runs: bool = True, **kw) -> tuple[list[Mapping] | Leaves, Walker]:
    """Walk ``root``; returns (mappings, walker) where walker.findings/.stats
    tell what was odd and how much was read.  Merged runs come as a list of
    Mappings; every leaf (``merge_runs=False``) as a ``Leaves`` sequence."""
    if isinstance(flags, str):
        flags = parse_flags(flags)
    start, end = range if range else (0, 1 << 64)
    w = Walker(read_phys, root, la57=la57, start=start, end=end, flags=flags, **kw)
    maps = list(w.merged()) if merge_runs else w.leaf_list()
    return maps, w


def ptov(read_phys: ReadPhys | TableReader, root: int | CR3, pa: int, *, la57: bool = False,
         **kw) -> tuple[list[tuple[int, Mapping]], Walker]:
    """Every virtual address that maps physical address ``pa`` under ``root``."""
    maps, w = walk(read_phys, root, la57=la57, **kw)
    out = [(m.va + (pa - m.pa), m) for m in maps if m.pa <= pa < m.pa + m.size]
    return out, w


__all__ = [
    "Entry", "Perms", "Finding", "Translation", "Mapping", "Leaves", "Walker", "WalkStats",
    "TableReader", "PagingError", "translate", "walk", "merge", "ptov", "parse_flags",
    "truncation", "truncated_line", "OUTPUT_MAX_RANGES", "RENDER_MAX_ROWS", "MAX_BYTES",
    "canonical", "sign_extend", "reserved_mask", "decode_cr3", "CR3",
    "P", "RW", "US", "PWT", "PCD", "A", "D", "PS", "G", "XD", "PAT_4K", "PAT_LARGE",
    "PAGE_4K", "PAGE_2M", "PAGE_1G", "LEVEL_NAMES", "LEVEL_SHIFT",
]
