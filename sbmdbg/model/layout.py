"""Struct layouts from DWARF: ``Layout`` (offsetof, sizeof, field types).

Two sources implement ``LayoutSource.layout(name)``:
* ``DwarfLayouts``: pyelftools over vmlinux's DWARF (offline); extracted
  layouts are cached as JSON keyed by the ELF build id (a full DWARF parse
  is slow, so only the requested structs are extracted, CU by CU).
* the gdb face's adapter over ``gdb.lookup_type`` (sbmdbg.gdbcmd.gdbtypes).

Anonymous struct/union members are flattened into their parent, as C does.
No struct offset is ever hard-coded in sbmdbg.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from sbmdbg.errors import SbmdbgError
from sbmdbg import text as _text


class LayoutError(SbmdbgError):
    pass


@dataclass
class Field:
    name: str
    offset: int
    size: int
    kind: str            # int, bool, enum, ptr, struct, union, array, float, func, other
    type: str            # C spelling, e.g. "struct task_struct *", "char [16]"
    signed: bool = False
    target: str | None = None     # struct/union tag: of the field, pointee or element
    count: int | None = None      # arrays
    elem_size: int | None = None
    elem_kind: str | None = None
    bit_size: int | None = None
    bit_offset: int | None = None  # from the start of the field's storage unit (LSB)


@dataclass
class Layout:
    name: str
    size: int
    fields: dict[str, Field]
    kind: str = "struct"

    def field(self, name: str) -> Field:
        f = self.fields.get(name)
        if f is None:
            raise LayoutError(f"struct {self.name} has no field {name!r}")
        return f

    def has(self, name: str) -> bool:
        return name in self.fields

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "kind": self.kind,
                "fields": {k: asdict(v) for k, v in self.fields.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls(d["name"], d["size"], {k: Field(**v) for k, v in d["fields"].items()},
                   d.get("kind", "struct"))


class LayoutSource:
    """Something that knows struct layouts."""

    def layout(self, name: str) -> Layout:
        raise NotImplementedError

    def has_layout(self, name: str) -> bool:
        try:
            self.layout(name)
            return True
        except LayoutError:
            return False

    def resolve(self, struct_name: str, path: str) -> Field:
        """``resolve('task_struct', 'thread_info.flags')`` -> Field with the
        absolute offset from the start of the outer struct."""
        lay = self.layout(struct_name)
        off = 0
        parts = path.split(".")
        for i, part in enumerate(parts):
            f = lay.field(part)
            off += f.offset
            if i == len(parts) - 1:
                return Field(**{**asdict(f), "offset": off, "name": path})
            if f.kind not in ("struct", "union") or not f.target:
                raise LayoutError(f"{struct_name}.{'.'.join(parts[:i + 1])} is not a struct")
            lay = self.layout(f.target)
        raise LayoutError(f"empty field path for {struct_name}")

    def offsetof(self, struct_name: str, path: str) -> int:
        return self.resolve(struct_name, path).offset

    def sizeof(self, struct_name: str) -> int:
        return self.layout(struct_name).size


class DictLayouts(LayoutSource):
    """Layouts from a JSON dict (fixtures, the DWARF cache)."""

    def __init__(self, layouts: dict[str, Layout]):
        self.layouts = layouts

    def layout(self, name: str) -> Layout:
        lay = self.layouts.get(name)
        if lay is None:
            raise LayoutError(f"no layout for struct {name}")
        return lay

    def to_json(self) -> dict:
        return {k: v.to_json() for k, v in self.layouts.items()}

    @classmethod
    def from_json(cls, d: dict) -> "DictLayouts":
        return cls({k: Layout.from_json(v) for k, v in d.items()})


# ---------------------------------------------------------------------------
# decoding bytes with a layout

def decode_scalar(f_kind: str, size: int, signed: bool, data: bytes) -> int:
    if size not in (1, 2, 4, 8):
        return int.from_bytes(data[:size], "little", signed=signed)
    return int.from_bytes(data[:size], "little", signed=signed)


def decode_field(f: Field, data: bytes):
    """Decode one field from the bytes of its struct (``data`` from offset 0)."""
    raw = data[f.offset:f.offset + f.size]
    if f.bit_size:
        v = int.from_bytes(raw, "little") >> (f.bit_offset or 0)
        v &= (1 << f.bit_size) - 1
        if f.signed and v >> (f.bit_size - 1):
            v -= 1 << f.bit_size
        return v
    if f.kind in ("int", "enum", "ptr", "bool"):
        v = int.from_bytes(raw, "little", signed=f.signed and f.kind != "ptr")
        return bool(v) if f.kind == "bool" else v
    if f.kind == "array" and f.elem_kind in ("int", "ptr", "enum") and f.elem_size:
        if f.elem_size == 1:
            return bytes(raw)
        return [int.from_bytes(raw[i:i + f.elem_size], "little", signed=f.signed)
                for i in range(0, len(raw), f.elem_size)]
    return bytes(raw)


def decode_struct(lay: Layout, data: bytes, fields: list[str] | None = None) -> dict:
    names = fields if fields is not None else list(lay.fields)
    return {n: decode_field(lay.field(n), data) for n in names}


def cstring(b: bytes) -> str:
    """A guest char array as text: undecodable bytes and every control
    character shown visibly (sbmdbg.text, the one sanitizer)."""
    return _text.cstring(b)


# ---------------------------------------------------------------------------
# pyelftools DWARF extraction

def build_id(vmlinux: str) -> str:
    from elftools.elf.elffile import ELFFile
    with open(vmlinux, "rb") as fh:
        elf = ELFFile(fh)
        for sec in elf.iter_sections():
            if sec.header["sh_type"] != "SHT_NOTE":
                continue
            for note in sec.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    st = os.stat(vmlinux)
    return f"nobuildid-{st.st_size}-{int(st.st_mtime)}"


def _cache_dir() -> Path:
    from sbmdbg.paths import cache_root
    d = cache_root() / "layouts"
    d.mkdir(parents=True, exist_ok=True)
    return d


class DwarfLayouts(LayoutSource):
    """Struct layouts from vmlinux's DWARF via pyelftools, cached per build id."""

    def __init__(self, vmlinux: str, cache: bool = True):
        self.vmlinux = vmlinux
        self.build_id = build_id(vmlinux)
        self._cache_file = _cache_dir() / f"{self.build_id}.json" if cache else None
        self._layouts: dict[str, Layout] = {}
        self._missing: set[str] = set()
        self._lock = threading.Lock()
        if self._cache_file and self._cache_file.exists():
            try:
                d = json.loads(self._cache_file.read_text())
                self._layouts = {k: Layout.from_json(v) for k, v in d.get("layouts", {}).items()}
                self._missing = set(d.get("missing", []))
            except (ValueError, KeyError, TypeError):
                self._layouts = {}

    def _save(self) -> None:
        if not self._cache_file:
            return
        tmp = self._cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"layouts": {k: v.to_json() for k, v in self._layouts.items()},
                                   "missing": sorted(self._missing)}))
        tmp.replace(self._cache_file)

    def layout(self, name: str) -> Layout:
        with self._lock:
            if name not in self._layouts and name not in self._missing:
                self.prefetch([name])
            lay = self._layouts.get(name)
        if lay is None:
            raise LayoutError(f"struct {name} is not in the DWARF of {self.vmlinux}")
        return lay

    def prefetch(self, names: list[str]) -> None:
        """Extract several structs in one pass over the CUs."""
        want = {n for n in names if n not in self._layouts and n not in self._missing}
        if not want:
            return
        found = _extract(self.vmlinux, want)
        self._layouts.update(found)
        self._missing |= want - set(found)
        self._save()


