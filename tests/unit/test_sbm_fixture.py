"""The SBM model offline on snapshots recorded from the reference kernel (a vCPU
stopped in the sandbox at __sbm_thunk_sbm_demo_compute, and in handle_sbm_fault
for write_kernel_data): the commands give the recorded JSON, and the model's
answers hold on their own."""
import json
import types
from pathlib import Path

import pytest

from sbmdbg.model.kernel import Kernel
from sbmdbg.commands import COMMANDS
from sbmdbg.commands import compute as C
from sbmdbg.sbm import model as M
from sbmdbg.model.fixture import load_snapshot

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"
ns = types.SimpleNamespace
ARGS = {"status": ns(), "list": ns(), "show": ns(sandbox=None, no_map=False), "stack": ns(cpu="all"),
        "audit": ns(sandbox=None)}


def kernel(name):
    t, syms, lays, exp = load_snapshot(str(FIX / f"{name}.json.gz"))
    return M.open_kernel(t, symbols=syms, layouts=lays), exp


@pytest.mark.parametrize("name", ["sbm-in-sandbox", "sbm-in-handler"])
def test_commands_replay(name):
    k, exp = kernel(name)
    for cmd, args in ARGS.items():
        assert json.loads(json.dumps(COMMANDS[cmd](k, args))) == exp[cmd], cmd


def test_in_sandbox_facts():
    k, exp = kernel("sbm-in-sandbox")
    sb = M.sandboxes(k)[0]
    cpu = sb.cpus[0]
    st = M.vcpu_status(k, cpu)
    assert st["mode"] == "sandbox" and st["cpl"] == 3 and st["cr3"] & ~0xFFF == sb.pgd_pa
    # discovery on a vCPU stopped in the sandbox ends on a kernel root: the
    # task's own (state->kernel_cr3), not the sandbox's
    k2 = M.open_kernel(k.target, symbols=k.symbols, layouts=k.layouts, cpu=cpu)
    assert k2.root != sb.pgd_pa and k2.root == sb.fields["kernel_cr3"] & ~0xFFF
    assert k2.slide == k.slide
    views = M.state_page_views(k, sb)
    assert views["sandbox_maps_state_page"] and views["kernel_reads_zero"]
    assert k.resolve_root(f"sandbox={sb.pid}").pgd_pa == sb.pgd_pa
    audit = C.audit(k)
    assert audit["worst"] == "info" and not audit["above_info"]


def test_in_handler_facts():
    k, exp = kernel("sbm-in-handler")
    s = exp["stack"]["cpus"]
    row = next(c for c in s if c["sbm_state"])
    assert row["mode"] == "sandbox (in kernel handler)"
    assert row["exc_pt_regs"]["from_sandbox"] and row["exc_pt_regs"]["top"] == row["top_of_intr_stack"]
    syms = [f.get("symbol") or "" for f in row["backtrace"]["frames"]]
    assert syms[0].startswith("handle_sbm_fault") and any(x.startswith("arch_sbm_exec+") for x in syms)


def test_no_sbm_kernel_is_one_line():
    t, syms, lays, _ = load_snapshot(str(FIX / "kaslr-pti-smp2.json.gz"))
    k = Kernel(t, syms, lays)
    reason = M.no_sbm_reason(k)
    assert reason.startswith("no SandBox Mode in this kernel: missing ") and "\n" not in reason
    with pytest.raises(M.NoSandboxMode):
        C.list_(k)
