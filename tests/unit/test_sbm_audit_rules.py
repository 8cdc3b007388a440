"""Audit rules and the root diff on hand-built inputs."""
import pytest

from sbmdbg.sbm.audit import audit_ranges, diff_mappings, worst
from sbmdbg.x86.paging import Mapping, Perms

pytestmark = pytest.mark.unit
K = 0xFFFFFFFF81000000


def rng(kind, u, w, x, va=K, pages=1, g=False):
    return {"va": va, "end": va + pages * 4096, "kind": kind, "name": kind, "pages": pages,
            "perms": {"u": u, "w": w, "x": x}, "global": g}


GOOD = [rng("kernel_text", True, False, True, K, 10), rng("entry_text", False, False, True, K + 0xA000),
        rng("data", True, False, False, K + 0xB000), rng("sandbox_stack", True, True, False, K + 0xC000, 4),
        rng("exception_stack", False, True, False, K + 0x10000, 2), rng("state_page", False, True, False, K + 0x12000),
        rng("input_buffer", True, False, False, K + 0x13000), rng("output_buffer", True, True, False, K + 0x14000),
        rng("tss", False, False, False, K + 0x15000), rng("entry_stack", False, True, False, K + 0x16000)]
VIEW = {"sandbox_maps_state_page": True, "kernel_reads_zero": True}


def above_info(findings):
    return [(f["rule"], f["severity"]) for f in findings if f["severity"] != "info"]


def test_design_table_is_clean():
    f = audit_ranges(GOOD, VIEW, {"error": 0})
    assert above_info(f) == [] and worst(f) == "info"


@pytest.mark.parametrize("bad,want", [
    (rng("entry_text", True, False, True), ("entry_text_user", "critical")),
    (rng("state_page", True, True, False), ("state_page_user", "critical")),
    (rng("exception_stack", True, True, False), ("exception_stack_user", "critical")),
    (rng("input_buffer", True, True, False), ("input_writable", "high")),
    (rng("data", True, True, False), ("kernel_data_writable", "high")),
    (rng("unknown", True, False, False), ("unexplained", "medium")),
    (rng("sandbox_stack", True, True, False, va=0x400000), ("user_half", "high")),
    (rng("state_page", False, True, False, g=True), ("state_page_global", "high")),
    (rng("data", True, False, False, g=True), ("global", "medium")),
    (rng("sandbox_stack", True, True, True), ("wx", "critical")),
    (rng("tss", True, False, False), ("supervisor_region_user", "high")),
    (rng("data", False, True, False), ("kernel_data_writable", "medium")),
    (rng("rodata", True, False, True), ("executable", "high")),
    (rng("rodata", False, False, True), ("executable", "medium")),
    (rng("kernel_text", False, False, True), ("user_region_supervisor", "low")),
    (rng("sandbox_stack", True, False, False), ("readonly", "low")),
    (rng("kernel_text", True, False, False), ("not_executable", "low")),
])
def test_each_rule(bad, want):
    f = audit_ranges([bad], VIEW)
    assert want in above_info(f)


def test_wx_also_reports_the_nx_violation_once_and_aggregates():
    f = audit_ranges([rng("sandbox_stack", True, True, True, K), rng("sandbox_stack", True, True, True, K + 0x2000)], VIEW)
    rules = above_info(f)
    assert rules.count(("wx", "critical")) == 1 and ("executable", "high") in rules
    wx = next(x for x in f if x["rule"] == "wx")
    assert wx["pages"] == 2 and len(wx["ranges"]) == 2


def test_sbm_error_and_summary_are_info():
    f = audit_ranges(GOOD, VIEW, {"error": -14})
    assert {(x["rule"], x["severity"]) for x in f} >= {("sbm_error", "info"), ("summary", "info")}
    assert "-14" in next(x for x in f if x["rule"] == "sbm_error")["message"]


def test_state_page_checks():
    f = audit_ranges(GOOD, {"sandbox_maps_state_page": False, "kernel_reads_zero": False})
    assert ("state_page_missing", "high") in above_info(f) and ("kernel_state_nonzero", "medium") in above_info(f)


def m(va, pages, w=False, u=False, x=False, pa=0x100000, g=False):
    return Mapping(va, va + pages * 4096, pa, 4096, Perms(w, u, x), g, 0, 0, 0)


