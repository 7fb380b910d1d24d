"""The serving step log (engine/step_log.py): each step's shape in the model's terms and its
times, from a real engine driven by the serving loop."""

from __future__ import annotations

import asyncio
import json

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.async_engine import AsyncEngine
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.step_log import StepLog


def serve(tmp_path, step_budget: int, prompts: list[list[int]], max_tokens: int
          ) -> tuple[list[list], list[dict]]:
    """The prompts served at once by a real engine under the serving loop, with a step log:
    (each request's updates, the log's lines)."""
    engine = LLMEngine(EngineConfig(model="random:tiny", block_size=4, num_kv_blocks=64,
                                    max_num_batched_tokens=step_budget))
    log = StepLog(str(tmp_path / "worker.jsonl"))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    async def main():
        serving = AsyncEngine(engine, log)
        serving.start()

        async def one(name, prompt):
            return [u async for u in serving.generate(name, prompt, params)]
        got = await asyncio.gather(*(one(f"r{i}", p) for i, p in enumerate(prompts)))
        await serving.stop()
        return got

    updates = asyncio.run(main())
    lines = [json.loads(line) for line in (tmp_path / "worker.jsonl").read_text().splitlines()]
    return updates, lines


def test_every_step_of_a_request_is_logged_with_its_shape_and_times(tmp_path):
    (updates,), lines = serve(tmp_path, 8, [list(range(1, 13))], 4)
    assert sum(len(u.new_token_ids) for u in updates) == 4
    # A 12-token prompt in chunks of 8 and 4 (the second samples the first token), then three
    # decode steps whose context grows by one.
    assert [(s["prefill_tokens"], s["cached_tokens"], s["decode_seqs"], s["sampled"])
            for s in lines] == [(8, 0, 0, 0), (4, 8, 0, 1), (0, 0, 1, 1), (0, 0, 1, 1),
                                (0, 0, 1, 1)]
    assert [s["context_tokens"] for s in lines[2:]] == [13, 14, 15]
    assert [s["prefill_seqs"] for s in lines] == [1, 1, 0, 0, 0]
    # Host time to schedule and queue each step; a prompt chunk is queued within its own thread
    # call (no step decoded before it), so it is part of that call's time.
    assert all(s["host_s"] > 0 for s in lines)
    assert all(s["host_s"] <= s["ended_s"] - s["began_s"] for s in lines[:2])
    for step, after in zip(lines, lines[1:] + [None]):
        assert step["began_s"] <= step["ended_s"] <= step["resumed_s"]
        if after is not None:
            assert step["resumed_s"] <= after["began_s"]


def test_a_step_of_two_prompts_logs_both(tmp_path):
    _, lines = serve(tmp_path, 16, [list(range(1, 6)), list(range(7, 13))], 2)
    first = lines[0]
    assert (first["prefill_tokens"], first["prefill_seqs"], first["decode_seqs"]) == (11, 2, 0)
    # One decode step: the second token is both requests' last, so none is queued after it.
    assert [(s["prefill_seqs"], s["decode_seqs"]) for s in lines[1:]] == [(0, 2)]


def test_the_log_is_off_unless_its_directory_is_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TANDEM_STEP_LOG_DIR", raising=False)
    assert StepLog.from_env("decode-0") is None
    monkeypatch.setenv("TANDEM_STEP_LOG_DIR", str(tmp_path / "steps"))
    log = StepLog.from_env("decode/0")
    assert log is not None and log.path == str(tmp_path / "steps" / "decode_0.jsonl")
    log.close()
