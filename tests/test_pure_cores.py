"""The pure cores import with neither torch nor grpc installed: a simulator and the planner drive
them on any machine."""

from __future__ import annotations

import subprocess
import sys

PURE_CORES = [
    "tandem.engine.scheduler", "tandem.engine.block_manager", "tandem.engine.sequence",
    "tandem.engine.stop_rule", "tandem.router.kv_index", "tandem.router.kv_policy",
    "tandem.router.routing", "tandem.router.worker_registry", "tandem.contracts.sampling_params",
    "tandem.contracts.block_hash", "tandem.contracts.kv_events", "tandem.router.migration",
    "tandem.launcher.supervisor",
]

BLOCKED = ("torch", "grpc", "google.protobuf", "triton")


def test_pure_cores_import_without_torch_or_grpc():
    code = ("import sys\n"
            f"for name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
            f"import importlib\nfor module in {PURE_CORES!r}:\n"
            "    importlib.import_module(module)\n"
            f"leaked = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} "
            "and sys.modules[m] is not None]\n"
            "assert not leaked, leaked\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
