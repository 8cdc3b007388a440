"""Drive the reference kernel's ``/sys/kernel/debug/sbm_codec`` (patch 0007).

Inputs go straight into the kernel's static staging buffer
``sbm_codec_stage`` (bss: physically contiguous) through the VM's shared RAM
file, so no input byte crosses the serial console; the console carries only
the ``run`` commands (``<codec> <out_len> <in_off> <in_len>``) and their
one-line results.  Many cases are staged at once at different offsets and run
by one shell line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sbmdbg.errors import SbmdbgError
from sbmdbg.target.shm import RamLayout

CODEC_DIR = "/sys/kernel/debug/sbm_codec"
STAGE_SYM = "sbm_codec_stage"
CODECS = ("lz4_safe", "lz4_fast", "inflate")
_RESULT = re.compile(r"codec=(\S+) ret=(-?\d+) sbm_error=(-?\d+) in_len=(\d+) out_len=(\d+) "
                     r"out_fnv1a64=0x([0-9a-f]+) in_sbm=0x([0-9a-f]+) out_sbm=0x([0-9a-f]+)")
#: one shell line stays well under the tty's 4095-byte canonical line
LINE_BUDGET = 3000


def fnv1a64(data: bytes) -> int:
    """The hash the kernel side reports as ``out_fnv1a64`` (FNV-1a, 64 bit)."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@dataclass
class Result:
    codec: str
    ret: int
    sbm_error: int
    in_len: int
    out_len: int
    out_fnv: int
    in_sbm: int
    out_sbm: int


def parse_result(line: str) -> Result:
    m = _RESULT.search(line)
    if not m:
        raise SbmdbgError(f"unexpected sbm_codec result: {line[:200]!r}")
    g = m.groups()
    return Result(g[0], int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5], 16),
                  int(g[6], 16), int(g[7], 16))


def _region(kernel, sym: str) -> tuple[int, int]:
    """(physical address, size) of a static kernel array, checked contiguous."""
    try:
        va = kernel.sym(sym)
    except Exception as e:  # noqa: BLE001 - a kernel without patch 0007
        raise SbmdbgError(f"the kernel has no {sym} (patch 0007, CONFIG_SBM_CODEC_DEMO): {e}")
    size = kernel.symbols.size(sym)
    first, last = kernel.translate(kernel.root, va), kernel.translate(kernel.root, va + size - 1)
    if first.pa is None or last.pa != first.pa + size - 1:
        raise SbmdbgError(f"{sym} at {va:#x} is not mapped physically contiguous")
    return first.pa, size


class CodecGuest:
    """The sbm_codec interface of one VM (harness ``VM`` with a shared RAM
    file) and its kernel model (for the staging buffer's physical address)."""

    def __init__(self, vm, kernel):
        self.vm = vm
        info = vm.info
        self.layout = RamLayout(info["ram_size"])
        self.stage_pa, self.stage_size = _region(kernel, STAGE_SYM)
        self.batch_pa, batch_size = _region(kernel, "sbm_codec_batch")
        self.res_pa, _ = _region(kernel, "sbm_codec_results")
        self.req = kernel.layouts.layout("sbm_codec_req")
        self.res = kernel.layouts.layout("sbm_codec_res")
        self.batch_max = batch_size // self.req.size
        self._fd = os.open(info["ram"], os.O_RDWR)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def stage(self, off: int, data: bytes) -> None:
        if off < 0 or off + len(data) > self.stage_size:
            raise SbmdbgError(f"{len(data)} bytes at {off} do not fit the {self.stage_size}-byte stage")
        pa = self.stage_pa + off
        os.pwrite(self._fd, data, self.layout.offset(pa, max(len(data), 1)))

    def _pwrite(self, pa: int, data: bytes) -> None:
        os.pwrite(self._fd, data, self.layout.offset(pa, len(data)))

    def _pread(self, pa: int, n: int) -> bytes:
        return os.pread(self._fd, n, self.layout.offset(pa, n))

    def _encode_req(self, codec: str, out_len: int, off: int, n: int) -> bytes:
        b = bytearray(self.req.size)
        for name, v in (("codec", CODECS.index(codec)), ("out_len", out_len), ("in_off", off),
                        ("in_len", n)):
            f = self.req.field(name)
            b[f.offset:f.offset + f.size] = v.to_bytes(f.size, "little")
        return bytes(b)

    def run_fast(self, cases: list[tuple[str, bytes, int]], timeout: float = 300.0) -> list[Result]:
        """Like ``run_batch``, but the requests and results go through guest
        RAM (``sbm_codec_batch``/``sbm_codec_results``, layouts from DWARF):
        one ``echo batch N`` per chunk is all the console carries."""
        from sbmdbg.model.layout import decode_struct

        out: list[Result] = []
        i = 0
        while i < len(cases):
            off, reqs, chunk = 0, [], []
            while i < len(cases) and len(reqs) < self.batch_max:
                codec, data, olen = cases[i]
                if codec not in CODECS:
                    raise SbmdbgError(f"unknown codec {codec!r}")
                if reqs and off + len(data) > self.stage_size:
                    break
                self.stage(off, data)
                reqs.append(self._encode_req(codec, olen, off, len(data)))
                chunk.append(cases[i])
                off += len(data)
                i += 1
            self._pwrite(self.batch_pa, b"".join(reqs))
            res = self.vm.run(f"echo batch {len(reqs)} > {CODEC_DIR}/run", timeout=timeout)
            if not res.ok:
                raise SbmdbgError(f"sbm_codec batch of {len(reqs)} failed", detail=res.output[-2000:])
            raw = self._pread(self.res_pa, self.res.size * len(reqs))
            for j, (codec, data, _olen) in enumerate(chunk):
                d = decode_struct(self.res, raw[j * self.res.size:(j + 1) * self.res.size])
                if d["done"] != 1:
                    raise SbmdbgError(f"sbm_codec batch: request {j} did not run")
                out.append(Result(codec, d["ret"], d["sbm_error"], len(data), d["out_len"],
                                  d["out_fnv1a64"], d["in_sbm"], d["out_sbm"]))
        return out

    def run_batch(self, cases: list[tuple[str, bytes, int]], timeout: float = 120.0) -> list[Result]:
        """Run ``(codec, input, out_len)`` cases; one shell line per chunk
        that fits the stage and the line budget."""
        out: list[Result] = []
        i = 0
        while i < len(cases):
            off, cmds = 0, []
            while i < len(cases):
                codec, data, olen = cases[i]
                if codec not in CODECS:
                    raise SbmdbgError(f"unknown codec {codec!r}")
                cmd = f"echo {codec} {olen} {off} {len(data)} >run;cat run"
                if cmds and (off + len(data) > self.stage_size or
                             sum(len(c) + 1 for c in cmds) + len(cmd) > LINE_BUDGET):
                    break
                self.stage(off, data)
                off += len(data)
                cmds.append(cmd)
                i += 1
            res = self.vm.run(f"cd {CODEC_DIR};" + ";".join(cmds) + ";cd /", timeout=timeout)
            lines = [ln for ln in res.output.splitlines() if ln.startswith("codec=")]
            if len(lines) != len(cmds):
                raise SbmdbgError(f"{len(cmds)} codec runs gave {len(lines)} results",
                                  detail=res.output[-2000:])
            out.extend(parse_result(ln) for ln in lines)
        return out

    def stats(self) -> dict:
        res = self.vm.run(f"cat {CODEC_DIR}/stats")
        return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", res.output)}
