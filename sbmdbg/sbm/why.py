"""``sbm why``: the explanation of a sandbox abort.

Input: the fault (vector, error code, CR2, fault RIP), the sandbox's buffers
and (live) its page table, and the kernel model.  Output: a JSON-able dict:

    instruction  the faulting instruction, decoded from vmlinux's bytes
                 (capstone), with its memory operand and access size
    source       file:line (DWARF line table) and the inlined-function chain
    access       read | write | execute, address, size
    address      what the address is: sandbox region, offset from the nearest
                 buffer ("17 bytes past the end of input buffer #0, in its
                 guard page"), and the kernel's own view (symbol, mapping)
    walks        the sandbox root's walk next to the kernel root's (live)
    denied       which level of the sandbox walk and which bit said no
    rule         the design rule the access broke
"""
from __future__ import annotations

from sbmdbg.model import srcline
from sbmdbg.x86 import paging as pg

PAGE = 4096
PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16
DIRECTIONS = ("input", "output", "io")
#: farther than this from every buffer is "not near any buffer" (LZ4 match
#: offsets reach 64 KiB back, plus a guard page)
FAR = 64 * 1024 + 2 * PAGE

RULES = {
    "input_write": "the sandbox may only read its input buffers (mapped user read-only)",
    "past_buffer": "the sandbox sees only the pages of its buffers; anything past them is unmapped "
                   "(vmalloc guard page)",
    "kernel_write": "kernel data, bss and rodata are mapped user read-only: the sandbox may write "
                    "only its output/io buffers and its own stack",
    "unmapped": "the sandbox page table maps only kernel text/data, its stacks and its buffers; "
                "everything else (heap, vmalloc, the direct map) is unmapped",
    "user_half": "the user half of a sandbox page table is empty",
    "exec": "only kernel text is executable in the sandbox (entry text and data are not)",
    "stack_guard": "the sandbox stack is THREAD_SIZE with an unmapped guard page below it",
    "thread_stack": "the caller's thread stack is mapped user read-only (the thunk reads its args)",
    "supervisor": "supervisor-only pages (state page, exception stack, cpu_entry_area) are "
                  "closed to CPL 3",
    "noncanonical": "a non-canonical address raises #GP; the sandbox is aborted like on #PF",
    "other": "any exception in the sandbox aborts it (sbm->error = -EFAULT)",
}


def disassemble(code: bytes, addr: int) -> dict:
    """The first instruction of ``code`` (at ``addr``): text, length, and its
    memory operand (size in bytes, read/write) when it has one."""
    try:
        import capstone
        from capstone import x86 as cx
    except ImportError:  # pragma: no cover - capstone is a dependency
        return {"text": None, "note": "capstone is not installed"}
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    for ins in md.disasm(code, addr, 1):
        out = {"address": addr, "bytes": ins.bytes.hex(), "length": ins.size,
               "mnemonic": ins.mnemonic, "operands": ins.op_str,
               "text": f"{ins.mnemonic} {ins.op_str}".strip(), "memory": None}
        mem = None
        for op in ins.operands:
            if op.type == cx.X86_OP_MEM:
                acc = op.access if hasattr(op, "access") else 0
                mem = {"size": op.size, "read": bool(acc & capstone.CS_AC_READ),
                       "write": bool(acc & capstone.CS_AC_WRITE),
                       "base": ins.reg_name(op.mem.base) if op.mem.base else None,
                       "index": ins.reg_name(op.mem.index) if op.mem.index else None,
                       "scale": op.mem.scale, "disp": op.mem.disp}
                break
        if mem is None and ins.mnemonic.startswith(("movs", "stos", "lods", "cmps", "scas",
                                                    "rep")):
            mem = {"size": None, "string": True}
        out["memory"] = mem
        return out
    return {"address": addr, "bytes": code[:16].hex(), "text": None, "note": "undecodable"}


def access_of(vector: int | None, error_code: int | None, insn: dict, cr2: int | None) -> dict:
    """read | write | execute from the error code (the operand for #GP)."""
    mem = insn.get("memory") or {}
    if vector == 14 and error_code is not None:
        kind = "execute" if error_code & PF_I else "write" if error_code & PF_W else "read"
        why = ("protection (page present)" if error_code & PF_P else "not present")
        return {"kind": kind, "address": cr2, "size": None if kind == "execute" else mem.get("size"),
                "cpl": 3 if error_code & PF_U else 0, "fault": why}
    kind = "write" if mem.get("write") else "read" if mem else None
    return {"kind": kind, "address": None, "size": mem.get("size"), "cpl": 3,
            "fault": {13: "general protection (#GP: e.g. a non-canonical address)",
                      8: "double fault"}.get(vector or -1, f"vector {vector}")}


