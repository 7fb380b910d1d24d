"""Synthetic workloads: each builds the full list of `BenchRequest`s before anything is sent.

- `random`: independent prompts of random token ids; input and output lengths drawn uniformly from
  `[len * (1 - range_ratio), len * (1 + range_ratio)]`.
- `shared-prefix`: `num_groups` groups whose prompts start with the group's own system prompt and
  end with a private question, shuffled so groups interleave (what a prefix-aware router sees from
  many tenants at once).
- `multi-turn`: conversations whose turn k prompt is turn k-1's prompt, a fixed synthetic assistant
  reply of `output_len` tokens, and a new user message; turns of a conversation form a session and
  are sent one after the other. Requests are ordered round-robin by turn, so conversations overlap.

Token ids are drawn from `[FIRST_ORDINARY_TOKEN_ID, vocab_size)` because the low ids of tandem's
built-in tokenizer are special tokens (bos, eos, pad, chat markers) that would change what a model
does with the prompt. Every generator is seeded and takes no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter

import numpy as np

from tandem.bench.records import BenchRequest

# Ids below this are special tokens on the built-in tokenizer; 16 leaves margin for more of them.
FIRST_ORDINARY_TOKEN_ID = 16


@dataclass(frozen=True)
class RandomDatasetConfig:
    num_requests: int = 100
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.0
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        _check_positive(num_requests=self.num_requests, input_len=self.input_len,
                        output_len=self.output_len)
        if not 0.0 <= self.range_ratio < 1.0:
            raise ValueError(f"--range-ratio must be in [0, 1), got {self.range_ratio}")
        _check_vocab(self.vocab_size)


@dataclass(frozen=True)
class SharedPrefixConfig:
    num_groups: int = 8
    prompts_per_group: int = 16
    system_prompt_len: int = 1024
    question_len: int = 128
    output_len: int = 128
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        _check_positive(num_groups=self.num_groups, prompts_per_group=self.prompts_per_group,
                        system_prompt_len=self.system_prompt_len,
                        question_len=self.question_len, output_len=self.output_len)
        _check_vocab(self.vocab_size)


@dataclass(frozen=True)
class MultiTurnConfig:
    num_conversations: int = 16
    turns: int = 4
    user_len: int = 128
    output_len: int = 128
    vocab_size: int = 2000

    def __post_init__(self) -> None:
        _check_positive(num_conversations=self.num_conversations, turns=self.turns,
                        user_len=self.user_len, output_len=self.output_len)
        _check_vocab(self.vocab_size)


def random_dataset(config: RandomDatasetConfig, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng([seed, 0])
    input_lens = _uniform_lengths(rng, config.input_len, config.range_ratio, config.num_requests)
    output_lens = _uniform_lengths(rng, config.output_len, config.range_ratio, config.num_requests)
    return [BenchRequest(prompt_token_ids=random_token_ids(rng, int(n_in), config.vocab_size),
                         output_len=int(n_out))
            for n_in, n_out in zip(input_lens, output_lens)]


def shared_prefix_dataset(config: SharedPrefixConfig, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng([seed, 1])
    requests = []
    for _ in range(config.num_groups):
        system = random_token_ids(rng, config.system_prompt_len, config.vocab_size)
        for _ in range(config.prompts_per_group):
            question = random_token_ids(rng, config.question_len, config.vocab_size)
            requests.append(BenchRequest(prompt_token_ids=system + question,
                                         output_len=config.output_len))
    order = rng.permutation(len(requests))
    return [requests[i] for i in order]


def multi_turn_dataset(config: MultiTurnConfig, seed: int) -> list[BenchRequest]:
    rng = np.random.default_rng([seed, 2])
    by_turn: list[list[BenchRequest]] = [[] for _ in range(config.turns)]
    for conversation in range(config.num_conversations):
        prompt: tuple[int, ...] = ()
        for turn in range(config.turns):
            if turn > 0:
                reply = random_token_ids(rng, config.output_len, config.vocab_size)
                prompt = prompt + reply
            prompt = prompt + random_token_ids(rng, config.user_len, config.vocab_size)
            by_turn[turn].append(BenchRequest(prompt_token_ids=prompt,
                                              output_len=config.output_len,
                                              session_id=conversation, turn_index=turn))
    return [request for turn_requests in by_turn for request in turn_requests]


def random_token_ids(rng: np.random.Generator, length: int, vocab_size: int) -> tuple[int, ...]:
    ids = rng.integers(FIRST_ORDINARY_TOKEN_ID, vocab_size, size=length).tolist()
    if length < 2:
        return tuple(ids)
    # The ids as the vocabulary's own int objects, picked in C: a trace draws a hundred million,
    # and one int object each took gigabytes and made every later pass over prompts miss cache.
    return itemgetter(*ids)(_vocabulary(vocab_size))


@lru_cache(maxsize=8)
def _vocabulary(vocab_size: int) -> tuple[int, ...]:
    return tuple(range(vocab_size))


def _uniform_lengths(rng: np.random.Generator, mean_len: int, range_ratio: float,
                     count: int) -> np.ndarray:
    low = max(1, int(mean_len * (1.0 - range_ratio)))
    high = max(low, int(mean_len * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=count)


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_vocab(vocab_size: int) -> None:
    if vocab_size <= FIRST_ORDINARY_TOKEN_ID:
        raise ValueError(f"--vocab-size must exceed {FIRST_ORDINARY_TOKEN_ID} "
                         f"(lower ids are special tokens), got {vocab_size}")