def test_diff_mappings():
    a = [m(K, 4), m(K + 0x10000, 1, w=True)]
    b = [m(K + 0x1000, 1, u=True, pa=0x101000), m(K + 0x2000, 2, pa=0x102000), m(K + 0x20000, 1)]
    d = diff_mappings(a, b)
    assert [(r["va"], r["end"]) for r in d["only_a"]] == [(K, K + 0x1000), (K + 0x10000, K + 0x11000)]
    assert [(r["va"], r["end"]) for r in d["only_b"]] == [(K + 0x20000, K + 0x21000)]
    assert d["perms_differ"] == [{"va": K + 0x1000, "end": K + 0x2000, "a": "r-- supv", "b": "r-- user"}]
    assert d["same"] == 0x2000 and d["pa_differ"] == []


# ---------------------------------------------------------------- issue 13: the design, not our choices
def test_global_supervisor_pte_is_info_global_user_pte_is_medium():
    """v1 maps its exception stack, cpu_entry_area and entry text with global
    supervisor-only PTEs: not a finding above info.  Global + user is."""
    sup = audit_ranges([rng("exception_stack", False, True, False, g=True),
                        rng("entry_text", False, False, True, K + 0x5000, g=True),
                        rng("tss", False, False, False, K + 0x6000, g=True)], VIEW)
    assert above_info(sup) == []
    assert {f["region"] for f in sup if f["rule"] == "global_supervisor"} == {"exception_stack",
                                                                             "entry_text", "tss"}
    assert ("global", "medium") in above_info(audit_ranges([rng("kernel_text", True, False, True, g=True)], VIEW))


class _Tr:
    def __init__(self, pa):
        self.pa = pa
        self.fault = None if pa is not None else "PTE not present"


class TwoRoots:
    """kernel.translate over two hand-written tables: page VA -> PA."""
    root = 0x1000

    def __init__(self, kernel_map, sandbox_map):
        self.maps = {0x1000: kernel_map, 0x2000: sandbox_map}

    def translate(self, root, va):
        return _Tr(self.maps[root].get(va & ~0xFFF))


def test_consistency_rule():
    from sbmdbg.sbm.audit import consistency
    ranges = [rng("kernel_text", True, False, True, K, 2), rng("ist_stack", False, True, False, K + 0x4000, 2),
              rng("state_page", False, True, False, K + 0x8000), rng("sandbox_stack", True, True, False, K + 0x9000),
              rng("percpu", True, False, False, K + 0xA000)]
    kmap = {K: 0x100000, K + 0x1000: 0x101000, K + 0x8000: 0x200000, K + 0xA000: 0x300000}
    smap = {K: 0x100000, K + 0x1000: 0x101000,          # kernel text: same frames
            K + 0x4000: 0x0, K + 0x5000: 0x0,            # v1's #VC stack: not mapped by the kernel, PA 0
            K + 0x8000: 0x777000,                        # the state page: private, another frame is right
            K + 0x9000: 0x888000,                        # the sandbox stack: private
            K + 0xA000: 0x301000}                        # a per-CPU page onto another frame
    f = {(x["rule"], x["region"]): x for x in consistency(TwoRoots(kmap, smap), 0x2000, ranges)}
    assert set(f) == {("pa_zero", "ist_stack"), ("not_mapped_by_kernel", "ist_stack"), ("pa_differs", "percpu")}
    assert f[("pa_zero", "ist_stack")]["pages"] == 2 and f[("pa_zero", "ist_stack")]["severity"] == "high"
    assert f[("pa_zero", "ist_stack")]["ranges"] == [{"va": K + 0x4000, "end": K + 0x6000, "perms": "rw- supv",
                                                      "global": False, "name": "ist_stack"}]
    smap[K + 0x4000] = smap[K + 0x5000] = 0x400000   # mapped somewhere, still not by the kernel
    f = {(x["rule"], x["region"]) for x in consistency(TwoRoots(kmap, smap), 0x2000, ranges)}
    assert ("not_mapped_by_kernel", "ist_stack") in f
    assert consistency(TwoRoots(kmap, {K: 0x100000, K + 0x1000: 0x101000}), 0x2000, ranges[:1]) == []
    trunc = consistency(TwoRoots(kmap, smap), 0x2000, ranges, max_pages=1)
    assert [x["rule"] for x in trunc] == ["consistency_truncated"]
    # the kernel's table unreadable (a partial image): "not compared", info only
    unread = TwoRoots(kmap, smap)
    unread.translate = lambda root, va: (_Tr(smap.get(va)) if root == 0x2000 else
                                         type("T", (), {"pa": None, "fault": "PT table at 0x5000 is not readable"})())
    got = consistency(unread, 0x2000, ranges[:1])
    assert [(x["rule"], x["severity"], x["pages"]) for x in got] == [("consistency_unreadable", "info", 2)]


