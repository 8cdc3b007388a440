"""Trace events: the schema, decoders (vectors, #PF error codes) and the
JSON-lines sink/reader.

One event is one JSON object on one line.  The sink writes each line with a
single ``os.write`` on an ``O_APPEND`` descriptor (no Python buffering): an
event is on disk (in the page cache) as soon as it is recorded, so a killed
gdb or QEMU loses nothing recorded, and no line is ever half-written by us.
The reader still tolerates a torn last line (a full disk, say).

Schema (``SCHEMA`` = 2).  Every event has::

    seq        int     0, 1, 2, ... in recording order (0 = trace_start)
    kind       str     trace_start | call | arch_call | enter | return | abort |
                       exit | irq | nmi | irq_return | spurious | sandbox_insn |
                       trace_stop
    host_ns    int     host time.time_ns() when the tracer saw it
    jiffies    int     guest jiffies (read from guest RAM; the guest clock we
                       can read without an extra round trip, see README)
    vcpu       int     vCPU that stopped (0-based)
    point      str     the probe that fired (x86_sbm_exec, sbm_entry, ...)
    pid, comm, task    the current task of that vCPU (task = task_struct VA)
    sandbox    str     x86_sbm_state address (hex) or null
    cr3, cr3_role      CR3 at the stop; role in the SBM model's words
                       (sbm.model.CR3_ROLES): kernel | kernel (other mm) |
                       user (PTI) | sandbox:<pid>
    cpl        int     CPL of the vCPU at the stop (the probe runs in the kernel)
    mode       str     the SBM model's mode (sbm.model.MODES): kernel | user |
                       sandbox | sandbox (in kernel handler) | transition
    rip, sym, rsp, stack   where the vCPU is; stack = class of RSP in the SBM
                       model's words (sbm.stacks.STACK_KINDS): task_stack,
                       irq_stack, entry_stack, ist_stack, ist_guard,
                       sbm_sandbox_stack, sbm_sandbox_guard, sbm_exception_stack,
                       unknown (also fault_stack)

Schema 1 (before the tracer spoke the SBM model's words: roles user/sandbox,
stacks task/sandbox/sandbox-guard/exception/entry/irq/other, no mode) is
still read: ``read_events`` maps its words to schema 2's (``upgrade``).

Kind-specific fields (addresses are hex strings, numbers are ints):

    call/arch_call  sbm, func, func_sym, data, sticky_error
    enter           sbm, func, func_sym (first sandbox instruction), args,
                    sbm_tos, exc_tos, sbm_cr3
    return          ret (the sandbox's RAX), vector 14, error_code 0x15,
                    cr2 (= x86_sbm_return), fault_rip
    abort           vector, vector_name, via (caller of handle_sbm_fault),
                    error_code, error_bits [P,W,U,R,I,PK,...], cr2,
                    cr2_region, fault_rip, fault_sym, fault_rsp, fault_stack,
                    address (handle_sbm_fault's argument), ret (RAX)
    exit            ret, error (sbm->error at x86_sbm_return), aborted
    irq/nmi         vector, vector_name, fault_rip, fault_sym, fault_rsp
    irq_return      vector (of the interrupt returned from), to_rip, to_sym
    spurious        vector 14, error_code, error_bits, cr2, cr2_region, fault_rip
    sandbox_insn    (the no-stop tracer's instruction watch, issue 15) a
                    sensitive instruction a vCPU executed inside a sandbox:
                    rip, sym, insn (mnemonic, sbm.attack.sensitive_insn),
                    bytes (hex, at most 15 bytes), cpl 3, mode sandbox
    abort/irq/nmi/exit (when sbm.attack names the attempt, issue 15):
                    attack (class: syscall, int1, trap_flag, lret32, gs_base,
                    endless_loop, ...), attack_insn, attack_evidence [str]
"""
from __future__ import annotations

import json
import os
import threading

from sbmdbg.errors import SbmdbgError

SCHEMA = 2
# schema 1 words -> the SBM model's (entry: somewhere in cpu_entry_area, most
# likely its entry stack)
V1_STACKS = {"task": "task_stack", "sandbox": "sbm_sandbox_stack", "sandbox-guard": "sbm_sandbox_guard",
             "exception": "sbm_exception_stack", "entry": "entry_stack", "irq": "irq_stack",
             "other": "unknown", "?": "unknown"}
