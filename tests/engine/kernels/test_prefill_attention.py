"""Varlen causal prefill attention kernel (chunked prefill, cached prefix) against
paged_attention_reference."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import paged_attention_reference
from tests.engine.kernels.paged_batch import make_paged_batch, relative_error

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

BF16_REL_TOL = 1e-2
HEAD_SHAPES = [(8, 8), (32, 8), (32, 4)]  # GQA ratios 1, 4, 8


def run_prefill(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
                head_dim: int, config: tuple[int, int, int, int] | None = None) -> float:
    from tandem.engine.kernels.prefill_attention import prefill_attention

    batch = make_paged_batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim)
    scale = head_dim ** -0.5
    out = torch.full_like(batch.query, float("nan"))
    prefill_attention(batch.query, batch.kv_layer, batch.meta, scale, out, config=config)
    ref = paged_attention_reference(batch.query, batch.kv_layer, batch.meta, scale)
    assert torch.isfinite(out).all(), "unwritten (NaN) output rows"
    return relative_error(out, ref)


@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_whole_prompts_of_mixed_lengths(num_heads, num_kv_heads, head_dim):
    seq_lens = [1, 17, 64, 129, 300]
    assert run_prefill(seq_lens, seq_lens, num_heads, num_kv_heads, head_dim) < BF16_REL_TOL


@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_SHAPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_chunks_after_a_cached_prefix(num_heads, num_kv_heads, head_dim):
    # query_len < seq_len: the first seq_len - query_len positions come from the cache only.
    seq_lens = [50, 300, 1000, 77, 520]
    query_lens = [10, 129, 200, 1, 8]
    assert run_prefill(seq_lens, query_lens, num_heads, num_kv_heads, head_dim) < BF16_REL_TOL


@pytest.mark.parametrize("query_lens", [[5, 40, 1], [64, 3]])
def test_short_chunks_take_small_tiles(query_lens):
    seq_lens = [q + 333 for q in query_lens]
    assert run_prefill(seq_lens, query_lens, 32, 8, 128) < BF16_REL_TOL


@pytest.mark.parametrize("config", [(64, 32, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3)])
def test_other_tile_configs(config):
    seq_lens, query_lens = [700, 190], [700, 150]
    assert run_prefill(seq_lens, query_lens, 32, 8, 128, config) < BF16_REL_TOL


def test_long_prompt_with_long_prefix():
    assert run_prefill([4096 + 2048 + 3], [2048 + 3], 32, 8, 128) < BF16_REL_TOL


def test_compile_variants_runs_each_tile_choice_on_a_cache_layer():
    # What the engine calls at start-up (ModelRunner.compile_kernel_variants), on a layer view of
    # a cache laid out as the engine's: (blocks, layers, 2, block size, KV heads, head_dim).
    from tandem.engine.kernels import prefill_attention

    cache = torch.randn(16, 2, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    before = cache.clone()
    prefill_attention.compile_variants(cache[:, 0], 32)
    assert torch.equal(cache, before)   # reads only
