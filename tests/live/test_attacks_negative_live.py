"""Negative proof of the attack catalogue (issue 15): checks/check_attacks.toml
passes on the reference kernel (pytest collects checks/ as scenario items)
and, on the kernel without the hardening (fixtures/kernel/broken/0201-...:
0005 reverted), fails with messages naming the scenarios that crash the
kernel or corrupt the caller's state.  The catalogue is split step by step,
one scenario file each (shorter timeouts: the unhardened endless loop only
ends when the step times out), run by one `sbmdbg check --reuse-after-failure`
on one VM: a failed scenario's VM is replaced only when the guest no longer
answers (QEMU exited, the shell hung) or the kernel's taint changed (a WARN,
an oops), so the scenarios known to end the VM run last."""
from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.live, pytest.mark.timeout(2400)]
REPO = Path(__file__).resolve().parents[2]
CATALOGUE = REPO / "checks" / "check_attacks.toml"
UNHARDENED = REPO / "fixtures" / "kernel" / "broken" / "0201-test-only-revert-sbm-hardening.patch"
#: what 0005 fixes (measured under TCG: the VM dies, the shell is killed or
#: signalled, the caller's state is corrupted, a WARN splat, a hang)
EXPECTED_FAIL = ("gs_selector", "wrgsbase", "wrfsbase", "syscall", "lret32", "trap_flag", "sse_unmasked",
                 "warn_ud2", "endless_loop", "nested_from_irq", "irqs_off_caller", "unaligned_output")
#: what the unhardened kernel already survives here (no IA32 emulation, no
#: PKU, TCG's icebp is #UD and it raises no #AC)
EXPECTED_PASS = ("int80", "pkru_write", "int1", "alignment_check", "ok")
#: what ends the unhardened VM here (QEMU exits after an oops or a triple
#: fault, the shell never comes back, a WARN taints the kernel): run after the
#: others, so that those share one VM
ENDS_THE_VM = ("lret32", "trap_flag", "warn_ud2", "nested_from_irq", "gs_selector", "wrgsbase", "syscall",
               "endless_loop")
EXPECTED_MESSAGES = (
    "QEMU exited during the file",                       # gs_selector, wrgsbase, syscall
    'saw no result= in the output: "Segmentation fault"',  # wrfsbase: the shell's TLS
    'saw no result= in the output: "Trace/breakpoint trap"',  # trap_flag: SIGTRAP to the caller
    'state: expected == "ok", saw "BAD:mxcsr"',
    'state: expected == "ok", saw "BAD:if"',
    'neighbour: expected == "0x11", saw "0x33"',
    "scenario=warn_ud2 ret=1 sbm_error=0 result=FAIL",
)


def split_catalogue(dest: Path, timeout: int = 40) -> list[Path]:
    """One scenario file per step of the catalogue (the VM-ending ones last)."""
    text = CATALOGUE.read_text()
    head, *steps = text.split("\n[[step]]\n")
    head = re.sub(r'(?m)^name = ".*"$', "", head)
    out = []
    for i, body in enumerate(steps, 1):
        body = re.sub(r"(?m)^timeout = \d+$", f"timeout = {timeout}", body)
        m = re.search(r'(?m)^demo = "([^"]+)"$', body)
        if m is None:           # the 20 rounds from two shells (run =): each scenario alone says more
            continue
        demo = m.group(1)
        f = dest / f"attack_{i:02d}.toml"
        f.write_text(f'name = "unhardened {demo}"\ntimeout = {timeout}\n{head}\n'
                     f"[[step]]\n{body}")
        out.append((demo in ENDS_THE_VM, f))
    # stable: catalogue order otherwise, so "ok" (last) runs on the VM every
    # failure before it was kept on, and must still pass there
    return [f for _, f in sorted(out, key=lambda t: t[0])]


def test_catalogue_fails_on_the_unhardened_kernel(tmp_path, kernel_build):
    files = split_catalogue(tmp_path)
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "check", *map(str, files), "--extra-patch",
                        str(UNHARDENED), "--reuse-after-failure", "--junit", str(tmp_path / "neg.xml")],
                       capture_output=True, text=True, timeout=2100, cwd=REPO)
    out = r.stdout
    assert r.returncode == 1, out[-4000:] + r.stderr[-2000:]
    root = ET.parse(tmp_path / "neg.xml").getroot()
    failed = {s.get("name") for s in root.iter("testsuite")
              if any(tc.find("failure") is not None or tc.find("error") is not None
                     for tc in s.iter("testcase"))}
    failed_names = " ".join(sorted(failed))
    # what the hardening fixes, scenario by scenario
    for name in EXPECTED_FAIL:
        assert f"unhardened {name}" in failed, (name, failed_names, out[-6000:])
    # specific: the attacks the unhardened kernel already survives still pass
    for name in EXPECTED_PASS:
        assert f"unhardened {name}" not in failed, (name, failed_names)
    # the messages say how: crashed VMs, corrupted state, the splat
    for msg in EXPECTED_MESSAGES:
        assert msg in out, (msg, out[-6000:])