V1_ROLES = {"user": "user (PTI)", "kernel": "kernel", "other": "kernel (other mm)"}

CALL_KINDS = ("enter",)
END_KINDS = ("return", "abort")
INSTANT_KINDS = ("irq", "nmi", "irq_return", "spurious")

# Exception vectors (SDM Vol. 3, 6.3.1) and the Linux entry stubs that raise them.
EXC_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
    8: "#DF", 9: "CSO", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF",
    16: "#MF", 17: "#AC", 18: "#MC", 19: "#XM", 20: "#VE", 21: "#CP", 29: "#VC",
}
STUB_VECTORS = {
    "asm_exc_divide_error": 0, "asm_exc_debug": 1, "asm_exc_nmi": 2, "asm_exc_int3": 3,
    "asm_exc_overflow": 4, "asm_exc_bounds": 5, "asm_exc_invalid_op": 6,
    "asm_exc_device_not_available": 7, "asm_exc_double_fault": 8,
    "asm_exc_coproc_segment_overrun": 9, "asm_exc_invalid_tss": 10,
    "asm_exc_segment_not_present": 11, "asm_exc_stack_segment": 12,
    "asm_exc_general_protection": 13, "asm_exc_page_fault": 14,
    "asm_exc_spurious_interrupt_bug": 15, "asm_exc_coprocessor_error": 16,
    "asm_exc_alignment_check": 17, "asm_exc_machine_check": 18,
    "asm_exc_simd_coprocessor_error": 19, "asm_exc_control_protection": 21,
    # system vectors (arch/x86/include/asm/irq_vectors.h, Linux 6.12)
    "asm_sysvec_spurious_apic_interrupt": 0xFF, "asm_sysvec_error_interrupt": 0xFE,
    "asm_sysvec_reschedule_ipi": 0xFD, "asm_sysvec_call_function": 0xFC,
    "asm_sysvec_call_function_single": 0xFB, "asm_sysvec_thermal": 0xFA,
    "asm_sysvec_threshold": 0xF9, "asm_sysvec_reboot": 0xF8,
    "asm_sysvec_x86_platform_ipi": 0xF7, "asm_sysvec_irq_work": 0xF6,
    "asm_sysvec_deferred_error": 0xF4, "asm_sysvec_apic_timer_interrupt": 0xEC,
}
# Callers of handle_sbm_fault -> vector (when no entry probe saw the stub).
CALLER_VECTORS = {
    "exc_page_fault": 14, "handle_page_fault": 14, "exc_general_protection": 13,
    "exc_double_fault": 8, "exc_int3": 3,
}

# #PF error code bits (SDM Vol. 3, 4.7).
PF_BITS = [(0, "P"), (1, "W"), (2, "U"), (3, "R"), (4, "I"), (5, "PK"), (6, "SS"),
           (15, "SGX")]
PF_EXIT_ERROR = 0x15   # P|U|I: the sandbox's `ret` to the supervisor-only x86_sbm_return


def vector_name(v: int | None) -> str:
    if v is None:
        return "?"
    if v in EXC_NAMES:
        return EXC_NAMES[v]
    return f"irq {v:#x}" if v >= 32 else f"exc {v}"


def decode_pf_error(code: int) -> list[str]:
    """#PF error code -> bit names, e.g. 0x15 -> ['P', 'U', 'I']."""
    return [name for bit, name in PF_BITS if code >> bit & 1]


def describe_pf_error(code: int) -> str:
    """Human words: 0x6 -> 'not-present write from user'."""
    present = "protection" if code & 1 else "not-present"
    access = "fetch" if code & 0x10 else "write" if code & 2 else "read"
    who = "user" if code & 4 else "supervisor"
    extra = [n for b, n in PF_BITS if b not in (0, 1, 2, 4) and code >> b & 1]
    return f"{present} {access} from {who}" + (f" ({','.join(extra)})" if extra else "")


def hx(v: int | None) -> str | None:
    return None if v is None else f"{v & ((1 << 64) - 1):#x}"


