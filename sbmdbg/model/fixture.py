"""Small recorded snapshots (pages a walk read + registers + layouts + the
few symbols used) for offline tests: ``record_snapshot`` / ``load_snapshot``."""
from __future__ import annotations

import base64
import gzip
import json

from sbmdbg.model.layout import DictLayouts
from sbmdbg.model.symbols import Symbols
from sbmdbg.target.base import DictTarget, RecordingTarget

SNAPSHOT_SYMBOLS = ("_text", "linux_banner", "page_offset_base", "vmalloc_base", "vmemmap_base",
                    "__per_cpu_offset", "__per_cpu_end", "pcpu_hot", "boot_cpu_data", "pti_mode")


class SnapshotSymbols(Symbols):
    def __init__(self, table, build_id, blobs: dict[int, bytes]):
        super().__init__(table, build_id)
        self.blobs = blobs

    def read_file_bytes(self, addr: int, n: int) -> bytes | None:
        b = self.blobs.get(addr)
        return b[:n] if b is not None and len(b) >= n else None


def record_snapshot(path: str, rec: RecordingTarget, symbols: Symbols, layouts, struct_names,
                    expected: dict) -> None:
    table = {n: symbols.table[n] for n in SNAPSHOT_SYMBOLS if n in symbols.table}
    blobs = {}
    if "linux_banner" in table:
        blobs[table["linux_banner"][0]] = symbols.read_file_bytes(table["linux_banner"][0], 64)
    d = {
        "regs": [rec.registers(c) for c in range(rec.ncpus)],
        "pages": {f"{pa:#x}": base64.b64encode(data).decode() for pa, data in sorted(rec.recorded.items())},
        "layouts": {n: layouts.layout(n).to_json() for n in struct_names},
        "symbols": {"build_id": symbols.build_id, "table": table,
                    "blobs": {f"{a:#x}": base64.b64encode(b).decode() for a, b in blobs.items()}},
        "expected": expected,
    }
    with gzip.open(path, "wt") as fh:
        json.dump(d, fh)


def load_snapshot(path: str):
    """-> (DictTarget, SnapshotSymbols, DictLayouts, expected dict)"""
    with gzip.open(path, "rt") as fh:
        d = json.load(fh)
    pages = {int(k, 16): base64.b64decode(v) for k, v in d["pages"].items()}
    t = DictTarget(pages, d["regs"])
    s = d["symbols"]
    syms = SnapshotSymbols({k: tuple(v) for k, v in s["table"].items()}, s["build_id"],
                           {int(k, 16): base64.b64decode(v) for k, v in s["blobs"].items()})
    return t, syms, DictLayouts.from_json(d["layouts"]), d["expected"]
