"""Prefill on one engine, decode on another, with the KV blocks copied between their caches the way
kv_transfer moves them: the tokens equal a single engine's, and every path ends with blocks freed."""

from __future__ import annotations

import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.contracts.sampling_params import SamplingParams

PROMPT = list(range(10, 47))  # 37 tokens: 9 full blocks of 4 and a partial one
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def engine(role: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", role=role, block_size=4, num_kv_blocks=64))


def run(eng: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for update in eng.step():
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def expected() -> list[int]:
    eng = engine("both")
    eng.add_request("r", PROMPT, PARAMS)
    return run(eng)["r"]


def prefill(eng: LLMEngine, request_id: str, prompt=PROMPT) -> tuple[int, list[int]]:
    eng.add_request(request_id, prompt, PARAMS)
    first = run(eng)[request_id]
    assert len(first) == 1
    return first[0], eng.pinned_blocks(request_id)


def test_remote_prefill_then_local_decode_equals_one_engine(expected):
    p, d = engine("prefill"), engine("decode")
    first, remote_blocks = prefill(p, "r")
    assert first == expected[0] and len(remote_blocks) == 10
    num_cached, local_blocks = d.add_remote_request("r", PROMPT, first, PARAMS)
    assert num_cached == 0 and len(local_blocks) == 10
    d.runner.kv_cache[local_blocks] = p.runner.kv_cache[remote_blocks]
    assert p.release_pinned("r") and p.block_manager.num_used_blocks == 0
    d.complete_remote_request("r", succeeded=True)
    assert [first] + run(d)["r"] == expected
    assert d.block_manager.num_used_blocks == 0


def test_decode_pulls_only_blocks_its_prefix_cache_lacks(expected):
    p, d = engine("prefill"), engine("decode")
    d.add_request("warm", PROMPT[:20], SamplingParams(temperature=0, max_tokens=1))
    run(d)  # the decode worker now caches the first 5 blocks
    first, remote_blocks = prefill(p, "r")
    num_cached, local_blocks = d.add_remote_request("r", PROMPT, first, PARAMS)
    assert num_cached == 5 and len(local_blocks) == 5
    d.runner.kv_cache[local_blocks] = p.runner.kv_cache[remote_blocks[num_cached:]]
    d.complete_remote_request("r", succeeded=True)
    assert [first] + run(d)["r"] == expected
    assert d.stats().prefix_cache_hits == 20


def test_failed_pull_recomputes_locally(expected):
    p, d = engine("prefill"), engine("decode")
    first, _ = prefill(p, "r")
    _, local_blocks = d.add_remote_request("r", PROMPT, first, PARAMS)
    d.runner.kv_cache[local_blocks] = 7.0  # a half-finished transfer left garbage behind
    d.complete_remote_request("r", succeeded=False)
    assert [first] + run(d)["r"] == expected
    assert d.block_manager.num_used_blocks == 0


def test_abort_while_waiting_for_the_pull_frees_blocks():
    d = engine("decode")
    d.add_remote_request("r", PROMPT, 5, PARAMS)
    assert d.block_manager.num_used_blocks == 10
    d.finish_request("r")
    assert d.block_manager.num_used_blocks == 0 and not d.has_unfinished_requests()


def test_first_token_that_ends_the_request_finishes_it_at_once():
    d = engine("decode")
    d.add_remote_request("r", PROMPT, 5, SamplingParams(temperature=0, max_tokens=1))
    d.complete_remote_request("r", succeeded=True)
    assert d.block_manager.num_used_blocks == 0 and not d.has_unfinished_requests()


def test_roles_refuse_the_other_side():
    with pytest.raises(ValueError, match="decode role"):
        engine("both").add_remote_request("r", PROMPT, 5, PARAMS)
    assert engine("both").release_pinned("r") is False


def test_no_free_blocks_for_the_pull_queues_a_local_recompute(expected):
    p = engine("prefill")
    first, _ = prefill(p, "r")
    d = LLMEngine(EngineConfig(model="random:tiny", role="decode", block_size=4, num_kv_blocks=14))
    d.add_request("hog", list(range(200, 240)), SamplingParams(temperature=0, max_tokens=5))
    d.step()  # the hog holds 10 of 14 blocks until it finishes
    assert d.add_remote_request("r", PROMPT, first, PARAMS) is None
    tokens = run(d)
    assert [first] + tokens["r"] == expected
    assert d.block_manager.num_used_blocks == 0


def test_no_step_is_queued_ahead_while_a_pull_is_parked(expected):
    """A decode worker in steady decode queues each step before the last one's tokens are read;
    a request parked for its KV pull stops that, so once the pull completes it joins the very
    next step instead of waiting out one queued before it."""
    p, d = engine("prefill"), engine("decode")
    first, remote_blocks = prefill(p, "r")
    d.add_request("a", PROMPT[:9], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    ahead = [0]
    launch = d.runner.launch_ahead

    def counted(*args):
        ahead[0] += 1
        return launch(*args)

    d.runner.launch_ahead = counted
    steps = d.steps(launch_before_yield=False)
    for _ in range(3):  # a's prompt, then steady decode with a step queued ahead each time
        next(steps)
    assert ahead[0] > 0
    num_cached, local_blocks = d.add_remote_request("r", PROMPT, first, PARAMS)
    queued = ahead[0]
    assert [u.request_id for u in next(steps)] == ["a"]  # the step queued before the park
    assert ahead[0] == queued                              # none queued behind it
    d.runner.kv_cache[local_blocks] = p.runner.kv_cache[remote_blocks[num_cached:]]
    d.complete_remote_request("r", succeeded=True)
    tokens = [first]
    for updates in steps:
        tokens += [t for u in updates if u.request_id == "r" for t in u.new_token_ids]
        if len(tokens) == 2:
            assert ahead[0] > queued  # r's own step: steady again, the next one queued ahead
    assert tokens == expected
    assert d.block_manager.num_used_blocks == 0
