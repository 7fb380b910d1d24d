"""Streaming client for an OpenAI-compatible `/v1/chat/completions` endpoint (`--backend
openai-chat`), timing every chunk as the completions client does.

Each prompt is sent as one user message, so the server applies its chat template: the prompt the
model sees is longer than the dataset's text by the template's markers, and the server's usage
(which the record keeps) counts them. The prompt must therefore be text; a token-id dataset needs
`--tokenizer` to be decoded first (cli.py). The output length is asked for with
`max_completion_tokens`, OpenAI's current name, and `ignore_eos` keeps it exact.

A chunk carries a token when its delta has content, or when it has neither a finish reason nor a
role (a token whose text the server's detokenizer holds back). The stream's opening chunk, the
role alone with empty content, is not a token: counting it would make TTFT the time to the
server's first write rather than to the first token.
"""

from __future__ import annotations

from typing import Any

from tandem.bench.openai_client import OpenAICompletionsClient, StreamError
from tandem.bench.records import BenchRequest


def chat_body(request: BenchRequest, model: str, temperature: float) -> dict[str, Any]:
    if request.prompt_text is None:
        raise ValueError("the openai-chat backend sends text prompts; this request has only "
                         "token ids (pass --tokenizer to decode them)")
    return {
        "model": model, "messages": [{"role": "user", "content": request.prompt_text}],
        "max_completion_tokens": request.output_len, "temperature": temperature,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }


def chat_chunk_token_count(chunk: dict[str, Any]) -> int:
    """1 if this chat chunk carries a token (see the module docstring), else 0."""
    if "error" in chunk:
        raise StreamError(str(chunk["error"]))
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    choice = choices[0]
    delta = choice.get("delta") or {}
    if delta.get("content"):
        return 1
    return 1 if choice.get("finish_reason") is None and delta.get("role") is None else 0


class OpenAIChatClient(OpenAICompletionsClient):
    endpoint = "/v1/chat/completions"

    def request_body(self, request: BenchRequest) -> dict[str, Any]:
        return chat_body(request, self.model or "", self._temperature)

    def chunk_token_count(self, chunk: dict[str, Any]) -> int:
        return chat_chunk_token_count(chunk)
