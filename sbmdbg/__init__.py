"""sbmdbg: a debugger (gdb + QEMU) for Linux SandBox Mode (SBM) kernels."""

__version__ = "0.1.0"
