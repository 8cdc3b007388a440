"""ELF symbols of vmlinux (pyelftools), cached as JSON per build id.

Addresses are link-time (unslid); ``Kernel`` adds the KASLR slide.
"""
from __future__ import annotations

import bisect
import json

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean
from sbmdbg.model.layout import _cache_dir, build_id


class SymbolError(SbmdbgError):
    pass


class Symbols:
    def __init__(self, table: dict[str, tuple[int, int, str]], build_id: str = "",
                 sections: dict[str, tuple[int, int, int]] | None = None, path: str = ""):
        self.table = table          # name -> (addr, size, type)
        self.build_id = build_id
        self.sections = sections or {}  # name -> (addr, size, file offset)
        self.path = path
        by_addr = sorted((a, s, n) for n, (a, s, t) in table.items() if a and t in ("FUNC", "OBJECT", "NOTYPE"))
        self._addrs = [a for a, _, _ in by_addr]
        self._by_addr = by_addr

    @classmethod
    def from_elf(cls, vmlinux: str, cache: bool = True) -> "Symbols":
        bid = build_id(vmlinux)
        cf = _cache_dir() / f"{bid}.symbols.json" if cache else None
        if cf and cf.exists():
            try:
                d = json.loads(cf.read_text())
                return cls({k: tuple(v) for k, v in d["table"].items()}, bid,
                           {k: tuple(v) for k, v in d["sections"].items()}, vmlinux)
            except (ValueError, KeyError):
                pass
        from elftools.elf.elffile import ELFFile
        table: dict[str, tuple[int, int, str]] = {}
        sections: dict[str, tuple[int, int, int]] = {}
        try:
            fh = open(vmlinux, "rb")
        except OSError as e:
            raise SymbolError(f"cannot open {vmlinux}: {e.strerror}") from None
        with fh:
            elf = ELFFile(fh)
            for sec in elf.iter_sections():
                if sec["sh_addr"]:
                    sections[sec.name] = (sec["sh_addr"], sec["sh_size"], sec["sh_offset"])
            symtab = elf.get_section_by_name(".symtab")
            if symtab is None:
                raise SymbolError(f"{vmlinux} has no .symtab")
            for s in symtab.iter_symbols():
                if not s.name:
                    continue
                typ = s["st_info"]["type"][4:]  # STT_FUNC -> FUNC
                prev = table.get(s.name)
                # prefer global definitions over local duplicates
                if prev is None or s["st_info"]["bind"] == "STB_GLOBAL":
                    table[s.name] = (s["st_value"], s["st_size"], typ)
        if cf:
            cf.write_text(json.dumps({"table": table, "sections": sections}))
        return cls(table, bid, sections, vmlinux)

    def __contains__(self, name: str) -> bool:
        return name in self.table

    def addr(self, name: str) -> int:
        try:
            return self.table[name][0]
        except KeyError:
            raise SymbolError(f"no symbol {name!r} in vmlinux") from None

    def size(self, name: str) -> int:
        return self.table[name][1] if name in self.table else 0

    def get(self, name: str) -> int | None:
        t = self.table.get(name)
        return t[0] if t else None

    def lookup(self, addr: int) -> tuple[str, int] | None:
        """addr (unslid) -> (symbol, offset) for the closest symbol at or below."""
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0:
            return None
        a, s, n = self._by_addr[i]
        if s and addr >= a + s and addr - a > 0x10000:
            return None
        return clean(n), addr - a   # names come from an input file: shown, never obeyed

    def read_file_bytes(self, addr: int, n: int) -> bytes | None:
        """Bytes of the vmlinux file at link-time address ``addr`` (for the
        "vmlinux matches the running kernel" check)."""
        for name, (a, size, off) in self.sections.items():
            if a <= addr and addr + n <= a + size and name not in (".bss", ".brk") and off:
                with open(self.path, "rb") as fh:
                    fh.seek(off + addr - a)
                    return fh.read(n)
        return None
