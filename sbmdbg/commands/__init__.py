"""The command table shared by every face (gdb, ``sbmdbg inspect``, the
dashboard, ``sbmdbg check``): compute (kernel, args) -> JSON-able data and
render (data) -> rich renderables."""
