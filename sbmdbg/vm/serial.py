"""The guest's serial console: a unix-socket client that runs shell commands.

Protocol (``run``): the command is sent base64-encoded and evaluated by the
guest's interactive busybox shell between two markers::

    echo __SBMDBG_BEG""IN_<id>__; (eval "$(... | base64 -d)") </dev/null; echo __SBMDBG_E""ND_<id>_$?__

The quotes make the echoed input line differ from the markers the shell
prints, so only real output matches; ``$?`` is the command's status.  Long
The command runs in a subshell: ``exit 3`` gives status 3 and leaves the
shell alive, and ``cd``/variables do not carry over to the next run.  Long
commands are sent in chunks appended to a file in the guest (busybox's line
editor takes at most 1024 characters a line).
"""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from sbmdbg.errors import SbmdbgError
from sbmdbg.text import clean

#: Longest line sent to the guest's line editor.
MAX_LINE = 700
_BEGIN = "__SBMDBG_BEGIN_{id}__"
_END_RE = "__SBMDBG_END_{id}_([0-9]+)__"


@dataclass(frozen=True)
class RunResult:
    """What a guest command printed (``\\r\\n`` folded to ``\\n``) and its exit status."""

    output: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


def run_lines(cmd: str, marker: str) -> list[str]:
    """The lines (without newlines) that make the guest shell run *cmd*."""
    if not re.fullmatch(r"[A-Za-z0-9]+", marker):
        raise ValueError("marker must be alphanumeric")
    b64 = base64.b64encode(cmd.encode()).decode()
    begin = f'echo __SBMDBG_BEG""IN_{marker}__'
    end = f'echo __SBMDBG_E""ND_{marker}_$?__'
    if len(b64) + 120 <= MAX_LINE:
        return [f'{begin}; (eval "$(echo {b64} | base64 -d)") </dev/null; {end}']
    path = f"/tmp/.sbmdbg-{marker}"
    lines = [f": > {path}"]
    step = MAX_LINE - 40
    for i in range(0, len(b64), step):
        lines.append(f"printf %s {b64[i:i + step]} >> {path}")
    lines.append(f'{begin}; (eval "$(base64 -d {path}; rm -f {path})") </dev/null; {end}')
    return lines


def parse_run_output(text: str, marker: str) -> RunResult | None:
    """Find the command's output between the markers; None if not finished yet."""
    begin = _BEGIN.format(id=marker)
    start = text.find(begin)
    if start < 0:
        return None
    start += len(begin)
    m = re.compile(_END_RE.format(id=marker)).search(text, start)
    if m is None:
        return None
    body = text[start:m.start()].replace("\r\n", "\n").replace("\r", "")
    if body.startswith("\n"):
        body = body[1:]
    return RunResult(clean(body, multiline=True), int(m.group(1)))


class SerialConsole:
    """A connection to QEMU's serial chardev socket with a reader thread."""

    def __init__(self, path: str, connect_timeout: float = 10.0):
        self.path = path
        self._buf: list[str] = []
        self._text = ""
        self._cond = threading.Condition()
        self._closed = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(path)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise SbmdbgError(f"cannot connect to the serial console {path}: "
                                      f"{exc.strerror}") from exc
                time.sleep(0.05)
        self._thread = threading.Thread(target=self._reader, name="sbmdbg-serial", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._text += data.decode("utf-8", errors="replace")
                self._cond.notify_all()

    @property
    def connected(self) -> bool:
        return not self._closed

    def text(self) -> str:
        """Everything received on this connection so far."""
        with self._cond:
            return self._text

    def send(self, data: str) -> None:
        try:
            self._sock.sendall(data.encode())
        except OSError as exc:
            raise SbmdbgError(f"serial console {self.path} closed: {exc.strerror}") from exc

    def wait_for(self, pred, timeout: float, start: int = 0):
        """Wait until ``pred(text[start:])`` is truthy; returns it, or None on timeout/EOF."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                res = pred(self._text[start:])
                if res:
                    return res
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    return None
                self._cond.wait(min(left, 0.5))

    def run(self, cmd: str, timeout: float = 30.0) -> RunResult:
        """Run *cmd* in the guest shell and return its output and status."""
        marker = uuid.uuid4().hex[:12]
        with self._cond:
            start = len(self._text)
        for line in run_lines(cmd, marker):
            self.send(line + "\n")
        res = self.wait_for(lambda t: parse_run_output(t, marker), timeout, start)
        if res is None:
            tail = clean(self.text()[start:][-2000:], multiline=True)
            if self._closed:
                raise SbmdbgError(f"serial console closed while running {cmd!r}", detail=tail)
            self.send("\x03")  # interrupt the command, leave the shell usable
            raise SbmdbgError(f"guest command {cmd!r} did not finish in {timeout:g} s",
                              detail=tail)
        return res

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)
