"""benchmarks/step_model_bench.py on the CPU: the tiny model's steps, measured and priced."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_prints_a_measured_and_a_priced_time_for_every_step():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/step_model_bench.py"),
         "--profile", str(ROOT / "planner/profiles/random-tiny-cpu.json"), "--model",
         "random:tiny", "--chunk", "64", "--cached", "0,128", "--decodes", "2", "--context", "64",
         "--repeats", "1"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = re.findall(r"^\| (prefill|mixed) \| (\d+) \| .* \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                      out, re.M)
    assert [(kind, cached) for kind, cached, *_ in rows] == [
        ("prefill", "0"), ("prefill", "128"), ("mixed", "0"), ("mixed", "128")]
    for *_, measured, priced, ratio in rows:
        assert float(measured) > 0 and float(priced) > 0
        assert abs(float(ratio) - float(priced) / float(measured)) < 0.01
