"""Rich renderables of a dashboard snapshot (``Backend.snapshot()``), shared
by the Textual app and the one-frame (``--once``/``--svg``) output.

Guest strings (task comm, symbols, console text, region names) only ever go
into ``rich.text.Text`` objects, never through markup, so a task named
``[red]x`` prints as those characters."""
from __future__ import annotations

from rich.console import Group
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

MODE_STYLE = {"kernel": "green", "user": "cyan", "sandbox": "bold magenta", "transition": "bold yellow",
              "sandbox (in kernel handler)": "magenta"}
SEV_STYLE = {"critical": "bold red", "high": "red", "medium": "yellow", "low": "cyan", "info": "dim"}
KIND_STYLE = {"enter": "bold green", "return": "green", "exit": "dim green", "abort": "bold red",
              "irq": "yellow", "nmi": "bold yellow", "irq_return": "dim yellow", "spurious": "magenta",
              "call": "cyan", "arch_call": "dim cyan", "error": "red", "trace_start": "dim",
              "trace_stop": "dim"}


def T(v, style: str = "") -> Text:
    return Text("-" if v is None else str(v), style=style, no_wrap=True, overflow="ellipsis")


def F(v, style: str = "") -> Text:
    """A value that wraps (folds) in a narrow column instead of losing its end."""
    return Text("-" if v is None else str(v), style=style, overflow="fold")


