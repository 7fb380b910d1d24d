"""Steps run as captured pieces around eager attention (engine/step_graphs.py) compute what the eager
model computes, write no KV slot but their own, and give the eager engine's tokens."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.engine.step_buckets import bucket_sizes, padded_tokens
from tandem.engine.step_inputs import HostInputs


def test_buckets_cover_every_step_with_bounded_padding():
    sizes = bucket_sizes(2048)
    assert sizes[0] == 16 and sizes[-1] == 2048 and list(sizes) == sorted(set(sizes))
    for small, large in zip(sizes, sizes[1:]):
        assert large - small <= 32 if large <= 256 else large <= 1.125 * small + 1
    assert bucket_sizes(100)[-1] == 100 and max(bucket_sizes(100)) == 100
    assert bucket_sizes(16) == (16,)


def test_a_step_runs_as_its_bucket_or_eagerly_past_the_largest():
    assert [padded_tokens(n, 2048) for n in (1, 16, 17, 100, 257, 2047, 2048)] == \
        [16, 16, 32, 128, 288, 2048, 2048]
    assert padded_tokens(2056, 8192) == 2304  # a 2048-token chunk beside 8 decodes
    assert padded_tokens(2056, 2048) == 2056  # past the budget's largest bucket: eager
    assert padded_tokens(2080, 2080) == 2080  # the budget itself is always a bucket


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.checkpoints import make_checkpoint
    return str(make_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")))


def mixed_step(block_size: int) -> HostInputs:
    """Two decoding sequences (contexts 40 and 70) and a 37-token chunk after 20 cached tokens."""
    rows = [(40, 1, [0, 1, 2]), (70, 1, [3, 4, 5, 6, 7]), (57, 37, [8, 9, 10, 11])]
    host = HostInputs([], [], [], [0], [], [], [0, 1, 2], max(q for _, q, _ in rows))
    for seq_len, query_len, table in rows:
        for p in range(seq_len - query_len, seq_len):
            host.input_ids.append((7 * p + seq_len) % 100)
            host.positions.append(p)
            host.slots.append(table[p // block_size] * block_size + p % block_size)
        host.query_start_loc.append(host.query_start_loc[-1] + query_len)
        host.seq_lens.append(seq_len)
        host.block_tables.append(table)
    return host


@needs_gpu
@pytest.mark.gpu
def test_pieces_equal_the_eager_model_and_write_only_their_slots(model_dir):
    llm = LLM(model=model_dir, device="cuda", dtype="float32", block_size=16, num_kv_blocks=64)
    runner = llm.engine.runner
    assert runner.step_graphs is not None
    with torch.inference_mode():
        runner.kv_cache.normal_()  # a stray write would show against random contents
        inputs = runner.to_device(mixed_step(16))
        eager = runner.model(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache)
        written = runner.kv_cache.clone()
        pieces = runner.step_graphs.run(inputs).clone()
    assert pieces.shape == eager.shape == (39, llm.engine.model_config.hidden_size)
    torch.testing.assert_close(pieces, eager, rtol=1e-4, atol=1e-4)
    # The step ran in a 48-token bucket: its 9 padding rows stored nothing.
    torch.testing.assert_close(runner.kv_cache, written, rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.gpu
def test_admissions_beside_decodes_give_the_eager_tokens(model_dir):
    """Requests that arrive while others decode join them in mixed steps: through the pieces, the
    tokens are the eager engine's."""
    def run(enforce_eager: bool) -> dict[str, list[int]]:
        llm = LLM(model=model_dir, device="cuda", dtype="float32", block_size=16,
                  num_kv_blocks=64, max_num_batched_tokens=64, enforce_eager=enforce_eager)
        engine = llm.engine
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = {f"r{i}": [(13 * i + 5 * j) % 90 + 3 for j in range(9 + 31 * i)]
                   for i in range(4)}
        out: dict[str, list[int]] = {request_id: [] for request_id in prompts}
        for request_id, prompt in prompts.items():  # one new request every other step
            engine.add_request(request_id, prompt, params)
            for _ in range(2):
                for update in engine.step():
                    out[update.request_id].extend(update.new_token_ids)
        while engine.has_unfinished_requests():
            for update in engine.step():
                out[update.request_id].extend(update.new_token_ids)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        return out

    torch.backends.cuda.matmul.allow_tf32 = False
    graphs = run(enforce_eager=False)
    assert all(len(tokens) == 12 for tokens in graphs.values())
    assert graphs == run(enforce_eager=True)
