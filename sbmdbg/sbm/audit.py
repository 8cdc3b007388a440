"""Isolation audit of a sandbox page table against the design's table, and a
diff of two page-table roots.  Pure functions over labeled ranges (see
sbmdbg.sbm.regions), so the rules are testable on hand-built inputs."""
from __future__ import annotations

import bisect

from sbmdbg.sbm.regions import EXPECTED, KERNEL_DATA, PAGE, perm_str

SEVERITIES = ["info", "low", "medium", "high", "critical"]
USER_HALF_END = 1 << 47


def severity_rank(s: str) -> int:
    return SEVERITIES.index(s)


def _rules_for(r: dict) -> list[tuple[str, str, str]]:
    """(rule, severity, message) of one labeled range."""
    p, kind = r["perms"], r["kind"]
    out = []
    if p["w"] and p["x"]:
        out.append(("wx", "critical", "writable and executable (W+X)"))
    if r["va"] < USER_HALF_END:
        out.append(("user_half", "high", "mapped in the user half (the design keeps it empty)"))
    if kind == "unknown":
        out.append(("unexplained", "medium", "mapping not explained by any region of the design"))
    exp = EXPECTED.get(kind)
    if exp is not None:
        eu, ew, ex = exp
        if kind == "entry_text" and p["u"] and p["x"]:
            out.append(("entry_text_user", "critical",
                        "entry text executable at CPL 3 (user bit set on .entry.text)"))
        elif kind in ("state_page", "exception_stack") and p["u"]:
            out.append((f"{kind}_user", "critical", f"{kind.replace('_', ' ')} is user-accessible"))
        elif eu is False and p["u"]:
            out.append(("supervisor_region_user", "high", f"{kind} is user-accessible (design: supervisor)"))
        elif eu is True and not p["u"]:
            out.append(("user_region_supervisor", "low", f"{kind} is supervisor-only (design: user)"))
        if ew is False and p["w"]:
            if kind == "input_buffer":
                out.append(("input_writable", "high", "input buffer is writable (design: read-only)"))
            elif kind in KERNEL_DATA:
                out.append(("kernel_data_writable", "high" if p["u"] else "medium",
                            f"kernel {kind.replace('_', ' ')} is writable from the sandbox"))
            else:
                out.append(("writable", "medium", f"{kind} is writable (design: read-only)"))
        elif ew is True and not p["w"]:
            out.append(("readonly", "low", f"{kind} is read-only (design: writable)"))
        if ex is False and p["x"]:
            out.append(("executable", "high" if p["u"] else "medium",
                        f"{kind.replace('_', ' ')} is executable (design: NX)"))
        elif ex is True and not p["x"]:
            out.append(("not_executable", "low", f"{kind} is NX (design: executable)"))
    if kind == "unknown" and p["w"] and p["u"]:
        # (issue 15) an in-place writable map (sbm_map_writable) of memory
        # that is not page-aligned exposes the neighbours on its pages
        out.append(("writable_unexplained", "high",
                    "writable from the sandbox, not a buffer copy or the sandbox stack: an in-place "
                    "writable map? (page-granular: its neighbours on those pages are writable too)"))
    if r["global"]:
        if kind == "state_page":
            out.append(("state_page_global", "high",
                        "global bit on the state page: a stale TLB entry would make the kernel read "
                        "the sandbox's state at x86_sbm_state"))
        elif p["u"]:
            out.append(("global", "medium", "global user-accessible sandbox PTE: the translation "
                        "outlives the sandbox CR3 in the TLB and stays reachable at CPL 3 "
                        "after the switch back"))
        else:  # the design's concern is user access; the consistency rule checks the frame
            out.append(("global_supervisor", "info", "global supervisor-only sandbox PTE (a stale "
                        "TLB entry is reachable only at CPL 0, where the kernel maps the same "
                        "page: see the consistency rule)"))
    return out


