"""The kernel pipeline: a Debian kernel source + a patch series -> vmlinux.

    unpack /usr/src/linux-source-<6.12|6.1>.tar.xz -> work/<source>/linux (once)
    patch -p1 --forward --batch < <patches>/*.patch (sorted), extras,
        applied to pristine copies of the touched files; only files whose
        content changes are rewritten in the work tree (make stays incremental;
        files a previous patch set touched are restored, files it created removed)
    make tinyconfig; merge_config.sh -m .config <fragments>; olddefconfig
    make bzImage scripts_gdb   (ccache, reproducible timestamp/user/host)
    export vmlinux, bzImage, .config, System.map, scripts/gdb -> builds/<key>/tree

The default is the reference SBM kernel: 6.12 + fixtures/kernel/patches +
fixtures/kernel/config.  ``kernel_spec()`` names the others (the matrix):
``--source 6.1`` (no patches by default; fragment + config-6.1),
``--patches none`` (a kernel without SBM), ``--config FRAGMENT`` (repeatable).
A fragment line for a symbol no Kconfig of the tree defines (SBM's, without
the SBM patches; a newer kernel's name on 6.1) is skipped and reported in
result.json's ``skipped_settings``; any other line .config lacks is an error.

Every ``make`` runs under the machine-wide build lock.  The key hashes the
source identity, the patches' bytes in order, the config fragments and the
extra patches, so a result is reused only for exactly the same inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Sequence

from sbmdbg.errors import SbmdbgError
from sbmdbg.paths import KERNEL_FIXTURES, build_lock_path, cache_root, file_lock

SOURCE_TARBALL = Path(os.environ.get("SBMDBG_KERNEL_SOURCE", "/usr/src/linux-source-6.12.tar.xz"))
PATCHES_DIR = KERNEL_FIXTURES / "patches"
CONFIG_FRAGMENT = KERNEL_FIXTURES / "config"
#: ``--source VERSION``: Debian's linux-source-VERSION package (apt-get install).
SOURCES = {"6.12": SOURCE_TARBALL, "6.1": Path("/usr/src/linux-source-6.1.tar.xz")}
DEFAULT_SOURCE = "6.12"
#: Per source: the reference patches apply to 6.12 only; 6.1 needs its names
#: of a few settings (fixtures/kernel/config-6.1, merged after config).
DEFAULT_PATCHES = {"6.12": PATCHES_DIR}
EXTRA_FRAGMENTS = {"6.1": (KERNEL_FIXTURES / "config-6.1",)}
#: Bumped when the pipeline itself changes in a way that changes the output.
PIPELINE_VERSION = "2"
#: About how many CC/LD/AR/... lines a tinyconfig + fragment build prints.
EXPECTED_STEPS = 1650
#: How many finished builds the cache keeps (override: SBMDBG_KEEP_BUILDS).
KEEP_BUILDS = int(os.environ.get("SBMDBG_KEEP_BUILDS", "12"))
BUILD_TIMESTAMP = "Thu Jan  1 00:00:00 UTC 2026"
MAKE_VARS = [
    "ARCH=x86_64",
]
_STEP_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_]{1,9})\s+\S")
_CONFIG_LINE_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """A finished build: what tests, the VM harness and gdb need."""

    key: str
    tree: Path
    vmlinux: Path
    bzImage: Path
    build_id: str
    seconds: float
    #: What was built (absent in results written before the matrix existed).
    source: str = ""
    patches: str = ""          # the patch directory, or "none"
    config: tuple = ()         # the fragments, in merge order
    skipped_settings: tuple = ()

    def to_json(self) -> dict:
        return {
            "vmlinux": str(self.vmlinux),
            "bzImage": str(self.bzImage),
            "tree": str(self.tree),
            "build_id": self.build_id,
            "key": self.key,
            "seconds": round(self.seconds, 1),
            "source": self.source,
            "patches": self.patches,
            "config": list(self.config),
            "skipped_settings": list(self.skipped_settings),
        }

    @classmethod
    def from_json(cls, data: dict) -> "KernelBuild":
        return cls(
            key=data["key"],
            tree=Path(data["tree"]),
            vmlinux=Path(data["vmlinux"]),
            bzImage=Path(data["bzImage"]),
            build_id=data["build_id"],
            seconds=float(data["seconds"]),
            source=str(data.get("source", "")),
            patches=str(data.get("patches", "")),
            config=tuple(data.get("config", ())),
            skipped_settings=tuple(data.get("skipped_settings", ())),
        )

    def exists(self) -> bool:
        return self.vmlinux.is_file() and self.bzImage.is_file() and self.tree.is_dir()


# ---------------------------------------------------------------- the key

def source_identity(tarball: Path = SOURCE_TARBALL) -> str:
    """Name, size and mtime of the source tarball (cheap, no decompression)."""
    try:
        st = tarball.stat()
    except OSError as exc:
        raise SbmdbgError(f"kernel source {tarball} not found (apt-get install linux-source-6.12)") from exc
    return f"{tarball.name}:{st.st_size}:{int(st.st_mtime)}"


def compute_key(source_id: str, patches: Sequence[bytes], config: bytes | Sequence[bytes],
                extra_patches: Sequence[bytes] = ()) -> str:
    """sha256 over the inputs, each length-prefixed so no two lists collide.
    ``config``: one fragment (bytes) or several in merge order (one fragment
    in a list hashes as that fragment alone)."""
    h = hashlib.sha256()

    def put(tag: str, data: bytes) -> None:
        h.update(tag.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)

    put("pipeline", PIPELINE_VERSION.encode())
    put("source", source_id.encode())
    for blob in patches:
        put("patch", blob)
    for blob in ([config] if isinstance(config, bytes) else config):
        put("config", blob)
    for blob in extra_patches:
        put("extra", blob)
    return h.hexdigest()[:24]


def list_patches(patches_dir: Path | None) -> list[Path]:
    """``*.patch`` in sorted order; an absent or empty directory is no patches."""
    if patches_dir is None or not patches_dir.is_dir():
        return []
    return sorted(p for p in patches_dir.glob("*.patch") if p.is_file())


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SbmdbgError(f"cannot read {what} {path}: {exc.strerror}") from exc


def fragment_settings(config: bytes) -> dict[str, str]:
    """The ``CONFIG_X=value`` lines of a fragment (comments are not checked)."""
    out: dict[str, str] = {}
    for line in config.decode(errors="replace").splitlines():
        m = _CONFIG_LINE_RE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def effective_settings(fragment: bytes) -> dict[str, str | None]:
    """Every symbol a fragment sets, the last line winning (as merge_config.sh
    does with several fragments): ``value``, or None for ``is not set``."""
    out: dict[str, str | None] = {}
    for line in fragment.decode(errors="replace").splitlines():
        m = _CONFIG_LINE_RE.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.fullmatch(r"#\s*(CONFIG_\w+) is not set", line.strip())
        if m:
            out[m.group(1)] = None
    return out


def missing_settings(fragment: bytes, dotconfig: str) -> list[str]:
    """Fragment lines ``CONFIG_X=v`` that are not in the final .config (and
    ``# CONFIG_X is not set`` lines whose symbol .config enables)."""
    have = set(line.strip() for line in dotconfig.splitlines())
    enabled = {line.split("=", 1)[0] for line in have if line.startswith("CONFIG_")}
    out = []
    for k, v in effective_settings(fragment).items():
        if v is not None and f"{k}={v}" not in have:
            out.append(f"{k}={v}")
        elif v is None and k in enabled:
            out.append(f"# {k} is not set")
    return out


_KCONFIG_DEF_RE = re.compile(rb"^[ \t]*(?:menu)?config[ \t]+([A-Za-z0-9_]+)", re.M)


def kconfig_symbols(tree: Path) -> set[str]:
    """``CONFIG_<name>`` for every symbol a Kconfig file of *tree* defines."""
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("Kconfig"):
                try:
                    data = Path(dirpath, fn).read_bytes()
                except OSError:
                    continue
                out.update("CONFIG_" + m.decode() for m in _KCONFIG_DEF_RE.findall(data))
    return out


def setting_symbol(setting: str) -> str:
    """``CONFIG_X=v`` or ``# CONFIG_X is not set`` -> ``CONFIG_X``."""
    m = re.search(r"CONFIG_\w+", setting)
    return m.group(0) if m else setting


# ---------------------------------------------------------------- ELF

def read_build_id(vmlinux: Path) -> str:
    """The GNU build-id (hex) of an ELF file, via pyelftools."""
    from elftools.elf.elffile import ELFFile

    with open(vmlinux, "rb") as fh:
        elf = ELFFile(fh)
        for section in elf.iter_sections():
            if section.header["sh_type"] != "SHT_NOTE":
                continue
            for note in section.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID":
                    return note["n_desc"]
    raise SbmdbgError(f"{vmlinux} has no GNU build-id note")


# ---------------------------------------------------------------- the pipeline

class _Progress:
    """Counts CC/LD/... lines: a rich bar on a TTY, periodic lines otherwise."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.label = label
        self.total = total
        self.count = 0
        self.quiet = quiet
        self.last_line = ""
        self._last_print = 0.0
        self._rich = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TextColumn("{task.fields[last]}"),
                                  console=Console(stderr=True), transient=True)
            self._task = self._rich.add_task(label, total=total, last="")

    def __enter__(self):
        if self._rich is not None:
            self._rich.start()
        return self

    def __exit__(self, *exc):
        if self._rich is not None:
            self._rich.stop()
        elif not self.quiet:
            print(f"sbmdbg: {self.label}: {self.count} steps", file=sys.stderr, flush=True)

    def line(self, text: str) -> None:
        m = _STEP_RE.match(text)
        if not m:
            return
        self.count += 1
        self.last_line = text.strip()
        if self._rich is not None:
            self._rich.update(self._task, completed=min(self.count, self.total),
                              last=self.last_line[:60])
        elif not self.quiet:
            now = time.monotonic()
            if now - self._last_print >= 10:
                self._last_print = now
                print(f"sbmdbg: {self.label}: {self.count}/~{self.total} {self.last_line}",
                      file=sys.stderr, flush=True)


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"sbmdbg: {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path, log, env: dict | None = None,
         progress: _Progress | None = None, what: str = "") -> None:
    """Run *cmd*, teeing its output to *log*; SbmdbgError with the tail on failure."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    tail: deque[str] = deque(maxlen=40)
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, errors="replace")
    except OSError as exc:
        raise SbmdbgError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            log.write(line)
            tail.append(line.rstrip("\n"))
            if progress is not None:
                progress.line(line)
        rc = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    log.flush()
    if rc != 0:
        raise SbmdbgError(f"{what or cmd[0]} failed (exit {rc}); log: {log.name}",
                          detail="\n".join(tail))


