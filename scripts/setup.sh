#!/usr/bin/env bash
# Installs tandem and everything it needs on a fresh machine (Python 3.10+ and pip).
# On a CPU-only machine torch comes from `pip install torch==2.13.0`, which resolves to the CPU build
# there; it is installed first so that no later package pulls in a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
# Ray (the `ray` extra) serves on a cluster and its tests run here; GPU hosts go without it.
$PIP -e ".[test,ray]"
# NIXL: the CUDA 12 build also runs on a CPU; the `nixl` meta package is added without its
# dependencies because it would otherwise ask for every CUDA variant at once.
if ! python3 -c "import nixl._api" 2>/dev/null; then
    $PIP nixl-cu12==1.5.1
    $PIP --no-deps nixl==1.5.1
fi
