"""Offline tests of the foundation: key hashing, cpio, markers, QEMU argv, CLI."""

from __future__ import annotations

import io
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sbmdbg.errors import SbmdbgError
from sbmdbg.kernel import build
from sbmdbg.kernel.initramfs import INIT_SCRIPT, Entry, initramfs_entries, read_newc, write_newc
from sbmdbg.vm.qemu import VMOptions, VMPaths, check_kernel_image, kernel_cmdline, parse_mem, qemu_command
from sbmdbg.vm.serial import parse_run_output, run_lines

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------ key hashing

def test_key_is_stable_and_sensitive():
    k = build.compute_key("src:1:2", [b"a", b"b"], b"CONFIG_X=y\n")
    assert k == build.compute_key("src:1:2", [b"a", b"b"], b"CONFIG_X=y\n")
    assert len(k) == 24 and int(k, 16) >= 0
    others = {
        build.compute_key("src:1:3", [b"a", b"b"], b"CONFIG_X=y\n"),
        build.compute_key("src:1:2", [b"b", b"a"], b"CONFIG_X=y\n"),   # order matters
        build.compute_key("src:1:2", [b"ab"], b"CONFIG_X=y\n"),         # no concatenation clash
        build.compute_key("src:1:2", [b"a", b"b"], b"CONFIG_X=n\n"),
        build.compute_key("src:1:2", [b"a"], b"CONFIG_X=y\n", [b"b"]),  # extra != patch
        build.compute_key("src:1:2", [b"a", b"b"], b"CONFIG_X=y\n", [b"e"]),
    }
    assert k not in others and len(others) == 6


@given(st.lists(st.binary(max_size=20), max_size=4), st.lists(st.binary(max_size=20), max_size=4))
@settings(max_examples=200, deadline=None)
def test_key_injective_on_patch_lists(a, b):
    if a != b:
        assert build.compute_key("s", a, b"c") != build.compute_key("s", b, b"c")


def test_list_patches_sorted_and_absent(tmp_path):
    assert build.list_patches(tmp_path / "nope") == []
    assert build.list_patches(None) == []
    for n in ("0002-b.patch", "0001-a.patch", "README", "0010-c.patch"):
        (tmp_path / n).write_text("x")
    assert [p.name for p in build.list_patches(tmp_path)] == ["0001-a.patch", "0002-b.patch",
                                                              "0010-c.patch"]


def test_missing_settings():
    frag = b"# c\nCONFIG_A=y\nCONFIG_B=8\n# CONFIG_C is not set\nCONFIG_D=\"x\"\n"
    dot = "CONFIG_A=y\nCONFIG_B=4\nCONFIG_D=\"x\"\n"
    assert build.missing_settings(frag, dot) == ["CONFIG_B=8"]


def test_source_identity_missing(tmp_path):
    with pytest.raises(SbmdbgError, match="not found"):
        build.source_identity(tmp_path / "linux.tar.xz")


def test_make_command_flags():
    cmd = build.make_command(["bzImage", "scripts_gdb"], jobs=2)
    assert cmd[:3] == ["make", "ARCH=x86_64", "-j2"]
    assert "CC=ccache gcc" in cmd
    assert "KBUILD_BUILD_TIMESTAMP=Thu Jan  1 00:00:00 UTC 2026" in cmd
    assert cmd[-2:] == ["bzImage", "scripts_gdb"]


# ------------------------------------------------------------ cpio

def test_newc_roundtrip_and_cpio_tool(tmp_path):
    entries = [Entry("d", stat.S_IFDIR | 0o755), Entry("d/f", stat.S_IFREG | 0o644, b"hello"),
               Entry("l", stat.S_IFLNK | 0o777, b"d/f"), Entry("c", stat.S_IFCHR | 0o600, rdev=(5, 1))]
    buf = io.BytesIO()
    write_newc(entries, buf)
    data = buf.getvalue()
    assert len(data) % 512 == 0
    assert read_newc(data) == entries
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=data, capture_output=True, check=True)
    assert listing.stdout.decode().split() == ["d", "d/f", "l", "c"]


@given(st.lists(st.tuples(st.text("abcxyz/", min_size=1, max_size=12), st.binary(max_size=40)),
                max_size=6))