def _extract(vmlinux: str, want: set[str]) -> dict[str, Layout]:
    from elftools.elf.elffile import ELFFile
    out: dict[str, Layout] = {}
    with open(vmlinux, "rb") as fh:
        elf = ELFFile(fh)
        if not elf.has_dwarf_info():
            raise LayoutError(f"{vmlinux} has no DWARF (CONFIG_DEBUG_INFO)")
        dw = elf.get_dwarf_info()
        pending = set(want)
        for cu in dw.iter_CUs():
            if not pending:
                break
            top = cu.get_top_DIE()
            for die in top.iter_children():
                if die.tag not in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                    continue
                if "DW_AT_declaration" in die.attributes:
                    continue
                nm = die.attributes.get("DW_AT_name")
                if nm is None:
                    continue
                name = nm.value.decode() if isinstance(nm.value, bytes) else nm.value
                if name in pending:
                    out[name] = _layout_of(die, name)
                    pending.discard(name)
    return out


def _attr(die, name, default=None):
    a = die.attributes.get(name)
    if a is None:
        return default
    v = a.value
    return v.decode() if isinstance(v, bytes) else v


def _strip(die):
    """Follow typedef/const/volatile; return (die, spelling-prefix)."""
    quals = []
    seen = 0
    while die is not None and die.tag in ("DW_TAG_typedef", "DW_TAG_const_type",
                                          "DW_TAG_volatile_type", "DW_TAG_restrict_type",
                                          "DW_TAG_atomic_type") and seen < 32:
        seen += 1
        if "DW_AT_type" not in die.attributes:
            return None, quals
        die = die.get_DIE_from_attribute("DW_AT_type")
    return die, quals


