"""``sbm why``: compute and render for the command table (the model is
sbmdbg.sbm.why).  Live: the sandbox's fault comes from handle_sbm_fault's
arguments when a vCPU is stopped there (rdi = pt_regs, rsi = error code,
rdx = address), else from the pt_regs on the sandbox's exception stack and
the vCPU's CR2; --rip/--error-code/--cr2/--vector override."""
from __future__ import annotations

from sbmdbg.errors import SbmdbgError
from sbmdbg.jsonutil import jsonable
from sbmdbg.sbm import model as m
from sbmdbg.sbm import stacks as stk
from sbmdbg.sbm import why as W


def args(p) -> None:
    p.add_argument("sandbox", nargs="?", help="cpuN, pid=N, N or the state address; "
                   "default: the sandbox of a vCPU in its fault path")
    p.add_argument("--rip", help="fault RIP (default: from the fault path)")
    p.add_argument("--cr2", help="faulting address (default: handle_sbm_fault's, else CR2)")
    p.add_argument("--error-code", help="#PF error code")
    p.add_argument("--vector", type=int, help="exception vector (default 14, 13 if address is 0)")


def _num(v):
    if v is None:
        return None
    try:
        return int(str(v), 0)
    except ValueError:
        raise SbmdbgError(f"bad number {v!r}") from None


def sandbox_buffers(sb) -> list[dict]:
    """The sandbox's buffers, numbered per direction in list order."""
    out, count = [], {}
    for b in (sb.sbm or {}).get("buffers", []):
        if b.get("sbm_ptr") is None:
            continue
        d = b.get("direction", "?")
        i = count.get(d, 0)
        count[d] = i + 1
        out.append({"direction": d, "index": i, "sbm_ptr": b["sbm_ptr"], "size": b.get("size") or 0})
    return out


def _fault_from_stop(kernel, sb, cpu: int | None) -> dict:
    f: dict = {}
    pr = stk.pt_regs_on_exc_stack(kernel, sb, cpu) or {}
    regs = pr.get("regs") or {}
    if regs.get("ip") and pr.get("from_sandbox"):     # a frame saved by an exception from the sandbox
        f["rip"] = regs["ip"]
        f["error_code"] = regs.get("orig_ax")
    if cpu is not None:
        r = kernel.target.registers(cpu)
        s = kernel.lookup(r.get("rip", 0))
        if s and s[0] == "handle_sbm_fault":
            f["error_code"] = r.get("rsi")
            f["cr2"] = r.get("rdx")
            f["vector"] = 14 if r.get("rdx") else 13
            try:
                from sbmdbg.model import stacks as xs
                hr = xs.decode_pt_regs(kernel, r["rdi"], kernel.root)
                f["rip"] = hr.get("ip", f.get("rip"))
            except Exception:  # noqa: BLE001 - keep the exception stack's frame
                pass
        elif "cr2" in r:
            f.setdefault("cr2", r["cr2"])
    return f


def compute(kernel, a=None) -> dict:
    m.require_sbm(kernel)
    g = (lambda n: getattr(a, n, None)) if a is not None else (lambda n: None)
    cpus = [c for c in range(kernel.target.ncpus)]
    sb, cpu = None, None
    spec = g("sandbox")
    sbs = m.sandboxes(kernel)
    if spec:
        sb = m.find_sandbox(kernel, spec)
    else:
        for s in sbs:
            for c in s.cpus:
                r = kernel.target.registers(c)
                lk = kernel.lookup(r.get("rip", 0))
                if lk and lk[0] == "handle_sbm_fault":
                    sb, cpu = s, c
            if sb is None and s.cpus:
                sb, cpu = s, s.cpus[0]
        if sb is None and sbs:
            sb = sbs[0]
    if sb is None:
        raise SbmdbgError("no sandbox is active: stop in the fault path (handle_sbm_fault), "
                          "or use `sbmdbg trace why FILE` on a recorded abort")
    if cpu is None and sb.cpus:
        cpu = sb.cpus[0]
    del cpus
    f = _fault_from_stop(kernel, sb, cpu)
    for k, n in (("rip", "rip"), ("cr2", "cr2"), ("error_code", "error_code")):
        v = _num(g(n))
        if v is not None:
            f[k] = v
    if g("vector") is not None:
        f["vector"] = g("vector")
    if not f.get("rip"):
        raise SbmdbgError(f"{sb.label}: no fault in progress (no frame saved from the sandbox on its "
                          "exception stack; stop at handle_sbm_fault) - or give --rip/--cr2/--error-code")
    vector = f.get("vector", 14)
    d = W.explain(kernel, rip=f["rip"], vector=vector, error_code=f.get("error_code"),
                  cr2=f.get("cr2") if vector == 14 else None, buffers=sandbox_buffers(sb),
                  sandbox_root=sb.pgd_pa)
    d["sandbox"] = {"label": sb.label, "state": sb.state, "cpu": cpu, "sbm_cr3": sb.sbm_cr3}
    return jsonable(d)


def render(d: dict) -> list:
    from rich.text import Text   # plain text: operands like [rax] are not markup
    return [Text(line) for line in W.lines(d)]