def unhex(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, int):
        return v
    return int(v, 16) if isinstance(v, str) and v.startswith("0x") else int(v, 0)


# ------------------------------------------------------------------ sink

class EventSink:
    """Append-only JSON-lines writer; each event is one ``os.write``."""

    def __init__(self, path: str, truncate: bool = True):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if truncate else 0)
        try:
            self._fd: int | None = os.open(path, flags, 0o644)
        except OSError as e:
            raise SbmdbgError(f"cannot write trace file {path}: {e.strerror}") from None
        self._lock = threading.Lock()
        self.count = 0
        self.errors = 0

    def write(self, ev: dict) -> None:
        line = (json.dumps(ev, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, line)
                self.count += 1
            except OSError:
                self.errors += 1

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                try:
                    os.fsync(self._fd)
                except OSError:
                    pass
                os.close(self._fd)
                self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None


# ------------------------------------------------------------------ reader
# A trace file is input like any other: every count taken from it is bounded
# and every field the faces use has its type checked, per line (FILE:LINE).
MAX_VCPUS = 4096
MAX_LINE = 1 << 20          # bytes of one event line
_U64 = (0, (1 << 64) - 1)
INT_FIELDS = {
    "seq": _U64, "host_ns": _U64, "jiffies": (-(1 << 63), (1 << 64) - 1),
    "vcpu": (0, MAX_VCPUS - 1), "ncpus": (1, MAX_VCPUS), "pid": (-1, (1 << 32) - 1),
    "cpl": (0, 3), "vector": (0, 255), "error_code": _U64, "schema": (0, 1 << 16),
    "irqs": _U64,
}
#: may be null: no task yet, no IRQ count, a vector that pushes no error code (#UD, #DB, ...),
#: an interrupt whose vector the tracer could not tell, an event no handler stamp timed (jiffies:
#: a software `int n` that faulted before its handler ran)
NULLABLE = {"pid", "irqs", "error_code", "vector", "jiffies"}
STR_FIELDS = {"point", "comm", "cr3_role", "mode", "sym", "stack", "func_sym", "fault_sym",
              "vector_name", "cr2_region", "to_sym", "fault_stack", "via", "level", "reason", "insn"}
HEX_FIELDS = {"task", "sandbox", "cr3", "rip", "rsp", "sbm", "func", "data", "sbm_tos", "exc_tos",
              "sbm_cr3", "cr2", "fault_rip", "fault_rsp", "address", "to_rip", "sandbox_rsp"}
_HEX_RE = None


def _hex_ok(v) -> bool:
    global _HEX_RE
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and -(1 << 63) <= v < 1 << 64):
        return True
    if not isinstance(v, str):
        return False
    if _HEX_RE is None:
        import re
        _HEX_RE = re.compile(r"-?0x[0-9a-fA-F]{1,16}")
    return _HEX_RE.fullmatch(v) is not None


def check_event(ev) -> str | None:
    """Why *ev* (one decoded JSON line) is not a trace event, or None."""
    if not isinstance(ev, dict):
        return f"not a trace event (a JSON {type(ev).__name__})"
    k = ev.get("kind")
    if not isinstance(k, str):
        return "not a trace event (no string 'kind')" if "kind" not in ev else \
            f"kind: want a string, got {type(k).__name__}"
    for f, (lo, hi) in INT_FIELDS.items():
        if f in ev:
            v = ev[f]
            if f in NULLABLE and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool):
                return f"{f}: want an integer, got {type(v).__name__}"
            if not lo <= v <= hi:
                return f"{f}: {v} out of range [{lo}, {hi}]"
    for f in STR_FIELDS:
        if f in ev and ev[f] is not None and not isinstance(ev[f], str):
            return f"{f}: want a string, got {type(ev[f]).__name__}"
    for f in HEX_FIELDS:
        if f in ev and not _hex_ok(ev[f]):
            return f"{f}: want a hex address like 0x1f, got {_short(ev[f])}"
    eb = ev.get("error_bits")
    if eb is not None and (not isinstance(eb, list) or len(eb) > 64
                           or not all(isinstance(b, str) for b in eb)):
        return "error_bits: want a list of bit names"
    b = ev.get("bytes")
    if b is not None and not (isinstance(b, str) and len(b) <= 30 and len(b) % 2 == 0
                              and all(ch in "0123456789abcdefABCDEF" for ch in b)):
        return f"bytes: want at most 15 bytes in hex, got {_short(b)}"
    if "probes" in ev and not isinstance(ev["probes"], list):
        return "probes: want a list"
    return None