def hx(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else ("-" if v is None else str(v))


def short_stack(st: dict | None) -> str:
    if not st:
        return "?"
    kind = st.get("kind", "?")
    name = {"task_stack": "task", "irq_stack": "irq", "entry_stack": "entry", "ist_stack": "IST",
            "ist_guard": "IST guard", "sbm_sandbox_stack": "sandbox", "sbm_exception_stack": "SBM exc",
            "unknown": "unknown"}.get(kind, kind)
    if "offset_from_top" in st:
        name += f" (top-{st['offset_from_top']:#x})"
    return name


def preempt_str(pc) -> str:
    """pcpu_hot.preempt_count: x86 keeps PREEMPT_NEED_RESCHED inverted in bit 31."""
    if pc is None:
        return "?"
    count = pc & 0x7FFFFFFF
    s = f"{count:#x}"
    if not pc >> 31:
        s += " resched"
    return s


# ---------------------------------------------------------------- header
def header(snap: dict) -> Text:
    t = Text()
    t.append(" sbmdbg dashboard ", "bold reverse")
    t.append(" ")
    if snap.get("running"):
        t.append("RUNNING", "bold green")
    else:
        t.append("PAUSED", "bold yellow reverse")
    t.append("  trace ")
    t.append("ON" if snap.get("tracing") else "off", "bold red" if snap.get("tracing") else "dim")
    t.append(f"  vCPU {snap.get('selected', 0)}  ")
    tm = snap.get("timing_ms") or {}
    if "total" in tm:
        t.append(f"refresh {tm['total']:.0f} ms  ", "dim")
    t.append(str(snap.get("label") or ""), "dim")
    return t


# ---------------------------------------------------------------- vCPUs
VCPU_ROWS = ("mode", "CPL", "CR3 role", "RIP", "task", "preempt", "rsp on", "top_of_stack", "top_of_intr")


def vcpu_panel(snap: dict) -> Table | Text:
    cpus = snap.get("cpus") or []
    if not cpus:
        return Text(f"no vCPU data: {snap.get('cpus_error', '?')}", style="red")
    sel = snap.get("selected", 0)
    t = Table(box=None, pad_edge=False, padding=(0, 1), expand=True, show_edge=False)
    t.add_column("", style="bold", no_wrap=True, width=12)
    for r in cpus:
        t.add_column(Text(f"{'▶ ' if r['cpu'] == sel else ''}vCPU {r['cpu']}",
                          style="bold reverse" if r["cpu"] == sel else "bold"), ratio=1)
    cols = []
    for r in cpus:
        task = r.get("task") or {}
        sym = (r.get("rip_symbol") or {}).get("text")
        mode = r.get("mode", "?")
        intr = r.get("top_of_intr_stack")
        tos = r.get("top_of_stack")
        cols.append([
            T(mode, MODE_STYLE.get(mode, "")),
            T(r.get("cpl")),
            T(r.get("cr3_role"), "magenta" if str(r.get("cr3_role", "")).startswith("sandbox") else ""),
            F(sym or hx(r.get("rip"))),
            F(f"{task.get('pid')} {task.get('comm')}" if "pid" in task else task.get("error", "?")),
            F(preempt_str(r.get("preempt_count"))),
            F(short_stack(r.get("stack"))),
            F(hx(tos)),
            F(hx(intr) + (" SBM" if intr is not None and tos is not None and intr != tos else ""),
              "magenta" if intr is not None and intr != tos else ""),
        ])
    for i, name in enumerate(VCPU_ROWS):
        t.add_row(name, *[c[i] for c in cols])
    # issue 15: a GS/FS base or PKRU that is not what the kernel expects in a sandbox
    flags = [T(f"vCPU {r['cpu']}: {e}", "bold red") for r in cpus for e in r.get("attack_evidence") or ()]
    bt = snap.get("backtrace")
    if not bt:
        return Group(t, *flags) if flags else t
    lines = [t, *flags, Text(f"backtrace of vCPU {sel}:", style="bold")]
    if "error" in bt:
        lines.append(T(bt["error"], "red"))
    for f in (bt.get("frames") or [])[:8]:
        if "pc" in f:
            lines.append(T(f"  {f['pc']:#x} {f.get('symbol') or '?'} [{f.get('context')}]"))
        else:
            lines.append(T(f"  {f.get('symbol', '')}", "dim"))
    return Group(*lines)


# ---------------------------------------------------------------- sandboxes
def sandbox_panel(snap: dict) -> Group:
    sbs = snap.get("sandboxes") or []
    out: list = []
    if snap.get("sbm") is False:
        out.append(T(snap.get("note") or "no SandBox Mode in this kernel", "red"))
    if not sbs:
        out.append(Text("no active sandbox", style="dim"))
        out.append(Text("(a sandbox exists only while a task runs sbm_exec: pause inside one, "
                        "or trace it)", style="dim"))
    for s in sbs:
        if "error" in s and "label" not in s:
            out.append(T(s["error"], "red"))
            continue
        f = s.get("fields") or {}
        sbm = s.get("sbm") or {}
        line = Text()
        line.append(str(s.get("label")), "bold magenta")
        line.append(f" state {hx(s.get('state'))} task ")
        line.append(f"{s.get('pid')} {s.get('comm')}")
        line.append(f" cpu {','.join(map(str, s.get('cpus') or [])) or '-'}")
        err = sbm.get("error")
        line.append(f" error={err}", "bold red" if err else "green")
        out.append(line)
        out.append(T(f"  sbm_cr3 {hx(f.get('sbm_cr3'))} stack {hx(f.get('stack'))} exc {hx(f.get('exc_stack'))}",
                     "dim"))
        for b in sbm.get("buffers") or []:
            out.append(T(f"  {b.get('direction', '?'):6} buf {hx(b.get('sbm_ptr'))} size {hx(b.get('size'))}"))
        if s.get("pt_error"):
            out.append(T(f"  page table: {s['pt_error']}", "red"))
        if s.get("audit"):
            w = s.get("audit_worst", "info")
            out.append(Text.assemble(("audit: worst ", "bold"), (w, SEV_STYLE.get(w, ""))))
            for a in s["audit"]:
                if a["rule"] == "summary":
                    continue
                out.append(Text.assemble(("  " + a["severity"].ljust(8), SEV_STYLE.get(a["severity"], "")),
                                         (f" {a['rule']}: {a['message']}", "")))
        if s.get("pt_summary"):
            out.append(Text("page table (region perms pages):", style="bold"))
            pt = Text(overflow="fold")
            for i, r in enumerate(s["pt_summary"]):
                if i:
                    pt.append(" · ", "dim")
                pt.append(str(r["kind"]), "bold" if r["kind"].endswith("buffer") or "sandbox" in r["kind"] else "")
                pt.append(f" {r['perms'].replace(' user', ' U').replace(' supv', ' S')}{' G' if r['global'] else ''}"
                          f" {r['pages']}", "dim")
            out.append(pt)
    return Group(*out)


# ---------------------------------------------------------------- transitions
def event_line(ev: dict) -> str:
    try:
        from sbmdbg.trace.export import summary_line
        return summary_line(ev)
    except Exception:  # noqa: BLE001 - a malformed event must not break the panel
        return str(ev.get("kind"))


def trace_panel(snap: dict, max_events: int = 12) -> Group:
    tr = snap.get("trace") or {}
    out: list = []
    if not snap.get("tracing") and not tr.get("events"):
        out.append(Text("tracer off (t to start)", style="dim"))
        return Group(*out)
    counts = tr.get("counts") or {}
    head = Text()
    head.append(f"{tr.get('events', 0)} events  ")
    for k in ("enter", "return", "abort", "irq"):
        head.append(f"{k} {counts.get(k, 0)}  ", KIND_STYLE.get(k, ""))
    out.append(head)
    rates = tr.get("per_second") or {}
    out.append(T("per s (last {:.0f} s): ".format(tr.get("window_s", 5)) +
                 (", ".join(f"{k} {v:g}" for k, v in rates.items()) or "-"), "dim"))
    ab = tr.get("aborts_by_reason") or {}
    if ab:
        out.append(Text("aborts by reason:", style="bold red"))
        for reason, n in list(ab.items())[:5]:
            out.append(T(f"  {n:3} x {reason}", "red"))
    evs = [e for e in tr.get("last") or [] if e.get("kind") not in ("trace_start",)]
    whys = tr.get("why") or {}   # seq -> the one-line `sbm why` of an abort
    rows: list = []   # the newest events (each abort with its why line) in max_events rows
    for ev in reversed(evs):
        k = ev.get("kind")
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{ev.get('seq', ''):>5} ", "dim")
        line.append(f"cpu{ev.get('vcpu', '-')} ", "dim")
        line.append(event_line(ev), KIND_STYLE.get(k, ""))
        why = whys.get(str(ev.get("seq"))) if k == "abort" else None
        block = [line] + ([Text.assemble(("      why: ", "bold red"), (str(why), "red"), no_wrap=True,
                                         overflow="ellipsis")] if why else [])
        if len(rows) + len(block) > max_events:
            break
        rows[:0] = block
    out.extend(rows)
    return Group(*out)


# ---------------------------------------------------------------- console
def console_panel(snap: dict, lines: int = 12, width: int | None = None) -> Text:
    """The last lines of the console that fit ``lines`` rows of ``width`` columns."""
    body = snap.get("console") or []
    keep: list[str] = []
    rows = 0
    for ln in reversed(body):
        need = max(1, -(-len(ln) // width)) if width else 1
        if rows + need > lines and keep:
            break
        keep.append(ln)
        rows += need
    t = Text(no_wrap=False, overflow="fold")
    t.append("\n".join(reversed(keep)))
    return t


def messages_text(snap: dict) -> Text:
    t = Text(style="dim", no_wrap=True, overflow="ellipsis")
    msgs = snap.get("messages") or []
    if msgs:
        ts, m = msgs[-1]
        t.append(f"{ts} {m}")
    return t


KEYS = "space pause/continue · s stepi · v/0-9 vCPU · t trace · d demo · c console · q quit"


# ---------------------------------------------------------------- one frame
def frame(snap: dict, width: int = 120, height: int = 40) -> Layout:
    """The whole dashboard as one rich Layout (for --once and --svg)."""
    lay = Layout()
    lay.split_column(Layout(header(snap), name="header", size=1),
                     Layout(name="top"), Layout(name="bottom"),
                     Layout(Text(KEYS, style="dim", no_wrap=True, overflow="ellipsis"), size=1))
    body_rows = height - 2
    top_h = max(11, body_rows // 2 + 1)
    lay["top"].size = top_h
    lay["top"].split_row(
        Layout(Panel(vcpu_panel(snap), title="vCPUs", title_align="left"), ratio=1),
        Layout(Panel(sandbox_panel(snap), title="sandboxes", title_align="left"), ratio=1))
    lay["bottom"].split_row(
        Layout(Panel(trace_panel(snap, max(2, body_rows - top_h - 8)), title="transitions",
                     title_align="left"), ratio=1),
        Layout(Panel(console_panel(snap, max(2, body_rows - top_h - 2), width // 2 - 4), title="console",
                     title_align="left"), ratio=1))
    return lay
