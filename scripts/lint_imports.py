"""Checks the floors (pyproject.toml, [tool.importlinter]) with import-linter.

The source folders map onto one namespace (`engine/` is `tandem.engine`), which import-linter cannot
follow from an editable install, so the package is first staged in a temporary folder the way it
installs, from pyproject's `package-dir`; then `lint-imports` runs on that copy. Extra arguments go
to `lint-imports`. `--root DIR` checks another source tree with this repository's contract (the
test suite uses it to prove that an upward import fails).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def stage(root: Path, dest: Path) -> None:
    """Copy each package's .py files from its source folder to where it installs under dest."""
    with open(REPO / "pyproject.toml", "rb") as f:
        package_dir = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = dest / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for source in (root / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="source tree to check")
    args, rest = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-floors-") as tmp:
        stage(args.root.resolve(), Path(tmp))
        env = dict(os.environ, PYTHONPATH=tmp)
        command = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                   "lint_imports_command()", str(REPO / "pyproject.toml"),
                   "--no-cache", *rest]
        return subprocess.call(command, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
