"""Target sources offline: RAM layout of pc/q35, QMP text parsers, shm on a file."""
import pytest

from sbmdbg.target.base import UnbackedMemory
from sbmdbg.target.qmp import parse_info_registers, parse_xp
from sbmdbg.target.shm import RamLayout, ShmTarget

pytestmark = pytest.mark.unit
G = 1 << 30

INFO_REGS = """RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000001 RDX=0000000000000000
RSI=0000000000000087 RDI=0000000000000087 RBP=ffffc90000073e58 RSP=ffffc90000073e40
R8 =0000000000000000 R9 =0000000000000000 R10=0000000000000000 R11=0000000000000000
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000
RIP=ffffffff812a1dd0 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
SS =0018 0000000000000000 ffffffff 00c09300 DPL=0 DS   [-WA]
DS =0000 0000000000000000 00000000 00000000
FS =0000 0000000000000000 00000000 00000000
GS =0000 ffff88801f300000 00000000 00000000
LDT=0000 fffffe0000000000 00000000 00008200 DPL=0 LDT
TR =0040 fffffe000004a000 00004087 00008900 DPL=0 TSS64-avl
GDT=     fffffe0000048000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=0000000000000000 CR3=00000000006d8000 CR4=003506b0
DR0=0000000000000000 DR1=0000000000000000 DR2=0000000000000000 DR3=0000000000000000
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000d01
"""


def test_parse_info_registers():
    r = parse_info_registers(INFO_REGS)
    assert r["rip"] == 0xFFFFFFFF812A1DD0 and r["rflags"] == 0x246 and r["cr3"] == 0x6D8000
    assert r["cs"] == 0x10 and r["ss"] == 0x18 and r["gs_base"] == 0xFFFF88801F300000
    assert r["cr4"] == 0x3506B0 and r["efer"] == 0xD01 and r["r8"] == 0 and r["cpl"] == 0


def test_parse_xp():
    assert parse_xp("0000000001000000: 0x0000000000000001 0x0000000000000002\n") == \
        (1).to_bytes(8, "little") + (2).to_bytes(8, "little")


@pytest.mark.parametrize("ram,machine,below", [
    (512 << 20, "pc", 512 << 20), (3 * G, "pc", 3 * G), (int(3.5 * G), "pc", 3 * G),
    (4 * G, "pc", 3 * G), (8 * G, "pc", 3 * G), (2 * G, "q35", 2 * G),
    (int(2.75 * G), "q35", 2 * G), (4 * G, "q35", 2 * G)])
def test_ram_layout(ram, machine, below):
    lay = RamLayout(ram, machine)
    assert lay.below == below and lay.above == ram - below
    assert lay.offset(0x1000) == 0x1000
    if lay.above:
        assert lay.offset(4 * G) == below
        with pytest.raises(UnbackedMemory):
            lay.offset(below)  # the PCI hole
    with pytest.raises(UnbackedMemory):
        lay.offset(4 * G + lay.above if lay.above else ram)


def test_shm_target_reads_file(tmp_path):
    f = tmp_path / "ram"
    f.write_bytes(bytes(range(256)) * 64 * 4)  # 64 KiB
    t = ShmTarget(str(f), 65536)
    try:
        assert t.read_phys(0x1001, 3) == bytes([1, 2, 3])
        assert len(t.read_phys(0, 65536)) == 65536
        with pytest.raises(UnbackedMemory):
            t.read_phys(65536, 1)
    finally:
        t.close()


def test_ram_file_found_from_the_qemu_command_line(tmp_path):
    from pathlib import Path

    from sbmdbg.target.shm import find_ram_file, ram_file_from_qemu_argv
    from sbmdbg.vm.qemu import VMOptions, VMPaths, qemu_command
    p = VMPaths(*(tmp_path / n for n in ("w", "q", "qh", "s", "c", "ram", "e")))
    argv = qemu_command(VMOptions(mem="1G"), p, 41234, "bzImage", "initrd")
    got = ram_file_from_qemu_argv(argv, 41234)
    assert got == {"path": str(p.ram), "size": 1 << 30, "machine": "pc", "max_ram_below_4g": None}
    assert ram_file_from_qemu_argv(argv, 41235) is None          # another stub
    private = [a.replace("share=on", "share=off") for a in argv]
    assert ram_file_from_qemu_argv(private, 41234) is None       # not the guest's RAM
    q35 = ["qemu-system-x86_64", "-s", "-M", "q35,memory-backend=m,max-ram-below-4g=2G",
           "-object", "memory-backend-file,id=m,size=4G,mem-path=/r,share=on"]
    assert ram_file_from_qemu_argv(q35, 1234) == {"path": "/r", "size": 4 << 30, "machine": "q35",
                                                  "max_ram_below_4g": 2 << 30}
    # a fake /proc
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    (proc / "77" / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    assert find_ram_file(41234, str(proc)) is None               # the RAM file does not exist
    Path(p.ram).write_bytes(b"")
    assert find_ram_file(41234, str(proc))["path"] == str(p.ram)