def buffer_view(buffers: list[dict], va: int) -> dict | None:
    """Where ``va`` is relative to the nearest sandbox buffer copy.
    ``buffers``: {direction, index, sbm_ptr, size} (sbm_ptr = the copy's start;
    ``data_start`` optional: where the data starts inside it)."""
    best = None
    for b in buffers:
        start = b.get("data_start", b["sbm_ptr"])
        end = b["sbm_ptr"] + b["size"]
        mapped_end = (b["sbm_ptr"] + b["size"] + PAGE - 1) & ~(PAGE - 1)
        name = f"{b['direction']} buffer #{b['index']}"
        if start <= va < end:
            d = {"buffer": name, "relation": "inside", "offset": va - start,
                 "text": f"{va - start} bytes into {name} ({end - start} bytes)"}
            dist = 0
        elif va >= end:
            past = va - end
            where = ("in its last page (mapped, past the data)" if va < mapped_end else
                     "in its guard page" if va < mapped_end + PAGE else "beyond its guard page")
            d = {"buffer": name, "relation": "past_end", "offset": past,
                 "text": f"{past} bytes past the end of {name} ({end - start} bytes), {where}"}
            dist = past
        else:
            before = start - va
            d = {"buffer": name, "relation": "before_start", "offset": -before,
                 "text": f"{before} bytes before the start of {name}"}
            dist = before
        if dist >= FAR and d["relation"] != "inside":
            d["relation"] = "far"
            d["text"] = (f"not near any buffer: {dist} bytes from {name} (the nearest), "
                         "in an unmapped page")
        d.update(direction=b["direction"], index=b["index"], start=start, end=end)
        if best is None or dist < best[0]:
            best = (dist, d)
    return best[1] if best else None


def _walk_json(kernel, root: int, va: int) -> dict:
    tr = kernel.translate(root, va)
    levels = []
    for e in tr.entries:
        levels.append({"level": e.name, "raw": e.raw, "flags": e.flags_str(),
                       "present": bool(e.raw & 1), "user": bool(e.raw & 4),
                       "write": bool(e.raw & 2), "nx": bool(e.raw >> 63 & 1)})
    return {"root": root, "pa": tr.pa, "fault": tr.fault, "levels": levels,
            "perms": None if tr.perms is None else
            {"w": tr.perms.w, "u": tr.perms.u, "x": tr.perms.x}}


def denied(walk: dict, kind: str | None) -> dict:
    """Which level of a walk refuses a CPL-3 ``kind`` access, and which bit."""
    for lv in walk["levels"]:
        if not lv["present"]:
            return {"level": lv["level"], "bit": "P", "text": f"{lv['level']} not present"}
    for lv in walk["levels"]:
        if not lv["user"]:
            return {"level": lv["level"], "bit": "U/S", "text": f"{lv['level']} supervisor-only (U/S=0)"}
    if kind == "write":
        for lv in walk["levels"]:
            if not lv["write"]:
                return {"level": lv["level"], "bit": "R/W", "text": f"{lv['level']} read-only (R/W=0)"}
    if kind == "execute":
        for lv in walk["levels"]:
            if lv["nx"]:
                return {"level": lv["level"], "bit": "XD", "text": f"{lv['level']} no-execute (XD=1)"}
    if not walk["levels"]:
        return {"level": None, "bit": None, "text": walk.get("fault") or "no walk"}
    return {"level": None, "bit": None, "text": "the walk allows it (a stale TLB entry: spurious)"}


def rule_for(access: dict, buf: dict | None, region: str | None, kernel_view: dict) -> str:
    kind, va = access.get("kind"), access.get("address")
    if access.get("fault", "").startswith("general protection"):
        return "noncanonical"
    if va is not None and va < 1 << 47:
        return "user_half"
    if kind == "execute":
        return "exec"
    r = (region or "").lower()
    if "guard" in r and "stack" in r:
        return "stack_guard"
    if buf is not None and buf["relation"] == "inside" and buf["direction"] == "input" and kind == "write":
        return "input_write"
    if buf is not None and buf["relation"] in ("past_end", "before_start"):
        return "past_buffer"
    if "thread stack" in r or "task" in r:
        return "thread_stack"
    if kind == "write" and kernel_view.get("symbol"):
        return "kernel_write"
    return "unmapped"


