"""The Textual dashboard: four panels over a ``Backend``.

Every backend call (QMP, shm reads, gdb) runs in a worker thread; the UI
thread only renders snapshots.  A refresh is skipped, not queued, while the
previous one still runs, so a slow guest never piles up requests.  While the
guest is paused the model data cannot change: only the console and the
trace tail are re-read (after a pause or a step, one full refresh runs).
"""
from __future__ import annotations

import os
import signal
import threading
import time

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, OptionList, Static

from sbmdbg.dashboard import panels as P
from sbmdbg.dashboard.backend import SCENARIOS
from sbmdbg.errors import SbmdbgError


class ScenarioPicker(ModalScreen[str | None]):
    BINDINGS = [Binding("escape", "dismiss_none", "cancel")]
    DEFAULT_CSS = """
    ScenarioPicker { align: center middle; }
    #picker { width: 40; height: auto; max-height: 18; border: round $accent; }
    """

    def compose(self) -> ComposeResult:
        ol = OptionList(*SCENARIOS, id="picker")
        ol.border_title = "run a demo scenario"
        yield ol

    def on_option_list_option_selected(self, ev: OptionList.OptionSelected) -> None:
        self.dismiss(str(ev.option.prompt))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class Dashboard(App):
    TITLE = "sbmdbg dashboard"
    CSS = """
    #header { height: 1; }
    #grid { grid-size: 2 2; grid-columns: 1fr 1fr; grid-rows: 3fr 2fr; height: 1fr; }
    .panel { border: round $primary; border-title-align: left; padding: 0 1; height: 1fr; }
    #console-box { border: round $primary; border-title-align: left; height: 1fr; }
    #console-scroll { height: 1fr; }
    #console { padding: 0 1; }
    #cmd { height: 1; border: none; padding: 0 1; }
    #msg { height: 1; }
    """
    BINDINGS = [
        Binding("space", "pause", "pause/cont"),
        Binding("p", "pause", "pause/cont", show=False),
        Binding("s", "stepi", "stepi"),
        Binding("v", "next_cpu", "vCPU"),
        Binding("t", "trace", "trace"),
        Binding("d", "demo", "demo"),
        Binding("c", "console", "console"),
        Binding("r", "refresh", "refresh", show=False),
        Binding("q", "quit", "quit"),
    ] + [Binding(str(i), f"select({i})", show=False) for i in range(10)]

    def __init__(self, backend, rate: float = 2.0):
        super().__init__()
        self.backend = backend
        self.rate = max(0.1, min(float(rate), 30.0))
        self.snap: dict = {}
        self._busy = False
        self._full_due = True
        self.frames = 0

    # ------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with Grid(id="grid"):
            with VerticalScroll(id="vcpus-box", classes="panel"):
                yield Static(id="vcpus")
            with VerticalScroll(id="sandboxes-box", classes="panel"):
                yield Static(id="sandboxes")
            with VerticalScroll(id="trace-box", classes="panel"):
                yield Static(id="trace")
            with Vertical(id="console-box"):
                with VerticalScroll(id="console-scroll"):
                    yield Static(id="console")
                yield Input(placeholder="guest command: c to type, Enter sends, Esc leaves", id="cmd")
        yield Static(id="msg")
        yield Footer()

    def on_mount(self) -> None:
        for wid, title in (("vcpus-box", "vCPUs"), ("sandboxes-box", "sandboxes"),
                           ("trace-box", "transitions"), ("console-box", "console")):
            self.query_one(f"#{wid}").border_title = title
        self.set_focus(None)
        self.set_interval(1.0 / self.rate, self.tick)
        self.tick()
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError):
                pass

    def _on_signal(self, signum, frame) -> None:
        """Terminal gone (SIGHUP) or SIGTERM: the UI loop may not get to run
        again (a dead pty), so clean up from a thread and leave."""
        def bye():
            try:
                self.backend.close()
            finally:
                os._exit(128 + signum)
        threading.Thread(target=bye, name="sbmdbg-dashboard-exit", daemon=True).start()
        try:
            self.call_later(self.exit)
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------ refresh
    def tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        full = self._full_due or not self.backend.paused
        self._full_due = False
        self.run_worker(lambda: self._refresh(full), thread=True, group="refresh")

    def _refresh(self, full: bool) -> None:
        try:
            if full:
                snap = self.backend.snapshot()
            else:
                snap = dict(self.snap)
                self.backend.poll_gdb()
                self.backend.trace.poll()
                snap.update(console=self.backend.console_tail(), trace=self.backend.trace.to_json(),
                            messages=list(self.backend.messages), running=not self.backend.paused,
                            tracing=self.backend.tracing, selected=self.backend.selected)
            self.call_from_thread(self.show, snap)
        except Exception as e:  # noqa: BLE001 - keep the UI alive, say what failed
            self.call_from_thread(self.notify, f"refresh failed: {e}", severity="error")
        finally:
            self._busy = False

    def show(self, snap: dict) -> None:
        self.snap = snap
        self.frames += 1
        self.query_one("#header", Static).update(P.header(snap))
        self.query_one("#vcpus", Static).update(P.vcpu_panel(snap))
        self.query_one("#sandboxes", Static).update(P.sandbox_panel(snap))
        th = max(3, self.query_one("#trace-box").size.height - 4)
        self.query_one("#trace", Static).update(P.trace_panel(snap, th))
        self.query_one("#console", Static).update(P.console_panel(snap, 200))
        scroll = self.query_one("#console-scroll")
        self.call_after_refresh(scroll.scroll_end, animate=False)
        self.query_one("#msg", Static).update(P.messages_text(snap))

    def refresh_soon(self) -> None:
        self._full_due = True
        self.tick()

    # ------------------------------------------------------------ controls
    def _control(self, what: str, fn, *args) -> None:
        def run():
            try:
                fn(*args)
            except SbmdbgError as e:
                self.call_from_thread(self.notify, f"{what}: {e}", severity="error")
            except Exception as e:  # noqa: BLE001
                self.call_from_thread(self.notify, f"{what} failed: {type(e).__name__}: {e}", severity="error")
            self.call_from_thread(self.refresh_soon)
        self.run_worker(run, thread=True, group="control")

    def action_pause(self) -> None:
        self._control("pause/continue", self.backend.toggle_pause)

    def action_stepi(self) -> None:
        self._control("stepi", self.backend.stepi)

    def action_trace(self) -> None:
        self._control("trace", self.backend.toggle_trace)

    def action_select(self, cpu: int) -> None:
        self.backend.select(cpu)
        self.refresh_soon()

    def action_next_cpu(self) -> None:
        n = max(1, self.backend.ncpus)
        self.backend.select((self.backend.selected + 1) % n)
        self.refresh_soon()

    def action_refresh(self) -> None:
        self.refresh_soon()

    def action_console(self) -> None:
        self.query_one("#cmd", Input).focus()

    def action_demo(self) -> None:
        def chosen(name: str | None) -> None:
            if name:
                self._control(f"scenario {name}", self.backend.run_scenario, name)
        self.push_screen(ScenarioPicker(), chosen)

    def on_input_submitted(self, ev: Input.Submitted) -> None:
        line = ev.value
        ev.input.value = ""
        if line.strip():
            self._control("console", self.backend.send_line, line)

    def on_key(self, event) -> None:
        if event.key == "escape" and isinstance(self.focused, Input):
            self.set_focus(None)
            event.stop()


def run_app(backend, rate: float) -> dict:
    """Run the dashboard; always closes the backend (guest continued, gdb
    detached, an owned VM killed).  The close report."""
    app = Dashboard(backend, rate)
    t0 = time.monotonic()
    try:
        app.run()
    finally:
        report = backend.close()
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["frames"] = app.frames
    return report
