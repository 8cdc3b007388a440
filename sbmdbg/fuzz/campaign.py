"""The fuzz campaign: cases, the run (traced by the no-stop plugin tracer),
the classification and the grouped ``why`` of every abort.

Cases (``random.Random(seed)``, reproducible): valid inputs compressed by
Python's ``lz4.block`` / ``zlib`` (the sandbox's output must equal the
original, byte for byte: FNV-1a of the output is compared), and malformed
ones: truncations, bit flips, forged lengths (LZ4 literal/match length
nibbles and extension bytes, zlib header and stored-block lengths) and forged
offsets (LZ4 match offsets reaching before the output).  LZ4 cases alternate
LZ4_decompress_safe and LZ4_decompress_fast.
"""
from __future__ import annotations

import random
import time
import zlib
from dataclasses import dataclass

from sbmdbg.errors import SbmdbgError
from sbmdbg.fuzz.guest import fnv1a64

BIG = 64 * 1024 + 123      # >= 64 KiB: crosses many pages


@dataclass
class Case:
    codec: str
    data: bytes          # what the guest decompresses
    out_len: int
    kind: str            # valid | truncated | bitflip | forged_length | forged_offset
    expect: bytes | None = None   # the original, for valid cases


def _payload(rng: random.Random, big: bool) -> bytes:
    n = BIG + rng.randrange(1 << 14) if big else rng.randrange(1, 4000)
    style = rng.randrange(4)
    if style == 0:
        return rng.randbytes(n)
    if style == 1:
        unit = rng.randbytes(rng.randrange(1, 64))
        return (unit * (n // len(unit) + 1))[:n]
    if style == 2:
        return bytes(rng.choice(b"abcdefgh ") for _ in range(n))
    words = [rng.randbytes(rng.randrange(2, 12)) for _ in range(16)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words)
    return bytes(out[:n])


def _compress(family: str, data: bytes) -> bytes:
    if family == "lz4":
        import lz4.block
        return lz4.block.compress(data, store_size=False)
    return zlib.compress(data)


def _mutate(rng: random.Random, family: str, comp: bytes) -> tuple[str, bytes]:
    b = bytearray(comp)
    m = rng.randrange(4)
    if m == 0 and len(b) > 1:
        return "truncated", bytes(b[:rng.randrange(1, len(b))])
    if m == 1:
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return "bitflip", bytes(b)
    if m == 2:
        # lengths: an LZ4 token's nibbles / extension bytes; zlib's header or an early byte
        i = 0 if family == "lz4" or rng.random() < 0.3 else rng.randrange(min(len(b), 8))
        b[i] = rng.choice((0xFF, 0xF0, 0x0F, rng.randrange(256)))
        if len(b) > i + 1 and rng.random() < 0.5:
            b[i + 1] = 0xFF
        return "forged_length", bytes(b)
    # offsets: for LZ4 a 16-bit little-endian word somewhere in the stream
    if len(b) > 3:
        i = rng.randrange(1, len(b) - 2)
        b[i:i + 2] = rng.choice((b"\xff\xff", b"\x00\x80", rng.randbytes(2)))
    return "forged_offset", bytes(b)


def cases(family: str, n: int, seed: int = 0, valid_share: float = 0.3) -> list[Case]:
    if family not in ("lz4", "zlib"):
        raise SbmdbgError(f"unknown fuzz target {family!r}: lz4 or zlib")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        big = rng.random() < 0.05
        data = _payload(rng, big)
        comp = _compress(family, data)
        codec = ("lz4_fast" if i % 2 else "lz4_safe") if family == "lz4" else "inflate"
        if rng.random() < valid_share:
            out.append(Case(codec, comp, len(data), "valid", data))
        else:
            kind, bad = _mutate(rng, family, comp)
            out.append(Case(codec, bad, len(data), kind))
    return out


def classify(codec: str, r) -> str:
    if r.sbm_error:
        return "sandbox abort"
    if codec == "inflate":
        return "ok" if r.ret == 1 else "decoder error"     # Z_STREAM_END
    return "ok" if r.ret >= 0 else "decoder error"


def buffers_of(case: Case, r) -> list[dict]:
    """The sandbox buffers of one codec run (patch 0007's layout: the input's
    data ends at its copy's page end; the output starts on a page)."""
    return [{"direction": "input", "index": 0, "sbm_ptr": r.in_sbm, "size": len(case.data)},
            {"direction": "output", "index": 0, "sbm_ptr": r.out_sbm, "size": case.out_len}]


def code_at(kernel, ev: dict) -> bytes | None:
    """The running kernel's bytes at the fault RIP (text is not freed; the
    trace's vmlinux bytes may predate the alternatives patching)."""
    try:
        return kernel.read_virt(kernel.root, int(ev["fault_rip"], 16), 16)
    except Exception:  # noqa: BLE001 - fall back to vmlinux's bytes
        return None


def run(vm, kernel, family: str, n: int, seed: int = 0, trace_file: str | None = None,
        batch: int = 1000, progress=None) -> dict:
    """Run a campaign on ``vm`` (a harness VM with the sbmtrace plugin)."""
    from sbmdbg.fuzz.guest import CodecGuest
    from sbmdbg.sbm import why as W
    from sbmdbg.trace.fast import PluginTracer
    from sbmdbg.trace.why import explain_event

    cs = cases(family, n, seed)
    g = CodecGuest(vm, kernel)
    path = trace_file or f"{vm.info['workdir']}/fuzz-{family}-{seed}.jsonl"
    before = g.stats()
    tracer = PluginTracer(vm, path)
    results = []
    tracer.start()
    t0 = time.monotonic()
    try:
        for i in range(0, len(cs), batch):
            chunk = cs[i:i + batch]
            results += g.run_fast([(c.codec, c.data, c.out_len) for c in chunk])
            tracer.poll()
            if progress:
                progress(len(results), len(cs))
        secs = time.monotonic() - t0
        st = tracer.stop()
    finally:
        tracer.close()
        g.close()
    after = g.stats()
    events = tracer.events()
    classes: dict[str, int] = {}
    wrong, abort_cases = [], []
    for c, r in zip(cs, results):
        cl = classify(c.codec, r)
        classes[cl] = classes.get(cl, 0) + 1
        if c.kind == "valid" and (cl != "ok" or r.out_len != len(c.expect)
                                  or r.out_fnv != fnv1a64(c.expect)):
            wrong.append({"case": len(abort_cases), "codec": c.codec, "class": cl, "ret": r.ret})
        if cl == "sandbox abort":
            abort_cases.append((c, r))
    aborts = [e for e in events if e.get("kind") == "abort"]
    from sbmdbg.trace.why import image_for
    img = image_for(events, vm.info.get("vmlinux"))
    groups: dict[str, dict] = {}
    sites: dict[str, dict] = {}
    for ev, (c, r) in zip(aborts, abort_cases):
        d = explain_event(img, ev)
        if ev.get("cr2") is not None:
            d2 = W.explain(img, rip=int(ev["fault_rip"], 16), vector=ev.get("vector"),
                           error_code=ev.get("error_code"), cr2=int(ev["cr2"], 16),
                           buffers=buffers_of(c, r), region=None, code=code_at(kernel, ev))
            d.update(address=d2["address"], summary=d2["summary"], instruction=d2["instruction"],
                     access=d2["access"], rule=d2["rule"])
        src = d["source"]
        sites.setdefault(ev["fault_rip"], {"rip": ev["fault_rip"], "file": src.get("file"),
                                           "line": src.get("line"), "function": src.get("function"),
                                           "instruction": d["instruction"].get("text"), "count": 0})
        sites[ev["fault_rip"]]["count"] += 1
        key = W.group_key(d)
        gr = groups.setdefault(key, {"why": key, "count": 0, "codecs": {}, "example": d["summary"],
                                     "rule": d["rule"]["id"]})
        gr["count"] += 1
        gr["codecs"][c.codec] = gr["codecs"].get(c.codec, 0) + 1
    dmesg = vm.run("dmesg | grep -E 'BUG|WARNING|Oops|general protection|RIP:' | head -5").output
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    report = {
        "target": family, "cases": len(cs), "seed": seed, "seconds": round(secs, 3),
        "calls_per_s": round(len(cs) / secs, 1) if secs else None,
        "classes": classes,
        "kinds": {k: sum(1 for c in cs if c.kind == k) for k in sorted({c.kind for c in cs})},
        "valid_wrong": wrong, "distinct_fault_sites": len(sites),
        "fault_sites": sorted(sites.values(), key=lambda x: -x["count"]),
        "aborts_traced": len(aborts), "aborts_returned": len(abort_cases),
        "why_groups": sorted(groups.values(), key=lambda g_: -g_["count"]),
        "kernel": {"stats_delta": delta, "alive": vm.alive(), "dmesg_problems": dmesg.strip(),
                   "clean": (not dmesg.strip() and delta.get("calls") == len(cs)
                             and delta.get("aborts") == len(abort_cases))},
        "trace": {"file": path, "summary": st.get("summary") if isinstance(st, dict) else None},
    }
    return report