#: Regions whose sandbox pages are the instance's own (not the kernel's page
#: at that VA): the consistency rule skips them.
PRIVATE = {"sandbox_stack", "exception_stack", "state_page", "input_buffer", "output_buffer",
           "io_buffer"}
MAX_CONSISTENCY_PAGES = 65536


def consistency(kernel, sandbox_root: int, ranges: list[dict],
                max_pages: int = MAX_CONSISTENCY_PAGES) -> list[dict]:
    """The design's sandbox table reuses kernel VAs: every sandbox translation
    of a non-private region must map the physical page the kernel's own table
    maps there.  Findings: ``not_mapped_by_kernel`` (a VA the kernel does not
    map, e.g. an unused IST stack or a guard page), ``pa_zero`` (a mapping onto
    physical page 0, any region: also reported with ``not_mapped_by_kernel``
    when the kernel does not map the VA), ``pa_differs``.  Bounded to
    *max_pages* pages."""
    agg: dict[tuple, dict] = {}
    budget = max_pages

    def add(rule, sev, msg, r, va):
        f = agg.get((rule, r["kind"]))
        if f is None:
            f = agg[(rule, r["kind"])] = {"rule": rule, "severity": sev, "region": r["kind"],
                                          "message": msg, "ranges": [], "pages": 0}
        last = f["ranges"][-1] if f["ranges"] else None
        if last and last["end"] == va:
            last["end"] = va + PAGE
        else:
            f["ranges"].append({"va": va, "end": va + PAGE, "perms": perm_str(r["perms"]),
                                "global": r["global"], "name": r["name"]})
        f["pages"] += 1

    for r in ranges:
        for va in range(r["va"], r["end"], PAGE):
            if budget <= 0:
                break
            budget -= 1
            spa = kernel.translate(sandbox_root, va).pa
            if spa is None:
                continue
            if spa >> 12 == 0:
                add("pa_zero", "high", "mapped onto physical page 0 (slow_virt_to_phys() of a "
                    "non-present kernel PTE gives PFN 0)", r, va)
            if r["kind"] in PRIVATE:
                continue
            ktr = kernel.translate(kernel.root, va)
            kpa = ktr.pa
            if kpa is None and "not readable" in (ktr.fault or ""):
                add("consistency_unreadable", "info", "the kernel's table could not be read here "
                    "(a partial memory image): not compared", r, va)
            elif kpa is None:
                add("not_mapped_by_kernel", "high", "the sandbox maps a VA the kernel's own table "
                    "does not map", r, va)
            elif kpa >> 12 != spa >> 12 and spa >> 12:
                add("pa_differs", "high", "the sandbox maps another physical page than the "
                    "kernel's own table at this VA", r, va)
    out = list(agg.values())
    if budget <= 0:
        out.append({"rule": "consistency_truncated", "severity": "low", "region": None,
                    "message": f"consistency checked on the first {max_pages} pages only",
                    "ranges": [], "pages": 0})
    return out


#: Regions that are one object the design exposes (not a section or a stack
#: of fixed size): a mapping past their pages is the object over-mapped.
OBJECTS = ("task_struct", "input_buffer", "output_buffer", "io_buffer")
MAX_OVERRUN_PAGES = 4096


def _object_label(reg: dict) -> str:
    if reg["kind"] == "task_struct":
        return f"{reg['name']} ({reg.get('size_source', 'size')}={reg.get('size')})"
    return f"{reg['name']} of {reg.get('size')} bytes"


