"""The fuzz campaign's cases and classification, offline."""
from __future__ import annotations

import zlib

import lz4.block
import pytest

from sbmdbg.errors import SbmdbgError
from sbmdbg.fuzz import campaign as C
from sbmdbg.fuzz.guest import Result, fnv1a64, parse_result

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("family", ["lz4", "zlib"])
def test_cases_reproducible_and_valid_ones_decompress(family):
    a, b = C.cases(family, 60, seed=5), C.cases(family, 60, seed=5)
    assert [(c.codec, c.data, c.out_len, c.kind) for c in a] == \
        [(c.codec, c.data, c.out_len, c.kind) for c in b]
    assert [c.data for c in C.cases(family, 60, seed=6)] != [c.data for c in a]
    valid = [c for c in a if c.kind == "valid"]
    assert valid and len(valid) < len(a)
    for c in valid:
        got = (lz4.block.decompress(c.data, uncompressed_size=c.out_len) if family == "lz4"
               else zlib.decompress(c.data))
        assert got == c.expect and len(got) == c.out_len
    if family == "lz4":
        assert {c.codec for c in a} == {"lz4_safe", "lz4_fast"}
    else:
        assert {c.codec for c in a} == {"inflate"}
    big = [c for c in C.cases(family, 200, seed=1) if c.out_len >= 64 * 1024]
    assert big, "some inputs must cross many pages"


def test_mutations_change_the_input():
    for c in C.cases("lz4", 80, seed=2):
        if c.kind == "truncated":
            assert 0 < len(c.data)
    kinds = {c.kind for c in C.cases("zlib", 200, seed=3)}
    assert kinds == {"valid", "truncated", "bitflip", "forged_length", "forged_offset"}


def test_classify_and_result_line():
    line = ("codec=lz4_fast ret=-14 sbm_error=-14 in_len=6 out_len=0 "
            "out_fnv1a64=0x0000000000000000 in_sbm=0xffffc9000000cffa out_sbm=0xffffc9000000e000")
    r = parse_result(line)
    assert (r.ret, r.sbm_error, r.in_sbm) == (-14, -14, 0xffffc9000000cffa)
    assert C.classify("lz4_fast", r) == "sandbox abort"
    ok = Result("inflate", 1, 0, 10, 5, 0, 0, 0)
    assert C.classify("inflate", ok) == "ok"
    assert C.classify("inflate", Result("inflate", -3, 0, 10, 0, 0, 0, 0)) == "decoder error"
    assert C.classify("lz4_safe", Result("lz4_safe", -1, 0, 10, 0, 0, 0, 0)) == "decoder error"
    with pytest.raises(SbmdbgError):
        parse_result("garbage")
    with pytest.raises(SbmdbgError):
        C.cases("zstd", 1)
    # FNV-1a 64 test vectors (the kernel side computes the same)
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