def explain(kernel, *, rip: int, vector: int | None, error_code: int | None, cr2: int | None,
            buffers: list[dict] | None = None, sandbox_root: int | None = None,
            region: str | None = None, code: bytes | None = None) -> dict:
    """The whole explanation.  ``kernel`` gives vmlinux (symbols, DWARF) and
    the slide; ``sandbox_root``, when given (live), is walked next to the
    kernel root; ``region`` is a tracer's label for the address (offline)."""
    slide = getattr(kernel, "slide", 0) or 0
    syms = kernel.symbols
    file_code = syms.read_file_bytes(rip - slide, 16) or b""
    code_from = "vmlinux"
    if code is None and getattr(kernel, "root", None) is not None:
        try:   # the running text: alternatives may have patched vmlinux's bytes
            code, code_from = kernel.read_virt(kernel.root, rip, 16), "guest memory (kernel root)"
        except Exception:  # noqa: BLE001 - fall back to vmlinux
            code = None
    if code is None:
        code = file_code
    elif code_from == "vmlinux":
        code_from = "given"
    insn = disassemble(code, rip)
    insn["code_from"] = code_from
    insn["vmlinux_bytes_differ"] = bool(file_code) and insn.get("length") is not None and \
        file_code[:insn["length"]] != code[:insn["length"]]
    if code_from == "vmlinux":
        insn["note"] = "decoded from vmlinux: runtime-patched code (alternatives) may differ"
    s = kernel.lookup(rip)
    insn["symbol"] = f"{s[0]}+{s[1]:#x}" if s and s[1] < 0x100000 else None
    try:
        src = kernel.source_line(rip - slide) if hasattr(kernel, "source_line") else \
            srcline.line_for(syms.path, rip - slide)
    except Exception as e:  # noqa: BLE001 - no DWARF / odd DWARF: say so, keep the rest
        src = {"file": None, "line": None, "inlined": [], "note": str(e)}
    access = access_of(vector, error_code, insn, cr2)
    va = access["address"]
    out = {"fault": {"vector": vector, "error_code": error_code, "cr2": cr2, "rip": rip},
           "instruction": insn, "source": src, "access": access}
    buf = buffer_view(buffers or [], va) if va is not None else None
    kv: dict = {}
    if va is not None:
        ks = kernel.lookup(va)
        kv["symbol"] = f"{ks[0]}+{ks[1]:#x}" if ks and ks[1] < 0x100000 else None
        walks = {}
        if getattr(kernel, "root", None) is not None:
            try:
                kw = _walk_json(kernel, kernel.root, va)
            except Exception as e:  # noqa: BLE001
                kw = {"error": str(e), "levels": []}
            kv["mapped"] = kw.get("pa") is not None
            walks["kernel"] = kw
        else:
            kv["mapped"] = None
        kv["text"] = kv["symbol"] or {True: "mapped (not a kernel-image symbol)",
                                      False: "unmapped under the kernel root",
                                      None: "not a kernel-image symbol (no live kernel root)"}[kv["mapped"]]
        if sandbox_root is not None:
            try:
                sw = _walk_json(kernel, sandbox_root, va)
            except Exception as e:  # noqa: BLE001
                sw = {"error": str(e), "levels": []}
            walks["sandbox"] = sw
            out["denied"] = denied(sw, access["kind"])
        elif error_code is not None and vector == 14:
            out["denied"] = {"level": None, "bit": "P" if not error_code & PF_P else None,
                             "text": "not present in the sandbox page table" if not error_code & PF_P
                             else "present but refused (protection: U/S, R/W or XD)",
                             "from": "error code (the sandbox is gone: no walk)"}
        out["walks"] = walks
    if va is not None and not pg.canonical(va):
        region = region or "non-canonical"
    out["address"] = {"va": va, "region": region or (buf["text"] if buf else None),
                      "buffer": buf, "kernel": kv}
    rule = rule_for(access, buf, region, kv)
    out["rule"] = {"id": rule, "text": RULES[rule]}
    out["summary"] = summary(out)
    return out