def _make_env(tree: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "CCACHE_DIR": str(cache_root() / "ccache"),
        "CCACHE_BASEDIR": str(tree),
        "CCACHE_NOHASHDIR": "1",
        "CCACHE_MAXSIZE": "5G",
        "LC_ALL": "C",
    })
    return env


def make_command(targets: Iterable[str], jobs: int | None = None) -> list[str]:
    """The exact ``make`` invocation (shared with the lead's dev builds)."""
    return ["make", "ARCH=x86_64", f"-j{jobs or os.cpu_count() or 1}", "CC=ccache gcc",
            f"KBUILD_BUILD_TIMESTAMP={BUILD_TIMESTAMP}", "KBUILD_BUILD_USER=sbmdbg",
            "KBUILD_BUILD_HOST=sbmdbg", *targets]


def _extract(tarball: Path, dest: Path, quiet: bool) -> None:
    """Really extract (no hardlinks to anything) into *dest*."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _say(f"unpacking {tarball.name} into {dest} ...", quiet)
    t0 = time.monotonic()
    xz = "xz -T0" if shutil.which("xz") else "xz"
    res = subprocess.run(["tar", "-I", xz, "-xf", str(tarball), "-C", str(tmp),
                          "--strip-components=1", "--no-same-owner"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SbmdbgError(f"unpacking {tarball} failed: {res.stderr.strip()[-500:]}")
    if not (tmp / "Makefile").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise SbmdbgError(f"{tarball} does not look like a kernel source tarball")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    _say(f"unpacked in {time.monotonic() - t0:.0f} s", quiet)


def build_dir(key: str) -> Path:
    return cache_root() / "builds" / key


def cached_build(key: str) -> KernelBuild | None:
    """The finished build for *key*, if its result.json and files exist."""
    result = build_dir(key) / "result.json"
    try:
        kb = KernelBuild.from_json(json.loads(result.read_text()))
    except (OSError, ValueError, KeyError):
        return None
    return kb if kb.exists() else None


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel of the matrix: ``ensure_kernel(**spec.kwargs())``."""

    source: str                    # "6.12", "6.1" or a tarball path
    tarball: Path
    patches_dir: Path | None       # None: no patches (a kernel without SBM)
    fragments: tuple[Path, ...]

    def kwargs(self) -> dict:
        return {"tarball": self.tarball, "patches_dir": self.patches_dir,
                "config_fragments": self.fragments, "source_label": self.source}