def _type_name(die, depth=0) -> str:
    if die is None:
        return "void"
    if depth > 8:
        return "?"
    t = die.tag
    nm = _attr(die, "DW_AT_name")
    if t == "DW_TAG_base_type" or t == "DW_TAG_typedef":
        return nm or "?"
    if t in ("DW_TAG_structure_type", "DW_TAG_union_type", "DW_TAG_enumeration_type"):
        kw = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union",
              "DW_TAG_enumeration_type": "enum"}[t]
        return f"{kw} {nm or '<anonymous>'}"
    sub = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in die.attributes else None
    if t == "DW_TAG_pointer_type":
        return _type_name(sub, depth + 1) + " *"
    if t in ("DW_TAG_const_type", "DW_TAG_volatile_type"):
        return ("const " if t == "DW_TAG_const_type" else "volatile ") + _type_name(sub, depth + 1)
    if t == "DW_TAG_array_type":
        return _type_name(sub, depth + 1) + " []"
    if t == "DW_TAG_subroutine_type":
        return "func"
    return t.replace("DW_TAG_", "")


def _size_of(die, depth=0) -> int:
    if die is None or depth > 16:
        return 0
    bs = _attr(die, "DW_AT_byte_size")
    if bs is not None:
        return bs
    if die.tag == "DW_TAG_pointer_type":
        return 8
    if die.tag == "DW_TAG_array_type":
        n = _array_count(die)
        sub = die.get_DIE_from_attribute("DW_AT_type")
        return (n or 0) * _size_of(sub, depth + 1)
    if "DW_AT_type" in die.attributes:
        return _size_of(die.get_DIE_from_attribute("DW_AT_type"), depth + 1)
    return 0


def _array_count(die) -> int | None:
    n = None
    for ch in die.iter_children():
        if ch.tag == "DW_TAG_subrange_type":
            cnt = _attr(ch, "DW_AT_count")
            if cnt is None:
                ub = _attr(ch, "DW_AT_upper_bound")
                cnt = (ub + 1) if isinstance(ub, int) else 0
            n = cnt if n is None else n * cnt
    return n


def _kind(die) -> tuple[str, bool, str | None]:
    """(kind, signed, target tag) of a (stripped) type DIE."""
    if die is None:
        return "other", False, None
    t = die.tag
    if t == "DW_TAG_base_type":
        enc = _attr(die, "DW_AT_encoding", 0)
        # DW_ATE_boolean 2, float 4, signed 5, signed_char 6, unsigned 7, unsigned_char 8
        if enc == 2:
            return "bool", False, None
        if enc == 4:
            return "float", False, None
        return "int", enc in (5, 6), None
    if t == "DW_TAG_enumeration_type":
        return "enum", False, None
    if t == "DW_TAG_pointer_type":
        sub, _ = _strip(die.get_DIE_from_attribute("DW_AT_type")) if "DW_AT_type" in die.attributes else (None, [])
        tgt = _attr(sub, "DW_AT_name") if sub is not None and sub.tag in (
            "DW_TAG_structure_type", "DW_TAG_union_type") else None
        return "ptr", False, tgt
    if t in ("DW_TAG_structure_type", "DW_TAG_union_type"):
        return ("struct" if t == "DW_TAG_structure_type" else "union"), False, _attr(die, "DW_AT_name")
    if t == "DW_TAG_array_type":
        return "array", False, None
    if t == "DW_TAG_subroutine_type":
        return "func", False, None
    return "other", False, None


def _layout_of(die, name: str) -> Layout:
    fields: dict[str, Field] = {}
    _collect(die, 0, fields, 0)
    return Layout(name, _attr(die, "DW_AT_byte_size", 0), fields,
                  "union" if die.tag == "DW_TAG_union_type" else "struct")


def _collect(die, base: int, fields: dict, depth: int) -> None:
    if depth > 8:
        return
    for m in die.iter_children():
        if m.tag != "DW_TAG_member":
            continue
        off = _attr(m, "DW_AT_data_member_location", 0)
        if not isinstance(off, int):
            off = 0
        tdie = m.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in m.attributes else None
        sdie, _ = _strip(tdie)
        mname = _attr(m, "DW_AT_name")
        if mname is None:
            if sdie is not None and sdie.tag in ("DW_TAG_structure_type", "DW_TAG_union_type"):
                _collect(sdie, base + off, fields, depth + 1)
            continue
        kind, signed, target = _kind(sdie)
        f = Field(mname, base + off, _size_of(tdie), kind, _type_name(tdie), signed, target)
        if kind == "array":
            el, _ = _strip(sdie.get_DIE_from_attribute("DW_AT_type")) if "DW_AT_type" in sdie.attributes else (None, [])
            ek, es, et = _kind(el)
            f.count = _array_count(sdie)
            f.elem_size = _size_of(el)
            f.elem_kind = ek
            f.signed = es
            f.target = et
        bits = _attr(m, "DW_AT_bit_size")
        if bits is not None:
            f.bit_size = bits
            dbo = _attr(m, "DW_AT_data_bit_offset")
            if dbo is not None:
                f.offset = base + (dbo // 8)
                f.bit_offset = dbo % 8
                f.size = (f.bit_offset + bits + 7) // 8
            else:
                f.bit_offset = 0
        fields[mname] = f


__all__ = ["Field", "Layout", "LayoutSource", "DictLayouts", "DwarfLayouts", "LayoutError",
           "decode_field", "decode_struct", "cstring", "build_id", "struct"]
