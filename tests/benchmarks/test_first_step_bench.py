"""benchmarks/first_step_bench.py on the CPU: every shape of the sweep runs twice and is listed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_lists_each_shape_with_its_first_and_second_run():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/first_step_bench.py"), "--model", "random:tiny",
         "--chunks", "5", "--cached", "0,16", "--decodes", "0,2", "--contexts", "64,100",
         "--max-model-len", "256"], capture_output=True, text=True, timeout=300,
        check=True).stdout
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) x (\d+) \| ([\d.]+) \| ([\d.]+) \|", out, re.M)
    # the chunk alone once (decodes 0), beside 2 decodes at each context: 2 + 2 x 2 shapes
    assert len(rows) == 6
    assert {(r[2], r[3]) for r in rows} == {("0", "0"), ("2", "64"), ("2", "100")}
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    assert re.search(r"^\d+ shapes stalled on their first run$", out, re.M)