def kernel_spec(source: str | None = None, patches: str | os.PathLike | None = None,
                config: Sequence[str | os.PathLike] | None = None) -> KernelSpec:
    """``--source 6.12|6.1|TARBALL``, ``--patches DIR|none``, ``--config FRAGMENT...``.

    Defaults per source: 6.12 gets the reference SBM series and
    fixtures/kernel/config (= the reference kernel, same key as ever); 6.1
    gets no patches and config + config-6.1."""
    label = source or DEFAULT_SOURCE
    if label in SOURCES:
        tarball = SOURCES[label]
    elif label.endswith((".tar.xz", ".tar.gz", ".tar.bz2", ".tar")):
        tarball = Path(label).expanduser().resolve()
        if not tarball.is_file():
            raise SbmdbgError(f"kernel source tarball {label} not found")
    else:
        raise SbmdbgError(f"unknown kernel source {label!r}: {' or '.join(SOURCES)} "
                          "(Debian's linux-source-VERSION) or a .tar.xz path")
    if patches is None:
        pdir = DEFAULT_PATCHES.get(label)
    elif str(patches) == "none":
        pdir = None
    else:
        pdir = Path(patches).expanduser().resolve()
        if not pdir.is_dir():
            raise SbmdbgError(f"patch directory {patches} not found")
        if not list_patches(pdir):
            raise SbmdbgError(f"patch directory {patches} has no *.patch (use --patches none)")
    if config:
        frags = tuple(Path(c).expanduser().resolve() for c in config)
    else:
        frags = (CONFIG_FRAGMENT, *EXTRA_FRAGMENTS.get(label, ()))
    for f in frags:
        if not f.is_file():
            raise SbmdbgError(f"config fragment {f} not found")
    return KernelSpec(label, tarball, pdir, frags)


