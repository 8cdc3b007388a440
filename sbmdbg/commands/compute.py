"""The compute half of the command table: ``(kernel, args) -> JSON-able dict``,
the same for every face (gdb's ``sbm CMD --json``, ``sbmdbg inspect``, the
dashboard, ``sbmdbg check``).  ``args`` is any object with the attributes the
command reads (argparse Namespace); missing ones take their defaults."""
from __future__ import annotations

from sbmdbg.errors import SbmdbgError
from sbmdbg.jsonutil import jsonable  # noqa: F401  (re-exported for the faces)
from sbmdbg.sbm import audit as au
from sbmdbg.sbm import model as m
from sbmdbg.sbm import regions as rg
from sbmdbg.sbm import stacks as stk
from sbmdbg.x86 import paging as pg


def _a(args, name, default=None):
    return getattr(args, name, default) if args is not None else default


def _cpus(kernel, spec) -> list[int]:
    n = kernel.target.ncpus
    if spec in (None, "all"):
        return list(range(n))
    try:
        c = int(str(spec).removeprefix("cpu"), 0)
    except ValueError:
        raise SbmdbgError(f"bad CPU {spec!r}: a number or 'all'") from None
    if not 0 <= c < n:
        raise SbmdbgError(f"no CPU {c} (the guest has {n})")
    return [c]


def _selected(kernel, args) -> list:
    """The SANDBOX argument's sandbox, or every active one."""
    m.require_sbm(kernel)
    spec = _a(args, "sandbox")
    sbs = [m.find_sandbox(kernel, spec)] if spec else m.sandboxes(kernel)
    if not sbs:
        raise SbmdbgError("no sandbox is active (no task has thread_info.sbm_state set; "
                          "stop while a task runs one)")
    return sbs


def status(kernel, args=None) -> dict:
    """`sbm`: one row per vCPU."""
    out = {"sbm": m.has_sbm(kernel), "note": m.no_sbm_reason(kernel), "cpus": m.vcpus_status(kernel)}
    if out["sbm"]:
        out["sandboxes"] = len(m.sandboxes(kernel, all_tasks_walk=False))
    return jsonable(out)


def list_(kernel, args=None) -> dict:
    m.require_sbm(kernel)
    return jsonable({"sandboxes": [s.to_json() for s in m.sandboxes(kernel)]})


def show(kernel, args=None) -> dict:
    """`sbm show [SANDBOX|cpuN]`: the state, struct sbm, buffers, the state
    page through both roots, the labeled page table."""
    out = []
    sbs = _selected(kernel, args)
    for sb in sbs:
        d = sb.to_json()
        d["state_page"] = m.state_page_views(kernel, sb)
        d["stacks"] = stk.sbm_stacks(kernel, sb)
        if not _a(args, "no_map", False):
            lm = rg.labeled_map(kernel, sb)
            d["map"] = lm["ranges"]
            d["map_walk"] = lm["walk"]
        out.append(d)
    return jsonable({"sandboxes": out})


def stack(kernel, args=None) -> dict:
    return jsonable({"cpus": [stk.cpu_stack(kernel, c) for c in _cpus(kernel, _a(args, "cpu"))]})


def audit(kernel, args=None) -> dict:
    """`sbm audit [SANDBOX]`: findings against the design's table."""
    sbs = _selected(kernel, args)
    res = []
    for sb in sbs:
        lm = rg.labeled_map(kernel, sb)
        findings = au.audit_ranges(lm["ranges"], m.state_page_views(kernel, sb), sb.sbm)
        findings += au.consistency(kernel, sb.pgd_pa, lm["ranges"])
        findings += au.out_of_object(lm["ranges"], lm["regions"])
        findings.sort(key=lambda f: -au.severity_rank(f["severity"]))
        for f in lm["walk"]["findings"]:
            findings.append({"rule": f"walk_{f['kind']}", "severity": "high", "region": None,
                             "message": f["message"], "ranges": [], "pages": 0})
        res.append({"sandbox": sb.label, "state": sb.state, "root": sb.pgd_pa,
                    "worst": au.worst(findings), "findings": findings})
    worst = max((r["worst"] for r in res), key=au.severity_rank)
    return jsonable({"worst": worst, "above_info": au.severity_rank(worst) > 0, "audits": res})


def _int(s, what: str) -> int:
    """A number (0x..., decimal) from an argument; the gdb face evaluates gdb
    expressions before calling in."""
    try:
        return int(str(s), 0) & m.U64
    except ValueError:
        raise SbmdbgError(f"bad {what} {s!r}") from None


def _range(s: str | None):
    """``--range START-END`` -> (start, end) or None."""
    if not s:
        return None
    a, sep, b = s.partition("-")
    if not sep:
        raise SbmdbgError(f"bad range {s!r}: want START-END")
    lo, hi = _int(a, "range start"), _int(b, "range end")
    if hi <= lo:
        raise SbmdbgError(f"empty range {s!r}")
    return lo, hi