def test_writable_unexplained():
    """Issue 15: a writable user page that no region explains: an in-place
    writable map, whose neighbours on that page are writable too."""
    f = audit_ranges([rng("unknown", True, True, False)], VIEW)
    assert ("writable_unexplained", "high") in above_info(f) and ("unexplained", "medium") in above_info(f)
    assert "writable_unexplained" not in {x["rule"] for x in audit_ranges([rng("unknown", True, False, False)], VIEW)}
    assert "writable_unexplained" not in {x["rule"] for x in audit_ranges([rng("unknown", False, True, False)], VIEW)}


# ---------------------------------------------------------------- issue 13: out-of-object mappings
T = 0xFFFF888000100000 + 0x0B40           # a task_struct in the middle of a slab page


def obj(kind, start, size, name, source):
    return {"kind": kind, "name": name, "start": start & ~0xFFF, "end": (start + size + 0xFFF) & ~0xFFF,
            "exact_start": start, "exact_end": start + size, "size": size, "size_source": source}


TASK = obj("task_struct", T, 3392, "task_struct of sh (pid 43)", "arch_task_struct_size")
OUT = obj("output_buffer", 0xFFFFC90000010000, 64, "output buffer (copy of 0x1234)", "sbm_buf.size")


def test_out_of_object_task_struct_past_arch_task_struct_size():
    """v1 maps sizeof(task_struct) from current; the allocation is
    arch_task_struct_size: a page past the object's last page is a finding
    naming the object and the size the audit used."""
    from sbmdbg.sbm.audit import out_of_object
    base = T & ~0xFFF
    ranges = [rng("task_struct", True, False, False, base, 1),   # T .. T+3392 fits in [base, base+0x2000)
              rng("task_struct", True, False, False, base + 0x1000, 1),
              rng("unknown", True, False, False, base + 0x2000, 1)]
    f = [x for x in out_of_object(ranges, [TASK]) if x["rule"] == "out_of_object"]
    assert len(f) == 1 and f[0]["severity"] == "medium" and f[0]["pages"] == 1
    assert "task_struct of sh (pid 43) (arch_task_struct_size=3392)" in f[0]["message"]
    assert f[0]["object_size"] == 3392 and f[0]["size_source"] == "arch_task_struct_size"
    assert f[0]["ranges"] == [{"va": base + 0x2000, "end": base + 0x3000, "perms": "r-- user", "global": False,
                               "name": "past task_struct of sh (pid 43) (arch_task_struct_size=3392)"}]
    assert f"{base + 0x3000 - (T + 3392)} bytes past its end" in f[0]["message"]
    # the object's own pages only: no finding above info, the slab neighbours on them are info
    clean = out_of_object(ranges[:2], [TASK])
    assert [(x["rule"], x["severity"]) for x in clean] == [("object_page_neighbours", "info")]
    assert f"{T & 0xFFF} bytes before" in clean[0]["message"]
    # a page before the first one, writable: high
    before = out_of_object([rng("unknown", True, True, False, base - 0x1000)] + ranges[:2], [TASK])
    f = [x for x in before if x["rule"] == "out_of_object"]
    assert f[0]["severity"] == "high" and "1 page(s) before its first page" in f[0]["message"]


def test_out_of_object_only_unexplained_contiguous_pages():
    from sbmdbg.sbm.audit import out_of_object
    base = T & ~0xFFF
    own = [rng("task_struct", True, False, False, base, 2)]
    # a gap, then an unknown page: not this object's overrun (the unexplained rule reports it)
    assert not [x for x in out_of_object(own + [rng("unknown", True, False, False, base + 0x3000)], [TASK])
                if x["rule"] == "out_of_object"]
    # the next page is another region of the design (a thread stack): not an overrun
    assert not [x for x in out_of_object(own + [rng("task_stack", True, False, False, base + 0x2000, 4)], [TASK])
                if x["rule"] == "out_of_object"]


