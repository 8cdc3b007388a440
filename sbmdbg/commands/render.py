"""The render half of the command table: ``(data) -> [renderable]`` for the
dict a command computed, the same text in gdb and ``sbmdbg inspect``.  A
renderable is a rich object, a markup string, or ``Plain`` text (printed as
is: no markup, no wrapping; the cheap path of ``sbm vtop``).  Guest strings
(comm, symbols) are escaped before markup."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from sbmdbg.x86 import paging as pg
from sbmdbg.x86.paging import RENDER_MAX_ROWS, truncated_line


class Plain(str):
    """Text printed verbatim by the faces (not parsed as rich markup)."""


def _h(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else ("-" if v is None else escape(str(v)))


def _task(t: dict | None) -> str:
    if not t or "pid" not in t:
        return "?"
    return f"{t.get('pid')} {escape(str(t.get('comm')))}"


def status(d: dict) -> list:
    out = []
    if not d["sbm"]:
        out.append(escape(d["note"]))
    t = Table(title="vCPUs", title_justify="left")
    for c in ("cpu", "mode", "CPL", "CR3", "CR3 role", "RIP", "task", "stack", "sandbox"):
        t.add_column(c, no_wrap=c not in ("RIP", "stack"))
    for r in d["cpus"]:
        sym = (r.get("rip_symbol") or {}).get("text")
        st = r.get("stack") or {}
        t.add_row(str(r["cpu"]), escape(r["mode"]), str(r["cpl"]), _h(r["cr3"]), escape(r["cr3_role"]),
                  f"{r['rip']:#x} {escape(sym) if sym else ''}", _task(r.get("task")),
                  escape(st.get("name", "?")), escape(r.get("sandbox") or "-"))
    out.append(t)
    for r in d["cpus"]:
        for e in r.get("attack_evidence") or ():
            out.append(f"[bold red]cpu {r['cpu']}: {escape(e)}[/]")
    return out


def sandbox_list(d: dict) -> list:
    t = Table(title=f"{len(d['sandboxes'])} active sandbox(es)", title_justify="left")
    for c in ("#", "label", "state", "task", "cpus", "sbm_cr3", "stack", "exc_stack", "error", "buffers"):
        t.add_column(c)
    for s in d["sandboxes"]:
        f = s["fields"]
        t.add_row(str(s["index"]), escape(s["label"]), _h(s["state"]), f"{s['pid']} {escape(s['comm'])}",
                  ",".join(map(str, s["cpus"])) or "-", _h(f.get("sbm_cr3")), _h(f.get("stack")),
                  _h(f.get("exc_stack")), str(s["sbm"].get("error", "?")), str(len(s["sbm"].get("buffers", []))))
    return [t]


def show(d: dict) -> list:
    out = []
    for s in d["sandboxes"]:
        out.append(f"[bold]{escape(s['label'])}[/bold]  state {s['state']:#x} (pa {_h(s['state_pa'])})  "
                   f"task {s['pid']} {escape(s['comm'])}  on cpu {','.join(map(str, s['cpus'])) or '-'}")
        t = Table(title="struct x86_sbm_state", title_justify="left")
        t.add_column("field")
        t.add_column("value")
        for k, v in s["fields"].items():
            t.add_row(k, _h(v))
        out.append(t)
        sbm = s["sbm"]
        out.append(f"struct sbm at {_h(sbm.get('address'))}: error={sbm.get('error')} private={_h(sbm.get('private'))}")
        if sbm.get("buffers"):
            bt = Table(title="buffers", title_justify="left")
            for c in ("direction", "kern_ptr", "sbm_ptr", "size"):
                bt.add_column(c)
            for b in sbm["buffers"]:
                bt.add_row(b.get("direction", "?"), _h(b.get("kern_ptr")), _h(b.get("sbm_ptr")), _h(b.get("size")))
            out.append(bt)
        for e in s.get("errors", []):
            out.append(f"[red]warning:[/red] {escape(e)}")
        sp = s["state_page"]
        st = Table(title=f"x86_sbm_state at {sp['va']:#x}, read through both roots", title_justify="left")
        st.add_column("field")
        st.add_column("via sandbox root (= the state page)")
        st.add_column("via kernel root (kernel's .bss)")
        sv, kv = sp["sandbox_root"], sp["kernel_root"]
        st.add_row("pa", _h(sv.get("pa")), _h(kv.get("pa")))
        for k in (sv.get("fields") or kv.get("fields") or {}):
            st.add_row(k, _h((sv.get("fields") or {}).get(k)), _h((kv.get("fields") or {}).get(k)))
        out.append(st)
        out.append(f"sandbox maps the state page: {sp['sandbox_maps_state_page']}; "
                   f"kernel reads zeros: {sp['kernel_reads_zero']}")
        if s.get("map") is not None:
            mt = Table(title=f"sandbox page table {s['fields'].get('sbm_cr3', 0):#x}, labeled", title_justify="left")
            for c in ("va", "end", "pages", "perms", "G", "region"):
                mt.add_column(c)
            for r in s["map"][:RENDER_MAX_ROWS]:
                p = r["perms"]
                mt.add_row(f"{r['va']:#x}", f"{r['end']:#x}", str(r["pages"]),
                           "r" + ("w" if p["w"] else "-") + ("x" if p["x"] else "-") + (" user" if p["u"] else " supv"),
                           "G" if r["global"] else "", escape(r["name"]))
            out.append(mt)
            mw = s.get("map_walk") or {}
            more = max(0, len(s["map"]) - RENDER_MAX_ROWS) + mw.get("more_ranges", 0)
            line = truncated_line(more, bool(mw.get("truncated")) or more > 0)
            if line:
                out.append(line)
    return out


def stack(d: dict) -> list:
    out = []
    for c in d["cpus"]:
        cls = c["rsp_class"]
        out.append(f"[bold]cpu {c['cpu']}[/bold] ({escape(c['mode'])}): rsp {c['rsp']:#x} on "
                   f"{escape(cls.get('name', '?'))}"
                   + (f" ({cls['offset_from_top']:#x} below its top)" if "offset_from_top" in cls else ""))
        out.append(f"  top_of_stack {c['top_of_stack']:#x}   top_of_intr_stack {c['top_of_intr_stack']:#x}"
                   + ("  (SBM exception stack)" if c["intr_stack_is_sbm"] else ""))
        pr = c.get("exc_pt_regs")
        if pr:
            if "regs" in pr:
                r = pr["regs"]
                out.append(f"  pt_regs at {pr['address']:#x} (top {pr['top']:#x}): cs={r.get('cs', 0):#x} "
                           f"[{escape(pr['cs_meaning'])}] ip={r.get('ip', 0):#x} {escape(pr.get('ip_symbol') or '')} "
                           f"sp={r.get('sp', 0):#x} flags={r.get('flags', 0):#x}")
            else:
                out.append(f"  pt_regs at {pr['address']:#x}: {escape(pr.get('error', ''))}")
            if pr.get("stack") == "entry_stack":
                out.append("  (the handler runs on the entry stack: pt_regs where the CPU pushed it)")
            if "kernel_rsp" in pr:
                out.append(f"  kernel rsp at \\[exc_top-{pr['exc_top'] - pr['kernel_rsp_slot']}] "
                           f"{pr['kernel_rsp_slot']:#x}: {pr['kernel_rsp']:#x}"
                           + (" (= state->return_sp)" if pr.get("kernel_rsp_is_return_sp") else ""))
        bt = c["backtrace"]
        i = 0
        for f in bt["frames"]:
            if "pc" in f:
                i += 1
                out.append(f"  #{i - 1:<2} {f['pc']:#018x} {escape(f.get('symbol') or '?'):40} [{f['context']}, {escape(f['root'])} root]")
            else:
                out.append(f"  {escape(f.get('symbol', ''))}")
        for n in bt["notes"]:
            out.append(f"  ({escape(n)})")
    return out


SEV_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}


def audit(d: dict) -> list:
    out = []
    for a in d["audits"]:
        out.append(f"[bold]audit of {escape(a['sandbox'])}[/bold] (root {a['root']:#x}): worst = {a['worst']}")
        for f in a["findings"]:
            sty = SEV_STYLE.get(f["severity"], "")
            out.append(f"  [{sty}]{f['severity']:8}[/{sty}] {escape(f['rule'])}: {escape(f['message'])}"
                       + (f" ({f['pages']} pages)" if f["ranges"] else ""))
            for r in f["ranges"][:8]:
                out.append(f"           {r['va']:#x}-{r['end']:#x} {r['perms']} {escape(r['name'])}")
            if len(f["ranges"]) > 8:
                out.append(f"           ... {len(f['ranges']) - 8} more ranges")
    return out


def diff(d: dict) -> list:
    out = [f"A = {escape(d['root_a']['label'])} {d['root_a']['pgd']:#x}, "
           f"B = {escape(d['root_b']['label'])} {d['root_b']['pgd']:#x}; identical: {d['same']:#x} bytes"]
    for key, title in (("only_a", "only in A"), ("only_b", "only in B"), ("perms_differ", "permissions differ"),
                       ("pa_differ", "different frames")):
        rows = d[key]
        out.append(f"[bold]{title}[/bold]: {len(rows)} ranges")
        for r in rows[:200]:
            extra = f"A {r['a']} / B {r['b']}" if "a" in r else r.get("perms", "")
            out.append(f"  {r['va']:#x}-{r['end']:#x} {escape(extra)}")
        if len(rows) > 200:
            out.append(f"  ... {len(rows) - 200} more")
    return out


def _perm(p: dict | None) -> str:
    if p is None:
        return "-"
    return "r" + ("w" if p["w"] else "-") + ("x" if p["x"] else "-") + (" user" if p["u"] else " supv")


def _size(n: int) -> str:
    for unit, sh in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << sh and n % (1 << sh) == 0:
            return f"{n >> sh}{unit}"
    return str(n)


def pcpu(d: dict) -> list:
    rows = d["cpus"]
    t = Table(title=f"{d.get('layout_description', 'pcpu_hot')}, kernel root {d['root']:#x}",
              title_justify="left")
    t.add_column("field")
    for r in rows:
        t.add_column(f"cpu {r['cpu']}", no_wrap=True)
    names: list = []
    for r in rows:
        names += [n for n in r["fields"] if n not in names]

    t.add_row("vCPU mode", *[escape(str(r["vcpu"].get("mode") or "?")) for r in rows])
    for name in names:
        vals = []
        for r in rows:
            v = r["fields"].get(name)
            if isinstance(v, bool):
                vals.append(str(int(v)))
            elif name == "preempt_count" and isinstance(v, int):
                vals.append(f"{v & 0xFFFFFFFF:#x}")
            elif isinstance(v, int) and abs(v) < 4096:
                vals.append(str(v))
            else:
                vals.append(f"{v & ((1 << 64) - 1):#x}" if isinstance(v, int) else escape(str(v)))
        t.add_row(name, *vals)
        if name == "current_task":
            t.add_row("  pid", *[str((r.get("current") or {}).get("pid", "?")) for r in rows])
            t.add_row("  comm", *[escape(str((r.get("current") or {}).get("comm", "?"))) for r in rows])
    return [t]


def vtop(d: dict) -> list:
    """Plain text, not a rich Table: rendering one costs ~3 ms, more than the
    translation (nothing here comes from guest strings)."""
    rows = [("level", "idx", "entry @pa", "value", "flags", "next / frame")]
    for j in d["entries"]:
        e = pg.Entry(j["level"], j["index"], j["entry_pa"], j["raw"])
        flags = e.flags_str() if e.present else "not present"
        if e.leaf and e.present:
            flags += f" pkey={e.pkey} pat={e.cache_index}"
        if j.get("reserved_bits"):
            flags += f" RSVD={j['reserved_bits']:#x}"
        rows.append((e.name, str(e.index), f"{e.entry_pa:#x}", f"{e.raw:#018x}", flags,
                     f"{j['target']:#x}" if e.present else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{d['va']:#x} via {d['root_label']} root {d['root']:#x} ({d['levels']}-level)"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if d["pa"] is not None:
        lines.append(f"pa = {d['pa']:#x}  ({_size(d['page_size'])} page, {_perm(d['perms'])}, "
                     f"global={d['global']})")
    else:
        lines.append(f"no translation: {d['fault']}")
    return [Plain("\n".join(lines))]


def pt(d: dict) -> list:
    maps = d["mappings"]
    t = Table(title=f"{escape(d['root_label'])} root {d['root']:#x}: {len(maps)} ranges", title_justify="left")
    for col in ("va", "end", "pa", "size", "page", "perms", "G", "pat", "pkey"):
        t.add_column(col)
    for mp in maps[:RENDER_MAX_ROWS]:
        t.add_row(f"{mp['va']:#x}", f"{mp['end']:#x}", f"{mp['pa']:#x}", _size(mp["size"]), _size(mp["page_size"]),
                  _perm(mp["perms"]), "G" if mp["global"] else "", str(mp["cache_index"]), str(mp["pkey"]))
    more = max(0, len(maps) - RENDER_MAX_ROWS) + d.get("more_ranges", 0)
    line = truncated_line(more, bool(d.get("truncated")) or more > 0)
    return [t] + ([line] if line else []) + \
        [f"finding: {escape(f['kind'])}: {escape(f['message'])}" for f in d["findings"][:20]]


def ptov(d: dict) -> list:
    if not d["vas"]:
        return [f"{d['pa']:#x} is not mapped under the {escape(d['root_label'])} root"]
    return [f"{v['va']:#x}  {_perm(v['perms'])}  {_size(v['page_size'])}"
            + (f" <{escape(v['symbol'])}>" if v.get("symbol") else "") for v in d["vas"]]


def memory_line(info: dict) -> str:
    """Where physical memory comes from (``sbm target``, ``sbm kernel``)."""
    if info["memory"] == "shm":
        return f"physical memory: shm {escape(str(info['ram_file']))} ({info['how']})"
    if info["memory"] == "vmcore":
        return f"physical memory: vmcore {escape(str(info['vmcore']))}"
    return f"physical memory: gdbstub physical mode ({info['how']})"


def kernel(d: dict) -> list:
    out = []
    for key, v in d.items():
        if key == "sbm_variant_detail":
            out += [f"{'sbm evidence':18} {escape(e)}" for e in v.get("evidence", [])]
            out += [f"{'sbm not detected':18} {escape(e)}" for e in v.get("errors", [])]
        elif key != "memory":
            out.append(f"{key:18} {v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{key:18} {v}")
    if "memory" in d:
        out.append(f"{'memory':18} " + memory_line(d["memory"]).partition(": ")[2])
    return out
