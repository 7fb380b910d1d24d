#!/usr/bin/env bash
# Regenerates the Python gRPC stubs under tandem/api/ from proto/. Run after editing a .proto file;
# tests/test_protos.py fails while the committed stubs are stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python3 -m grpc_tools.protoc -Iproto --python_out="$out" --grpc_python_out="$out" \
    --pyi_out="$out" $(find proto -name "*.proto" | sort)