def build_kernel(source: str | None = None, patches: str | os.PathLike | None = None,
                 config: Sequence[str | os.PathLike] | None = None,
                 extra_patches: Sequence[str | os.PathLike] = (), quiet: bool = False) -> KernelBuild:
    """``sbmdbg kernel build [--source] [--patches] [--config] [--extra-patch]``."""
    return ensure_kernel(extra_patches, quiet=quiet, **kernel_spec(source, patches, config).kwargs())


def ensure_kernel(extra_patches: Sequence[str | os.PathLike] = (), *,
                  patches_dir: Path | None = PATCHES_DIR,
                  config_fragment: Path = CONFIG_FRAGMENT,
                  tarball: Path = SOURCE_TARBALL,
                  quiet: bool = False,
                  config_fragments: Sequence[Path] | None = None,
                  source_label: str = "") -> KernelBuild:
    """Build (or reuse) a kernel (by default the reference one) and return
    where it is.  ``config_fragments`` (merge order) replaces ``config_fragment``.

    A cache hit reads one JSON file and stats three paths: no make, no lock.
    """
    patches = list_patches(patches_dir)
    extras = [Path(p) for p in extra_patches]
    for p in extras:
        if not p.is_file():
            raise SbmdbgError(f"extra patch {p} not found")
    patch_blobs = [_read(p, "patch") for p in patches]
    extra_blobs = [_read(p, "extra patch") for p in extras]
    fragments = [Path(f) for f in (config_fragments or [config_fragment])]
    configs = [_read(f, "config fragment") for f in fragments]
    key = compute_key(source_identity(tarball), patch_blobs, configs, extra_blobs)
    meta = {"source": source_label or tarball.name,
            "patches": str(patches_dir) if patches else "none",
            "config": tuple(str(f) for f in fragments)}

    hit = cached_build(key)
    if hit is not None:
        _touch(build_dir(key) / "result.json")
        return hit

    bdir = build_dir(key)
    bdir.mkdir(parents=True, exist_ok=True)
    with file_lock(bdir.with_name(key + ".lock"), what=f"build {key}", quiet=quiet):
        hit = cached_build(key)  # someone else finished it while we waited
        if hit is not None:
            return hit
        kb = _build(key, bdir, tarball, patches + extras, fragments, configs, quiet, meta)
    prune_builds(keep=KEEP_BUILDS, protect=key, quiet=quiet)
    return kb


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def prune_builds(keep: int = 4, protect: str | None = None, quiet: bool = True) -> list[str]:
    """Delete all but the *keep* most recently used builds (a tree is ~2.5 GB).

    "Used" is the mtime of result.json (touched on every cache hit).  A build
    whose per-key lock is held (in progress) or that has no result.json yet
    is never removed.
    """
    import fcntl

    root = cache_root() / "builds"
    done = []
    for d in root.iterdir() if root.is_dir() else ():
        if d.is_dir() and (d / "result.json").is_file() and d.name != protect:
            done.append(((d / "result.json").stat().st_mtime, d))
    done.sort(reverse=True)
    removed = []
    for _, d in done[max(keep - (1 if protect else 0), 0):]:
        lock = d.with_name(d.name + ".lock")
        with open(lock, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            (d / "result.json").unlink(missing_ok=True)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        lock.unlink(missing_ok=True)
    if removed:
        _say(f"pruned old kernel builds: {' '.join(removed)}", quiet)
    return removed


def patched_files(patch: bytes) -> set[str]:
    """Paths (``-p1``) a unified diff creates, changes or deletes."""
    out: set[str] = set()
    for line in patch.decode(errors="replace").splitlines():
        if line.startswith(("--- ", "+++ ")):
            path = line[4:].split("\t", 1)[0].strip()
            if path == "/dev/null" or "/" not in path:
                continue
            path = path.split("/", 1)[1]
            if ".." in Path(path).parts or path.startswith("/"):
                raise SbmdbgError(f"patch names a path outside the tree: {path!r}")
            out.add(path)
    return out


def _sha(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def worktree_dir(tarball: Path) -> Path:
    """The persistent build tree for one source tarball."""
    ident = hashlib.sha256(source_identity(tarball).encode()).hexdigest()[:16]
    return cache_root() / "work" / ident


def _update_worktree(wdir: Path, tarball: Path, patches: list[Path], log, quiet: bool) -> Path:
    """Bring the work tree to pristine source + *patches*, rewriting only the
    files whose content changes (so make recompiles only what changed).

    ``pristine/`` keeps the original of every file any patch set ever
    touched (``None`` in the manifest: the file did not exist)."""
    tree = wdir / "linux"
    manifest_path = wdir / "pristine.json"
    if not (tree / "Makefile").is_file() or not manifest_path.is_file():
        shutil.rmtree(wdir, ignore_errors=True)
        wdir.mkdir(parents=True)
        _extract(tarball, tree, quiet)
        manifest_path.write_text("{}\n")
    manifest: dict[str, bool] = json.loads(manifest_path.read_text())
    pristine = wdir / "pristine"
    applied_path = wdir / "applied.json"
    try:
        previously = set(json.loads(applied_path.read_text()))
    except (OSError, ValueError):
        previously = set()

    touched: set[str] = set()
    for p in patches:
        touched |= patched_files(_read(p, "patch"))
    # Save the original of every newly touched file before anything changes it.
    for rel in sorted(touched - set(manifest)):
        src = tree / rel
        manifest[rel] = src.is_file()
        if src.is_file():
            (pristine / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, pristine / rel)
    manifest_path.write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")

    # Apply the patch set to pristine copies of just these files.
    scratch = wdir / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    union = touched | previously
    for rel in union:
        if manifest.get(rel):
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(pristine / rel, scratch / rel)
    for p in patches:
        _say(f"applying {p.name}", quiet)
        _run(["patch", "-p1", "--forward", "--batch", "-i", str(p.resolve())],
             cwd=scratch, log=log, what=f"patch {p.name}")
    changed = 0
    for rel in sorted(union):
        new, cur = scratch / rel, tree / rel
        if new.is_file():
            if _sha(new) != _sha(cur):
                cur.parent.mkdir(parents=True, exist_ok=True)
                tmp = cur.with_name(cur.name + ".sbmdbg-tmp")
                shutil.copyfile(new, tmp)
                tmp.replace(cur)
                changed += 1
        elif cur.exists():
            cur.unlink()
            changed += 1
    applied_path.write_text(json.dumps(sorted(touched)) + "\n")
    shutil.rmtree(scratch, ignore_errors=True)
    _say(f"work tree {tree}: {changed} file(s) rewritten for this patch set", quiet)
    return tree


#: What a build exports next to its key (the work tree moves on to other keys).
_EXPORTS = {"vmlinux": "vmlinux", "System.map": "System.map", ".config": ".config",
            "arch/x86/boot/bzImage": "bzImage", "scripts/gdb": "scripts/gdb"}


def _export(work: Path, tree: Path) -> None:
    """Copy the outputs of *work* into *tree*: vmlinux, bzImage, scripts/gdb
    (with the generated constants), vmlinux-gdb.py; and link the source
    directories so gdb can list sources."""
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for rel, out in _EXPORTS.items():
        src, dst = work / rel, tree / out
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=False,
                            ignore=shutil.ignore_patterns("__pycache__", "*.o", ".*.cmd"))
        else:
            shutil.copy2(src, dst)
    (tree / "vmlinux-gdb.py").symlink_to("scripts/gdb/vmlinux-gdb.py")
    for entry in work.iterdir():
        if entry.is_dir() and not entry.name.startswith(".") and not (tree / entry.name).exists():
            (tree / entry.name).symlink_to(entry)


def _configure(work: Path, bdir: Path, fragments: list[bytes], fragment_paths: list[Path], log,
               env: dict, quiet: bool) -> list[str]:
    """tinyconfig + fragments + olddefconfig, skipped when the fragments, the
    Kconfig files the patches touched and .config are what the last run left.
    Returns the fragment lines skipped because no Kconfig defines their symbol."""
    fragment = b"\n".join(fragments)
    stamp = work.parent / "config.stamp"
    try:
        applied = json.loads((work.parent / "applied.json").read_text())
    except (OSError, ValueError):
        applied = []
    kconfigs = sorted(rel for rel in applied if "Kconfig" in rel)
    want = hashlib.sha256(fragment + "".join(f"{k}:{_sha(work / k)}" for k in kconfigs).encode()
                          ).hexdigest()
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        have = {}
    if have.get("inputs") == want and have.get("config") == _sha(work / ".config"):
        _say("configuration unchanged", quiet)
        return list(have.get("skipped", []))
    names = " + ".join(p.name for p in fragment_paths)
    _say(f"configuring (tinyconfig + {names})", quiet)
    _run(["make", *MAKE_VARS, "tinyconfig"], cwd=work, log=log, env=env, what="make tinyconfig")
    copies = []
    for i, frag in enumerate(fragments):
        frag_copy = bdir / ("config.fragment" if i == 0 else f"config.fragment.{i}")
        frag_copy.write_bytes(frag)
        copies.append(str(frag_copy))
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", *copies],
         cwd=work, log=log, env=env, what="merge_config.sh")
    _run(["make", *MAKE_VARS, "olddefconfig"], cwd=work, log=log, env=env,
         what="make olddefconfig")
    missing = missing_settings(fragment, (work / ".config").read_text())
    skipped: list[str] = []
    if missing:
        known = kconfig_symbols(work)
        skipped = [m for m in missing if setting_symbol(m) not in known]
        missing = [m for m in missing if setting_symbol(m) in known]
    if missing:
        stamp.unlink(missing_ok=True)
        raise SbmdbgError(
            f"config fragment {names} not honoured: "
            f"{len(missing)} setting(s) missing from .config: {' '.join(missing)}")
    if skipped:
        _say(f"skipped {len(skipped)} setting(s) this kernel does not define: {' '.join(skipped)}",
             quiet)
    stamp.write_text(json.dumps({"inputs": want, "config": _sha(work / ".config"),
                                 "skipped": skipped}) + "\n")
    return skipped


