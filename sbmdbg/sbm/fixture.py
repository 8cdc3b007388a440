"""Record a small SBM snapshot (the format of sbmdbg.model.fixture: pages read,
registers, layouts, symbols) by running commands on the SBM model, so offline
tests replay them: ``record(target, vmlinux, path, run)`` where the caller's
``run(kernel) -> {name: JSON}`` runs the commands (the face's command table:
the model does not import it)."""
from __future__ import annotations

import base64
import gzip
import json

from sbmdbg.model.layout import LayoutSource
from sbmdbg.model.symbols import Symbols
from sbmdbg.target.base import RecordingTarget


class RecSymbols(Symbols):
    """Symbols that remember every name asked for or returned by lookup()."""

    def __init__(self, inner: Symbols):
        super().__init__(inner.table, inner.build_id, inner.sections, inner.path)
        self.used: set[str] = set()

    def addr(self, name):
        self.used.add(name)
        return super().addr(name)

    def get(self, name):
        self.used.add(name)
        return super().get(name)

    def __contains__(self, name):
        self.used.add(name)
        return super().__contains__(name)

    def lookup(self, addr):
        r = super().lookup(addr)
        if r:
            self.used.add(r[0])
        return r


class RecLayouts(LayoutSource):
    def __init__(self, inner):
        self.inner, self.used = inner, set()

    def layout(self, name):
        lay = self.inner.layout(name)
        self.used.add(name)
        return lay


def record(target, vmlinux: str, path: str, run) -> dict:
    """``run(kernel) -> {name: output}`` on the SBM model over ``target``
    while recording; write the snapshot with the outputs as "expected"."""
    from sbmdbg.model.layout import DwarfLayouts
    from sbmdbg.sbm.model import PREFETCH, open_kernel
    rec = RecordingTarget(target)
    dl = DwarfLayouts(vmlinux)
    dl.prefetch(list(PREFETCH))
    syms, lays = RecSymbols(Symbols.from_elf(vmlinux)), RecLayouts(dl)
    k = open_kernel(rec, symbols=syms, layouts=lays)
    expected = {name: json.loads(json.dumps(out)) for name, out in run(k).items()}
    expected["summary"] = k.summary()
    table = {n: syms.table[n] for n in sorted(syms.used) if n in syms.table}
    blobs = {}
    if "linux_banner" in table:
        blobs[table["linux_banner"][0]] = syms.read_file_bytes(table["linux_banner"][0], 64)
    d = {"regs": [rec.registers(c) for c in range(rec.ncpus)],
         "pages": {f"{pa:#x}": base64.b64encode(data).decode() for pa, data in sorted(rec.recorded.items())},
         "layouts": {n: dl.layout(n).to_json() for n in sorted(lays.used)},
         "symbols": {"build_id": syms.build_id, "table": table,
                     "blobs": {f"{a:#x}": base64.b64encode(b).decode() for a, b in blobs.items()}},
         "expected": expected}
    with gzip.open(path, "wt") as fh:
        json.dump(d, fh)
    return expected
