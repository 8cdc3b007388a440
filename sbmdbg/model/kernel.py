"""The kernel model: a running (or dumped) kernel seen through a Target.

``Kernel(target, symbols, layouts)`` finds, from physical memory only:
* the kernel root (any vCPU's CR3 with the PTI user bit and PCID cleared),
* 4- or 5-level paging (CR4.LA57) and NX (EFER.NXE),
* the KASLR slide: the first present 2 MiB entry of the kernel-image PMD
  (0xffffffff80000000 + 1 GiB) is ``_text`` (cleanup_highmap clears those
  below), confirmed by comparing ``linux_banner`` in memory with vmlinux,
* phys_base, page_offset_base / vmalloc_base / vmemmap_base,
* per-CPU offsets (per-CPU symbols are zero-based on x86_64, not slid).

Every virtual read goes through an explicit root: ``read_virt(root, va, n)``;
page tables through ``translate(root, va)``, ``walk(root, ...)``, ``ptov(root, pa)``.

``open_kernel(target, vmlinux, ...)`` is the one way to build it (faces call
``sbmdbg.sbm.open_kernel``, which attaches the SBM model's extension).
Caches belong to the model: ``kernel.cache(name)`` is emptied by
``kernel.invalidate()`` (the guest ran; ``kernel.generation`` counts those),
``kernel.cache(name, per_stop=False)`` lives as long as the model.
"""
from __future__ import annotations

import dataclasses

import struct
from dataclasses import dataclass, field
from typing import Callable

from sbmdbg.errors import SbmdbgError
from sbmdbg.model.layout import DwarfLayouts, LayoutSource, cstring, decode_field, decode_struct
from sbmdbg.model.symbols import Symbols
from sbmdbg.target.base import Target, TargetError
from sbmdbg.x86 import paging as pg
from sbmdbg.x86.regs import CR4_LA57, EFER_NXE, decode_cr3

START_KERNEL_MAP = 0xFFFFFFFF80000000
#: X86_FEATURE_PTI (arch/x86/include/asm/cpufeatures.h: word 7, bit 11)
PTI_FEATURE = 7 * 32 + 11
KERNEL_IMAGE_SPAN = 1 << 30


class KernelError(SbmdbgError):
    pass


class FaultError(KernelError):
    def __init__(self, va: int, tr: pg.Translation):
        super().__init__(f"cannot read {va:#x}: {tr.fault}")
        self.va = va
        self.translation = tr


@dataclass
class RootSpec:
    """A resolved page-table root."""
    label: str          # kernel, user, sandbox:<pid>, cr3
    pgd_pa: int
    cr3: int | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Extension:
    """What a higher layer attaches to a Kernel when it is opened (explicitly:
    ``open_kernel(..., extensions=[...])``), e.g. the SBM model's."""
    name: str
    # kernel -> the sandbox roots (``--root sandbox[=N]``)
    sandbox_roots: Callable[["Kernel"], list[RootSpec]] | None = None
    # kernel -> a better kernel root PA or None, run after discovery (the SBM
    # model maps a sandbox CR3 found on the vCPU to its saved kernel CR3)
    root_fixup: Callable[["Kernel"], int | None] | None = None


def open_kernel(target: Target, vmlinux: str | None = None, *, symbols: Symbols | None = None,
                layouts: LayoutSource | None = None, extensions=(), prefetch=(),
                cpu: int | None = None, verify: bool = True) -> "Kernel":
    """The kernel model of what ``target`` shows: symbols from ``vmlinux``
    (ELF) unless ``symbols`` is given, layouts from its DWARF unless
    ``layouts`` is given (gdb's types in gdb, a recorded snapshot's offline);
    ``prefetch``: struct names to read from DWARF in one pass."""
    if symbols is None or layouts is None:
        if not vmlinux:
            raise KernelError("no vmlinux: the kernel model needs its symbols and DWARF")
        symbols = symbols or Symbols.from_elf(vmlinux)
        if layouts is None:
            layouts = DwarfLayouts(vmlinux)
            if prefetch:
                layouts.prefetch(list(prefetch))   # one pass over the CUs instead of one per struct
    return Kernel(target, symbols, layouts, cpu=cpu, verify=verify, extensions=extensions)


