"""Live checks of the target/model/paging layers against QEMU and scripts/gdb.

* ``sbm pcpu --json`` == scripts/gdb ``$lx_per_cpu(pcpu_hot, N)`` field by
  field on every CPU, PTI on and off, and with a vCPU stopped in user mode.
* ``sbm pt CR3 --raw --json`` == QEMU's ``info tlb`` mapping for mapping.
* ``sbm vtop`` == scripts/gdb ``translate-vm`` entry by entry.
* KASLR on: slide found, symbols resolve (banner check), pcpu works.
* vmcore (``dump-guest-memory``) and shm sources agree with the gdbstub.

SBMDBG_TEST_KERNEL_DIR=DIR (with vmlinux, bzImage, scripts/gdb,
vmlinux-gdb.py) uses a prebuilt kernel instead of the pipeline's.
"""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from sbmdbg.target.qmp import info_tlb_flags as qemu_flags, parse_info_tlb

pytestmark = pytest.mark.live

U64 = (1 << 64) - 1


@pytest.fixture
def boot(request):
    """boot(**VMOptions) -> (vm, gdb session attached, stopped)."""
    kdir = os.environ.get("SBMDBG_TEST_KERNEL_DIR")
    from sbmdbg.vm import VM, VMOptions
    from sbmdbg.vm.gdbmi import GdbSession
    opened = []

    def factory(attach=True, before_attach=None, **opts):
        if kdir:
            opts.setdefault("kernel", f"{kdir}/bzImage")
            opts.setdefault("vmlinux", f"{kdir}/vmlinux")
            opts.setdefault("tree", kdir)
            vm = VM(VMOptions(**opts))
            opened.append(vm)
        else:
            vm = request.getfixturevalue("make_vm")(**opts)
        if before_attach:
            before_attach(vm)
        g = None
        if attach:
            g = GdbSession(vm.info["vmlinux"], vm.info.get("tree"), vm.info["gdb"])
            opened.insert(0, g)
        return vm, g

    yield factory
    for o in opened:
        o.close()


def sbm_json(g, cmd: str) -> dict:
    return g.sbm_json(cmd)


LX_FIELDS = """
import gdb, json
v = gdb.parse_and_eval("$lx_per_cpu(pcpu_hot, %d)")
out = {}
for f in %r:
    x = v[f]
    out[f] = int(x.cast(gdb.lookup_type("long"))) if x.type.strip_typedefs().code == gdb.TYPE_CODE_PTR else int(x)
t = v["current_task"]
out["pid"] = int(t["pid"])
out["comm"] = t["comm"].string()
print("LX" + json.dumps(out))
"""


def lx_pcpu(g, cpu: int, fields: list[str]) -> dict:
    script = LX_FIELDS % (cpu, fields)
    # a multi-line python block is awkward over MI: exec() one string instead
    code = script.replace("\n", "\\n").replace('"', '\\"')
    out = g.console(f'python exec("{code}")')
    return json.loads(out[out.index("LX") + 2:].strip())


def compare_pcpu(g, kernel_thread: int | None = None):
    got = sbm_json(g, "sbm pcpu")
    if kernel_thread is not None:
        g.console(f"thread {kernel_thread}")
    for row in got["cpus"]:
        f = row["fields"]
        names = list(f)
        want = lx_pcpu(g, row["cpu"], names)
        for name in names:
            a, b = f[name], want[name]
            assert (int(a) & U64) == (int(b) & U64), (row["cpu"], name, a, b)
        assert row["current"]["pid"] == want["pid"]
        assert row["current"]["comm"] == want["comm"]
    return got


@pytest.mark.parametrize("pti", ["on", "off"])
def test_pcpu_matches_lx_per_cpu(boot, pti):
    vm, g = boot(smp=2, pti=pti)
    g.interrupt()
    got = compare_pcpu(g)
    assert len(got["cpus"]) == 2
    assert [c["fields"]["cpu_number"] for c in got["cpus"]] == [0, 1]
    summary = sbm_json(g, "sbm kernel")
    assert summary["pti"] == (pti == "on")


def _cpl_by_thread(g) -> dict[int, int]:
    d = sbm_json(g, "sbm pcpu")
    return {row["cpu"]: row["vcpu"]["cpl"] for row in d["cpus"]}