@settings(max_examples=100, deadline=None)
def test_newc_roundtrip_property(items):
    entries = [Entry(f"f{i}_{n.strip('/') or 'x'}", stat.S_IFREG | 0o644, b) for i, (n, b) in enumerate(items)]
    buf = io.BytesIO()
    write_newc(entries, buf)
    assert read_newc(buf.getvalue()) == entries


def test_initramfs_layout():
    names = {e.name: e for e in initramfs_entries(b"\x7fELFbusybox")}
    assert names["init"].mode & 0o111 and names["init"].data.startswith(b"#!/bin/busybox sh")
    assert names["dev/console"].rdev == (5, 1)
    assert names["bin/busybox"].data == b"\x7fELFbusybox"
    for needle in ("mount -t proc", "mount -t sysfs", "/sys/kernel/debug", "devtmpfs",
                   "--install -s", "SBMDBG-READY", "cttyhack sh"):
        assert needle in INIT_SCRIPT


# ------------------------------------------------------------ console markers

def test_run_lines_and_parse():
    lines = run_lines("echo hi; false # comment", "abc123")
    assert len(lines) == 1
    echoed = lines[0] + "\r\n"
    # The echoed command line must not look like a finished run.
    assert parse_run_output(echoed, "abc123") is None
    text = echoed + "__SBMDBG_BEGIN_abc123__\r\nhi\r\n__SBMDBG_END_abc123_1__\r\n~ # "
    res = parse_run_output(text, "abc123")
    assert res.output == "hi\n" and res.status == 1 and not res.ok
    assert parse_run_output(text, "other") is None


def test_parse_no_trailing_newline_and_partial():
    assert parse_run_output("__SBMDBG_BEGIN_m__\r\nhi__SBMDBG_END_m_0__", "m").output == "hi"
    assert parse_run_output("__SBMDBG_BEGIN_m__\r\nhi\r\n__SBMDBG_END_m_", "m") is None
    assert parse_run_output("__SBMDBG_BEGIN_m__\r\n__SBMDBG_END_m_127__", "m").status == 127


def test_run_lines_long_command_is_chunked():
    cmd = "echo " + "x" * 5000
    lines = run_lines(cmd, "m1")
    assert len(lines) > 3 and all(len(line) < 1000 for line in lines)
    with pytest.raises(ValueError):
        run_lines("x", "bad marker")


# ------------------------------------------------------------ QEMU command line

def _paths():
    return VMPaths.for_id("abc", Path("/tmp/w"))


def test_qemu_command_defaults():
    cmd = qemu_command(VMOptions(), _paths(), 1234, "/k/bzImage", "/k/initrd")
    s = " ".join(cmd)
    assert cmd[0] == "qemu-system-x86_64"
    assert "-accel tcg -cpu max" in s and "-smp 2,sockets=2,cores=1,threads=1 -m 512M" in s
    assert "-gdb tcp:127.0.0.1:1234" in s and " -s " not in f" {s} "
    assert "memory-backend-file,id=ram0,size=512M,mem-path=/dev/shm/sbmdbg-abc.ram,share=on" in s
    assert "-machine pc,memory-backend=ram0" in s
    assert "-no-reboot" in cmd and "-nographic" in cmd and "vmcoreinfo" in cmd
    assert "logfile=/tmp/w/console.log" in s and "-serial chardev:con0" in s
    append = cmd[cmd.index("-append") + 1]
    assert append == "console=ttyS0 pti=off nokaslr no5lvl panic=-1 qemu_fw_cfg.ioport=12@0x510:0:1:4"
    assert "-d" not in cmd


def test_qemu_command_options():
    o = VMOptions(smp=4, mem="1G", pti="on", kaslr=True, la57=True, append="quiet",
                  qemu_log="/tmp/q.log", extra_args=["-S"])
    cmd = qemu_command(o, _paths(), 1, "k", "i")
    assert kernel_cmdline(o) == "console=ttyS0 pti=on kaslr panic=-1 qemu_fw_cfg.ioport=12@0x510:0:1:4 quiet"
    assert cmd[-3:] == ["-D", "/tmp/q.log", "-S"] and "-smp" in cmd and "1024M" in cmd


