"""Negative proof of the scenario suite (issue 8): the scenario files fail,
with the right messages, on a deliberately broken variant
(fixtures/kernel/broken/0101-...: input buffers mapped writable in the
sandbox).  That the same files pass on the reference kernel is what pytest's
collection of checks/ asserts in the same run (each scenario runs once per
configuration).  The run goes through the CLI (`sbmdbg check`), as CI would;
the broken kernel is built once through the pipeline (cached afterwards)."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.live
REPO = Path(__file__).resolve().parents[2]
BROKEN = REPO / "fixtures" / "kernel" / "broken" / "0101-test-only-checks-input-buffers-writable.patch"
FILES = [str(REPO / "checks" / "check_demo_scenarios.toml"), str(REPO / "checks" / "check_isolation_audit.toml")]


def _check(*args, timeout=1500):   # below the test's own pytest timeout
    return subprocess.run([sys.executable, "-m", "sbmdbg.cli", "check", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.mark.timeout(1800)
def test_suite_fails_on_broken_kernel(tmp_path, kernel_build):
    for f in FILES:     # the files are the ones pytest runs on the reference kernel
        assert Path(f).is_file() and Path(f).parent.name == "checks"
    # one VM for both files: the first one's failure leaves the guest answering, untainted
    bad = _check(*FILES, "--extra-patch", str(BROKEN), "--reuse-after-failure",
                 "--junit", str(tmp_path / "broken.xml"),
                 "--json", str(tmp_path / "broken.json"))
    out = bad.stdout
    assert bad.returncode == 1, out[-4000:] + bad.stderr[-2000:]
    # The demo file: write_ro_input no longer aborts, and says so.
    assert 'sbm_error: expected == -14, saw "0"' in out, out[-4000:]
    assert 'result: expected == "PASS", saw "FAIL"' in out
    assert "stats: expected aborts to change by == 1, saw +0" in out
    # The audit file: at the stop inside the sandbox the audit finds the writable input.
    assert "expected `sbm audit` above_info == false, saw true" in out
    # The KUnit case that checks read-only inputs fails at boot, and the console tail is shown.
    assert "console after boot" in out and "sbm_test_write_input" in out
    assert "console tail:" in out
    # The other scenarios still pass on the broken kernel: the failures are specific.
    root = ET.parse(tmp_path / "broken.xml").getroot()
    assert int(root.get("tests")) >= 15
    failed = {tc.get("name") for tc in root.iter("testcase") if tc.find("failure") is not None}
    assert any("write_ro_input" in n for n in failed), failed
    assert not any(n.endswith("demo ok") or "read_null" in n for n in failed), failed