def test_pcpu_with_vcpu_in_user_mode_pti(boot):
    def spin(vm):
        r = vm.run("(while :; do :; done) & (while :; do :; done) & echo spinning")
        assert "spinning" in r.output
    vm, g = boot(smp=2, pti="on", before_attach=spin)
    user_cpu = None
    for _ in range(60):
        g.interrupt()
        cpls = _cpl_by_thread(g)
        users = [c for c, cpl in cpls.items() if cpl == 3]
        kern = [c for c, cpl in cpls.items() if cpl == 0]
        if users:
            user_cpu = users[0]
            break
        g.cont()
        time.sleep(0.05)
    assert user_cpu is not None, "no vCPU ever stopped in user mode"
    g.console(f"thread {user_cpu + 1}")
    regs_cs = int(g.console("output $cs").strip(), 0)
    assert regs_cs & 3 == 3
    # scripts/gdb reads through the selected vCPU's CR3: with PTI in user mode
    # it cannot see kernel memory, so it runs on a kernel-mode vCPU when one
    # exists; sbm pcpu runs with the user-mode vCPU selected.
    got = sbm_json(g, "sbm pcpu")
    if kern:
        g.console(f"thread {kern[0] + 1}")
        for row in got["cpus"]:
            want = lx_pcpu(g, row["cpu"], list(row["fields"]))
            for name, a in row["fields"].items():
                assert (int(a) & U64) == (int(want[name]) & U64), (row["cpu"], name)
            assert row["current"]["comm"] == want["comm"]
    user_row = got["cpus"][user_cpu]
    assert user_row["current"]["comm"] == "sh"
    assert user_row["vcpu"]["cpl"] == 3


@pytest.mark.parametrize("pti,source", [("on", "gdb"), ("off", "auto")])
def test_pt_matches_info_tlb(boot, pti, source):
    """Through the gdbstub's physical mode, and through the RAM file that the
    gdb side finds by itself (the harness VM's memory-backend-file)."""
    vm, g = boot(smp=2, pti=pti)
    g.interrupt()
    mem = sbm_json(g, f"sbm target {source}")
    if source == "auto":
        assert mem["memory"] == "shm" and mem["ram_file"] == vm.info["ram"]
        assert sbm_json(g, "sbm kernel")["memory"]["ram_file"] == vm.info["ram"]
    else:
        assert mem["memory"] == "gdbstub"
    for cpu in range(2):
        cr3 = sbm_json(g, "sbm pcpu")["cpus"][cpu]["vcpu"]["cr3"]
        mine = sbm_json(g, f"sbm pt {cr3:#x} --raw")
        assert not mine["stats"]["truncated"]
        ours = [(m["va"], m["pa"],
                 qemu_flags(m["leaf"], m["page_size"])) for m in mine["mappings"]]
        theirs = parse_info_tlb(vm.hmp("info tlb", cpu_index=cpu))
        assert len(theirs) > 100
        assert ours == theirs, next((a, b) for a, b in zip(ours, theirs) if a != b)


TV = re.compile(r"page entry binary data\s+(0x[0-9a-f]+)")


def test_vtop_matches_translate_vm(boot):
    vm, g = boot(smp=2, pti="off")
    g.interrupt()
    g.console("thread 1")
    pc = sbm_json(g, "sbm pcpu")
    cr3 = pc["cpus"][0]["vcpu"]["cr3"]
    k = sbm_json(g, "sbm kernel")
    samples = [k["text"], pc["cpus"][1]["address"], pc["cpus"][1]["fields"]["top_of_stack"] - 8,
               pc["cpus"][0]["fields"]["hardirq_stack_ptr"], k["page_offset_base"] + 0x1234567,
               pc["cpus"][1]["fields"]["current_task"]]
    for va in samples:
        va &= U64
        mine = sbm_json(g, f"sbm vtop {va:#x} --root {cr3:#x}")
        theirs = [int(x, 16) for x in TV.findall(g.console(f"translate-vm {va:#x}"))]
        assert [e["raw"] for e in mine["entries"]] == theirs, hex(va)
        assert mine["pa"] is not None
        # and the kernel root gives the same answer for kernel addresses
        assert sbm_json(g, f"sbm vtop {va:#x}")["pa"] == mine["pa"]


def test_kaslr_slide_and_symbols(boot):
    vm, g = boot(smp=2, pti="on", kaslr=True)
    g.interrupt()
    k = sbm_json(g, "sbm kernel")
    assert k["slide"] % (1 << 21) == 0
    # the banner check inside the model is the symbol check; pcpu through slid
    # __per_cpu_offset must find the boot task
    pc = sbm_json(g, "sbm pcpu")
    assert [c["fields"]["cpu_number"] for c in pc["cpus"]] == [0, 1]
    assert all(c["current"]["comm"] for c in pc["cpus"])
    hits = sbm_json(g, f"sbm ptov {k['phys_base'] + (k['text'] - 0xffffffff80000000):#x}")
    assert k["text"] in [h["va"] for h in hits["vas"]]


