"""QEMU's exception log (``-d int -D FILE``) and the cross-check of a trace
against it.  QEMU (target/i386/tcg/seg_helper.c, do_interrupt_all) logs one
line per interrupt/exception it delivers in protected mode::

    12: v=0e e=0006 i=0 cpl=3 IP=0033:ffffffff81234567 pc=ffffffff81234567 SP=002b:ffffc90000123f00 CR2=ffffc90000125000

followed by a register dump (ignored here).  A sandbox fault is a line with
cpl=3, CS 0033 and a kernel-half IP (user code never runs up there).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

LINE = re.compile(r"^\s*\d+:\s+v=([0-9a-f]+)\s+e=([0-9a-f]+)\s+i=(\d)\s+cpl=(\d)\s+"
                  r"IP=([0-9a-f]+):([0-9a-f]+)\s+pc=([0-9a-f]+)\s+SP=([0-9a-f]+):([0-9a-f]+)"
                  r"(?:\s+CR2=([0-9a-f]+))?")


@dataclass(frozen=True)
class QemuInt:
    vector: int
    error: int
    is_int: int
    cpl: int
    cs: int
    ip: int
    sp: int
    cr2: int | None

    @property
    def in_sandbox(self) -> bool:
        return self.cpl == 3 and self.cs == 0x33 and self.ip >= 1 << 47

    @property
    def is_exception(self) -> bool:
        return self.vector < 32 and not self.is_int


def parse_log(path: str, start: int = 0, end: int | None = None) -> list[QemuInt]:
    """Interrupt lines of the log between byte offsets ``start`` and ``end``
    (take them with ``os.path.getsize`` around the traced run)."""
    out = []
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(None if end is None else max(end - start, 0)).decode(errors="replace")
        for line in data.splitlines():
            if "v=" not in line:
                continue
            m = LINE.match(line)
            if not m:
                continue
            v, e, i, cpl, cs, ip, _pc, _ss, sp, cr2 = m.groups()
            out.append(QemuInt(int(v, 16), int(e, 16), int(i), int(cpl), int(cs, 16), int(ip, 16),
                               int(sp, 16), int(cr2, 16) if cr2 else None))
    return out


def _key(vector, error, cr2, ip) -> tuple:
    return (vector, error & 0xFFFF, cr2 if vector == 14 else None, ip)


def cross_check(events: list[dict], log: list[QemuInt]) -> dict:
    """Every sandbox fault the trace recorded (return/abort/spurious, with
    vector, error code, CR2 and faulting RIP) must be in QEMU's log, and every
    sandbox exception in the log must be in the trace.  Interrupts in the
    sandbox are compared the same way (vector and IP)."""
    def h(v):
        return None if v is None else int(v, 16) if isinstance(v, str) else v

    traced = Counter()
    traced_irq = Counter()
    for ev in events:
        k = ev.get("kind")
        if k in ("return", "abort", "spurious") and ev.get("vector") is not None:
            err = ev.get("error_code")
            traced[_key(ev["vector"], err if err is not None else 0, h(ev.get("cr2")), h(ev.get("fault_rip")))] += 1
        elif k in ("irq", "nmi") and ev.get("vector") is not None:
            traced_irq[(ev["vector"], h(ev.get("fault_rip")))] += 1
    logged = Counter()
    logged_irq = Counter()
    for q in log:
        if not q.in_sandbox:
            continue
        if q.is_exception:
            logged[_key(q.vector, q.error, q.cr2, q.ip)] += 1
        else:
            logged_irq[(q.vector, q.ip)] += 1
    fmt = (lambda k: {"vector": k[0], "error": k[1], "cr2": None if k[2] is None else f"{k[2]:#x}",
                      "ip": f"{k[3]:#x}" if k[3] is not None else None})
    return {
        "traced_faults": sum(traced.values()), "logged_faults": sum(logged.values()),
        "missing_from_log": [fmt(k) | {"n": n} for k, n in (traced - logged).items()],
        "missing_from_trace": [fmt(k) | {"n": n} for k, n in (logged - traced).items()],
        "traced_irqs": sum(traced_irq.values()), "logged_irqs": sum(logged_irq.values()),
        "irqs_missing_from_log": [{"vector": v, "ip": f"{ip:#x}", "n": n}
                                  for (v, ip), n in (traced_irq - logged_irq).items()],
        "irqs_missing_from_trace": [{"vector": v, "ip": f"{ip:#x}", "n": n}
                                    for (v, ip), n in (logged_irq - traced_irq).items()],
    }