def summary(d: dict) -> str:
    src = d["source"]
    where = f"{(src.get('file') or '?').rsplit('/', 1)[-1]}:{src.get('line')}"
    inl = src.get("inlined") or []
    if inl:
        where += f" in {inl[0]['function']}, inlined into {src.get('function')}"
    elif src.get("function"):
        where += f" in {src['function']}"
    a = d["access"]
    what = f"{a['kind'] or 'access'}"
    if a.get("size"):
        what += f" of {a['size']} bytes"
    if a.get("address") is not None:
        what += f" at {a['address']:#x}"
    b = (d.get("address") or {}).get("buffer")
    if b:
        what += f": {b['text']}"
    elif (d.get("address") or {}).get("region"):
        what += f": {d['address']['region']}"
    return f"{where}: {d['instruction'].get('text')}: {what}"


def one_line(d: dict) -> str:
    """The explanation in one short line (the dashboard's transitions panel):
    file:line in function, the access kind and address, the region (or
    buffer relation) and the page-table verdict."""
    src = d["source"]
    where = f"{(src.get('file') or '?').rsplit('/', 1)[-1]}:{src.get('line')}"
    inl = src.get("inlined") or []
    fn = inl[0]["function"] if inl else src.get("function")
    if fn:
        where += f" in {fn}"
    a = d["access"]
    what = a.get("kind") or "access"
    if a.get("address") is not None:
        what += f" {a['address']:#x}"
    ad = d.get("address") or {}
    b = ad.get("buffer")
    rel = b["text"] if b and b["relation"] != "far" else ad.get("region")
    parts = [where, what] + [p for p in (rel, (d.get("denied") or {}).get("text")) if p]
    return ": ".join(parts[:2]) + "".join(f"; {p}" for p in parts[2:])


def group_key(d: dict) -> str:
    """Identical explanations group together in a fuzz campaign: the source
    line, the access kind and where relative to which buffer."""
    src = d["source"]
    b = (d.get("address") or {}).get("buffer")
    words = {"inside": "inside", "past_end": "past the end of", "before_start": "before the start of",
             "far": "far from"}
    rel = (f"{words.get(b['relation'], b['relation'])} {b['buffer']}" if b else
           (d.get("address") or {}).get("region") or "?")
    return (f"{(src.get('file') or '?').rsplit('/', 1)[-1]}:{src.get('line')}, "
            f"{d['access']['kind']} {rel}")


class OfflineImage:
    """What ``explain`` needs when only vmlinux and the slide are known (a
    trace file): symbols, DWARF, the slide; no page tables (root None)."""

    root = None

    def __init__(self, symbols, slide: int = 0):
        self.symbols = symbols
        self.slide = slide

    def lookup(self, va: int):
        return self.symbols.lookup(va - self.slide)


def lines(d: dict) -> list[str]:
    """The explanation as plain lines (the gdb face, inspect, trace why)."""
    i, s, a, ad = d["instruction"], d["source"], d["access"], d.get("address") or {}
    out = [f"why: {d['summary']}"]
    out.append(f"  instruction  {i.get('address', 0):#x} <{i.get('symbol')}>: {i.get('text')}"
               f"   ({i.get('bytes')})")
    chain = " <- ".join(f"{x['function']} ({(x.get('call_file') or '?').rsplit('/', 1)[-1]}:"
                        f"{x.get('call_line')})" for x in s.get("inlined") or [])
    out.append(f"  source       {s.get('file')}:{s.get('line')} in {s.get('function')}"
               + (f"; inlined: {chain}" if chain else ""))
    va = a.get("address")
    out.append(f"  access       {a.get('kind')} of {a.get('size') or '?'} bytes at "
               f"{va:#x} (CPL {a.get('cpl')}, {a.get('fault')})" if va is not None else
               f"  access       {a.get('kind')} ({a.get('fault')})")
    if ad.get("region"):
        out.append(f"  address      {ad['region']}")
    kv = ad.get("kernel") or {}
    if kv:
        out.append(f"  kernel view  {kv.get('text')}")
    for name, w in (d.get("walks") or {}).items():
        lv = " ".join(f"{x['level']}={x['flags']}" for x in w.get("levels", []))
        out.append(f"  {name:8s} pt  {lv or w.get('error') or ''} -> "
                   f"{'pa ' + hex(w['pa']) if w.get('pa') is not None else (w.get('fault') or 'no mapping')}")
    if d.get("denied"):
        out.append(f"  denied       {d['denied']['text']}")
    out.append(f"  rule         {d['rule']['text']}")
    return out