def _short(v) -> str:
    from sbmdbg.text import clean
    return clean(repr(v), limit=40)


def read_events(path: str, strict: bool = False) -> list[dict]:
    """Events of a JSON-lines trace.  A torn last line (writer killed while
    the disk was full, say: the file does not end in a newline) is dropped
    unless ``strict``; any other bad line is an error with FILE:LINE.  Every
    string in an event is sanitized (sbmdbg.text.clean)."""
    from sbmdbg.text import clean, clean_tree

    where = clean(str(path), limit=300)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        raise SbmdbgError(f"cannot read trace {where}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise SbmdbgError(f"cannot read trace {where}: {e}") from None
    lines = data.split(b"\n")
    del data
    torn_ok = not strict and lines[-1].strip() != b""   # the last line has no newline
    last = len(lines) - 1
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        problem = None
        if len(ln) > MAX_LINE:
            problem = f"line longer than {MAX_LINE} bytes"
        else:
            try:
                ev = json.loads(ln)
            except RecursionError:
                problem = "JSON nested too deeply"
            except ValueError:
                problem = "not a JSON line"
            else:
                problem = check_event(ev)
        if problem is not None:
            if i == last and torn_ok and problem == "not a JSON line" and ln.lstrip().startswith(b"{"):
                break
            raise SbmdbgError(f"{where}:{i + 1}: {problem}") from None
        out.append(clean_tree(ev))
    return upgrade(out)


def upgrade(events: list[dict]) -> list[dict]:
    """Events of an older schema in the current schema's words (in place)."""
    schema = events[0].get("schema", SCHEMA) if events and events[0].get("kind") == "trace_start" else SCHEMA
    if schema != 1:
        return events
    for ev in events:
        for f in ("stack", "fault_stack"):
            if f in ev:
                ev[f] = V1_STACKS.get(ev[f], ev[f])
        role = ev.get("cr3_role")
        if role == "sandbox":
            ev["cr3_role"] = f"sandbox:{ev.get('pid')}"
        elif role in V1_ROLES:
            ev["cr3_role"] = V1_ROLES[role]
    return events


def validate(events: list[dict]) -> list[str]:
    """Problems with a trace (empty list = fine): seq order, header, fields."""
    probs = []
    if not events:
        return ["no events"]
    if events[0].get("kind") != "trace_start":
        probs.append("first event is not trace_start")
    prev = -1
    for ev in events:
        s = ev.get("seq")
        if not isinstance(s, int) or s <= prev:
            probs.append(f"seq {s!r} after {prev}")
        prev = s if isinstance(s, int) else prev
        if ev.get("kind") not in ("trace_start", "trace_stop") and "vcpu" not in ev:
            probs.append(f"seq {s}: no vcpu")
    return probs


def summarize(events: list[dict]) -> dict:
    """Counts per kind, per vCPU, calls/returns/aborts as the demo counts them."""
    kinds: dict[str, int] = {}
    vcpus: dict[int, int] = {}
    for ev in events:
        kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1
        if "vcpu" in ev and ev["kind"] not in ("trace_start", "trace_stop"):
            vcpus[ev["vcpu"]] = vcpus.get(ev["vcpu"], 0) + 1
    ts = [ev["host_ns"] for ev in events if "host_ns" in ev]
    dur = (max(ts) - min(ts)) / 1e9 if len(ts) > 1 else 0.0
    trans = sum(kinds.get(k, 0) for k in ("enter", "return", "abort", "irq", "nmi", "irq_return",
                                          "spurious"))
    return {"events": len(events), "kinds": kinds, "vcpus": vcpus,
            "calls": kinds.get("enter", 0), "returns": kinds.get("return", 0),
            "aborts": kinds.get("abort", 0), "transitions": trans, "seconds": round(dur, 3),
            "complete": bool(events) and events[-1].get("kind") == "trace_stop"}
