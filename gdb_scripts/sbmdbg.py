"""Load sbmdbg into gdb:  gdb -x gdb_scripts/sbmdbg.py vmlinux  (from any cwd).

Puts the repo root and the repo's .venv site-packages on sys.path, then
imports sbmdbg.gdbcmd, which registers the ``sbm`` commands.
"""

import glob
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SITE = sorted(glob.glob(os.path.join(_ROOT, ".venv", "lib", "python3*", "site-packages")))
for _p in reversed([_ROOT] + _SITE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

try:
    import sbmdbg.gdbcmd  # noqa: F401  (registers the `sbm` commands)
except Exception as _exc:  # one clear line, never a traceback in gdb
    print(f"sbmdbg: could not load the sbm commands ({type(_exc).__name__}: {_exc}); "
          f"run ./run setup in {_ROOT}")
