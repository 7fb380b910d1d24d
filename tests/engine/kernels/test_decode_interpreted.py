"""The decode attention's Triton kernels run by Triton's interpreter on the CPU, against
paged_attention_reference: the piece table, the split kernel and the merge, so a machine without a
GPU still checks how a batch's tokens are dealt out. A subprocess, because the interpreter is chosen
when Triton is first imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]

SCRIPT = r"""
import json, sys
import torch
from tandem.engine.attention import paged_attention_reference
from tandem.engine.kernels import decode_attention
from tests.engine.kernels.paged_batch import make_paged_batch, relative_error

decode_attention._device_sms = lambda device: 4   # a CPU has no SMs: a GPU of four
results = []
for seq_lens, splits in json.loads(sys.argv[1]):
    batch = make_paged_batch(seq_lens, [1] * len(seq_lens), 4, 2, 16, device="cpu",
                             dtype=torch.float32)
    out = torch.full_like(batch.query, float("nan"))
    decode_attention.decode_attention(batch.query, batch.kv_layer, batch.meta.block_tables,
                                      batch.meta.seq_lens, 0.25, out, batch.meta.max_seq_len,
                                      num_splits=splits)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, 0.25)
    table = None
    if splits > 1 and len(seq_lens) > 1:
        pieces = decode_attention.step_pieces(batch.meta.seq_lens, 2, splits)
        table = [pieces.slot_seq.tolist(), pieces.first_slot.tolist(), int(pieces.quantum)]
    results.append([relative_error(out, ref), bool(torch.isfinite(out).all()), table])
print(json.dumps(results))
"""


def _run(cases: list) -> list:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="a GPU runs the compiled kernels (test_decode_attention.py)")
def test_pieces_split_and_merge_match_the_reference_in_the_interpreter():
    # Four "SMs" and 2 KV heads: each program's share is about 1011 * 2 / 16 tokens, so the
    # 900-token context takes 5 pieces of 192 tokens though the launch has 2 slots a sequence;
    # a batch of one places its pieces without a table; one split reads each sequence whole.
    # Pieces of 512 tokens (8 tiles) for [2100, 1030, 570]: a remainder of up to one tile joins
    # the sequence's last piece (2100 = 3 x 512 + 564, 570 = one piece).
    cases = [([900, 40, 70, 1], 2), ([700], 5), ([300, 20], 1), ([2100, 1030, 570], 4)]
    results = _run(cases)
    for (err, finite, _), case in zip(results, cases):
        assert finite and err < 1e-5, (case, err)
    slot_seq, first_slot, quantum = results[0][2]
    assert quantum == 192
    assert slot_seq == [0, 0, 0, 0, 0, 1, 2, 3]
    assert first_slot == [0, 5, 6, 7]
    assert results[3][2] == [[0, 0, 0, 0, 1, 1, 2] + [-1] * 5, [0, 4, 6], 512]