def test_vm_options_validation():
    assert VMOptions(pti=True).pti == "on" and VMOptions(pti=False).pti == "off"
    for bad in (dict(pti="maybe"), dict(smp=0), dict(mem="lots")):
        with pytest.raises(SbmdbgError):
            VMOptions(**bad)
    assert parse_mem("512M") == 512 << 20 and parse_mem("2G") == 2 << 30 and parse_mem(4096) == 4096


def test_check_kernel_image(tmp_path):
    """A bzImage carries "HdrS" at 0x202; anything else is refused with one line."""
    good = tmp_path / "bzImage"
    good.write_bytes(b"\0" * 0x202 + b"HdrS" + b"\0" * 64)
    check_kernel_image(str(good))
    for name, data in (("text", b"not a kernel" * 100), ("elf", b"\x7fELF" + b"\0" * 1024),
                       ("short", b"\0" * 0x203), ("empty", b"")):
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(SbmdbgError, match="is not a bzImage") as ei:
            check_kernel_image(str(bad))
        assert "\n" not in str(ei.value)
    with pytest.raises(SbmdbgError, match="kernel image"):
        check_kernel_image(str(tmp_path))        # a directory: unreadable as a file


# ------------------------------------------------------------ CLI bad input (offline)

def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "sbmdbg.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60, **kw)


