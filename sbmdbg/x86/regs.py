"""Control-register and selector decoders (CR0, CR3, CR4, EFER, CS)."""
from __future__ import annotations

from dataclasses import dataclass

CR0_BITS = {0: "PE", 1: "MP", 2: "EM", 3: "TS", 4: "ET", 5: "NE", 16: "WP",
            18: "AM", 29: "NW", 30: "CD", 31: "PG"}
CR4_BITS = {0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE",
            7: "PGE", 8: "PCE", 9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP",
            12: "LA57", 13: "VMXE", 14: "SMXE", 16: "FSGSBASE", 17: "PCIDE",
            18: "OSXSAVE", 19: "KL", 20: "SMEP", 21: "SMAP", 22: "PKE", 23: "CET",
            24: "PKS", 25: "UINTR", 28: "LAM_SUP"}
EFER_BITS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE",
             14: "FFXSR", 15: "TCE"}
RFLAGS_BITS = {0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF",
               10: "DF", 11: "OF", 14: "NT", 16: "RF", 17: "VM", 18: "AC",
               19: "VIF", 20: "VIP", 21: "ID"}

CR4_LA57 = 1 << 12
CR4_PCIDE = 1 << 17
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21
CR4_PKE = 1 << 22
CR4_PKS = 1 << 24
EFER_NXE = 1 << 11
CR0_WP = 1 << 16

PTI_USER_PGTABLE_BIT = 12          # Linux: user PGD = kernel PGD + 4 KiB
PTI_USER_PCID_BIT = 11             # Linux: user ASID has bit 11 set
CR3_NOFLUSH = 1 << 63
CR3_LAM_U57 = 1 << 61
CR3_LAM_U48 = 1 << 62


def bit_names(value: int, table: dict[int, str]) -> list[str]:
    return [name for bit, name in sorted(table.items()) if value >> bit & 1]


def decode_cr0(v: int) -> dict:
    return {"value": v, "flags": bit_names(v, CR0_BITS)}


def decode_cr4(v: int) -> dict:
    return {"value": v, "flags": bit_names(v, CR4_BITS),
            "la57": bool(v & CR4_LA57), "pcide": bool(v & CR4_PCIDE),
            "smep": bool(v & CR4_SMEP), "smap": bool(v & CR4_SMAP),
            "umip": bool(v >> 11 & 1), "pke": bool(v & CR4_PKE), "pks": bool(v & CR4_PKS)}


def decode_efer(v: int) -> dict:
    return {"value": v, "flags": bit_names(v, EFER_BITS), "nxe": bool(v & EFER_NXE)}


def decode_rflags(v: int) -> dict:
    return {"value": v, "flags": bit_names(v, RFLAGS_BITS), "iopl": (v >> 12) & 3}


@dataclass(frozen=True)
class CR3:
    value: int
    pcide: bool = False

    @property
    def pgd_pa(self) -> int:
        """Physical address of the top-level table this CR3 points at."""
        return self.value & ((1 << 52) - 1) & ~0xFFF

    @property
    def pti_user(self) -> bool:
        """Linux PTI: bit 12 set means the user half of a PGD pair."""
        return bool(self.value >> PTI_USER_PGTABLE_BIT & 1)

    @property
    def kernel_pgd_pa(self) -> int:
        """The kernel PGD of a PTI pair (bit 12 and the PCID bits cleared)."""
        return self.pgd_pa & ~(1 << PTI_USER_PGTABLE_BIT)

    @property
    def user_pgd_pa(self) -> int:
        return self.kernel_pgd_pa | (1 << PTI_USER_PGTABLE_BIT)

    @property
    def pcid(self) -> int | None:
        return self.value & 0xFFF if self.pcide else None

    @property
    def noflush(self) -> bool:
        return bool(self.value & CR3_NOFLUSH)

    def to_json(self) -> dict:
        d = {"value": self.value, "pgd_pa": self.pgd_pa, "pti_user": self.pti_user,
             "kernel_pgd_pa": self.kernel_pgd_pa, "noflush": self.noflush,
             "lam_u57": bool(self.value & CR3_LAM_U57), "lam_u48": bool(self.value & CR3_LAM_U48)}
        if self.pcide:
            d["pcid"] = self.pcid
            d["pcid_user_bit"] = bool(self.value >> PTI_USER_PCID_BIT & 1)
        else:
            d["pwt"] = bool(self.value >> 3 & 1)
            d["pcd"] = bool(self.value >> 4 & 1)
        return d


def decode_cr3(value: int, cr4: int = 0) -> CR3:
    return CR3(value, bool(cr4 & CR4_PCIDE))


def cpl(cs: int) -> int:
    return cs & 3


def decode_cs(cs: int) -> dict:
    return {"value": cs, "index": cs >> 3, "ti": (cs >> 2) & 1, "rpl": cs & 3}