def test_out_of_object_output_buffer_past_its_rounded_size():
    """Issue 15: writable sandbox pages beyond an output buffer's bytes (past
    its size rounded up to a page) are a high finding naming the buffer."""
    from sbmdbg.sbm.audit import out_of_object
    va = OUT["start"]
    ranges = [rng("output_buffer", True, True, False, va), rng("unknown", True, True, False, va + 0x1000, 2)]
    f = out_of_object(ranges, [OUT])
    assert [(x["rule"], x["severity"], x["pages"]) for x in f] == [("out_of_object", "high", 2)]
    assert f[0]["message"].startswith("output buffer (copy of 0x1234) of 64 bytes mapped beyond the object: "
                                      "2 page(s) past its last page")
    assert f[0]["ranges"][0]["va"] == va + 0x1000 and f[0]["ranges"][0]["end"] == va + 0x3000
    assert out_of_object(ranges[:1], [OUT]) == []   # buffer copies own their pages: no neighbours


def test_consistency_pa_zero_of_an_unmapped_va_is_both_findings():
    """v1 maps the #VC IST stack, which the kernel does not map, onto PA 0:
    both the VA the kernel does not map and the mapping onto page 0."""
    from sbmdbg.sbm.audit import consistency
    ranges = [rng("ist_guard", False, True, False, K + 0x4000)]
    f = {(x["rule"], x["region"]): x for x in consistency(TwoRoots({}, {K + 0x4000: 0x0}), 0x2000, ranges)}
    assert set(f) == {("pa_zero", "ist_guard"), ("not_mapped_by_kernel", "ist_guard")}
    # a kernel page mapped at PA 0 by both tables: pa_zero only (the frames agree)
    f = {x["rule"] for x in consistency(TwoRoots({K + 0x4000: 0x0}, {K + 0x4000: 0x0}), 0x2000, ranges)}
    assert f == {"pa_zero"}


class _Syms(dict):
    def addr(self, n):
        return self[n]


class _FakeKernel:
    """What regions._task_struct_size reads: the symbol, guest memory, DWARF."""
    root = 0x1000

    def __init__(self, arch_size, readable=True):
        self.symbols = _Syms({"arch_task_struct_size": 0xFFFFFFFF82000000})
        self.mem = arch_size.to_bytes(4, "little")
        self.readable = readable
        self.layouts = type("L", (), {"sizeof": staticmethod(lambda name: 6400)})()

    def sym(self, n):
        return self.symbols[n]

    def read_virt(self, root, va, n):
        from sbmdbg.errors import SbmdbgError
        if not self.readable:
            raise SbmdbgError("not readable")
        return self.mem[:n]


def test_task_struct_size_is_the_kernel_variable_not_dwarf():
    from sbmdbg.sbm import regions
    assert regions._task_struct_size(_FakeKernel(3392)) == (3392, "arch_task_struct_size")
    assert regions._task_struct_size(_FakeKernel(3392, readable=False)) == (6400, "sizeof(struct task_struct)")


def test_gva2gpa_reads_physical_address_zero():
    """QEMU prints gva2gpa's result with %#x: PA 0 is "gpa: 0", not unmapped
    (the live audit test checks a mapping onto page 0 against it)."""
    from sbmdbg.fixture.sources import gva2gpa
    vm = type("VM", (), {"hmp": lambda self, cmd, cpu_index: self.out})()
    for out, want in (("gpa: 0\r\n", 0), ("gpa: 0x7e3000\r\n", 0x7E3000), ("Unmapped\r\n", None)):
        vm.out = out
        assert gva2gpa(vm, 0, 0xFFFFFE0000008000) == want, out


def test_readme_documents_every_rule_with_its_severity():
    """Audit severities documented: every rule audit.py emits has a row of
    README's rules table carrying its severity."""
    import re

    from sbmdbg.paths import REPO_ROOT
    from sbmdbg.sbm import audit
    src = open(audit.__file__).read()
    emitted = set(re.findall(r'\(f?"(\w+)", "(info|low|medium|high|critical)"', src))
    emitted |= set(re.findall(r'"rule": "(\w+)", "severity": "(info|low|medium|high|critical)"', src))
    emitted |= {("out_of_object", "medium"), ("out_of_object", "high")}   # chosen at run time
    assert len({r for r, _ in emitted}) >= 20, emitted
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("### `sbm audit`: rules and severities"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    for rule, sev in sorted(emitted):
        if rule.startswith("{"):
            continue
        row = next((ln for ln in rows if f"`{rule}`" in ln.split("|")[1]), None)
        assert row is not None, f"README has no row for audit rule {rule}"
        assert sev in row.split("|")[2], (rule, sev, row)
