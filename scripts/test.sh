#!/usr/bin/env bash
# Sets up and runs the test suite inside a loopback-only network namespace, so no test can reach
# anything but 127.0.0.1. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if unshare -n true 2>/dev/null; then
    exec unshare -n bash -c 'ip link set lo up && exec python3 -m pytest "$@"' pytest "$@"
fi
echo "warning: cannot create a network namespace here; running tests on the host network" >&2
exec python3 -m pytest "$@"
