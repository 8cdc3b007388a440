"""The attack catalogue (issue 15) on the reference kernel, through the CLI as
CI would: checks/check_attacks.toml (PTI off, 2 vCPUs: per scenario the
guest's result and caller state, a clean console, the tracer's event naming
the attempt) and checks/check_attacks_pti.toml (PTI on, KASLR: the catalogue
20 times from two shells at once).  The unhardened side is
test_attacks_negative_live.py."""
from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.live
REPO = Path(__file__).resolve().parents[2]
FILES = [REPO / "checks" / "check_attacks.toml", REPO / "checks" / "check_attacks_pti.toml"]


def test_catalogue_passes_on_the_reference_kernel(tmp_path, kernel_build):
    r = subprocess.run([sys.executable, "-m", "sbmdbg.cli", "check", *map(str, FILES),
                        "--junit", str(tmp_path / "attacks.xml")],
                       capture_output=True, text=True, timeout=2400, cwd=REPO)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    root = ET.parse(tmp_path / "attacks.xml").getroot()
    assert root.get("failures") == "0" and root.get("errors") == "0" and int(root.get("tests")) >= 37
    # the tracer named the attempts (the per-step checks include transitions.attack)
    assert "the catalogue 20 times from two shells at once" in r.stdout
