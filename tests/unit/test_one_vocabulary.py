"""One SBM model: the tracers' per-event context (trace/context.py) answers
CR3 role, mode and stack class in the words of `sbm --json` (the SBM model's
vcpu_status), on the recorded snapshots; old (schema 1) traces still read."""
import json
from pathlib import Path

import pytest

from sbmdbg.model.fixture import load_snapshot
from sbmdbg.sbm import model as M
from sbmdbg.sbm.stacks import STACK_KINDS
from sbmdbg.trace.context import GuestContext
from sbmdbg.trace.events import SCHEMA, read_events

pytestmark = pytest.mark.unit
FIX = Path(__file__).resolve().parents[2] / "fixtures" / "pt"


def tracer_view(ctx: GuestContext, k, cpu: int) -> dict:
    """What the breakpoint tracer's _base() puts in an event for a stop on ``cpu``."""
    r = k.target.registers(cpu)
    task = ctx.current_task(cpu)
    pid, _comm = ctx.task_brief(task)
    state = ctx.sbm_state(task)
    st = ctx.state(state) if state else None
    role = ctx.cr3_role(r["cr3"], st, task, pid)
    stack = ctx.stack_class(r["rsp"], task, st, cpu)
    return {"cr3_role": role, "stack": stack,
            "mode": ctx.mode(r["cs"] & 3, role, st, ctx.sym(r["rip"]), stack)}


@pytest.mark.parametrize("name", ["sbm-in-sandbox", "sbm-in-handler"])
def test_tracer_context_speaks_the_sbm_models_words(name):
    t, syms, lays, _ = load_snapshot(str(FIX / f"{name}.json.gz"))
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    ctx = GuestContext(k)
    rows = M.vcpus_status(k)            # what `sbm --json` prints per vCPU
    assert any(M.is_sandbox_role(r["cr3_role"]) or r["mode"] != "kernel" for r in rows)
    for row in rows:
        want = {"cr3_role": row["cr3_role"], "stack": row["stack"]["kind"], "mode": row["mode"]}
        assert tracer_view(ctx, k, row["cpu"]) == want, row["cpu"]
        assert want["stack"] in STACK_KINDS
    # the sizes and bounds are the model's, not a second guess
    sz = M.sizes(k)
    assert (ctx.thread_size, ctx.exc_stksz) == (sz["thread_size"], sz["exception_stksz"])


def test_schema_1_traces_read_in_todays_words(tmp_path):
    old = [{"seq": 0, "kind": "trace_start", "schema": 1},
           {"seq": 1, "kind": "irq", "vcpu": 0, "pid": 70, "cr3_role": "sandbox", "stack": "sandbox"},
           {"seq": 2, "kind": "abort", "vcpu": 1, "pid": 71, "cr3_role": "user", "stack": "exception",
            "fault_stack": "sandbox-guard"},
           {"seq": 3, "kind": "exit", "vcpu": 1, "cr3_role": "kernel", "stack": "other"},
           {"seq": 4, "kind": "trace_stop"}]
    p = tmp_path / "v1.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in old))
    evs = read_events(str(p))
    assert [(e.get("cr3_role"), e.get("stack")) for e in evs[1:4]] == [
        ("sandbox:70", "sbm_sandbox_stack"), ("user (PTI)", "sbm_exception_stack"), ("kernel", "unknown")]
    assert evs[2]["fault_stack"] == "sbm_sandbox_guard"
    # a current-schema file is read as written
    new = [dict(old[0], schema=SCHEMA), dict(old[1], cr3_role="sandbox:70", stack="sbm_sandbox_stack")]
    p.write_text("".join(json.dumps(e) + "\n" for e in new))
    assert read_events(str(p)) == new


def test_tracer_buffers_are_the_models():
    t, syms, lays, _ = load_snapshot(str(FIX / "sbm-in-sandbox.json.gz"))
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    ctx = GuestContext(k)
    sb = M.sandboxes(k)[0]
    want = [(b["direction"], b["sbm_ptr"], b["size"]) for b in sb.sbm["buffers"]]
    assert want, "the recorded sandbox has buffers"
    assert [(lst, p, n) for lst, _i, p, n in ctx.sbm_buffers(sb.fields["sbm"])] == want


def test_tracer_regions_use_the_models_sections():
    from sbmdbg.sbm import regions as RG
    t, syms, lays, _ = load_snapshot(str(FIX / "sbm-in-sandbox.json.gz"))
    k = M.open_kernel(t, symbols=syms, layouts=lays)
    ctx = GuestContext(k)
    sb = M.sandboxes(k)[0]
    kinds = {kind for kind, *_ in RG.SECTIONS}
    secs = [r for r in RG.sandbox_regions(k, sb) if r["kind"] in kinds]
    assert {r["kind"] for r in secs} >= {"kernel_text", "entry_text", "data"}
    for r in secs:
        assert ctx.where(r["exact_start"]).startswith(r["name"]), r
