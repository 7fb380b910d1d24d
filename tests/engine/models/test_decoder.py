"""The decoder layer's wiring of norms, projections and activation: with every few-row norm +
projection and SiLU-and-mul + down projection forced onto the fused kernels, a decode step gives
the hidden states it gives with all of them forced onto the unfused pairs, and the torch
references' to rounding.

The tiny checkpoints of the HF-correctness tests have no shape the skinny kernels tile, so they
never reach the fused kernels (on a CPU this wiring is what those tests run). Here the layers have
shapes that tile: qwen3-0.6b's on a GPU, smaller ones in Triton's interpreter on a CPU (fp16; in a
fresh python, as in tests/engine/kernels/test_skinny_fused.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.loader import build_model
from tandem.engine.model_config import ModelConfig
from tandem.engine.model_runner import kv_cache_shape

REPO = Path(__file__).resolve().parents[3]
BLOCK_SIZE = 16
CONTEXT = 9  # tokens each sequence holds, the newest one decoded this step
QWEN3_0_6B_LAYERS = {"hidden_size": 1024, "num_heads": 16, "num_kv_heads": 8, "head_dim": 128,
                     "intermediate_size": 3072}
SMALL_LAYERS = {"hidden_size": 256, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64,
                "intermediate_size": 512}


def _model(layers: dict, device: str, dtype: torch.dtype):
    config = ModelConfig(architecture="Qwen3ForCausalLM", num_layers=2, vocab_size=512,
                         max_position_embeddings=256, qk_norm=True, **layers)
    model = build_model(config, torch.device(device), dtype, None, 256, seed=0)
    with torch.no_grad():  # norm weights off one, so a wrong norm's weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
    return model


def _decode_step(config: ModelConfig, batch: int, device: str, dtype: torch.dtype):
    """(input ids, positions, metadata, KV cache) of one decode step, one block per sequence."""
    meta = AttentionMetadata(
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch,), CONTEXT, dtype=torch.int32, device=device),
        block_tables=torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1),
        slot_mapping=torch.arange(batch, device=device) * BLOCK_SIZE + CONTEXT - 1,
        max_query_len=1, max_seq_len=CONTEXT, query_start_loc_cpu=list(range(batch + 1)),
        seq_lens_cpu=[CONTEXT] * batch, num_splits=1)
    kv_cache = torch.randn(kv_cache_shape(config, batch, BLOCK_SIZE), dtype=dtype, device=device)
    input_ids = torch.randint(0, config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), CONTEXT - 1, device=device)
    return input_ids, positions, meta, kv_cache


def _forward(model, step, fused: bool) -> torch.Tensor:
    """The step's hidden states with every fusable call forced fused (the first config that
    fits) or unfused."""
    from tandem.engine.kernels import skinny_fused

    def forced(num_rows, weight, unfused, fused_call):
        configs = [c for c in skinny_fused.CONFIGS if skinny_fused.fits(num_rows, weight, c)]
        return configs[0] if fused and configs else None

    chosen: dict = {}
    saved = skinny_fused._chosen, skinny_fused._choose
    skinny_fused._chosen, skinny_fused._choose = chosen, forced
    input_ids, positions, meta, kv_cache = step
    try:
        with torch.inference_mode():
            hidden = model(input_ids, positions, meta, kv_cache.clone())
    finally:
        skinny_fused._chosen, skinny_fused._choose = saved
    # qkv and gate_up after the norms of layers past the first, down after the activation
    assert {key[0] for key in chosen} == {"rms_norm", "silu"}
    assert all((config is not None) == fused for config in chosen.values())
    return hidden


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def check_interpreted(batch: int) -> None:
    """The model on CPU tensors through the Triton kernels (run by the interpreter), the matmuls'
    choices fixed since nothing can be timed."""
    import tandem.engine.kernels as kernels
    from tandem.engine.kernels import skinny_gemm

    model = _model(SMALL_LAYERS, "cpu", torch.float16)
    step = _decode_step(model.config, batch, "cpu", torch.float16)
    with torch.inference_mode():
        reference = model(*step[:3], step[3].clone())
    kernels.is_triton_usable = lambda tensor: True
    torch.cuda.is_current_stream_capturing = lambda: False
    skinny_gemm.choose = lambda x, weight, bias: next(
        c for c in skinny_gemm.CONFIGS if skinny_gemm.fits(x.shape[0], weight, c))
    fused, unfused = _forward(model, step, fused=True), _forward(model, step, fused=False)
    assert _relative_error(fused, unfused) < 1e-3
    assert _relative_error(fused, reference) < 1e-2


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_kernels_give_the_unfused_hidden_states_interpreted(batch):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    code = ("from tests.engine.models.test_decoder import check_interpreted; "
            f"check_interpreted({batch})")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 5, 32])
def test_fused_kernels_give_the_unfused_hidden_states(batch):
    model = _model(QWEN3_0_6B_LAYERS, "cuda", torch.bfloat16)
    step = _decode_step(model.config, batch, "cuda", torch.bfloat16)
    fused, unfused = _forward(model, step, fused=True), _forward(model, step, fused=False)
    assert _relative_error(fused, unfused) < 1e-2
