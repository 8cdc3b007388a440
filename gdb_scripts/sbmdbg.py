"""Load sbmdbg into gdb:  gdb -x gdb_scripts/sbmdbg.py vmlinux  (from any cwd).

``sbmdbg gdb-script`` prints this file's path wherever sbmdbg is installed
(a git checkout, or a wheel: site-packages/sbmdbg/data/gdb/sbmdbg.py), so
``source $(sbmdbg gdb-script)`` works in any gdb.

Puts the directory that holds the ``sbmdbg`` package (the checkout, or the
site-packages it was installed into) and, in a checkout, its .venv
site-packages on sys.path, then imports sbmdbg.gdbcmd, which registers the
``sbm`` commands.  gdb embeds /usr/bin/python3: the venv must be made from it.
"""

import glob
import os
import sys


def _sbmdbg_home():
    """The nearest directory above this file that holds sbmdbg/__init__.py."""
    d = os.path.dirname(os.path.realpath(__file__))
    for _ in range(5):
        if os.path.isfile(os.path.join(d, "sbmdbg", "__init__.py")):
            return d
        d = os.path.dirname(d)
    return None


_ROOT = _sbmdbg_home()
if _ROOT is None:
    print(f"sbmdbg: could not load the sbm commands: no sbmdbg package above {__file__}")
else:
    _SITE = sorted(glob.glob(os.path.join(_ROOT, ".venv", "lib", "python3*", "site-packages")))
    for _p in reversed([_ROOT] + _SITE):
        if _p not in sys.path:
            sys.path.insert(0, _p)
    try:
        import sbmdbg.gdbcmd  # noqa: F401  (registers the `sbm` commands)
    except Exception as _exc:  # one clear line, never a traceback in gdb
        print(f"sbmdbg: could not load the sbm commands ({type(_exc).__name__}: {_exc}); "
              f"in a checkout run ./run setup in {_ROOT}; else install sbmdbg into a venv "
              f"made from /usr/bin/python3 (the Python gdb embeds)")
