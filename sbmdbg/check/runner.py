"""Run scenarios against a live VM.

One VM per scenario file, reused by the next file when the kernel and the
VM options match (and the file did not ask for ``fresh_vm``, and the
previous file passed -- or, with ``reuse_after_failure``, failed but left the
guest answering: QEMU alive, gdb able to stop and resume it, the shell
echoing).  One gdb session per VM, attached on the
first step that needs it and kept; between steps the guest always runs.

Every step result is a list of failure messages that say what was expected
and what was seen; the file result carries the console tail when anything
failed.
"""
from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from sbmdbg.check import known as K
from sbmdbg.check.expr import check_path, compare, short
from sbmdbg.check.spec import Scenario, Step
from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean

BAD_CONSOLE = re.compile(r"WARNING:|BUG:|Oops|general protection fault|Call Trace|"
                         r"Kernel panic|double fault|not ok \d")
_FIELD = re.compile(r"(\S+?)=(\S+)")


class NmiStorm:
    """``with NmiStorm(vm, on):`` sends QEMU's QMP ``inject-nmi`` (an NMI to every
    vCPU) back to back from a thread until the block ends (issue 15's
    nmi_storm: NMIs from outside the guest while sandboxes run).  ``sent``
    counts them; ``error`` is why the storm stopped early (QEMU gone, ...).
    At most ``max_sent`` NMIs: the kernel prints two console lines for every
    NMI nothing claims, so an endless storm on a slowed guest (a loaded host)
    is a feedback loop -- the command slows, more NMIs arrive, it never ends
    (seen under ``-n 2``).  Unloaded, a step sends ~150-230 before it ends."""

    def __init__(self, vm, on: bool = True, pause_s: float = 0.002, max_sent: int = 300):
        self.vm, self.on, self.pause_s, self.max_sent = vm, on, pause_s, max_sent
        self.sent = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set() and self.sent < self.max_sent:
            try:
                self.vm.qmp("inject-nmi")
            except Exception as e:  # noqa: BLE001 - QEMU gone, QMP closed: say why, stop
                self.error = str(e) or type(e).__name__
                return
            self.sent += 1
            self._stop.wait(self.pause_s)

    def __enter__(self) -> "NmiStorm":
        if self.on:
            self._t = threading.Thread(target=self._run, name="sbm-check-nmi", daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join(30)


# --------------------------------------------------------------- results
@dataclass
class StepResult:
    index: int
    name: str
    line: int | None
    status: str = "pass"            # pass | fail | error | skip
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output: str = ""
    checks: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FileResult:
    path: str
    name: str
    status: str = "pass"            # pass | fail | error (setup)
    seconds: float = 0.0
    steps: list[StepResult] = field(default_factory=list)
    setup_failures: list[str] = field(default_factory=list)
    console_tail: str = ""
    kernel: dict = field(default_factory=dict)
    vm: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict:
        d = asdict(self)
        d["steps"] = [s.to_json() for s in self.steps]
        return d


class Reporter:
    """Progress callbacks (the CLI prints with rich; pytest stays quiet)."""

    def file_start(self, sc: Scenario, i: int, n: int) -> None: ...
    def note(self, text: str) -> None: ...
    def step_start(self, st: Step, n: int) -> None: ...
    def step_done(self, st: Step, r: StepResult) -> None: ...
    def file_done(self, fr: FileResult) -> None: ...


# --------------------------------------------------------------- helpers
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|[\x00-\x08\x0b-\x1f\x7f]")


def console_tail(text: str, start: int = 0, lines: int = 30) -> str:
    """The last *lines* console lines since *start*, without the harness's
    command lines and markers or terminal escapes."""
    keep = [clean(_ANSI.sub("", ln).rstrip()) for ln in text[start:].splitlines()]
    keep = [ln for ln in keep if ln and "__SBMDBG_" not in ln and "base64 -d" not in ln]
    return "\n".join(keep[-lines:])


def parse_fields(output: str) -> dict:
    """``key=value`` words of a demo result line, as written (the operators
    compare numeric strings as numbers: "0xee" == 238, "-14" == -14)."""
    return dict(_FIELD.findall(output))


def check_expect(st: Step, status: int, output: str) -> list[str]:
    fields = parse_fields(output)
    fails = []
    line = output.strip().splitlines()[-1] if output.strip() else "(no output)"
    if st.demo is not None and status == 0:
        want = st.demo.split()[0]
        if fields.get("scenario") != want:
            return [f"demo {st.demo}: no result line for it in the output: {short(output.strip(), 300)}"]
    for e in st.expect:
        if e.key == "status":
            actual = status
        elif e.key == "output":
            actual = output
        elif e.key not in fields:
            fails.append(f"expected {e.describe()}, saw no {e.key}= in the output: {short(line, 300)}")
            continue
        else:
            actual = fields[e.key]
        if not compare(e.op, actual, e.value):
            what = "exit status" if e.key == "status" else e.key
            fails.append(f"{what}: expected {e.op} {short(e.value)}, saw {short(actual)}"
                         + ("" if e.key == "output" else f"  [{short(line, 300)}]"))
    return fails


def gdb_json(g, cmd: str, timeout: float = 120.0) -> tuple[object | None, str | None, str]:
    """Run a console command in gdb; (parsed JSON or None, gdb error or None, text).

    Unlike GdbSession.console, keeps what the command printed when it ends
    with an error (``sbm audit --json`` prints its JSON, then fails when a
    finding is above info)."""
    from sbmdbg.vm.gdbmi import parse_json_object

    out, err = g.console_result(cmd, timeout)
    return parse_json_object(out), err, out


def _context(doc, path) -> str:
    """The objects around a failed path's last key (their scalar fields), so
    that the message shows the rows it looked at, e.g. each vCPU's cpl/rip."""
    from sbmdbg.check.expr import Path as JPath, resolve

    if len(path.parts) < 2 or not isinstance(path.parts[-1], str):
        return ""
    parents, why = resolve(doc, JPath(path.text, path.parts[:-1]))
    if why or not parents:
        return ""
    rows = []
    for p in parents[:8]:
        if isinstance(p, dict):
            rows.append({k: (v.get("text", v) if isinstance(v, dict) else v) for k, v in p.items()
                         if not isinstance(v, list) and (not isinstance(v, dict) or "text" in v)})
    return f"\n  in: {short(rows, 900)}" if rows else ""


class _Machine:
    """A booted VM, its gdb session (lazy) and what the checker has seen of it."""

    def __init__(self, vm, key, kernel: dict, release=None):
        self.vm = vm
        self.release = release
        self.key = key
        self.kernel = kernel
        self.g = None
        self.trace_ok: bool | None = None
        self.plugin_kernel = None       # the no-stop tracer's open kernel (level "plugin")
        self.slide: int | None = None
        self.dmesg_seen = 0
        self.healthy = True
        self.boot_checked = False
        self.taint: str | None = None     # /proc/sys/kernel/tainted when the checker took the VM

    def gdb(self):
        if self.g is None:
            from sbmdbg.vm.gdbmi import GdbSession

            info = self.vm.info
            self.g = GdbSession(info["vmlinux"], info.get("tree"), info["gdb"])
            self.g.cont()          # attaching stops the guest; the checker keeps it running
        return self.g

    def close(self) -> None:
        if self.g is not None:
            try:
                self.g.interrupt(timeout=5)
                self.g.mi("-break-delete", timeout=5)
                self.g.cont(timeout=5)
            except SbmdbgError:
                pass
            self.g.close()
            self.g = None
        if self.release is not None:
            self.release(self.vm, self.healthy and self.vm.alive())
        else:
            self.vm.close()


# --------------------------------------------------------------- runner
class Runner:
    """``Runner(kernel=..., extra_patches=..., reuse=True, reporter=...)``;
    ``run(scenarios) -> [FileResult]``; ``close()`` stops the VM."""

    def __init__(self, *, kernel: dict | None = None, extra_patches=(), reuse: bool = True,
                 reuse_after_failure: bool = False, reporter: Reporter | None = None,
                 vm_factory=None):
        self.kernel_override = kernel
        self.extra_patches = [str(p) for p in extra_patches]
        self.reuse = reuse
        self.reuse_after_failure = reuse_after_failure
        # vm_factory(VMOptions) -> (vm, release): a VM from someone else's pool
        # (the test suite's); release(vm, healthy) hands it back instead of
        # stopping it.  None: the runner boots and stops its own.
        self.vm_factory = vm_factory
        self.rep = reporter or Reporter()
        self.m: _Machine | None = None
        self._builds: dict[tuple, dict] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.m is not None:
            m, self.m = self.m, None
            m.close()

    def run(self, scenarios: list[Scenario]) -> list[FileResult]:
        out = []
        for i, sc in enumerate(scenarios):
            self.rep.file_start(sc, i, len(scenarios))
            fr = self.run_one(sc)
            self.rep.file_done(fr)
            out.append(fr)
        return out

    # ----------------------------------------------------------- setup
    def kernel_for(self, sc: Scenario) -> dict:
        if self.kernel_override:
            return dict(self.kernel_override, source="command line")
        if sc.kernel:
            return dict(sc.kernel, source="scenario file")
        patches = tuple(str(p) for p in sc.extra_patches) + tuple(self.extra_patches)
        if patches not in self._builds:
            from sbmdbg.kernel.build import ensure_kernel

            t0 = time.monotonic()
            if patches:
                self.rep.note(f"kernel: reference + {', '.join(p.rsplit('/', 1)[-1] for p in patches)} "
                              "(building through the pipeline unless cached)")
            kb = ensure_kernel(list(patches))
            self._builds[patches] = {"bzimage": str(kb.bzImage), "vmlinux": str(kb.vmlinux),
                                     "tree": str(kb.tree), "key": kb.key,
                                     "source": "reference" + (" + " + ", ".join(
                                         p.rsplit("/", 1)[-1] for p in patches) if patches else ""),
                                     "seconds": round(time.monotonic() - t0, 1)}
        return self._builds[patches]

    def machine_for(self, sc: Scenario, fr: FileResult) -> _Machine:
        from sbmdbg.vm import VM, VMOptions

        kern = self.kernel_for(sc)
        fr.kernel = kern
        opts = dict(smp=2, pti="off", kaslr=False, la57=False, append="", mem="512M")
        opts.update(sc.vm)
        key = (kern["bzimage"], kern["vmlinux"], kern.get("tree"), tuple(sorted(opts.items())))
        m = self.m
        if m is not None and (not self.reuse or sc.fresh_vm or m.key != key or not m.healthy
                              or not m.vm.alive()):
            self.close()
            m = None
        if m is None:
            t0 = time.monotonic()
            vo = VMOptions(kernel=kern["bzimage"], vmlinux=kern["vmlinux"], tree=kern.get("tree"), **opts)
            release = None
            if self.vm_factory is not None and not sc.fresh_vm:
                vm, release = self.vm_factory(vo)
            else:
                vm = VM(vo)
            m = self.m = _Machine(vm, key, kern, release)
            fr.vm = {"id": vm.id, "fresh": True, "boot_seconds": round(time.monotonic() - t0, 1), **opts}
            self.rep.note(f"VM {vm.id} {'booted' if release is None else 'from the pool'} in "
                          f"{time.monotonic() - t0:.1f} s "
                          f"({', '.join(f'{k}={v}' for k, v in opts.items() if v not in ('', '512M'))}; "
                          f"kernel {kern.get('key') or kern['bzimage']})")
        else:
            fr.vm = {"id": m.vm.id, "fresh": False, **opts}
            self.rep.note(f"VM {m.vm.id} reused (same kernel and options)")
        return m

    # ----------------------------------------------------------- a file
    def run_one(self, sc: Scenario) -> FileResult:
        fr = FileResult(path=str(sc.path), name=sc.name)
        t0 = time.monotonic()
        try:
            m = self.machine_for(sc, fr)
        except SbmdbgError as e:
            fr.status = "error"
            fr.setup_failures.append(f"setup: {e.args[0]}")
            fr.console_tail = e.detail or ""
            fr.seconds = round(time.monotonic() - t0, 2)
            for st in sc.steps:
                fr.steps.append(StepResult(st.index, st.name, st.line, status="skip",
                                           notes=["not run: setup failed"]))
            return fr
        con_start = len(m.vm.console_text())
        if self.reuse_after_failure and m.taint is None:
            m.taint = self._taint(m)
        if sc.console_clean and not m.boot_checked:
            m.boot_checked = True
            bad = self._console_bad(m, 0)
            if bad:
                fr.setup_failures.append("console after boot: " + bad)
        for st in sc.steps:
            if not m.vm.alive():
                fr.steps.append(StepResult(st.index, st.name, st.line, status="skip",
                                           notes=["not run: QEMU is gone"]))
                continue
            self.rep.step_start(st, len(sc.steps))
            r = self.run_step(m, st)
            fr.steps.append(r)
            self.rep.step_done(st, r)
        failed = fr.setup_failures or any(s.status in ("fail", "error") for s in fr.steps)
        if not m.vm.alive():
            fr.setup_failures.append("QEMU exited during the file")
            failed = True
        if failed:
            fr.status = "fail"
            fr.console_tail = console_tail(m.vm.console_text(), con_start)
            # the next file gets a fresh VM, unless asked to keep one that still answers
            m.healthy = self.reuse_after_failure and self._answers(m)
            if m.healthy:
                self.rep.note(f"VM {m.vm.id} kept after the failure: the guest still answers")
        fr.seconds = round(time.monotonic() - t0, 2)
        return fr

    # ----------------------------------------------------------- a step
    def run_step(self, m: _Machine, st: Step) -> StepResult:
        r = StepResult(st.index, st.name, st.line)
        t0 = time.monotonic()
        con0 = len(m.vm.console_text())
        hook = None
        try:
            stats0 = self._stats(m) if st.stats else None
            if st.transitions:
                hook = self._trace_start(m, st, r)
            if st.brk:
                status, output = self._break_step(m, st, r)
            else:
                status, output = None, ""
                if st.command is not None:
                    with NmiStorm(m.vm, st.qmp_nmi) as storm:
                        res = m.vm.run(st.command, timeout=st.timeout)
                    status, output = res.status, res.output
                    if st.qmp_nmi:
                        r.notes.append(f"qmp_nmi: {storm.sent} NMIs sent while the command ran")
                        r.checks += 1
                        if not storm.sent:
                            r.failures.append("qmp_nmi: no NMI was sent while the command ran"
                                              + (f" ({storm.error})" if storm.error else ""))
                if st.asserts:
                    g = m.gdb()
                    g.interrupt()
                    try:
                        self._asserts(g, st, r)
                    finally:
                        g.cont()
            r.output = output
            if hook is not None:
                from sbmdbg.check.transitions import check_transitions, summary

                events = hook.stop()
                r.notes.append(f"transitions: {summary(events)}")
                r.failures += check_transitions(st.transitions, events)
                r.checks += len(st.transitions.counts) + sum(map(len, st.transitions.per_kind.values()))
            if status is not None:
                r.failures += check_expect(st, status, output)
                r.checks += len(st.expect)
            if stats0 is not None:
                stats1 = self._stats(m)
                for e in st.stats:
                    d = stats1.get(e.key, 0) - stats0.get(e.key, 0)
                    r.checks += 1
                    if not compare(e.op, d, e.value):
                        r.failures.append(f"stats: expected {e.key} to change by {e.op} {short(e.value)}, "
                                          f"saw {d:+d} ({stats0.get(e.key)} -> {stats1.get(e.key)})")
        except SbmdbgError as e:
            r.status = "error"
            r.failures.append(f"error: {e.args[0]}" + (f"\n{e.detail}" if e.detail else ""))
            if hook is not None:
                hook.abandon()
            self._recover(m)
        finally:
            if hook is not None:
                hook.cleanup()
        if st.console_clean and m.vm.alive():
            try:
                bad = self._console_bad(m, con0)
            except SbmdbgError as e:
                bad = f"could not read dmesg ({e.args[0]})"
            if bad:
                r.failures.append("console: " + bad)
            r.checks += 1
        if r.failures and r.status == "pass":
            r.status = "fail"
        r.seconds = round(time.monotonic() - t0, 2)
        return r

    def _trace_start(self, m: _Machine, st: Step, r: StepResult):
        from sbmdbg.check.transitions import PluginHook, TraceHook

        if st.transitions.level == "plugin":
            hook = PluginHook(m.vm, m.plugin_kernel)
            try:
                hook.start()
            except BaseException:
                hook.cleanup()
                raise
            m.plugin_kernel = hook.kernel
            return hook
        g = m.gdb()
        if m.trace_ok is None:
            try:
                import sbmdbg.trace.events  # noqa: F401
                g.interrupt()
                m.trace_ok = TraceHook.available(g)
                g.cont()
            except ImportError:
                m.trace_ok = False
        if not m.trace_ok:
            # A transitions block that checks nothing must not pass.
            r.failures.append("transitions: tracer not available (no `sbm trace` in gdb): "
                              "the step's transitions could not be checked")
            r.checks += 1
            return None
        hook = TraceHook(g, m.vm.info, st.transitions.level)
        try:
            hook.start()
        except BaseException:
            hook.cleanup()
            raise
        return hook

    def _break_step(self, m: _Machine, st: Step, r: StepResult) -> tuple[int | None, str]:
        from sbmdbg.vm.serial import parse_run_output, run_lines

        g = m.gdb()
        vm = m.vm
        if vm.serial is None:
            vm.run(":")
        g.interrupt()
        try:
            where = self._break_location(m, st.brk, r)
            g.mi(f"-break-insert -t {where}")
        except SbmdbgError as e:
            g.cont()
            r.failures.append(f"break {st.brk}: gdb refused the breakpoint ({e.args[0]})")
            return None, ""
        g.cont()
        marker = None
        start = len(vm.serial.text())
        if st.command is not None:
            marker = uuid.uuid4().hex[:12]
            for line in run_lines(st.command, marker):
                vm.serial.send(line + "\n")
        hit = False
        try:
            stop = g.wait_stopped(st.timeout)
            if stop.get("reason") != "breakpoint-hit":
                r.failures.append(f"break {st.brk}: the guest stopped for {stop.get('reason')!r}, "
                                  "not at the breakpoint")
            else:
                hit = True
                fr = stop.get("frame") or {}
                cpu = int(stop.get("thread-id", "1")) - 1
                r.notes.append(f"stopped at {fr.get('func') or fr.get('addr')} on vCPU {cpu}")
        except SbmdbgError:
            r.failures.append(f"break {st.brk}: not hit within {st.timeout:g} s"
                              + (f" while running {st.command!r}" if st.command else ""))
            g.interrupt()
            g.mi("-break-delete")
        if hit:
            try:
                self._asserts(g, st, r)
            finally:
                g.cont()
        else:
            g.cont()
        if marker is None:
            return None, ""
        res = vm.serial.wait_for(lambda t: parse_run_output(t, marker), st.timeout, start)
        if res is None:
            vm.serial.send("\x03")
            raise SbmdbgError(f"guest command {st.command!r} did not finish in {st.timeout:g} s "
                              "after the breakpoint")
        return res.status, res.output

    def _break_location(self, m: _Machine, brk: str, r: StepResult) -> str:
        """Where gdb breaks: the symbol as written, or under KASLR (vmlinux
        symbols are link-time addresses) ``*ADDRESS`` = symbol + slide."""
        if m.slide is None:
            doc, err, _ = gdb_json(m.g, "sbm kernel --json")
            m.slide = int(doc.get("slide") or 0) if isinstance(doc, dict) else 0
        if not m.slide or brk.startswith("*0x"):
            return brk
        sym = brk.lstrip("*")
        out = m.g.console(f'printf "%lu\\n", (unsigned long)&{sym}' if "+" not in sym else
                          f'printf "%lu\\n", (unsigned long)&{sym.split("+")[0]} + {sym.split("+")[1]}')
        addr = int(out.strip().splitlines()[-1]) + m.slide
        r.notes.append(f"KASLR slide {m.slide:#x}: break at *{addr:#x} ({sym})")
        return f"*{addr:#x}"

    def _asserts(self, g, st: Step, r: StepResult) -> None:
        # Drop the gdb-side model's caches: they are dropped on gdb's `cont`
        # event, but the first stop after a resume was seen to read stale
        # per-stop state now and then (see docs/checks.md, "Known issues").
        try:
            g.console("sbm target flush")
        except SbmdbgError:
            pass
        cache: dict[str, tuple] = {}
        for a in st.asserts:
            if a.argv not in cache:
                cache[a.argv] = gdb_json(g, a.argv)
            doc, err, text = cache[a.argv]
            r.checks += 1
            where = f" (line {a.line})" if a.line else ""
            if doc is None:
                r.failures.append(f"assert{where} {a.describe()}: `{a.argv}` printed no JSON"
                                  + (f"; gdb: {err}" if err else f": {short(text.strip(), 300)}"))
                continue
            ok, seen = check_path(doc, a.path, a.op, a.value)
            if not ok:
                # Re-read on a model rebuilt from scratch, for the report only:
                # the first answer stands, so a stale-cache bug fails the step.
                try:
                    g.console("sbm target reload")
                    doc2, _, _ = gdb_json(g, a.argv)
                except SbmdbgError:
                    doc2 = None
                if doc2 is not None and doc2 != doc:
                    _, seen2 = check_path(doc2, a.path, a.op, a.value)
                    r.notes.append(f"`{a.argv}` read again on a fresh model gave a different answer "
                                   f"({seen} -> {seen2}): a stale model cache")
            if not ok:
                r.failures.append(f"assert{where}: expected {a.describe()}, saw {seen}"
                                  + (f" (the command also said: {err})" if err else "")
                                  + _context(doc, a.path))

    def _stats(self, m: _Machine) -> dict:
        res = m.vm.run(f"cat {K.DEMO_DIR}/stats", timeout=30)
        if res.status != 0:
            raise SbmdbgError(f"cannot read {K.DEMO_DIR}/stats: {res.output.strip()}")
        return {k: int(v, 0) for k, v in parse_fields(res.output).items() if re.fullmatch(r"-?\d+", v)}

    def _console_bad(self, m: _Machine, con_from: int) -> str:
        """Oops/warning lines on the serial console since *con_from* and in the
        kernel log since the last look (after boot the kernel keeps messages
        off the console: dmesg -n 1)."""
        lines = [ln for ln in m.vm.console_text()[con_from:].splitlines() if BAD_CONSOLE.search(ln)]
        # Only the lines not seen yet cross the serial console (its tail is
        # what a failure shows): count, then print from the first new one.
        res = m.vm.run(f"dmesg > /tmp/.sbmdbg-dmesg; wc -l < /tmp/.sbmdbg-dmesg; "
                       f"tail -n +{m.dmesg_seen + 1} /tmp/.sbmdbg-dmesg", timeout=30)
        head, _, rest = res.output.partition("\n")
        total = int(head.strip()) if head.strip().isdigit() else m.dmesg_seen
        new = rest.splitlines() if total >= m.dmesg_seen else []
        m.dmesg_seen = total
        lines += [f"dmesg: {ln}" for ln in new if BAD_CONSOLE.search(ln) and ln not in lines]
        if not lines:
            return ""
        return f"{len(lines)} oops/warning line(s): " + " | ".join(clean(ln.strip(), limit=300)
                                                                  for ln in lines[:5])

    @staticmethod
    def _taint(m: _Machine) -> str | None:
        try:
            res = m.vm.run("cat /proc/sys/kernel/tainted", timeout=20)
        except SbmdbgError:
            return None
        return res.output.strip() if res.status == 0 else None

    def _answers(self, m: _Machine) -> bool:
        """After a failed file: is the guest still usable (QEMU alive and
        running, gdb can stop and resume it, the shell echoes within 20 s,
        the kernel's taint unchanged: no WARN, oops or BUG since the checker
        took the VM)?"""
        try:
            if not m.vm.alive():
                return False
            if m.g is not None:
                m.g.interrupt(timeout=10)
                m.g.mi("-break-delete", timeout=10)
                m.g.cont(timeout=10)
            if m.vm.qmp("query-status", timeout=10)["status"] != "running":
                return False
            marker = uuid.uuid4().hex[:8]
            if m.vm.run(f"echo {marker}", timeout=20).output.strip() != marker:
                return False
            taint = self._taint(m)
            if taint is None or taint != m.taint:
                self.rep.note(f"VM {m.vm.id} replaced: the kernel's taint went {m.taint} -> {taint}")
                return False
            return True
        except (SbmdbgError, OSError, KeyError, TypeError):
            return False

    def _recover(self, m: _Machine) -> None:
        """After an error: delete breakpoints, let the guest run."""
        if m.g is None or not m.vm.alive():
            return
        try:
            m.g.interrupt(timeout=10)
            m.g.mi("-break-delete", timeout=10)
            m.g.cont(timeout=10)
        except SbmdbgError:
            m.healthy = False