def _root(kernel, args, name: str = "root"):
    """A ROOT argument (kernel|user|sandbox[=N]|CR3); user and sandbox are
    those of the vCPU the face selected (``args.root_cpu``, default 0)."""
    return kernel.resolve_root(_a(args, name) or "kernel", cpu=_a(args, "root_cpu", 0) or 0)


def diff(kernel, args) -> dict:
    """`sbm diff ROOT_A ROOT_B`: what one root maps that the other does not."""
    ra, rb = _root(kernel, args, "root_a"), _root(kernel, args, "root_b")
    d = au.diff_roots(kernel, ra.pgd_pa, rb.pgd_pa, _range(_a(args, "range")))
    d.update(root_a={"label": ra.label, "pgd": ra.pgd_pa}, root_b={"label": rb.label, "pgd": rb.pgd_pa})
    return jsonable(d)


def pcpu(kernel, args=None) -> dict:
    """`sbm pcpu`: the hot per-CPU fields in the kernel's layout (pcpu_hot or
    separate per-CPU variables: ``layout``), and each vCPU's mode as the SBM
    model sees it (sandbox at CPL 3 is not "user")."""
    from sbmdbg.model.percpu import pcpu_hot, percpu_layout, vcpu_state
    rows = []
    sbs = m.sandboxes(kernel, all_tasks_walk=False) if m.has_sbm(kernel) else []
    for c in _cpus(kernel, _a(args, "cpu")):
        d = pcpu_hot(kernel, c)
        d["vcpu"] = vcpu_state(kernel, c)
        try:
            st = m.vcpu_status(kernel, c, sbs)
            d["vcpu"].update(mode=st["mode"], cr3_role=st["cr3_role"], sandbox=st["sandbox"])
        except m.ReadErrors as e:
            d["vcpu"].update(mode=None, mode_error=str(e))
        rows.append(d)
    lay = percpu_layout(kernel)
    return jsonable({"layout": lay.kind, "layout_description": lay.describe(), "cpus": rows,
                     "root": kernel.root, "slide": kernel.slide})


def vtop(kernel, args) -> dict:
    """`sbm vtop VA [--root R]`: one translation, every level."""
    root = _root(kernel, args)
    va = _int(args.va, "address")
    tr = kernel.translate(root.pgd_pa, va)
    d = tr.to_json()
    d["root_label"] = root.label
    return jsonable(d)


def pt(kernel, args) -> dict:
    """`sbm pt [ROOT]`: the mappings of a root as merged ranges (or --raw pages)."""
    root = _root(kernel, args)
    maps, w = kernel.walk(root.pgd_pa, range=_range(_a(args, "range")), flags=pg.parse_flags(_a(args, "flags")),
                          merge_runs=not _a(args, "raw", False), max_entries=_a(args, "max_entries", 4_000_000),
                          max_ranges=_a(args, "max_ranges", pg.OUTPUT_MAX_RANGES))
    return jsonable({"root": root.pgd_pa, "root_label": root.label,
                     "mappings": [mp.to_json() for mp in maps], **pg.truncation(w),
                     "findings": [f.to_json() for f in w.findings], "stats": vars(w.stats)})


def ptov(kernel, args) -> dict:
    """`sbm ptov PA [--root R]`: every virtual address mapping a physical one."""
    root = _root(kernel, args)
    pa = _int(args.pa, "physical address")
    hits, _ = kernel.ptov(root.pgd_pa, pa)
    vas = []
    for va, mp in hits:
        sym = kernel.lookup(va)
        vas.append({"va": va, "perms": mp.to_json()["perms"], "page_size": mp.page_size,
                    "symbol": f"{sym[0]}+{sym[1]:#x}" if sym and sym[1] < 1 << 24 else None})
    return jsonable({"pa": pa, "root": root.pgd_pa, "root_label": root.label, "vas": vas})


def kernel_summary(kernel, args=None) -> dict:
    """`sbm kernel`: what the kernel model found (the faces add "memory"), the
    per-CPU layout (pcpu_hot | per-cpu variables) and whether it has SBM."""
    from sbmdbg.model.percpu import percpu_layout
    s = kernel.summary()
    s["pti"] = kernel.pti_enabled()
    s["pti_evidence"] = kernel.pti_evidence()
    s["percpu_layout"] = percpu_layout(kernel).kind
    s["sbm"] = m.no_sbm_reason(kernel) is None
    if s["sbm"]:
        from sbmdbg.sbm.variant import detect
        var = detect(kernel)
        s["sbm_variant"] = var.name
        s["sbm_layout"] = var.describe()
        s["sbm_variant_detail"] = var.to_json()
    return jsonable(s)
