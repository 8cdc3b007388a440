"""The one exception type every face catches and prints as a single line."""


class SbmdbgError(Exception):
    """A user-facing error: bad input, a failed build, a VM that did not boot.

    Faces (the CLI, gdb commands) print ``sbmdbg: error: <message>`` and exit
    non-zero; they never show a traceback for it.  ``detail`` carries extra
    text (a console or build-log tail) that a face may print after the line.
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail

    def __str__(self) -> str:
        msg = super().__str__()
        if self.detail:
            return f"{msg}\n{self.detail}"
        return msg