def _build(key: str, bdir: Path, tarball: Path, patches: list[Path], fragment_paths: list[Path],
           fragments: list[bytes], quiet: bool, meta: dict) -> KernelBuild:
    """Build in the persistent work tree (incremental: only files whose content
    changed are rewritten, ccache serves the rest), then export the outputs to
    builds/<key>/tree."""
    t0 = time.monotonic()
    log_path = bdir / "build.log"
    tree = bdir / "tree"
    _say(f"building kernel {key} (log: {log_path})", quiet)
    with open(log_path, "a") as log, \
            file_lock(build_lock_path(), what="kernel build lock", quiet=quiet):
        log.write(f"\n===== sbmdbg kernel build {key} {time.ctime()} =====\n")
        work = _update_worktree(worktree_dir(tarball), tarball, patches, log, quiet)
        env = _make_env(work)
        skipped = _configure(work, bdir, fragments, fragment_paths, log, env, quiet)
        _say(f"make bzImage scripts_gdb (-j{os.cpu_count()})", quiet)
        with _Progress("kernel build", EXPECTED_STEPS, quiet=quiet) as progress:
            _run(make_command(["bzImage", "scripts_gdb"]), cwd=work, log=log, env=env,
                 progress=progress, what="kernel build")
        if not (work / "vmlinux").is_file() or not (work / "arch/x86/boot/bzImage").is_file():
            raise SbmdbgError(f"kernel build finished but vmlinux or bzImage is missing in {work}")
        _export(work, tree)

    vmlinux = tree / "vmlinux"
    bzimage = tree / "bzImage"
    kb = KernelBuild(key=key, tree=tree, vmlinux=vmlinux, bzImage=bzimage,
                     build_id=read_build_id(vmlinux), seconds=time.monotonic() - t0,
                     skipped_settings=tuple(skipped), **meta)
    tmp = bdir / "result.json.tmp"
    tmp.write_text(json.dumps(kb.to_json(), indent=2) + "\n")
    tmp.rename(bdir / "result.json")
    _say(f"kernel {key} built in {kb.seconds:.0f} s", quiet)
    return kb


