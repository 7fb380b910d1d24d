"""The planner core imports on a host without torch or grpc (its adapter is what needs them)."""

from __future__ import annotations

import subprocess
import sys

CORE_MODULES = ("policy", "sizing", "observation", "config", "predictors", "metrics_names",
                "scaling_actions", "worker_tracking", "interval_stats", "profile_catalog")


def test_core_imports_without_torch_or_grpc():
    imports = "; ".join(f"import tandem.planner.{name}" for name in CORE_MODULES)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['grpc'] = None; "
            f"{imports}; "
            "assert 'statsmodels' not in sys.modules, 'statsmodels must load only when chosen'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
