"""Packaging: every package folder is in pyproject.toml, and a built wheel holds all the code."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_PACKAGES = {"tests", "benchmarks", "build", "dist"}


def source_packages() -> dict[str, str]:
    """Import name -> folder, for every folder with an __init__.py (tandem/ maps to tandem)."""
    found = {}
    for init in ROOT.rglob("__init__.py"):
        folder = init.parent.relative_to(ROOT)
        if folder.parts[0] in NOT_PACKAGES or folder.parts[0].startswith("."):
            continue
        parts = folder.parts[1:] if folder.parts[0] == "tandem" else folder.parts
        found[".".join(("tandem", *parts))] = folder.as_posix()
    return found


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed_with_its_directory():
    config = pyproject()
    expected = source_packages()
    assert sorted(config["packages"]) == sorted(expected)
    assert config["package-dir"] == expected


@pytest.mark.slow
def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("tandem-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for package, folder in source_packages().items():
        for source in (ROOT / folder).glob("*.py"):
            assert f"{package.replace('.', '/')}/{source.name}" in names
    assert "tandem/data/tokenizer.json" in names
