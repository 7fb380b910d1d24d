"""router/migration.py: when a failed request migrates, and what the retry asks for."""

from __future__ import annotations

import pytest

from tandem.contracts.sampling_params import SamplingParams
from tandem.router.migration import (MigrationConfig, WorkerFailure, attempt_request_id,
                                     continuation, decide_migration)

CONFIG = MigrationConfig(max_migrations=2)


def test_a_dead_decode_worker_migrates_while_another_is_left():
    failure = WorkerFailure("decode", "decode-0", "UNAVAILABLE", "Socket closed")
    assert failure.is_worker_gone and failure.is_worker_fault
    assert decide_migration(failure, 0, 1, CONFIG).migrate
    verdict = decide_migration(failure, 0, 0, CONFIG)
    assert not verdict.migrate
    assert verdict.message == ("no decode worker is left to serve the request: decode worker "
                               "decode-0 failed (UNAVAILABLE: Socket closed)")


def test_migrations_are_bounded_per_request():
    failure = WorkerFailure("prefill", "prefill-1", "DEADLINE_EXCEEDED")
    assert not failure.is_worker_gone  # slow is not gone: heartbeats decide
    assert decide_migration(failure, 1, 3, CONFIG).migrate
    verdict = decide_migration(failure, 2, 3, CONFIG)
    assert not verdict.migrate
    assert verdict.message == ("the request failed on 3 workers in a row; last: prefill worker "
                               "prefill-1 failed (DEADLINE_EXCEEDED)")


def test_a_request_the_worker_rejects_does_not_migrate():
    failure = WorkerFailure("decode", "decode-0", "INVALID_ARGUMENT", "bad token id")
    verdict = decide_migration(failure, 0, 4, CONFIG)
    assert not verdict.migrate and verdict.message.endswith("(INVALID_ARGUMENT: bad token id)")


def test_continuation_puts_streamed_tokens_in_the_prompt_and_keeps_sampling():
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=["x"], stop_token_ids=[5],
                            ignore_eos=True, seed=3)
    prompt, retry = continuation([1, 2, 3], [7, 8, 9, 4], params)
    assert prompt == [1, 2, 3, 7, 8, 9, 4]
    assert retry.max_tokens == 6 and retry.temperature == 0.0 and retry.stop == ["x"]
    assert retry.stop_token_ids == [5] and retry.ignore_eos and retry.seed == 3
    assert params.max_tokens == 10  # the original is untouched
    assert retry.num_schema_prompt_tokens == 0
    _, structured = continuation([1, 2, 3], [7, 8], SamplingParams(json_schema='{"type": "object"}'))
    _, again = continuation([1, 2, 3, 7, 8], [9], structured)
    assert (structured.num_schema_prompt_tokens, again.num_schema_prompt_tokens) == (2, 3)
    _, unbounded = continuation([1], [2], SamplingParams(max_tokens=None))
    assert unbounded.max_tokens is None
    with pytest.raises(ValueError, match="all 2 tokens were streamed"):
        continuation([1], [2, 3], SamplingParams(max_tokens=2))


def test_each_attempt_has_its_own_worker_request_id():
    assert attempt_request_id("cmpl-1", 0) == "cmpl-1"
    assert attempt_request_id("cmpl-1", 2) == "cmpl-1~m2"
