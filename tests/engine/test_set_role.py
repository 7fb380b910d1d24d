"""`LLMEngine.set_role`: a role flip swaps the scheduling policy over the same block manager, only
when idle, and keeps the weights, the KV cache tensor and the prefix cache."""

from __future__ import annotations

import pytest

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.role_schedulers import DecodeScheduler, PrefillScheduler
from tandem.engine.scheduler import Scheduler

PROMPT = list(range(10, 47))  # 37 tokens: 9 full blocks of 4 and a partial one
PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def engine(role: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", role=role, block_size=4, num_kv_blocks=64))


def run(eng: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for update in eng.step():
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
    return tokens


def test_prefill_to_decode_keeps_kv_memory_and_prefix_cache():
    eng = engine("prefill")
    kv, model = eng.kv_cache, eng.runner.model
    eng.add_request("a", PROMPT, PARAMS)
    assert len(run(eng)["a"]) == 1
    assert eng.release_pinned("a")
    eng.set_role("decode")
    assert isinstance(eng.scheduler, DecodeScheduler) and eng.config.role == "decode"
    assert eng.kv_cache is kv and eng.runner.model is model
    assert eng.block_manager.num_used_blocks == 0
    eng.add_request("b", PROMPT, PARAMS)
    assert len(run(eng)["b"]) == 6  # decodes now, instead of stopping at the first token
    stats = eng.stats()
    # 9 full blocks of "a" were cached while prefilling and are hits for "b" after the flip.
    assert stats.prefix_cache_hits == 36 and stats.prefix_cache_queries == 2 * len(PROMPT)
    assert eng.block_manager.num_used_blocks == 0


def test_decode_to_prefill_pins_again():
    eng = engine("decode")
    eng.add_request("a", PROMPT, PARAMS)
    run(eng)
    eng.set_role("prefill")
    assert isinstance(eng.scheduler, PrefillScheduler)
    eng.add_request("b", PROMPT, PARAMS)
    assert len(run(eng)["b"]) == 1
    assert len(eng.pinned_blocks("b")) == 10
    assert eng.release_pinned("b") and eng.block_manager.num_used_blocks == 0


def test_flip_refused_while_busy_then_allowed_once_idle():
    eng = engine("decode")
    eng.add_request("a", PROMPT, PARAMS)
    eng.step()
    with pytest.raises(ValueError, match="in flight"):
        eng.set_role("prefill")
    assert isinstance(eng.scheduler, DecodeScheduler)
    run(eng)
    eng.set_role("both")
    assert type(eng.scheduler) is Scheduler


def test_flip_refused_while_blocks_are_pinned():
    eng = engine("prefill")
    eng.add_request("a", PROMPT, PARAMS)
    run(eng)
    with pytest.raises(ValueError, match="1 pinned"):
        eng.set_role("decode")
    eng.release_pinned("a")
    eng.set_role("decode")
    assert isinstance(eng.scheduler, DecodeScheduler)


def test_flip_refused_while_a_pull_is_parked():
    eng = engine("decode")
    assert eng.add_remote_request("r", PROMPT, 5, PARAMS) is not None
    with pytest.raises(ValueError, match="1 unfinished"):
        eng.set_role("prefill")
    eng.complete_remote_request("r", succeeded=False)
    run(eng)
    eng.set_role("prefill")


def test_same_role_is_a_no_op_and_unknown_role_is_refused():
    eng = engine("decode")
    scheduler = eng.scheduler
    eng.set_role("decode")
    assert eng.scheduler is scheduler
    with pytest.raises(ValueError, match="role must be one of"):
        eng.set_role("aggregated")