def foreign_comp_dirs(tree: str | os.PathLike, vmlinux: str | os.PathLike | None = None) -> list[str]:
    """DW_AT_comp_dir values of *vmlinux* that are not *tree*.

    ccache (CCACHE_BASEDIR + CCACHE_NOHASHDIR) reuses objects compiled in other
    trees, and their DWARF keeps the compiling tree as comp_dir.  gdb needs
    ``set substitute-path <dir> <tree>`` for each to show this tree's sources.
    Scanning takes a few seconds, so the answer is cached next to the tree,
    keyed by the build-id.
    """
    from elftools.elf.elffile import ELFFile

    tree = Path(tree)
    vmlinux = Path(vmlinux) if vmlinux else tree / "vmlinux"
    cache = tree.parent / "comp_dirs.json"
    try:
        build_id = read_build_id(vmlinux)
    except (OSError, SbmdbgError):
        return []
    try:
        data = json.loads(cache.read_text())
        if data.get("build_id") == build_id:
            return list(data["foreign"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    dirs: set[str] = set()
    try:
        with open(vmlinux, "rb") as fh:
            dwarf = ELFFile(fh).get_dwarf_info(relocate_dwarf_sections=False)
            for cu in dwarf.iter_CUs():
                attr = cu.get_top_DIE().attributes.get("DW_AT_comp_dir")
                if attr is not None:
                    dirs.add(attr.value.decode(errors="replace"))
    except Exception:  # no/odd DWARF: nothing to substitute
        return []
    foreign = sorted(d for d in dirs if Path(d) != tree)
    try:
        cache.write_text(json.dumps({"build_id": build_id, "foreign": foreign}) + "\n")
    except OSError:
        pass
    return foreign
