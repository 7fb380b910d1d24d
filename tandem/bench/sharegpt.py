"""Real-text workloads from a local ShareGPT-format JSON file (`--dataset sharegpt:PATH`), the
format `vllm bench serve --dataset-name sharegpt` takes, so runs with a real tokenizer are
comparable with vLLM's.

The file is a list of conversations, each `{"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}`. Each conversation gives one request: its first human turn
is the prompt (sent as text, so the server tokenizes it), and the length in tokens of the gpt turn
that answers it is the output length. Lengths are counted with the tokenizer the caller passes
(the served model's), so input and output token counts mean what they would on that model.

As vLLM does, pairs whose prompt or reply is under `MIN_TOKENS` tokens are skipped (too short to
time), and so are those longer than `max_prompt_len` or `max_total_len`; the rest are shuffled
with the seed and the first `num_requests` are kept. Reading the file is the only I/O.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tandem.bench.records import BenchRequest

MIN_TOKENS = 4  # vLLM's bound: a shorter prompt or reply says little about latency


@dataclass(frozen=True)
class ShareGPTConfig:
    path: str
    num_requests: int | None = None   # None: every usable conversation
    max_prompt_len: int = 1024        # vLLM's defaults for ShareGPT
    max_total_len: int = 2048

    def __post_init__(self) -> None:
        if self.num_requests is not None and self.num_requests <= 0:
            raise ValueError(f"--num-requests must be positive, got {self.num_requests}")


def load_sharegpt_dataset(config: ShareGPTConfig, encode: Callable[[str], list[int]],
                          seed: int) -> list[BenchRequest]:
    """Requests from the file; `encode` turns text into the served model's token ids."""
    with open(config.path, encoding="utf-8") as file:
        try:
            entries = json.load(file)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config.path} is not JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{config.path}: expected a list of conversations (ShareGPT format)")
    pairs = list(first_exchanges(entries))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        if config.num_requests is not None and len(requests) == config.num_requests:
            break
        request = _request(prompt, reply, encode, config)
        if request is not None:
            requests.append(request)
    if not requests:
        raise ValueError(f"{config.path} has no usable conversation (a human turn answered by a "
                         f"gpt turn, each at least {MIN_TOKENS} tokens)")
    return requests


def first_exchanges(entries: list[Any]) -> Iterator[tuple[str, str]]:
    """(first human turn, the gpt turn right after it) of each conversation that has both."""
    for entry in entries:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        for turn, answer in zip(turns, turns[1:]):
            if _speaker(turn) == "human":
                if _speaker(answer) == "gpt":
                    yield str(turn["value"]), str(answer["value"])
                break


def _speaker(turn: Any) -> str | None:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        return None
    return turn.get("from")


def _request(prompt: str, reply: str, encode: Callable[[str], list[int]],
             config: ShareGPTConfig) -> BenchRequest | None:
    prompt_ids = encode(prompt)
    output_len = len(encode(reply))
    if len(prompt_ids) < MIN_TOKENS or output_len < MIN_TOKENS:
        return None
    if len(prompt_ids) > config.max_prompt_len or len(prompt_ids) + output_len > config.max_total_len:
        return None
    return BenchRequest(prompt_token_ids=tuple(prompt_ids), output_len=output_len,
                        prompt_text=prompt)