def out_of_object(ranges: list[dict], regions: list[dict],
                  max_pages: int = MAX_OVERRUN_PAGES) -> list[dict]:
    """Mappings that exceed the object they expose: sandbox pages that no
    region explains ("unknown"), contiguous with an object's pages (the
    task_struct of the task in the sandbox, each buffer copy) before its first
    or after its last page.  The design maps an object at page granularity:
    its first and last pages are its own; a page past them is the object
    over-mapped (v1 maps sizeof(struct task_struct) from ``current``; the
    allocation is arch_task_struct_size).  Severity high if a page is writable,
    else medium.  Also, for the task_struct (a slab object), an ``info``
    finding for the bytes of its first and last pages outside the object
    (other objects of its slab page, visible through the page granularity).
    *ranges* are the labeled ranges (sorted by VA), *regions* the design's
    regions with their exact bounds (sbmdbg.sbm.regions)."""
    rs = sorted(ranges, key=lambda r: r["va"])
    starts = [r["va"] for r in rs]
    out = []

    def covering(va):
        i = bisect.bisect_right(starts, va) - 1
        return rs[i] if i >= 0 and va < rs[i]["end"] else None

    for reg in regions:
        if reg["kind"] not in OBJECTS:
            continue
        over = []       # (va, range) of each over-mapped page, ascending
        for step, va0 in ((PAGE, reg["end"]), (-PAGE, reg["start"] - PAGE)):
            va, n = va0, 0
            while n < max_pages and 0 <= va < 1 << 64:
                r = covering(va)
                if r is None or r["kind"] != "unknown":
                    break
                over.append((va, r))
                va += step
                n += 1
        label = _object_label(reg)
        if over:
            over.sort(key=lambda x: x[0])
            writable = any(r["perms"]["w"] for _, r in over)
            past = [va for va, _ in over if va >= reg["end"]]
            before = [va for va, _ in over if va < reg["start"]]
            where = []
            if past:
                end = past[-1] + PAGE
                where.append(f"{len(past)} page(s) past its last page, up to {end:#x} "
                             f"({end - reg['exact_end']} bytes past its end at {reg['exact_end']:#x})")
            if before:
                where.append(f"{len(before)} page(s) before its first page")
            f = {"rule": "out_of_object", "severity": "high" if writable else "medium",
                 "region": reg["kind"], "object": label, "object_start": reg["exact_start"],
                 "object_end": reg["exact_end"], "object_size": reg.get("size"),
                 "size_source": reg.get("size_source"),
                 "message": f"{label} mapped beyond the object: {'; '.join(where)}"
                            f"{' (writable)' if writable else ''}",
                 "ranges": [], "pages": len(over)}
            for va, r in over:
                last = f["ranges"][-1] if f["ranges"] else None
                if last and last["end"] == va and last["perms"] == perm_str(r["perms"]):
                    last["end"] = va + PAGE
                else:
                    f["ranges"].append({"va": va, "end": va + PAGE, "perms": perm_str(r["perms"]),
                                        "global": r["global"], "name": f"past {label}"})
            out.append(f)
        if reg["kind"] == "task_struct":
            head = reg["exact_start"] - reg["start"] if covering(reg["start"]) else 0
            tail = reg["end"] - reg["exact_end"] if covering(reg["end"] - PAGE) else 0
            if head or tail:
                out.append({"rule": "object_page_neighbours", "severity": "info", "region": reg["kind"],
                            "object": label, "message": f"{label}: its pages also show {head} bytes "
                            f"before and {tail} bytes after the object (other objects of its slab page; "
                            "the design maps at page granularity)", "ranges": [], "pages": 0})
    return out


