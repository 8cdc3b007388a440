"""VM options and the QEMU command line (pure functions, unit-tested)."""

from __future__ import annotations

import dataclasses
import re
import socket
from pathlib import Path
from typing import Sequence

from sbmdbg.errors import SbmdbgError

QEMU = "qemu-system-x86_64"


@dataclasses.dataclass
class VMOptions:
    """How to boot the guest.  ``kernel=None`` builds/uses the reference kernel."""

    smp: int = 2
    mem: str = "512M"
    pti: str = "off"            # "on" | "off" (True/False accepted)
    kaslr: bool = False
    la57: bool = False
    append: str = ""
    kernel: str | None = None   # bzImage; None = ensure_kernel()
    vmlinux: str | None = None
    qemu_log: str | None = None  # -d int -D FILE
    trace_plugin: bool | str = True  # load the sbmtrace plugin (fast tracer): True, False or a .so path
    extra_args: Sequence[str] = ()
    initrd: str | None = None   # None = ensure_initramfs()
    cpu: str = "max"
    boot_timeout: float = 60.0
    tree: str | None = None     # kernel tree (for scripts/gdb); set by ensure_kernel

    def __post_init__(self):
        if self.pti is True or self.pti == "on":
            self.pti = "on"
        elif self.pti is False or self.pti == "off":
            self.pti = "off"
        else:
            raise SbmdbgError(f"pti must be 'on' or 'off', not {self.pti!r}")
        if not isinstance(self.smp, int) or not 1 <= self.smp <= 8:
            raise SbmdbgError(f"smp must be 1..8, not {self.smp!r}")
        parse_mem(self.mem)
        self.extra_args = tuple(self.extra_args)


#: The x86 boot protocol's header signature, at offset 0x202 of every bzImage
#: (Documentation/arch/x86/boot.rst): what QEMU's -kernel loads.
BZIMAGE_MAGIC, BZIMAGE_MAGIC_AT = b"HdrS", 0x202


def check_kernel_image(path: str) -> None:
    """*path* is a bzImage (the boot protocol's "HdrS" header), or SbmdbgError
    with one line -- checked before QEMU starts (a vmlinux, a truncated or an
    unrelated file would otherwise only fail inside QEMU)."""
    try:
        with open(path, "rb") as f:
            f.seek(BZIMAGE_MAGIC_AT)
            magic = f.read(len(BZIMAGE_MAGIC))
    except OSError as e:
        raise SbmdbgError(f"kernel image {path}: {e.strerror or e}") from None
    if magic != BZIMAGE_MAGIC:
        raise SbmdbgError(f"kernel image {path} is not a bzImage (no {BZIMAGE_MAGIC.decode()!r} boot "
                          f"header at {BZIMAGE_MAGIC_AT:#x}); pass arch/x86/boot/bzImage, not vmlinux")


def parse_mem(mem: str | int) -> int:
    """QEMU-style size ("512M", "1G", bytes) -> bytes."""
    if isinstance(mem, int):
        return mem
    m = re.fullmatch(r"\s*(\d+)\s*([KMGkmg]?)i?[Bb]?\s*", str(mem))
    if not m:
        raise SbmdbgError(f"bad memory size {mem!r} (use e.g. 512M or 1G)")
    return int(m.group(1)) * {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]


def kernel_cmdline(opts: VMOptions) -> str:
    parts = ["console=ttyS0", f"pti={opts.pti}", "kaslr" if opts.kaslr else "nokaslr"]
    if not opts.la57:
        parts.append("no5lvl")
    parts.append("panic=-1")
    # The reference kernel has neither ACPI nor PCI: tell the fw_cfg driver
    # where QEMU's fw_cfg is (x86 I/O ports 0x510.., DMA at +4) so that
    # -device vmcoreinfo gets VMCOREINFO (drgn needs it).
    parts.append("qemu_fw_cfg.ioport=12@0x510:0:1:4")
    if opts.append:
        parts.append(opts.append)
    return " ".join(parts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class VMPaths:
    workdir: Path
    qmp: Path           # for others (info["qmp"]): a client may hold it open
    qmp_harness: Path   # the harness's own: vm.qmp() never waits for another client
    serial: Path
    console_log: Path
    ram: Path
    stderr: Path

    @classmethod
    def for_id(cls, vm_id: str, workdir: Path) -> "VMPaths":
        return cls(workdir=workdir, qmp=workdir / "qmp.sock", qmp_harness=workdir / "qmp-harness.sock",
                   serial=workdir / "serial.sock",
                   console_log=workdir / "console.log",
                   ram=Path("/dev/shm") / f"sbmdbg-{vm_id}.ram", stderr=workdir / "qemu.stderr")


def qemu_command(opts: VMOptions, paths: VMPaths, gdb_port: int, kernel: str, initrd: str) -> list[str]:
    """The full QEMU argv for *opts*."""
    mem = parse_mem(opts.mem)
    memstr = f"{mem // (1 << 20)}M"
    cmd = [
        QEMU, "-accel", "tcg", "-cpu", opts.cpu,
        # one vCPU per socket: SeaBIOS's MP table (the kernel has no ACPI) lists
        # only the first CPU of each socket
        "-smp", f"{opts.smp},sockets={opts.smp},cores=1,threads=1", "-m", memstr,
        "-object", f"memory-backend-file,id=ram0,size={memstr},mem-path={paths.ram},share=on",
        "-machine", "pc,memory-backend=ram0",
        "-nographic", "-monitor", "none", "-parallel", "none", "-no-reboot",
        "-kernel", kernel, "-initrd", initrd,
        "-append", kernel_cmdline(opts),
        "-gdb", f"tcp:127.0.0.1:{gdb_port}",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-qmp", f"unix:{paths.qmp_harness},server=on,wait=off",
        "-chardev", f"socket,id=con0,path={paths.serial},server=on,wait=off,"
                    f"logfile={paths.console_log},logappend=on",
        "-serial", "chardev:con0",
        "-device", "vmcoreinfo",
    ]
    if opts.qemu_log:
        cmd += ["-d", "int", "-D", str(opts.qemu_log)]
    if isinstance(opts.trace_plugin, str):
        cmd += ["-plugin", f"{opts.trace_plugin},sock={paths.workdir / 'sbmtrace.sock'}"]
        if not opts.qemu_log:
            # Per-thread logs can only be chosen at start (HMP `log ...,tid`
            # later keeps one shared file, where two vCPU threads' lines
            # interleave mid-line): nothing is logged until a tracer says so.
            cmd += ["-d", "tid", "-D", str(paths.workdir / "qemu-%d.log")]
    cmd += list(opts.extra_args)
    return cmd