def test_cli_bad_vmlinux_one_line(tmp_path):
    r = _cli("gdb", "--gdb", "127.0.0.1:1", "--vmlinux", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sbmdbg: error:")
    (tmp_path / "notelf").write_text("hello")
    r = _cli("gdb", "--gdb", "127.0.0.1:1", "--vmlinux", str(tmp_path / "notelf"))
    assert r.returncode == 1 and "not an ELF" in r.stderr and "Traceback" not in r.stderr


def test_cli_nothing_listening(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # bound then closed: nothing listens there
    r = _cli("gdb", "--gdb", f"127.0.0.1:{port}", "--vmlinux", sys.executable)
    assert r.returncode == 1 and "nothing listening" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = _cli("gdb", "--gdb", "nonsense", "--vmlinux", sys.executable)
    assert r.returncode == 1 and r.stderr.count("\n") == 1


def test_cli_argparse_errors_exit_2():
    r = _cli("vm", "start", "--pti", "sometimes")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = _cli("frobnicate")
    assert r.returncode == 2


def test_cli_vm_run_without_vm(tmp_path):
    r = _cli("vm", "run", "true", env={"SBMDBG_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "no detached VM" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_extra_patch(tmp_path):
    r = _cli("kernel", "build", "--extra-patch", str(tmp_path / "nope.patch"))
    assert r.returncode == 1 and "not found" in r.stderr and r.stderr.count("\n") == 1


def test_prune_builds_keeps_recent(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("SBMDBG_CACHE", str(tmp_path))
    root = tmp_path / "builds"
    for i in range(6):
        d = root / f"k{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text("{}")
        os.utime(d / "result.json", (1000 + i, 1000 + i))
    (root / "inprogress").mkdir()  # no result.json: never pruned
    removed = build.prune_builds(keep=3, protect="k0")
    assert sorted(removed) == ["k1", "k2", "k3"]  # 3 kept in all: the protected one + 2 newest
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["inprogress", "k0", "k4", "k5"]


# ---------------------------------------------------------------- work tree

def _diff(path: str, old: str | None, new: str | None) -> bytes:
    import difflib
    a = [] if old is None else old.splitlines(keepends=True)
    b = [] if new is None else new.splitlines(keepends=True)
    head_a = "/dev/null" if old is None else f"a/{path}"
    head_b = "/dev/null" if new is None else f"b/{path}"
    return "".join(difflib.unified_diff(a, b, head_a, head_b)).encode()


@pytest.mark.unit
def test_patched_files_parses_headers():
    p = _diff("kernel/x.c", "a\n", "b\n") + _diff("new/y.h", None, "y\n")
    assert build.patched_files(p) == {"kernel/x.c", "new/y.h"}
    with pytest.raises(SbmdbgError):
        build.patched_files(b"--- a/../etc/passwd\n+++ b/../etc/passwd\n")


@pytest.mark.unit
def test_worktree_rewrites_only_changed_files(tmp_path, monkeypatch):
    import io
    import os
    monkeypatch.setenv("SBMDBG_CACHE", str(tmp_path / "cache"))
    wdir = tmp_path / "w"
    tree = wdir / "linux"
    (tree / "kernel").mkdir(parents=True)
    (tree / "Makefile").write_text("all:\n")
    (tree / "kernel" / "a.c").write_text("int a;\n")
    (tree / "kernel" / "b.c").write_text("int b;\n")
    (wdir / "pristine.json").write_text("{}\n")
    for f in ("Makefile", "kernel/a.c", "kernel/b.c"):
        os.utime(tree / f, (1_000_000, 1_000_000))
    pa = tmp_path / "1.patch"
    pa.write_bytes(_diff("kernel/a.c", "int a;\n", "int a = 1;\n") + _diff("kernel/n.c", None, "int n;\n"))
    pb = tmp_path / "2.patch"
    pb.write_bytes(_diff("kernel/b.c", "int b;\n", "int b = 2;\n"))
    log = io.StringIO()

    build._update_worktree(wdir, tmp_path / "unused.tar.xz", [pa], log, quiet=True)
    assert (tree / "kernel/a.c").read_text() == "int a = 1;\n"
    assert (tree / "kernel/n.c").read_text() == "int n;\n"
    assert (tree / "kernel/b.c").stat().st_mtime == 1_000_000   # untouched

    # Same patch set again: nothing is rewritten (mtimes kept: make stays idle).
    os.utime(tree / "kernel/a.c", (2_000_000, 2_000_000))
    build._update_worktree(wdir, tmp_path / "unused.tar.xz", [pa], log, quiet=True)
    assert (tree / "kernel/a.c").stat().st_mtime == 2_000_000

    # Another patch set: a.c back to pristine, n.c gone, b.c patched.
    build._update_worktree(wdir, tmp_path / "unused.tar.xz", [pb], log, quiet=True)
    assert (tree / "kernel/a.c").read_text() == "int a;\n"
    assert not (tree / "kernel/n.c").exists()
    assert (tree / "kernel/b.c").read_text() == "int b = 2;\n"
    assert (tree / "Makefile").stat().st_mtime == 1_000_000


# ------------------------------------------------------------ the kernel matrix (issue 13)

def test_missing_settings_last_fragment_wins():
    frag = b"CONFIG_A=y\n# CONFIG_B is not set\n" + b"\n" + b"# CONFIG_A is not set\nCONFIG_B=y\n"
    assert build.effective_settings(frag) == {"CONFIG_A": None, "CONFIG_B": "y"}
    assert build.missing_settings(frag, "CONFIG_A=y\n") == ["# CONFIG_A is not set", "CONFIG_B=y"]


def test_key_one_fragment_list_equals_bytes():
    """The reference kernel keeps its key when fragments became a list."""
    assert build.compute_key("s", [b"p"], [b"c"]) == build.compute_key("s", [b"p"], b"c")
    assert build.compute_key("s", [b"p"], [b"c", b"d"]) != build.compute_key("s", [b"p"], b"c\nd")


def test_kconfig_symbols(tmp_path):
    (tmp_path / "arch").mkdir()
    (tmp_path / "Kconfig").write_text("config FOO\n\tbool\nmenuconfig BAR\n\tbool\n# config NOT\n")
    (tmp_path / "arch" / "Kconfig.debug").write_text("  config BAZ_2\n")
    assert build.kconfig_symbols(tmp_path) == {"CONFIG_FOO", "CONFIG_BAR", "CONFIG_BAZ_2"}
    assert build.setting_symbol("# CONFIG_X_Y is not set") == "CONFIG_X_Y"
    assert build.setting_symbol("CONFIG_Z=8") == "CONFIG_Z"


def test_kernel_spec_defaults_and_errors(tmp_path):
    ref = build.kernel_spec()
    assert ref.patches_dir == build.PATCHES_DIR and ref.fragments == (build.CONFIG_FRAGMENT,)
    assert build.kernel_spec("6.12", "none").patches_dir is None
    old = build.kernel_spec("6.1")
    assert old.patches_dir is None and old.tarball.name == "linux-source-6.1.tar.xz"
    assert [f.name for f in old.fragments] == ["config", "config-6.1"]
    assert all(f.is_file() for f in old.fragments)
    frag = tmp_path / "frag"
    frag.write_text("CONFIG_X=y\n")
    assert build.kernel_spec("6.1", config=[frag]).fragments == (frag,)
    with pytest.raises(SbmdbgError, match="unknown kernel source '5.10'"):
        build.kernel_spec("5.10")
    with pytest.raises(SbmdbgError, match="patch directory .* not found"):
        build.kernel_spec(patches=tmp_path / "nope")
    with pytest.raises(SbmdbgError, match="has no \\*.patch"):
        build.kernel_spec(patches=tmp_path)
    with pytest.raises(SbmdbgError, match="config fragment .* not found"):
        build.kernel_spec(config=[tmp_path / "nope"])


def test_package_data_paths():
    """Fixtures and the gdb script are found through the package, not the checkout."""
    from sbmdbg import paths
    assert (paths.KERNEL_FIXTURES / "config").is_file()
    assert build.PATCHES_DIR.parent == paths.KERNEL_FIXTURES and build.list_patches(build.PATCHES_DIR)
    assert paths.gdb_script().is_file() and paths.gdb_script().name == "sbmdbg.py"
    assert paths.TRACE_PLUGIN_SOURCE.is_file()


def test_cli_gdb_script(capsys):
    from sbmdbg import cli, paths
    assert cli.main(["gdb-script"]) == 0
    assert capsys.readouterr().out.strip() == str(paths.gdb_script())


def test_worktree_switch_between_patch_sets_leaves_no_stale_file(tmp_path, monkeypatch):
    """SBM patches -> none -> SBM again in one work tree (what 6.12 and 6.12
    without SBM do): every touched file is back to pristine, every created file
    is gone, and the second application gives the same tree as the first."""
    import io
    import tarfile

    monkeypatch.setenv("SBMDBG_CACHE", str(tmp_path / "cache"))
    src = {"linux/Makefile": b"all:\n", "linux/kernel/a.c": b"int a;\n", "linux/kernel/Kconfig": b"config A\n"}
    tarball = tmp_path / "linux-source-9.9.tar.xz"
    with tarfile.open(tarball, "w:xz") as tf:
        for name, data in src.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-x.patch").write_text(
        "--- a/kernel/a.c\n+++ b/kernel/a.c\n@@ -1 +1,2 @@\n int a;\n+int sbm_state;\n"
        "--- /dev/null\n+++ b/kernel/sbm.c\n@@ -0,0 +1 @@\n+int sbm;\n"
        "--- a/kernel/Kconfig\n+++ b/kernel/Kconfig\n@@ -1 +1,2 @@\n config A\n+config SANDBOX_MODE\n")
    wdir = build.worktree_dir(tarball)

    def tree_files():
        t = wdir / "linux"
        return {str(p.relative_to(t)): p.read_bytes() for p in t.rglob("*") if p.is_file()}

    log = open(tmp_path / "log", "w")
    patches = build.list_patches(pdir)
    build._update_worktree(wdir, tarball, patches, log, quiet=True)
    with_sbm = tree_files()
    assert with_sbm["kernel/sbm.c"] == b"int sbm;\n" and b"sbm_state" in with_sbm["kernel/a.c"]
    build._update_worktree(wdir, tarball, [], log, quiet=True)
    assert tree_files() == {k.removeprefix("linux/"): v for k, v in src.items()}
    build._update_worktree(wdir, tarball, patches, log, quiet=True)
    assert tree_files() == with_sbm


def test_vm_start_takes_the_tree_of_a_pipeline_build(tmp_path):
    """`vm start --kernel BZ --vmlinux V`: V's folder is the tree when it has
    vmlinux-gdb.py (a pipeline build), so `sbmdbg gdb --id` loads lx-*."""
    from sbmdbg import cli
    for name in ("bzImage", "vmlinux"):
        (tmp_path / name).write_bytes(b"x")
    args = cli.build_parser().parse_args(["vm", "start", "--kernel", str(tmp_path / "bzImage"),
                                          "--vmlinux", str(tmp_path / "vmlinux")])
    assert cli._vm_options(args).tree is None
    (tmp_path / "vmlinux-gdb.py").write_text("")
    assert cli._vm_options(args).tree == str(tmp_path.resolve())