def audit_ranges(ranges: list[dict], state_view: dict | None = None, sbm: dict | None = None) -> list[dict]:
    """Findings, one per (rule, region kind), with the ranges they cover."""
    agg: dict[tuple, dict] = {}
    for r in ranges:
        for rule, sev, msg in _rules_for(r):
            key = (rule, r["kind"])
            f = agg.get(key)
            if f is None:
                f = agg[key] = {"rule": rule, "severity": sev, "region": r["kind"], "message": msg,
                                "ranges": [], "pages": 0}
            f["ranges"].append({"va": r["va"], "end": r["end"], "perms": perm_str(r["perms"]),
                                "global": r["global"], "name": r["name"]})
            f["pages"] += r["pages"]
            if severity_rank(sev) > severity_rank(f["severity"]):
                f["severity"] = sev
    out = list(agg.values())
    if state_view is not None:
        if not state_view.get("sandbox_maps_state_page"):
            out.append({"rule": "state_page_missing", "severity": "high", "region": "state_page",
                        "message": "x86_sbm_state is not mapped onto the instance's state page "
                                   "(the entry code could not tell it came from the sandbox)",
                        "ranges": [], "pages": 0})
        if not state_view.get("kernel_reads_zero"):
            out.append({"rule": "kernel_state_nonzero", "severity": "medium", "region": "state_page",
                        "message": "x86_sbm_state reads non-zero under the kernel root",
                        "ranges": [], "pages": 0})
    if sbm and sbm.get("error"):
        out.append({"rule": "sbm_error", "severity": "info", "region": None,
                    "message": f"sbm->error = {sbm['error']} (sticky: the instance was aborted)",
                    "ranges": [], "pages": 0})
    total = sum(r["pages"] for r in ranges)
    kinds = sorted({r["kind"] for r in ranges})
    out.append({"rule": "summary", "severity": "info", "region": None,
                "message": f"{total} pages mapped in {len(ranges)} labeled ranges ({', '.join(kinds)})",
                "ranges": [], "pages": total})
    out.sort(key=lambda f: (-severity_rank(f["severity"]), f["rule"]))
    return out


def worst(findings: list[dict]) -> str:
    return max((f["severity"] for f in findings), key=severity_rank, default="info")


# ---------------------------------------------------------------- diff
def _perms(mp) -> dict:
    return {"u": mp.perms.u, "w": mp.perms.w, "x": mp.perms.x, "g": mp.g}


def diff_mappings(a: list, b: list) -> dict:
    """Sweep two sorted mapping lists (sbmdbg.x86.paging.Mapping): ranges only
    A maps, only B maps, and both map with different permissions or frames."""
    bounds = sorted({x for mp in a for x in (mp.va, mp.end)} | {x for mp in b for x in (mp.va, mp.end)})
    ia = ib = 0
    out = {"only_a": [], "only_b": [], "perms_differ": [], "pa_differ": [], "same": 0}

    def add(lst, va, end, extra):
        last = lst[-1] if lst else None
        if last and last["end"] == va and {k: v for k, v in last.items() if k not in ("va", "end")} == extra:
            last["end"] = end
        else:
            lst.append({"va": va, "end": end, **extra})

    for lo, hi in zip(bounds, bounds[1:]):
        while ia < len(a) and a[ia].end <= lo:
            ia += 1
        while ib < len(b) and b[ib].end <= lo:
            ib += 1
        ma = a[ia] if ia < len(a) and a[ia].va <= lo else None
        mb = b[ib] if ib < len(b) and b[ib].va <= lo else None
        if ma is None and mb is None:
            continue
        if mb is None:
            add(out["only_a"], lo, hi, {"perms": _pstr(ma)})
        elif ma is None:
            add(out["only_b"], lo, hi, {"perms": _pstr(mb)})
        elif _perms(ma) != _perms(mb):
            add(out["perms_differ"], lo, hi, {"a": _pstr(ma), "b": _pstr(mb)})
        elif ma.pa + (lo - ma.va) != mb.pa + (lo - mb.va):
            add(out["pa_differ"], lo, hi, {"perms": _pstr(ma)})
        else:
            out["same"] += hi - lo
    return out


def _pstr(mp) -> str:
    return str(mp.perms) + (" G" if mp.g else "")


def diff_roots(kernel, root_a: int, root_b: int, rng: tuple[int, int] | None = None) -> dict:
    ma, wa = kernel.walk(root_a, range=rng)
    mb, wb = kernel.walk(root_b, range=rng)
    d = diff_mappings(ma, mb)
    d["findings_a"] = [f.to_json() for f in wa.findings]
    d["findings_b"] = [f.to_json() for f in wb.findings]
    return d


__all__ = ["audit_ranges", "consistency", "out_of_object", "diff_mappings", "diff_roots", "worst", "severity_rank", "SEVERITIES", "PAGE"]
