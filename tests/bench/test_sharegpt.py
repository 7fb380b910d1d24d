"""The ShareGPT dataset: which turns become prompts, lengths by the tokenizer, filters, sampling."""

from __future__ import annotations

import json

import pytest

from tandem.bench.sharegpt import MIN_TOKENS, ShareGPTConfig, first_exchanges, load_sharegpt_dataset


def _words(text: str) -> list[int]:
    """A tokenizer with one token per word: lengths are easy to read off."""
    return [len(word) for word in text.split()]


def _conversation(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


ENTRIES = [
    _conversation(("human", "one two three four five"), ("gpt", "a b c d e f"),
                  ("human", "later turn is ignored here"), ("gpt", "x y z w v")),
    _conversation(("system", "be brief"), ("human", "what is a paged kv cache"),
                  ("gpt", "blocks of keys and values")),
    _conversation(("human", "too short"), ("gpt", "a b c d e")),            # prompt < 4 tokens
    _conversation(("human", "a prompt with no answer")),                     # no gpt turn
    _conversation(("gpt", "answer first"), ("human", "then a question here")),  # no reply after
    {"id": "broken"},
]


def _write(tmp_path, entries) -> str:
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_first_human_turn_and_its_gpt_reply_only():
    assert list(first_exchanges(ENTRIES)) == [
        ("one two three four five", "a b c d e f"),
        ("what is a paged kv cache", "blocks of keys and values"),
        ("too short", "a b c d e")]


def test_requests_carry_text_token_ids_and_the_reply_length(tmp_path):
    requests = load_sharegpt_dataset(ShareGPTConfig(_write(tmp_path, ENTRIES)), _words, seed=0)
    by_text = {r.prompt_text: r for r in requests}
    assert set(by_text) == {"one two three four five", "what is a paged kv cache"}
    first = by_text["one two three four five"]
    assert first.prompt_token_ids == (3, 3, 5, 4, 4) and first.output_len == 6
    assert by_text["what is a paged kv cache"].output_len == 5
    assert MIN_TOKENS == 4


def test_sampling_is_seeded_and_length_bounds_apply(tmp_path):
    entries = [_conversation(("human", " ".join(["w"] * n)), ("gpt", " ".join(["r"] * n)))
               for n in range(4, 40)]
    path = _write(tmp_path, entries)
    first = load_sharegpt_dataset(ShareGPTConfig(path, num_requests=5), _words, seed=7)
    again = load_sharegpt_dataset(ShareGPTConfig(path, num_requests=5), _words, seed=7)
    other = load_sharegpt_dataset(ShareGPTConfig(path, num_requests=5), _words, seed=8)
    assert [r.prompt_len for r in first] == [r.prompt_len for r in again]
    assert [r.prompt_len for r in first] != [r.prompt_len for r in other]
    bounded = load_sharegpt_dataset(ShareGPTConfig(path, max_prompt_len=20, max_total_len=30),
                                    _words, seed=0)
    assert sorted(r.prompt_len for r in bounded) == list(range(4, 16))  # n + n <= 30


def test_a_file_without_usable_conversations_says_so(tmp_path):
    with pytest.raises(ValueError, match="no usable conversation"):
        load_sharegpt_dataset(ShareGPTConfig(_write(tmp_path, ENTRIES[2:])), _words, seed=0)
    with pytest.raises(ValueError, match="list of conversations"):
        load_sharegpt_dataset(ShareGPTConfig(_write(tmp_path, {"a": 1})), _words, seed=0)