def test_shm_qmp_vmcore_sources_agree(boot, tmp_path):
    from sbmdbg.model.kernel import Kernel
    from sbmdbg.model.layout import DwarfLayouts
    from sbmdbg.model.percpu import pcpu_hot
    from sbmdbg.model.symbols import Symbols
    from sbmdbg.target.qmp import QmpTarget
    from sbmdbg.target.shm import ShmTarget
    from sbmdbg.target.vmcore import VmcoreTarget
    vm, g = boot(smp=2, pti="on", attach=False)
    vm.hmp("stop")
    vml = vm.info["vmlinux"]
    syms, lays = Symbols.from_elf(vml), DwarfLayouts(vml)
    q = QmpTarget(vm.hmp, vm.qmp)
    qx = QmpTarget(vm.hmp)  # xp path
    shm = ShmTarget(vm.info["ram"], vm.info["ram_size"], regs_source=q)
    core = tmp_path / "vmcore.elf"
    vm.hmp(f"dump-guest-memory {core}")
    vc = VmcoreTarget(str(core))
    try:
        assert vc.ncpus == 2
        for c in range(2):
            assert vc.registers(c)["cr3"] == q.registers(c)["cr3"]
        assert (shm.read_phys(0x1000000, 4096) == q.read_phys(0x1000000, 4096)
                == qx.read_phys(0x1000000, 4096) == vc.read_phys(0x1000000, 4096))
        results = []
        for t in (shm, q, vc):
            k = Kernel(t, syms, lays)
            results.append([pcpu_hot(k, c) for c in range(2)])
        assert results[0] == results[1] == results[2]
    finally:
        vc.close()
        shm.close()
        vm.hmp("cont")


LA57_SKIP = ("5-level paging is not active in the guest (CR4.LA57 clear): QEMU's CPU model lacks "
             "la57 or the kernel was built without CONFIG_X86_5LEVEL / booted with no5lvl")


def test_la57_pt_and_vtop_match_qemu_and_translate_vm(boot):
    """5-level paging (VMOptions(la57=True): no no5lvl, -cpu max has la57 under
    TCG): sbm pt == info tlb for every vCPU's CR3 and the kernel root, sbm
    vtop == translate-vm on sampled addresses."""
    from sbmdbg.target.qmp import parse_info_registers
    vm, g = boot(smp=2, pti="off", la57=True)
    g.interrupt()
    cr4 = parse_info_registers(vm.hmp("info registers", cpu_index=0))["cr4"]
    if not cr4 >> 12 & 1:
        pytest.skip(LA57_SKIP)
    k = sbm_json(g, "sbm kernel")
    assert k["la57"] and k["levels"] == 5
    assert k["page_offset_base"] >> 56 == 0xFF and k["page_offset_base"] >> 47 != 0x1FFFF  # 57-bit layout
    pc = sbm_json(g, "sbm pcpu")
    for cpu in range(2):
        cr3 = pc["cpus"][cpu]["vcpu"]["cr3"]
        theirs = parse_info_tlb(vm.hmp("info tlb", cpu_index=cpu))
        assert len(theirs) > 100
        for spec in {f"{cr3:#x}", "kernel"} if (cr3 & ~0xFFF) == k["root"] else {f"{cr3:#x}"}:
            mine = sbm_json(g, f"sbm pt {spec} --raw")
            assert not mine["stats"]["truncated"] and not mine["findings"]
            ours = [(m["va"], m["pa"], qemu_flags(m["leaf"], m["page_size"])) for m in mine["mappings"]]
            assert ours == theirs, next((a, b) for a, b in zip(ours, theirs) if a != b)
    g.console("thread 1")
    cr3 = pc["cpus"][0]["vcpu"]["cr3"]
    samples = [k["text"], pc["cpus"][1]["address"], pc["cpus"][1]["fields"]["top_of_stack"] - 8,
               k["page_offset_base"] + 0x1234567, pc["cpus"][1]["fields"]["current_task"],
               k["vmemmap_base"] + 0x40, k["vmalloc_base"]]
    mapped = 0
    for va in samples:
        va &= U64
        mine = sbm_json(g, f"sbm vtop {va:#x} --root {cr3:#x}")
        assert mine["levels"] == 5
        theirs = [int(x, 16) for x in TV.findall(g.console(f"translate-vm {va:#x}"))]
        assert [e["raw"] for e in mine["entries"]][:len(theirs)] == theirs, hex(va)
        if mine["pa"] is not None:
            mapped += 1
            assert len(theirs) == len(mine["entries"]), hex(va)
    assert mapped >= 5
