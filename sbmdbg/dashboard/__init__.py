"""``sbmdbg dashboard``: a live view of an SBM guest (Textual), out of process.

    backend.py   connections (QMP registers, shm RAM, gdb for the controls),
                 one snapshot of every panel, pause/continue/stepi/trace/console
    panels.py    rich renderables of a snapshot (guest strings as Text only)
    app.py       the Textual app (keys, refresh loop in worker threads)
    cli.py       the subcommand, ``--once``/``--svg``/``--json-timing``
"""