class Kernel:
    def __init__(self, target: Target, symbols: Symbols, layouts: LayoutSource,
                 cpu: int | None = None, verify: bool = True, extensions=()):
        self.target = target
        self.symbols = symbols
        self.layouts = layouts
        self.extensions: tuple[Extension, ...] = tuple(extensions)
        self.generation = 0                        # bumped by invalidate()
        self._caches: dict[str, dict] = {}         # static: as long as the model
        self._stop_caches: dict[str, dict] = {}    # per stop: emptied by invalidate()
        self._reader = pg.TableReader(target.read_phys)
        self._tlb = self.cache("tlb")
        self._discover(cpu, verify)

    def has_extension(self, name: str) -> bool:
        return any(e.name == name for e in self.extensions)

    # ------------------------------------------------------------------ caches
    def cache(self, name: str, *, per_stop: bool = True) -> dict:
        """A dict owned by the model for a client's results.  ``per_stop``
        ones are emptied (in place) when the guest ran (``invalidate()``);
        the others live as long as the model (symbols, layouts, offsets)."""
        store = self._stop_caches if per_stop else self._caches
        d = store.get(name)
        if d is None:
            d = store[name] = {}
        return d

    def invalidate(self) -> None:
        """The guest ran: empty every per-stop cache (the TLB, page tables, the
        clients'), bump ``generation``; slide and bases do not change."""
        self.generation += 1
        self._clear_stop_caches()
        self._reader = pg.TableReader(self.target.read_phys)
        self.target.invalidate()

    def _clear_stop_caches(self) -> None:
        for d in self._stop_caches.values():
            d.clear()

    # ------------------------------------------------------------------ setup
    def _discover(self, cpu: int | None, verify: bool) -> None:
        ncpus = self.target.ncpus
        if ncpus < 1:
            raise KernelError("the target has no CPUs (no registers source)")
        # A vCPU stopped in a sandbox has a CR3 that maps little of the kernel:
        # without an explicit cpu, try each vCPU until one yields the kernel.
        first_err = None
        for c in ([cpu] if cpu is not None else range(ncpus)):
            try:
                self._discover_on(c, verify)
                break
            except KernelError as e:
                first_err = first_err or e
        else:
            raise first_err  # the first vCPU's reason is the one to show
        for fix in (e.root_fixup for e in self.extensions if e.root_fixup):
            better = fix(self)  # e.g. the SBM model: a sandbox root -> its kernel root
            if better is not None and better != self.root:
                self.root = better
                self._clear_stop_caches()   # the root changed
        self._pin_root()

    def _pin_root(self) -> None:
        """Use init_top_pgt as the kernel root from now on: the CR3 a vCPU had
        at discovery may be a process's PGD, freed (and reused) once that
        process exits, while the model lives on across stops."""
        if self.symbols.get("init_top_pgt") is None:
            return
        pa = (self.sym("init_top_pgt") - START_KERNEL_MAP + self.phys_base) & ((1 << 64) - 1)
        text = self.sym("_text")
        try:
            ok = (pg.translate(self._reader, pa, text, la57=self.la57, nxe=self.nxe).pa ==
                  pg.translate(self._reader, self.root, text, la57=self.la57, nxe=self.nxe).pa)
        except Exception:  # noqa: BLE001 - unreadable: keep the discovered root
            ok = False
        if ok and pa != self.root:
            self.root = pa
            self._clear_stop_caches()   # the root changed

    def _discover_on(self, cpu: int, verify: bool) -> None:
        t = self.target
        regs = t.registers(cpu)
        self.cr4 = regs.get("cr4", 0)
        self.la57 = bool(self.cr4 & CR4_LA57)
        self.nxe = bool(regs.get("efer", EFER_NXE) & EFER_NXE)
        self.levels = 5 if self.la57 else 4
        self.root = decode_cr3(regs["cr3"], self.cr4).kernel_pgd_pa
        if not regs.get("cr0", 1 << 31) >> 31 & 1:
            raise KernelError("paging is off on that vCPU (stopped before the kernel set up CR3?)")
        self.slide, self.phys_base = self._find_slide(verify)
        sym = self.symbols
        self.page_offset_base = self._read_base("page_offset_base", 0xFFFF888000000000)
        self.vmalloc_base = self._read_base("vmalloc_base", 0xFFFFC90000000000)
        self.vmemmap_base = self._read_base("vmemmap_base", 0xFFFFEA0000000000)
        self.per_cpu_end = sym.get("__per_cpu_end") or 0

    def _first_pmds(self) -> list[int]:
        """VAs of the present 2 MiB entries in the kernel-image PMD (first few)."""
        tr = pg.translate(self._reader, self.root, START_KERNEL_MAP, la57=self.la57, nxe=self.nxe)
        if not tr.entries or tr.entries[-1].level != 2:
            # the PD entry itself may be absent; we need the PD table address
            pud = next((e for e in tr.entries if e.level == 3), None)
            if pud is None or not pud.present or pud.leaf:
                raise KernelError("no kernel image mapping at 0xffffffff80000000 under the kernel root "
                                  f"{self.root:#x} (is this a Linux x86-64 guest, booted?)")
            pd_pa = pud.target
        else:
            pd_pa = tr.entries[-1].entry_pa & ~0xFFF
        table = self._reader.table(pd_pa)
        if table is None:
            raise KernelError(f"kernel-image PMD table at {pd_pa:#x} is not readable")
        base_idx = (START_KERNEL_MAP >> 21) & 511
        out = []
        for i in range(base_idx, 512):
            if table[i] & pg.P:
                out.append(START_KERNEL_MAP + ((i - base_idx) << 21))
                if len(out) >= 8:
                    break
        return out

    def _find_slide(self, verify: bool) -> tuple[int, int]:
        text = self.symbols.addr("_text")
        banner = self.symbols.get("linux_banner")
        want = self.symbols.read_file_bytes(banner, 64) if banner else None
        candidates = self._first_pmds()
        if not candidates:
            raise KernelError("the kernel-image PMD has no present entry")
        tried = []
        for va in candidates:
            slide = va - text
            tr = pg.translate(self._reader, self.root, va, la57=self.la57, nxe=self.nxe)
            if tr.pa is None:
                continue
            phys_base = tr.pa - (va - START_KERNEL_MAP)
            if not verify or want is None:
                return slide, phys_base & ((1 << 64) - 1)
            try:
                got = self._read_virt_root(self.root, banner + slide, len(want))
            except (FaultError, TargetError):
                got = b""
            if got == want:
                return slide, phys_base & ((1 << 64) - 1)
            tried.append((va, got))
        va0, got0 = tried[0] if tried else (candidates[0], b"")
        raise KernelError(
            "vmlinux does not match the running kernel: linux_banner differs "
            f"(vmlinux: {cstring(want or b'')[:60]!r}, memory at slide {va0 - text:#x}: "
            f"{cstring(got0)[:60]!r})")

    def _read_base(self, name: str, default: int) -> int:
        a = self.symbols.get(name)
        if a is None:
            return default
        return self.read_u64(self.root, a + self.slide)

    # ---------------------------------------------------------------- symbols
    def is_percpu_symbol(self, addr: int) -> bool:
        return self.per_cpu_end != 0 and 0 <= addr < self.per_cpu_end

    def sym(self, name: str) -> int:
        """Runtime address of a symbol (slid; per-CPU symbols stay zero-based)."""
        a = self.symbols.addr(name)
        return a if self.is_percpu_symbol(a) else a + self.slide

    def lookup(self, va: int) -> tuple[str, int] | None:
        return self.symbols.lookup(va - self.slide)

    def per_cpu_offset(self, cpu: int) -> int:
        a = self.symbols.get("__per_cpu_offset")
        if a is None:  # !SMP
            return 0
        return self.read_u64(self.root, a + self.slide + 8 * cpu)

    def per_cpu_addr(self, name: str, cpu: int) -> int:
        return (self.symbols.addr(name) + self.per_cpu_offset(cpu)) & ((1 << 64) - 1)

    # ------------------------------------------------------------------ memory
    def translate(self, root: int, va: int) -> pg.Translation:
        """``va`` through the page tables at ``root`` (cached per 4 KiB page and stop)."""
        key = (root, va >> 12)
        tr = self._tlb.get(key)
        if tr is None:
            tr = pg.translate(self._reader, root, va, la57=self.la57, nxe=self.nxe)
            if tr.pa is not None:
                self._tlb[key] = tr
        elif tr.va != va:
            # Cached per 4 KiB page: same walk, this address's offset.
            tr = dataclasses.replace(tr, va=va, pa=(tr.pa & ~0xFFF) | (va & 0xFFF))
        return tr

    def walk(self, root: int, **kw) -> tuple[list[pg.Mapping], pg.Walker]:
        """Every mapping under ``root`` (x86.paging.walk: range, flags, ...)."""
        return pg.walk(self._reader, root, la57=self.la57, nxe=self.nxe, **kw)

    def ptov(self, root: int, pa: int, **kw) -> tuple[list[tuple[int, pg.Mapping]], pg.Walker]:
        """Every virtual address mapping physical ``pa`` under ``root``."""
        return pg.ptov(self._reader, root, pa, la57=self.la57, nxe=self.nxe, **kw)

    def _read_virt_root(self, root: int, va: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            tr = self.translate(root, va)
            if tr.pa is None:
                raise FaultError(va, tr)
            pa = (tr.pa & ~0xFFF) | (va & 0xFFF)
            chunk = min(n, 4096 - (va & 0xFFF))
            out += self.target.read_phys(pa, chunk)
            va += chunk
            n -= chunk
        return bytes(out)

    def read_virt(self, root: int, va: int, n: int) -> bytes:
        """Read ``n`` bytes at ``va`` translated through ``root`` (a PGD physical
        address; use ``self.root`` for the kernel)."""
        if n > 1 << 24:
            raise KernelError(f"refusing a {n}-byte read")
        return self._read_virt_root(root, va & ((1 << 64) - 1), n)

    def read_u64(self, root: int, va: int) -> int:
        return struct.unpack("<Q", self.read_virt(root, va, 8))[0]

    def read_struct(self, struct_name: str, va: int, root: int | None = None,
                    fields: list[str] | None = None) -> dict:
        lay = self.layouts.layout(struct_name)
        data = self.read_virt(self.root if root is None else root, va, lay.size)
        return decode_struct(lay, data, fields)

    def read_field(self, struct_name: str, va: int, path: str, root: int | None = None):
        f = self.layouts.resolve(struct_name, path)
        data = self.read_virt(self.root if root is None else root, va + f.offset, f.size)
        return decode_field(type(f)(**{**f.__dict__, "offset": 0}), data)

    def virt_to_phys_direct(self, va: int) -> int:
        return va - self.page_offset_base

    def phys_to_virt_direct(self, pa: int) -> int:
        return pa + self.page_offset_base

    # ------------------------------------------------------------------ roots
    def resolve_root(self, spec: str | None, cpu: int | None = None) -> RootSpec:
        """'kernel' | 'user' (the PTI user PGD of cpu's CR3, or CR3 itself
        without PTI) | 'sandbox' / 'sandbox=N' | a CR3 / PGD physical address."""
        spec = (spec or "kernel").strip().lower()
        if spec == "kernel":
            return RootSpec("kernel", self.root)
        if spec == "user":
            c = 0 if cpu is None else cpu
            cr3 = self.target.registers(c)["cr3"]
            d = decode_cr3(cr3, self.cr4)
            pti = self.pti_enabled()
            if not pti or not d.pti_user:
                sb = self._sandbox_root_of(cr3)
                if sb is not None:
                    # a vCPU on a sandbox table: the process's user table is its mm's
                    # (a sandbox PGD may have bit 12 set without being a PTI user PGD)
                    pa = self._task_mm_pgd(c)
                    if pa is None:
                        raise KernelError(f"vCPU {c} runs on {sb.label}'s page table and its task's "
                                          "mm is unreadable: use --root sandbox or a CR3 value")
                    return RootSpec("user", pa | (1 << 12) if pti else pa, cr3,
                                    {"note": f"vCPU {c} is on {sb.label}: the current task's mm"})
            return RootSpec("user", d.user_pgd_pa if pti else d.pgd_pa, cr3)
        if spec.startswith("sandbox"):
            want = spec.partition("=")[2]
            roots: list[RootSpec] = []
            providers = [e.sandbox_roots for e in self.extensions if e.sandbox_roots]
            for prov in providers:
                roots += prov(self)
            if not roots:
                raise KernelError("no sandbox is active (no task has thread_info.sbm_state set)"
                                  if providers else
                                  "sandbox roots need the SBM model: open the kernel with "
                                  "sbmdbg.sbm.open_kernel")
            if not want:
                return roots[0]
            for r in roots:
                if r.label.endswith(f":{want}") or str(r.extra.get("pid")) == want:
                    return r
            try:
                return roots[int(want, 0)]
            except (ValueError, IndexError):
                raise KernelError(f"no sandbox {want!r} (have: {', '.join(r.label for r in roots)})") from None
        try:
            v = int(spec, 0)
        except ValueError:
            raise KernelError(f"bad root {spec!r}: kernel, user, sandbox[=N] or a CR3 value") from None
        return RootSpec("cr3", decode_cr3(v, self.cr4).pgd_pa, v)

    def pti_enabled(self) -> bool:
        """The kernel's own decision: X86_FEATURE_PTI in boot_cpu_data (Linux
        sets it when it isolates page tables).  Only when that cannot be read,
        a running CR3 with bit 12 set counts (bit 12 alone is no proof: a
        sandbox PGD of the v1 series is a single 4 KiB page, any address)."""
        memo = self.cache("pti", per_stop=False)
        if "cap" in memo:
            return memo["cap"]
        cap = self.cpu_cap(PTI_FEATURE)
        if cap is not None:
            memo["cap"] = cap       # set once at boot
            return cap
        for c in range(self.target.ncpus):
            if decode_cr3(self.target.registers(c)["cr3"], self.cr4).pti_user:
                return True
        return False

    def pti_evidence(self) -> str:
        cap = self.cpu_cap(PTI_FEATURE)
        if cap is not None:
            return f"boot_cpu_data.x86_capability: X86_FEATURE_PTI {'set' if cap else 'clear'}"
        return "boot_cpu_data unreadable: a running CR3 with bit 12 set (PTI user PGD)"

    def cpu_has(self, feature: int) -> bool:
        """boot_cpu_data.x86_capability bit (layout from DWARF)."""
        return bool(self.cpu_cap(feature))

    def cpu_cap(self, feature: int) -> bool | None:
        """boot_cpu_data.x86_capability bit, None when unreadable."""
        a = self.symbols.get("boot_cpu_data")
        if a is None:
            return None
        try:
            off = self.layouts.offsetof("cpuinfo_x86", "x86_capability")
            word = struct.unpack("<I", self.read_virt(self.root, a + self.slide + off + 4 * (feature // 32), 4))[0]
        except (SbmdbgError, TargetError):
            return None
        return bool(word >> (feature % 32) & 1)

    def _sandbox_root_of(self, cr3: int):
        for e in self.extensions:
            if not e.sandbox_roots:
                continue
            try:
                for r in e.sandbox_roots(self):
                    if r.cr3 is not None and (r.cr3 ^ cr3) & ((1 << 52) - 1) & ~0xFFF == 0:
                        return r
            except SbmdbgError:
                pass
        return None

    def _task_mm_pgd(self, cpu: int) -> int | None:
        from sbmdbg.model.percpu import current_task
        try:
            task = current_task(self, cpu)
            mm = self.read_field("task_struct", task, "mm") or self.read_field("task_struct", task, "active_mm")
            pgd = self.read_field("mm_struct", mm, "pgd")
            return self.translate(self.root, pgd).pa
        except (SbmdbgError, TargetError):
            return None

    def summary(self) -> dict:
        return {"root": self.root, "levels": self.levels, "la57": self.la57, "nxe": self.nxe,
                "slide": self.slide, "phys_base": self.phys_base,
                "text": self.sym("_text"), "page_offset_base": self.page_offset_base,
                "vmalloc_base": self.vmalloc_base, "vmemmap_base": self.vmemmap_base,
                "build_id": self.symbols.build_id}
