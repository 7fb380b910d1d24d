"""Structured output in the engine: greedy generation under a JSON schema parses and validates, on
one engine and split between a prefill and a decode engine; the mask forbids exactly what the
grammar does and leaves other rows of the batch alone; missing library and bad schemas are refused."""

from __future__ import annotations

import json
import sys

import jsonschema
import pytest
import torch

from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.structured_output import TokenMask, apply_token_mask, check_json_schema
from tandem.engine.tokenizer import load_tokenizer

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pet": {"enum": ["cat", "dog", "fish"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
JSON_PARAMS = SamplingParams(temperature=0, max_tokens=40, json_schema=json.dumps(SCHEMA))
FREE_PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPT = list(range(10, 47))


def engine(role: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model="random:tiny", role=role, block_size=4, num_kv_blocks=64))


def run(eng: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for update in eng.step():
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
    return tokens


@pytest.fixture(scope="module")
def both() -> LLMEngine:
    return engine("both")


def decode_text(token_ids: list[int]) -> str:
    return load_tokenizer(None).decode(token_ids, skip_special_tokens=True)


def test_greedy_output_parses_and_matches_the_schema_beside_a_free_row(both):
    both.add_request("alone", PROMPT, FREE_PARAMS)
    alone = run(both)["alone"]
    both.add_request("json", PROMPT, JSON_PARAMS)
    both.add_request("free", PROMPT, FREE_PARAMS)
    tokens = run(both)
    document = json.loads(decode_text(tokens["json"]))
    jsonschema.validate(document, SCHEMA)
    assert set(document) == {"name", "age", "pet"}
    assert tokens["json"][-1] == 1                      # the built-in eos closes the document
    assert tokens["free"] == alone                      # the mask touches only its own row


def test_prefill_samples_the_first_token_and_decode_continues_the_document(both):
    both.add_request("whole", PROMPT, JSON_PARAMS)
    expected = run(both)["whole"]
    p, d = engine("prefill"), engine("decode")
    p.add_request("r", PROMPT, JSON_PARAMS)
    (first,) = run(p)["r"]
    remote_blocks = p.pinned_blocks("r")
    _, local_blocks = d.add_remote_request("r", PROMPT, first, JSON_PARAMS)
    d.runner.kv_cache[local_blocks] = p.runner.kv_cache[remote_blocks]
    d.complete_remote_request("r", succeeded=True)
    tokens = [first] + run(d)["r"]
    assert tokens == expected
    jsonschema.validate(json.loads(decode_text(tokens)), SCHEMA)


def test_a_migrated_request_resumes_its_document(both):
    both.add_request("whole", PROMPT, JSON_PARAMS)
    expected = run(both)["whole"]
    streamed = expected[:5]
    resumed = SamplingParams(temperature=0, max_tokens=35, json_schema=JSON_PARAMS.json_schema,
                             num_schema_prompt_tokens=len(streamed))
    both.add_request("retry", PROMPT + streamed, resumed)
    assert streamed + run(both)["retry"] == expected


def test_mask_sets_exactly_the_forbidden_tokens_to_minus_inf():
    logits = torch.arange(3 * 40, dtype=torch.float32).reshape(3, 40)
    bitmask = torch.tensor([[0b1010, 0b1], [-1, 0]], dtype=torch.int32)  # rows 0 and 2
    masked = apply_token_mask(logits, TokenMask([0, 2], bitmask))
    allowed = [masked[r].isfinite().nonzero().flatten().tolist() for r in range(3)]
    assert allowed == [[1, 3, 32], list(range(40)), list(range(32))]
    assert torch.equal(masked[1], logits[1]) and torch.equal(masked[0, [1, 3]], logits[0, [1, 3]])


def test_bad_schemas_are_refused():
    with pytest.raises(ValueError, match="json_schema is not valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(ValueError, match="cannot be used for structured output"):
        check_json_schema('{"type": "nonsense"}')


def test_missing_library_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)   # makes `import llguidance` fail
    with pytest.raises(ValueError, match=r"needs the llguidance package.*tandem\[structured\]"):
        check_json_schema('{"type": "object"}')
