"""The command line that starts a tandem process running a module of the installed package.

The threat: `python -m tandem.launcher.cli` puts the current directory first on the import path,
so a `tandem/` folder (or a `grpc.py`, `torch/`, ...) in the directory `tandem serve` was started
from would be imported by every worker in place of the installed package: a broken start at best,
someone else's code running with the workers' GPUs, model and users' prompts at worst.

The measure: start workers so that nothing is prepended to the import path. Python 3.11 has `-P`
for exactly this; on 3.10 a bootstrap drops the entry before anything but the built-in `sys` is
imported. The working directory is kept, so relative paths (a model directory, a profile) still
mean what the user meant. PYTHONPATH is honoured: GPU hosts install tandem with `--target` and
point PYTHONPATH at it, so `-I` or `-E` would break them.
"""

from __future__ import annotations

import sys

# -c puts "" (the current directory) first on sys.path; `sys` is built in, so nothing is looked up
# on the path before the entry is gone.
_BOOTSTRAP = ("import sys; del sys.path[0]; import runpy; "
              "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")


def python_module_command(module: str, args: list[str],
                          version: tuple[int, int] = sys.version_info[:2]) -> list[str]:
    """`python -m module args...`, without the current directory on the import path."""
    if version >= (3, 11):
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", _BOOTSTRAP.format(module=module), *args]
