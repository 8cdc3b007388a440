"""Installed anywhere (issue 13): the wheel built from this repo, installed into
a fresh venv (from /usr/bin/python3, the Python gdb embeds) in a temporary
folder, run from another folder, is a working tool: `sbmdbg demo` (the cached
reference kernel: same key as the checkout's), `sbmdbg kernel build --json`
(a cache hit), `sbmdbg gdb-script` (a path inside the venv that any gdb can
`source` to get the `sbm` commands)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from demo_helpers import pid_gone, wait_for

from sbmdbg.paths import REPO_ROOT

pytestmark = [pytest.mark.live, pytest.mark.timeout(1200)]


def _clean_env() -> dict:
    """No trace of the checkout: no PYTHONPATH, no VIRTUAL_ENV, the venv not on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if str(REPO_ROOT) not in p)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv, elsewhere): sbmdbg installed from a freshly built wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheels = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
                        str(REPO_ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = wheels.glob("sbmdbg-*.whl")
    venv = tmp / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        str(wheel)], capture_output=True, text=True, timeout=600, env=_clean_env())
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere


def _run(venv: Path, cwd: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "sbmdbg"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=_clean_env(), stdin=subprocess.DEVNULL)


def test_package_data_installed(installed):
    venv, elsewhere = installed
    site = next((venv / "lib").glob("python3*/site-packages"))
    pkg = site / "sbmdbg"
    assert not (pkg / "data" / "kernel").is_symlink()  # copies, not links into the checkout
    assert (pkg / "data" / "kernel" / "config").is_file()
    assert (pkg / "data" / "kernel" / "config-6.1").is_file()
    assert len(list((pkg / "data" / "kernel" / "patches").glob("*.patch"))) >= 4
    assert (pkg / "vm" / "plugin" / "sbmtrace.c").is_file()
    r = _run(venv, elsewhere, "gdb-script")
    assert r.returncode == 0, r.stderr
    script = Path(r.stdout.strip())
    assert script == pkg / "data" / "gdb" / "sbmdbg.py" and script.is_file()
    # any gdb: `source` the printed path, the sbm commands are there
    g = subprocess.run(["gdb", "-nx", "-q", "-batch", "-ex", f"source {script}",
                        "-ex", "help sbm pcpu"], capture_output=True, text=True, timeout=120,
                       cwd=elsewhere, env=_clean_env())
    out = g.stdout + g.stderr
    assert "Usage: sbm pcpu" in out and "could not load" not in out, out[-2000:]
    # ... and it loads sbmdbg from the venv, not from the checkout
    g = subprocess.run(["gdb", "-nx", "-q", "-batch", "-ex", f"source {script}",
                        "-ex", "python import sbmdbg; print('AT', sbmdbg.__file__)"],
                       capture_output=True, text=True, timeout=120, cwd=elsewhere, env=_clean_env())
    assert f"AT {pkg / '__init__.py'}" in g.stdout, g.stdout + g.stderr


def test_kernel_build_from_anywhere_is_the_cached_reference(installed, kernel_build):
    venv, elsewhere = installed
    r = _run(venv, elsewhere, "kernel", "build", "--json", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["key"] == kernel_build.key and got["vmlinux"] == str(kernel_build.vmlinux)


def test_demo_from_anywhere(installed, kernel_build, boots):
    """`sbmdbg demo` (what `./run demo` runs; the suite's only run of it):
    pcpu table, then a live stop in a sandbox with the boundary-crossing
    backtrace, the audit, and nothing left running."""
    venv, elsewhere = installed
    r = _run(venv, elsewhere, "demo", timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert f"kernel {kernel_build.key}" in out
    assert "pcpu_hot" in out and "swapper/0" in out
    assert "stopped at the first sandbox instruction" in out
    assert re.search(r"│ \d+\s+│ sandbox\s+│ 3 ", out), out[-3000:]
    assert "--- sandbox boundary: [tos-8]" in out and "arch_sbm_exec+" in out and "result=PASS" in out
    assert "worst = info" in out  # sbm audit on the reference kernel: clean
    assert "demo done" in out
    assert len(boots.pids()) == 1, boots.pids()     # the QEMU the demo started, from the boot log
    wait_for(lambda: all(pid_gone(p) for p in boots.pids()), 30, f"QEMU {boots.pids()} to exit")


def test_gdb_from_anywhere(installed, shared_vm):
    """`sbmdbg gdb` of the installed tool on a running VM: scripts/gdb and the
    sbm commands (from the venv) are loaded, gdb attached."""
    venv, elsewhere = installed
    vm = shared_vm(smp=2, pti="on")
    info = vm.info
    r = _run(venv, elsewhere, "gdb", "--gdb", info["gdb"], "--vmlinux", info["vmlinux"],
             "--tree", info["tree"], "--", "-batch", "-ex", "sbm pcpu all --json",
             "-ex", "python import sbmdbg; print('AT', sbmdbg.__file__)", "-ex", "lx-ps", timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    d = json.loads(out[out.index('{"layout"'):].splitlines()[0])
    assert d["layout"] == "pcpu_hot" and [c["fields"]["cpu_number"] for c in d["cpus"]] == [0, 1]
    assert f"AT {next((venv / 'lib').glob('python3*/site-packages'))}/sbmdbg/__init__.py" in out
    assert re.search(r"^\s*0x[0-9a-f]+\s+1\s+\S+", out, re.M), out[-2000:]  # lx-ps: pid 1
