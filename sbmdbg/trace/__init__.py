"""Live transition tracer: records SBM transitions (enter, return, abort,
IRQ/NMI in the sandbox, spurious faults) while the guest runs.

    events.py    schema, decoders, JSON-lines sink and reader
    points.py    where the breakpoints go (symbols + decoded entry_64.S labels)
    context.py   guest context read from RAM (a small stand-in for sbmdbg.sbm)
    recorder.py  Tracer: probe hits -> events (no gdb)
    export.py    Perfetto JSON, rich timeline
    live.py      out-of-process driver (pygdbmi): TraceRecorder
    qemulog.py   QEMU `-d int` log parser and cross-check
    bench.py     `sbmdbg bench trace`
"""
