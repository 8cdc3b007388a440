"""Source lines and inlined-function chains of kernel text, from vmlinux's
DWARF (pyelftools): only the one compilation unit that holds the address is
decoded (found through .debug_aranges), so a look-up costs one CU, not the
whole kernel.  Addresses are link-time (unslid)."""
from __future__ import annotations

import functools
import os

from elftools.elf.elffile import ELFFile

from sbmdbg.errors import SbmdbgError

#: bounded DIE walks (guest-independent, but vmlinux may be any file)
MAX_DIES = 2_000_000


class _Dwarf:
    def __init__(self, path: str):
        self.fh = open(path, "rb")
        self.elf = ELFFile(self.fh)
        if not self.elf.has_dwarf_info():
            raise SbmdbgError(f"{path} has no DWARF (build with CONFIG_DEBUG_INFO)")
        self.dwarf = self.elf.get_dwarf_info()
        self.aranges = self.dwarf.get_aranges()

    def cu_at(self, addr: int):
        off = self.aranges.cu_offset_at_addr(addr) if self.aranges else None
        if off is None:
            return None
        return self.dwarf.get_CU_at(off)


@functools.lru_cache(maxsize=4)
def _dwarf(path: str, mtime: float) -> _Dwarf:
    return _Dwarf(path)


def _ranges(dw, die) -> list[tuple[int, int]]:
    a = die.attributes
    if "DW_AT_low_pc" in a and "DW_AT_high_pc" in a:
        lo = a["DW_AT_low_pc"].value
        hi = a["DW_AT_high_pc"].value
        if a["DW_AT_high_pc"].form not in ("DW_FORM_addr",):
            hi = lo + hi
        return [(lo, hi)]
    if "DW_AT_ranges" in a:
        rl = dw.range_lists()
        if rl is None:
            return []
        try:
            entries = rl.get_range_list_for_die(die) if hasattr(rl, "get_range_list_for_die") \
                else rl.get_range_list_at_offset(a["DW_AT_ranges"].value, cu=die.cu)
        except Exception:  # noqa: BLE001 - malformed range list: no ranges
            return []
        base = die.cu.get_top_DIE().attributes.get("DW_AT_low_pc")
        base = base.value if base else 0
        out = []
        for e in entries:
            if hasattr(e, "begin_offset"):
                if getattr(e, "is_absolute", False):
                    out.append((e.begin_offset, e.end_offset))
                else:
                    out.append((base + e.begin_offset, base + e.end_offset))
        return out
    return []


def _name(die) -> str | None:
    for _ in range(4):
        a = die.attributes
        if "DW_AT_name" in a:
            return a["DW_AT_name"].value.decode(errors="replace")
        ref = a.get("DW_AT_abstract_origin") or a.get("DW_AT_specification")
        if ref is None:
            return None
        die = die.get_DIE_from_attribute(ref.name)
    return None


def _file_name(lp, idx: int) -> str | None:
    fes = lp["file_entry"]
    ver = lp["version"]
    i = idx if ver >= 5 else idx - 1
    if not 0 <= i < len(fes):
        return None
    fe = fes[i]
    name = fe.name.decode(errors="replace")
    dirs = lp["include_directory"]
    d = fe.dir_index if ver >= 5 else fe.dir_index - 1
    if not os.path.isabs(name) and 0 <= d < len(dirs):
        dn = dirs[d].decode(errors="replace")
        if dn and not dn.startswith("/"):
            name = f"{dn}/{name}"
        elif dn and d > 0:
            name = f"{dn}/{name}"
    return name


def line_for(vmlinux: str, addr: int) -> dict:
    """{file, line, function, inlined: [{function, call_file, call_line}, ...]}
    for the link-time ``addr``; the chain runs from the innermost inlined
    function out to the containing (out-of-line) function."""
    dw = _dwarf(vmlinux, os.stat(vmlinux).st_mtime)
    cu = dw.cu_at(addr)
    if cu is None:
        return {"file": None, "line": None, "function": None, "inlined": [],
                "note": f"{addr:#x} is in no compilation unit (.debug_aranges)"}
    lp = dw.dwarf.line_program_for_CU(cu)
    best = None
    prev = None
    for ent in lp.get_entries():
        st = ent.state
        if st is None:
            continue
        if prev is not None and prev.address <= addr < st.address and not prev.end_sequence:
            best = prev
        if st.end_sequence:
            prev = None
            continue
        prev = st
    out = {"file": None, "line": None, "function": None, "inlined": []}
    if best is not None:
        out["file"] = _file_name(lp.header, best.file)
        out["line"] = best.line
    # the DIE chain: subprogram -> inlined_subroutine* holding addr
    chain = []
    n = 0

    def visit(die, depth):
        nonlocal n
        for child in die.iter_children():
            n += 1
            if n > MAX_DIES:
                return
            tag = child.tag
            if tag in ("DW_TAG_subprogram", "DW_TAG_inlined_subroutine", "DW_TAG_lexical_block"):
                rs = _ranges(dw.dwarf, child)
                if any(lo <= addr < hi for lo, hi in rs):
                    if tag != "DW_TAG_lexical_block":
                        chain.append(child)
                    visit(child, depth + 1)
                    return
                if tag == "DW_TAG_lexical_block" and not rs:
                    continue
    visit(cu.get_top_DIE(), 0)
    if chain:
        out["function"] = _name(chain[0])
        # innermost first: each inlined subroutine's call site is in its parent
        inl = []
        for i in range(len(chain) - 1, 0, -1):
            d = chain[i]
            cf = d.attributes.get("DW_AT_call_file")
            cl = d.attributes.get("DW_AT_call_line")
            inl.append({"function": _name(d), "into": _name(chain[i - 1]),
                        "call_file": _file_name(lp.header, cf.value) if cf else None,
                        "call_line": cl.value if cl else None})
        out["inlined"] = inl
        out["innermost"] = _name(chain[-1])
    return out
