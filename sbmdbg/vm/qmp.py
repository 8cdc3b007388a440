"""The one QMP/HMP client (on qemu.qmp): what every part that talks to QEMU's
monitor uses -- the harness (``VM.qmp``/``VM.hmp``), the QMP target
(``QmpTarget.connect``), the dashboard and ``sbmdbg dump``."""
from __future__ import annotations

import threading

from sbmdbg.errors import SbmdbgError


class QmpError(SbmdbgError):
    """QEMU's monitor refused a command, or could not be reached."""


class QmpClient:
    """One QMP connection to ``path`` (qemu.qmp): ``cmd(name, **args)`` returns
    the ``return`` value (``cpu_index=`` is sent as ``cpu-index``: underscores
    in argument names become dashes); ``hmp(cmdline, cpu_index)`` runs a human
    monitor command.  ``keep_open``: keep the connection between commands
    (reopened once if it dropped); else connect for each command and leave
    the socket free.  Thread-safe."""

    def __init__(self, path: str, timeout: float = 30.0, keep_open: bool = True):
        self.path, self.timeout, self.keep_open = path, timeout, keep_open
        self._q = None
        self._lock = threading.Lock()

    def _open(self, timeout: float):
        from qemu.qmp.legacy import QEMUMonitorProtocol

        q = QEMUMonitorProtocol(self.path)
        try:
            q.connect(negotiate=True)
            q.settimeout(timeout)
        except Exception as e:  # noqa: BLE001 - qemu.qmp raises its own types
            try:
                q.close()
            except Exception:  # noqa: BLE001
                pass
            raise QmpError(f"cannot connect to QMP at {self.path}: {e}") from None
        return q

    def cmd(self, name: str, timeout: float | None = None, **args):
        arguments = {k.replace("_", "-"): v for k, v in args.items()}
        msg = {"execute": name, "arguments": arguments} if arguments else {"execute": name}
        t = self.timeout if timeout is None else timeout
        with self._lock:
            for attempt in (0, 1):
                if self._q is None:
                    self._q = self._open(t)
                else:
                    self._q.settimeout(t)
                try:
                    r = self._q.cmd_obj(msg)
                    break
                except Exception as e:  # noqa: BLE001 - the connection dropped: reopen once
                    self._drop()
                    if attempt or not self.keep_open:
                        raise QmpError(f"QMP {name}: {e}") from None
                finally:
                    if not self.keep_open:
                        self._drop()
        if "error" in r:
            raise QmpError(f"QMP {name}: {r['error'].get('desc', r['error'])}")
        return r.get("return")

    def hmp(self, cmdline: str, cpu_index: int | None = None) -> str:
        """A human monitor command (e.g. ``info registers``), on one vCPU if given."""
        if cpu_index is None:
            return self.cmd("human-monitor-command", command_line=cmdline)
        return self.cmd("human-monitor-command", command_line=cmdline, cpu_index=cpu_index)

    def _drop(self) -> None:
        if self._q is not None:
            try:
                self._q.close()
            except Exception:  # noqa: BLE001
                pass
            self._q = None

    def close(self) -> None:
        with self._lock:
            self._drop()
