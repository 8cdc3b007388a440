"""The offline face: ``sbmdbg dump`` (QMP dump-guest-memory) and ``sbmdbg
inspect`` (the command table on a vmcore)."""
