"""Struct layouts from gdb's own types (the in-gdb LayoutSource)."""
from __future__ import annotations

import gdb

from sbmdbg.model.layout import Field, Layout, LayoutError, LayoutSource

_KIND = {
    gdb.TYPE_CODE_INT: "int", gdb.TYPE_CODE_BOOL: "bool", gdb.TYPE_CODE_ENUM: "enum",
    gdb.TYPE_CODE_PTR: "ptr", gdb.TYPE_CODE_STRUCT: "struct", gdb.TYPE_CODE_UNION: "union",
    gdb.TYPE_CODE_ARRAY: "array", gdb.TYPE_CODE_FLT: "float", gdb.TYPE_CODE_FUNC: "func",
    gdb.TYPE_CODE_CHAR: "int",
}


def _signed(t) -> bool:
    try:
        return bool(t.is_signed)  # gdb >= 12
    except (AttributeError, ValueError):
        return t.code == gdb.TYPE_CODE_INT and not str(t).startswith(("unsigned", "u"))


def _tag(t) -> str | None:
    t = t.strip_typedefs()
    if t.code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION):
        return t.tag
    return None


class GdbLayouts(LayoutSource):
    def __init__(self):
        self._cache: dict[str, Layout] = {}

    def layout(self, name: str) -> Layout:
        if name in self._cache:
            return self._cache[name]
        t = None
        for spelling in (f"struct {name}", f"union {name}", name):
            try:
                t = gdb.lookup_type(spelling).strip_typedefs()
                break
            except gdb.error:
                continue
        if t is None or t.code not in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION):
            raise LayoutError(f"gdb knows no struct {name} (is vmlinux loaded with debug info?)")
        fields: dict[str, Field] = {}
        self._collect(t, 0, fields, 0)
        lay = Layout(name, t.sizeof, fields, "union" if t.code == gdb.TYPE_CODE_UNION else "struct")
        self._cache[name] = lay
        return lay

    def _collect(self, t, base_bits: int, fields: dict, depth: int) -> None:
        if depth > 8:
            return
        for f in t.fields():
            if not hasattr(f, "bitpos"):
                continue
            ft = f.type
            st = ft.strip_typedefs()
            bitpos = base_bits + f.bitpos
            if not f.name:
                if st.code in (gdb.TYPE_CODE_STRUCT, gdb.TYPE_CODE_UNION):
                    self._collect(st, bitpos, fields, depth + 1)
                continue
            kind = _KIND.get(st.code, "other")
            fl = Field(f.name, bitpos // 8, st.sizeof, kind, str(ft), _signed(st) if kind == "int" else False,
                       _tag(st))
            if kind == "ptr":
                fl.target = _tag(st.target())
            elif kind == "array":
                el = st.target().strip_typedefs()
                fl.elem_size = el.sizeof
                fl.count = st.sizeof // el.sizeof if el.sizeof else 0
                fl.elem_kind = _KIND.get(el.code, "other")
                fl.signed = _signed(el) if fl.elem_kind == "int" else False
                fl.target = _tag(el)
            if f.bitsize:
                fl.bit_size = f.bitsize
                fl.bit_offset = bitpos % 8
                fl.size = (fl.bit_offset + f.bitsize + 7) // 8
            fields[f.name] = fl
