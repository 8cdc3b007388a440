"""x86-64 paging: decode entries, translate one address, walk a whole tree.

Everything here reads page-table pages through ``read_phys(pa, n) -> bytes``
(any ``sbmdbg.target`` Target's ``read_phys``) and an explicit root (a CR3
value or a table physical address).  Guest memory is untrusted: walks are
bounded in entries and time, loops and reserved bits are reported as
findings, and nothing here hangs or raises on hostile tables.
"""
from __future__ import annotations

import struct
import time
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


class TableReader:
    """Reads 4 KiB page-table pages as 512 little-endian u64, with a cache."""

    def __init__(self, read_phys: ReadPhys):
        self._read = read_phys
        self._cache: dict[int, tuple[int, ...] | None] = {}
        self.pages_read = 0

    def table(self, pa: int) -> tuple[int, ...] | None:
        pa &= ~0xFFF
        if pa in self._cache:
            return self._cache[pa]
        try:
            data = self._read(pa, 4096)
            t = struct.unpack("<512Q", bytes(data)) if len(data) == 4096 else None
        except Exception:  # noqa: BLE001 - unbacked/unreadable memory is a finding
            t = None
        self._cache[pa] = t
        self.pages_read += 1
        return t


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
        e = Entry(level, idx, table_pa + idx * 8, table[idx], maxphyaddr, nxe)
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


class Walker:
    """Bounded depth-first walk of one root; yields leaf ``Mapping``s (one per page
    or large page) in VA order; ``merged()`` joins runs.  Findings and stats are
    collected on the instance."""

    def __init__(self, read_phys: ReadPhys | TableReader, root: int | CR3, *,
                 la57: bool = False, start: int = 0, end: int = 1 << 64,
                 flags: dict[str, bool] | None = None, maxphyaddr: int = 52,
                 nxe: bool = True, max_entries: int = 4_000_000,
                 max_seconds: float = 30.0, max_findings: int = 1000):
        self.reader = read_phys if isinstance(read_phys, TableReader) else TableReader(read_phys)
        self.root = _root_pa(root)
        self.la57 = la57
        self.levels = 5 if la57 else 4
        self.start, self.end = start, end
        self.flags = flags or {}
        self.maxphyaddr, self.nxe = maxphyaddr, nxe
        self.max_entries, self.max_seconds = max_entries, max_seconds
        self.max_findings = max_findings
        self.findings: list[Finding] = []
        self.stats = WalkStats()
        self._aliased: set[int] = set()

    def _finding(self, *a, **kw) -> None:
        if len(self.findings) < self.max_findings:
            self.findings.append(Finding(*a, **kw))

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

    def leaves(self) -> Iterator[Mapping]:
        t0 = time.monotonic()
        deadline = t0 + self.max_seconds
        top_bits = 57 if self.la57 else 48
        # Raw (non-sign-extended) VA range, split in the two canonical halves.
        try:
            yield from self._walk(self.root, self.levels, 0, True, True, True,
                                  [self.root], deadline, top_bits)
        finally:
            self.stats.seconds = time.monotonic() - t0

    def _walk(self, table_pa, level, base, w, u, x, path, deadline, top_bits):
        st = self.stats
        table = self.reader.table(table_pa)
        st.tables += 1
        if table is None:
            self._finding("unreadable", f"{LEVEL_NAMES[level]} table at {table_pa:#x} is not readable",
                          pa=table_pa, level=level)
            return
        shift = LEVEL_SHIFT[level]
        span = 1 << shift
        # Entry index range overlapping [start, end) (sign-extended VAs).
        for idx, e_raw in enumerate(table):
            if not e_raw & P:
                continue
            raw_va = base | (idx << shift)
            va = sign_extend(raw_va, self.la57)
            if va + span <= self.start or va >= self.end:
                continue
            st.entries += 1
            if st.entries > self.max_entries:
                if not st.truncated:
                    st.truncated = True
                    self._finding("budget", f"walk stopped after {self.max_entries} entries", va=va)
                return
            if (st.entries & 0x3FF) == 0 and time.monotonic() > deadline:
                if not st.truncated:
                    st.truncated = True
                    self._finding("timeout", f"walk stopped after {self.max_seconds:.1f}s", va=va)
                return
            e = Entry(level, idx, table_pa + idx * 8, e_raw, self.maxphyaddr, self.nxe)
            rsv = e.reserved_bits
            if rsv:
                self._finding("reserved", f"{e.name} {e_raw:#018x} at {e.entry_pa:#x} has reserved bits {rsv:#x} set",
                              va=va, pa=e.entry_pa, level=level)
                continue
            nw, nu, nx = w and bool(e_raw & RW), u and bool(e_raw & US), x and not (self.nxe and e_raw & XD)
            if e.leaf:
                perms = Perms(nw, nu, nx)
                g = bool(e_raw & G)
                if self._match(perms, g):
                    st.leaves += 1
                    yield Mapping(va, va + span, e.target, span, perms, g, e.cache_index, e.pkey, e_raw)
                continue
            if self._prune(nw, nu, nx):
                continue
            nxt = e.target
            if nxt in path:
                self._finding("loop", f"{e.name} at {e.entry_pa:#x} points back to the table at {nxt:#x} on its own path",
                              va=va, pa=e.entry_pa, level=level)
                continue
            if nxt in self._aliased:
                self._finding("alias", f"table {nxt:#x} is referenced by more than one entry (again from {e.entry_pa:#x})",
                              va=va, pa=nxt, level=level - 1)
            self._aliased.add(nxt)
            path.append(nxt)
            try:
                yield from self._walk(nxt, level - 1, raw_va, nw, nu, nx, path, deadline, top_bits)
            finally:
                path.pop()
            if st.truncated:
                return

    def merged(self) -> Iterator[Mapping]:
        return merge(self.leaves())


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
         merge_runs: bool = True, **kw) -> tuple[list[Mapping], Walker]:
    """Walk ``root``; returns (mappings, walker) where walker.findings/.stats
    tell what was odd and how much was read."""
    if isinstance(flags, str):
        flags = parse_flags(flags)
    start, end = range if range else (0, 1 << 64)
    w = Walker(read_phys, root, la57=la57, start=start, end=end, flags=flags, **kw)
    maps = list(w.merged() if merge_runs else w.leaves())
    return maps, w


def ptov(read_phys: ReadPhys | TableReader, root: int | CR3, pa: int, *, la57: bool = False,
         **kw) -> tuple[list[tuple[int, Mapping]], Walker]:
    """Every virtual address that maps physical address ``pa`` under ``root``."""
    maps, w = walk(read_phys, root, la57=la57, **kw)
    out = [(m.va + (pa - m.pa), m) for m in maps if m.pa <= pa < m.pa + m.size]
    return out, w


__all__ = [
    "Entry", "Perms", "Finding", "Translation", "Mapping", "Walker", "WalkStats",
    "TableReader", "PagingError", "translate", "walk", "merge", "ptov", "parse_flags",
    "canonical", "sign_extend", "reserved_mask", "decode_cr3", "CR3",
    "P", "RW", "US", "PWT", "PCD", "A", "D", "PS", "G", "XD", "PAT_4K", "PAT_LARGE",
    "PAGE_4K", "PAGE_2M", "PAGE_1G", "LEVEL_NAMES", "LEVEL_SHIFT",
]
