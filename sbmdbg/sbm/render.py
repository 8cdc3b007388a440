"""Text (rich) renderings of the command dicts, shared by gdb and the CLI.
Guest strings (comm, symbols) are escaped before markup."""
from __future__ import annotations

from rich.markup import escape
from rich.table import Table


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
            for r in s["map"]:
                p = r["perms"]
                mt.add_row(f"{r['va']:#x}", f"{r['end']:#x}", str(r["pages"]),
                           "r" + ("w" if p["w"] else "-") + ("x" if p["x"] else "-") + (" user" if p["u"] else " supv"),
                           "G" if r["global"] else "", escape(r["name"]))
            out.append(mt)
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


RENDER = {"status": status, "list": sandbox_list, "show": show, "stack": stack, "audit": audit, "diff": diff}
