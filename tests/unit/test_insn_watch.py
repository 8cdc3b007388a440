"""The sbmtrace plugin's instruction watch (issue 15): the C classifier that
picks, at translation time, the instructions to watch in a sandbox agrees
with the Python one that names them (sbmdbg.sbm.attack.sensitive_insn), so a
sandbox_insn event never says "?".  The plugin source is compiled with stub
QEMU entry points into a small program that classifies hex lines."""
from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from sbmdbg.sbm.attack import sensitive_insn
from sbmdbg.vm.qplugin import SOURCE

pytestmark = pytest.mark.unit

HARNESS = r"""
#include "%s"
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t a, qemu_plugin_vcpu_tb_trans_cb_t b) {}
void qemu_plugin_register_vcpu_idle_cb(qemu_plugin_id_t a, qemu_plugin_vcpu_simple_cb_t b) {}
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *a, qemu_plugin_vcpu_udata_cb_t b,
                                            enum qemu_plugin_cb_flags c, void *d) {}
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *a, qemu_plugin_vcpu_mem_cb_t b,
                                      enum qemu_plugin_cb_flags c, enum qemu_plugin_mem_rw d, void *e) {}
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *a) { return 0; }
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *a, size_t b) { return 0; }
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *a) { return 0; }
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *a) { return 0; }
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *a) { return 0; }
struct qemu_plugin_hwaddr *qemu_plugin_get_hwaddr(qemu_plugin_meminfo_t a, uint64_t b) { return 0; }
bool qemu_plugin_hwaddr_is_io(const struct qemu_plugin_hwaddr *a) { return 0; }
uint64_t qemu_plugin_hwaddr_phys_addr(const struct qemu_plugin_hwaddr *a) { return 0; }
void qemu_plugin_reset(qemu_plugin_id_t a, qemu_plugin_simple_cb_t b) {}
void qemu_plugin_outs(const char *a) {}
int main(void)
{
    char line[128];
    while (fgets(line, sizeof(line), stdin)) {
        uint8_t b[16];
        size_t n = 0;
        unsigned v;
        while (n < 15 && sscanf(line + 2 * n, "%%2x", &v) == 1)
            b[n++] = (uint8_t)v;
        printf("%%d\n", sbx_classify(b, n));
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def classify_c(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "no C compiler: the sbmtrace plugin itself needs one (apt-get install gcc)"
    d = tmp_path_factory.mktemp("insnwatch")
    (d / "h.c").write_text(HARNESS % SOURCE)
    subprocess.run([cc, "-O1", "-w", "-o", str(d / "h"), str(d / "h.c"), "-lpthread"], check=True)

    def run(codes: list[bytes]) -> list[int]:
        out = subprocess.run([str(d / "h")], input="".join(c.hex() + "\n" for c in codes),
                             capture_output=True, text=True, check=True).stdout.split()
        return [int(x) for x in out]
    return run


# what the catalogue's scenarios execute (fixtures/kernel/patches/0006) and the rest of the list
WATCHED = [b"\x8e\xe8", b"\xf3\x48\x0f\xae\xd8", b"\xf3\x48\x0f\xae\xd0", b"\x0f\x05", b"\xcd\x80",
           b"\xff\x6d\xf0", b"\xf1", b"\x9d", b"\x0f\xae\x55\xf0", b"\x0f\x0b", b"\x0f\x01\xef",
           b"\x0f\x01\xf8", b"\x0f\x34", b"\xcc", b"\xce", b"\x48\xcf", b"\x48\xcb", b"\xfa", b"\xfb",
           b"\xee", b"\xec", b"\x0f\xa9", b"\x0f\xb5\x07", b"\x0f\xae\x0f", b"\x0f\xae\x2f",
           b"\x0f\xc7\x1f", b"\xd9\x2f", b"\xdd\x27", b"\x0f\x00\xd8", b"\x0f\x01\x17", b"\x0f\x30",
           b"\x0f\x22\xd8", b"\x66\x8e\xd0", b"\x17"]
NOT_WATCHED = [b"\x90", b"\x48\x89\xe5", b"\xf3\x48\x0f\xae\xc0", b"\x0f\xae\xe8", b"\x8c\xe8",
               b"\xff\xd0", b"\xc3", b"\x0f\x01\xee", b"\x0f\x01\xf9", b"\xf3\x90"]


def test_watched_instructions_are_named(classify_c):
    got = classify_c(WATCHED + NOT_WATCHED)
    for code, k in zip(WATCHED, got):
        assert k in (1, 2), code.hex()
        assert sensitive_insn(code) is not None, code.hex()
    assert got[len(WATCHED):] == [0] * len(NOT_WATCHED)
    assert dict(zip((c.hex() for c in WATCHED), got))["0f05"] == 2     # syscall: into the kernel


def test_everything_watched_has_a_name(classify_c):
    """Random bytes and every opcode with every ModRM: what C watches, Python names."""
    rnd = random.Random(15)
    codes = [bytes([op, m, 0xC0 ^ m]) for op in range(256) for m in range(0, 256, 7)]
    codes += [bytes([0x0F, op, m]) for op in range(256) for m in range(0, 256, 5)]
    codes += [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 16))) for _ in range(20000)]
    for code, k in zip(codes, classify_c(codes)):
        if k:
            assert sensitive_insn(code) is not None, code.hex()
