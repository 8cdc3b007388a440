"""``sbmdbg bench pt|status|trace``: the benchmarks (each boots a VM)."""
