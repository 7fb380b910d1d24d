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


def test_every_step_of_a_request_is_logged_with_its_shape_and_times(tmp_path):
    engine = LLMEngine(EngineConfig(model="random:tiny", block_size=4, num_kv_blocks=64,
                                    max_num_batched_tokens=8))
    log = StepLog(str(tmp_path / "worker.jsonl"))

    async def main():
        serving = AsyncEngine(engine, log)
        serving.start()
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        got = [u async for u in serving.generate("r", list(range(1, 13)), params)]
        await serving.stop()
        return got

    updates = asyncio.run(main())
    assert sum(len(u.new_token_ids) for u in updates) == 4
    lines = [json.loads(line) for line in (tmp_path / "worker.jsonl").read_text().splitlines()]
    # A 12-token prompt in chunks of 8 and 4 (the second samples the first token), then three
    # decode steps whose context grows by one.
    assert [(s["prefill_tokens"], s["cached_tokens"], s["decode_seqs"], s["sampled"])
            for s in lines] == [(8, 0, 0, 0), (4, 8, 0, 1), (0, 0, 1, 1), (0, 0, 1, 1),
                                (0, 0, 1, 1)]
    assert [s["context_tokens"] for s in lines[2:]] == [13, 14, 15]
    assert [s["prefill_seqs"] for s in lines] == [1, 1, 0, 0, 0]
    for step, after in zip(lines, lines[1:] + [None]):
        assert step["began_s"] <= step["ended_s"] <= step["resumed_s"]
        if after is not None:
            assert step["resumed_s"] <= after["began_s"]


def test_a_step_of_two_prompts_logs_both(tmp_path):
    engine = LLMEngine(EngineConfig(model="random:tiny", block_size=4, num_kv_blocks=64,
                                    max_num_batched_tokens=16))
    log = StepLog(str(tmp_path / "worker.jsonl"))

    async def main():
        serving = AsyncEngine(engine, log)
        serving.start()
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

        async def one(name, prompt):
            return [u async for u in serving.generate(name, prompt, params)]
        await asyncio.gather(one("a", list(range(1, 6))), one("b", list(range(7, 13))))
        await serving.stop()

    asyncio.run(main())
    lines = [json.loads(line) for line in (tmp_path / "worker.jsonl").read_text().splitlines()]
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
