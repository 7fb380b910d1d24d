"""The committed gRPC stubs are what scripts/gen_protos.sh makes from proto/ today."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True,
                   cwd=ROOT)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "gen_protos.sh produced nothing"
    stale = [str(p) for p in generated
             if not (ROOT / p).is_file() or (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"stale stubs, run scripts/gen_protos.sh: {stale}"
