"""The kernel model and walker on a snapshot recorded from the real kernel
(KASLR on, PTI on, 2 vCPUs): only the pages the model and a kernel-half walk
read, the registers, the layouts and the few symbols used."""
import hashlib
import json
from pathlib import Path

import pytest

from sbmdbg.model.kernel import Kernel, KernelError
from sbmdbg.model.percpu import pcpu_hot
from sbmdbg.model.fixture import load_snapshot
from sbmdbg.x86 import paging as pg

pytestmark = pytest.mark.unit
SNAP = Path(__file__).resolve().parents[2] / "fixtures" / "pt" / "kaslr-pti-smp2.json.gz"


@pytest.fixture(scope="module")
def snap():
    return load_snapshot(str(SNAP))


def test_discovery_matches_recording(snap):
    t, syms, lays, exp = snap
    k = Kernel(t, syms, lays)
    assert k.summary() == exp["summary"]
    assert k.slide != 0 and k.slide % (1 << 21) == 0
    assert k.pti_enabled()


def test_pcpu_from_snapshot(snap):
    t, syms, lays, exp = snap
    k = Kernel(t, syms, lays)
    got = [pcpu_hot(k, c) for c in range(t.ncpus)]
    assert json.loads(json.dumps(got)) == exp["pcpu"]
    assert [g["fields"]["cpu_number"] for g in got] == [0, 1]


def test_walk_and_vtop_from_snapshot(snap):
    t, syms, lays, exp = snap
    k = Kernel(t, syms, lays)
    maps, w = pg.walk(t.read_phys, k.root, range=(1 << 63, 1 << 64))
    assert not w.findings and len(maps) == exp["nmaps"]
    assert hashlib.sha256(json.dumps([m.to_json() for m in maps]).encode()).hexdigest() == exp["maps_sha"]
    for va, pa in exp["vtop"].items():
        assert pg.translate(t.read_phys, k.root, int(va)).pa == pa
    # text is read-only executable and the direct map is NX
    tr = pg.translate(t.read_phys, k.root, k.sym("_text"))
    assert tr.perms == pg.Perms(w=False, u=False, x=True)
    assert not pg.translate(t.read_phys, k.root, k.page_offset_base + 0x100000).perms.x


def test_wrong_vmlinux_is_a_clear_error(snap):
    t, syms, lays, exp = snap
    bad = type(syms)(dict(syms.table), syms.build_id,
                     {a: b"Linux version 0.0.1-not-this-one" + bytes(32) for a in syms.blobs})
    with pytest.raises(KernelError, match="does not match the running kernel"):
        Kernel(t, bad, lays)


def test_translate_cache_keeps_the_offset(snap):
    """Kernel.translate caches per 4 KiB page; each address keeps its offset."""
    t, syms, lays, exp = snap
    k = Kernel(t, syms, lays)
    va = k.sym("_text")
    a = k.translate(k.root, va + 0x10)
    b = k.translate(k.root, va + 0x18)     # same page: served from the cache
    assert b.va == va + 0x18
    assert b.pa == a.pa + 8
    assert b.pa == pg.translate(t.read_phys, k.root, va + 0x18).pa
