"""The floors hold (README, "Layout"), and an upward import, even inside a function, breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT = [sys.executable, str(REPO / "scripts" / "lint_imports.py")]


def _lint(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, *args], capture_output=True, text=True, timeout=120)


def test_floors_are_kept():
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_an_upward_import_inside_a_function_breaks_them(tmp_path):
    for folder in ("tandem", "contracts", "engine", "kv_transfer", "worker", "router", "planner",
                   "prefill_workers", "decode_workers", "frontend", "launcher"):
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.txt"))
    manager = tmp_path / "engine" / "block_manager.py"
    manager.write_text(manager.read_text() + "\n\ndef _upward():\n"
                       "    from tandem.router import kv_index\n    return kv_index\n")
    result = _lint("--root", str(tmp_path))
    assert result.returncode != 0
    assert "tandem.engine.block_manager -> tandem.router.kv_index" in result.stdout
