"""One way to open a kernel: the SBM extension is attached explicitly (not by
importing sbmdbg.sbm), the model owns one per-stop cache with a generation
counter, and page tables are reached through public walk/translate/ptov."""
from pathlib import Path

import pytest

from sbmdbg.model.fixture import load_snapshot
from sbmdbg.model.kernel import KernelError, open_kernel
from sbmdbg.sbm import model as M

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"


def snapshot(name="sbm-in-sandbox"):
    t, syms, lays, _ = load_snapshot(str(FIX / f"{name}.json.gz"))
    return t, syms, lays


def test_sandbox_roots_only_with_the_sbm_extension():
    t, syms, lays = snapshot()
    plain = open_kernel(t, symbols=syms, layouts=lays)
    assert not plain.has_extension("sbm")
    with pytest.raises(KernelError, match="sbmdbg.sbm.open_kernel"):
        plain.resolve_root("sandbox")
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    sb = M.sandboxes(k)[0]
    assert k.has_extension("sbm") and k.resolve_root("sandbox").pgd_pa == sb.pgd_pa


def test_no_vmlinux_is_one_line():
    t, _, _ = snapshot()
    with pytest.raises(KernelError, match="no vmlinux"):
        open_kernel(t)


def test_generation_empties_per_stop_caches_only():
    t, syms, lays = snapshot()
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    g0 = k.generation
    sbs = M.sandboxes(k)
    assert M.sandboxes(k) is sbs                       # cached within a stop
    stop, static = k.cache("probe"), k.cache("probe", per_stop=False)
    stop["x"] = static["x"] = 1
    assert k.cache("probe") is stop
    k.invalidate()
    assert k.generation == g0 + 1
    assert "x" not in stop and static["x"] == 1         # emptied in place / kept
    again = M.sandboxes(k)
    assert again is not sbs and [s.state for s in again] == [s.state for s in sbs]


def test_public_paging_agrees():
    t, syms, lays = snapshot()
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    text = k.sym("_text")
    tr = k.translate(k.root, text)
    assert tr.pa is not None and tr.va == text
    hits, _ = k.ptov(k.root, tr.pa, range=(text, text + 0x200000))
    assert text in [va for va, _ in hits]
    maps, _ = k.walk(k.root, range=(text, text + 0x1000))
    assert maps and maps[0].va <= text < maps[0].va + maps[0].size
