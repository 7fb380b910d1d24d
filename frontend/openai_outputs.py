"""From the pipeline's `GenerateChunk`s to OpenAI response bodies, streamed or whole.

One formatter per choice (openai_choices puts the choices of one request together). `add(chunk)` folds a chunk into the running totals (text, completion
tokens, cached prompt tokens, finish reason, logprobs) and returns the choice that chunk contributes
to a stream; `stream_body(choice)` wraps it as one SSE payload; `response()` is the whole body of a
non-streamed request and `usage_chunk()` the last payload of a stream that asked for usage.

`stream_event(chunk)` does what `add` and `stream_body` do and returns the SSE event's bytes. Most
streamed chunks carry text alone (no logprobs, tool calls, echo or finish reason); their event
comes from a template of the choice's body (openai_sse.TextEventTemplate), the same bytes without
building a pydantic model, dumping it and encoding a dict per token.

Logprob conventions, as OpenAI documents them:
- completions (`logprobs: n`): `top_logprobs[i]` maps token text to logprob for the n most likely
  tokens, plus the sampled token when it is not among them (so up to n + 1 entries); `text_offset[i]`
  is where token i starts in the returned text.
- chat (`logprobs: true, top_logprobs: n`): each token has exactly the n most likely alternatives;
  `bytes` are the UTF-8 bytes of the token's text (a token that is part of a multi-byte character
  decodes to U+FFFD on its own, and its bytes are those of U+FFFD).
Logprobs of -inf (tokens a top-k or top-p cut removed) are sent as -9999.0, since JSON has no
infinities and clients reject them.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

from tandem.contracts.outputs import Logprob
from tandem.frontend.openai_protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionResponse,
                                           ChatDelta, ChatLogprobs, ChatResponseMessage,
                                           ChatStreamChoice, ChatTokenLogprob, CompletionChoice,
                                           CompletionLogprobs, CompletionResponse,
                                           PromptTokensDetails, TopLogprob, UsageInfo)
from tandem.frontend.openai_sse import TextEventTemplate, sse_event
from tandem.frontend.openai_tools import ToolCalling, tool_call_delta, tool_call_out
from tandem.frontend.types import GenerateChunk

LOGPROB_FLOOR = -9999.0
TokenText = Callable[[int], str]


def make_token_text(tokenizer: PreTrainedTokenizerBase, cache_size: int = 1 << 16) -> TokenText:
    """Token id -> its text, cached: logprob responses decode the same few ids over and over."""

    @functools.lru_cache(maxsize=cache_size)
    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    return token_text


class _Formatter:
    """What completions and chat share: the totals a request's chunks add up to."""

    def __init__(self, request_id: str, model: str, num_prompt_tokens: int,
                 num_top_logprobs: int | None, token_text: TokenText, index: int = 0):
        self.request_id = request_id
        self.index = index                         # the choice's place in the response
        self.model = model
        self.created = int(time.time())
        self.num_prompt_tokens = num_prompt_tokens
        self.num_top_logprobs = num_top_logprobs   # None: the request asked for no logprobs
        self.token_text = token_text
        self.text_parts: list[str] = []
        self.num_text_chars = 0
        self.num_completion_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self._template: TextEventTemplate | None = None   # made on the first text-only chunk

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def wants_logprobs(self) -> bool:
        return self.num_top_logprobs is not None

    def usage(self) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_completion_tokens,
            total_tokens=self.num_prompt_tokens + self.num_completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.num_cached_tokens),
        )

    def prologue(self) -> list[dict]:
        """Payloads a stream sends before the first token."""
        return []

    def stream_event(self, chunk: GenerateChunk) -> bytes | None:
        """Fold a chunk in; the SSE event it makes, if any."""
        if chunk.finish_reason is None and chunk.stop_reason is None and self._text_only:
            if self._template is None:
                self._template = TextEventTemplate.of(self._text_body)
            if self._template is not None:
                self._fold(chunk)
                return self._template.event(chunk.text) if chunk.text else None
        body = self.stream_body(self.add(chunk))
        return None if body is None else sse_event(body)

    @property
    def _text_only(self) -> bool:
        """Whether a chunk without a finish reason streams as its text alone."""
        return not self.wants_logprobs

    def _text_body(self, text: str) -> dict:
        """The stream payload of a chunk that carries only `text`."""
        raise NotImplementedError

    def add(self, chunk: GenerateChunk):
        raise NotImplementedError

    def stream_body(self, choice) -> dict | None:
        raise NotImplementedError

    def _fold(self, chunk: GenerateChunk, text: str | None = None) -> None:
        text = chunk.text if text is None else text
        self.text_parts.append(text)
        self.num_text_chars += len(text)
        self.num_completion_tokens += len(chunk.token_ids)
        # Only some chunks may carry the count; it never goes down.
        self.num_cached_tokens = max(self.num_cached_tokens, chunk.num_cached_tokens)
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason

    def _top(self, logprob: Logprob) -> list[tuple[str, float]]:
        ranked = sorted(logprob.top_logprobs.items(), key=lambda item: item[1], reverse=True)
        return [(self.token_text(t), finite_logprob(v)) for t, v in ranked[: self.num_top_logprobs]]


class CompletionFormatter(_Formatter):
    """`text_completion` objects for /v1/completions."""

    def __init__(self, *args, echo_text: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.logprobs = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        self.echo_text = echo_text   # the prompt, sent before the completion (`echo`)

    def add(self, chunk: GenerateChunk) -> CompletionChoice:
        logprobs = self._logprobs(chunk.logprobs, self.num_text_chars) if self.wants_logprobs else None
        text = chunk.text
        if self.echo_text:
            # Echo and logprobs are never asked together, so no text_offset shifts.
            text, self.echo_text = self.echo_text + text, ""
        self._fold(chunk, text)
        if logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(logprobs, name))
        return CompletionChoice(index=self.index, text=text, logprobs=logprobs,
                                finish_reason=chunk.finish_reason, stop_reason=chunk.stop_reason)

    @property
    def _text_only(self) -> bool:
        return not self.wants_logprobs and not self.echo_text

    def _text_body(self, text: str) -> dict:
        return self._body([CompletionChoice(index=self.index, text=text)], usage=None)

    def stream_body(self, choice: CompletionChoice) -> dict | None:
        has_tokens = bool(choice.logprobs and choice.logprobs.tokens)
        if not choice.text and choice.finish_reason is None and not has_tokens:
            return None   # a step whose text is held back (partial character, possible stop string)
        return self._body([choice], usage=None)

    def usage_chunk(self, usage: UsageInfo | None = None) -> dict:
        return self._body([], usage=usage or self.usage())

    def final_choice(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text=self.text,
                                logprobs=self.logprobs if self.wants_logprobs else None,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason)

    def response(self, choices: list[CompletionChoice] | None = None,
                 usage: UsageInfo | None = None) -> dict:
        """The whole body: this formatter's choice, or `choices` with their summed `usage`."""
        return self._body(choices or [self.final_choice()], usage=usage or self.usage())

    def _body(self, choices: list[CompletionChoice], usage: UsageInfo | None) -> dict:
        return CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                  choices=choices, usage=usage).model_dump()

    def _logprobs(self, logprobs: list[Logprob], text_offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for logprob in logprobs:
            token = self.token_text(logprob.token_id)
            top: dict[str, float] = {}
            for text, value in self._top(logprob):
                top.setdefault(text, value)   # ids that decode alike: keep the likelier
            top.setdefault(token, finite_logprob(logprob.logprob))
            out.tokens.append(token)
            out.token_logprobs.append(finite_logprob(logprob.logprob))
            out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out


class ChatFormatter(_Formatter):
    """`chat.completion` and `chat.completion.chunk` objects for /v1/chat/completions. With
    `tools`, the reply is read for tool calls (openai_tools): streamed, content passes through the
    parser's stream and each call goes out as one delta once complete; whole, the text is parsed
    at the end. Either way a reply with calls that stopped on its own ends with `tool_calls`."""

    def __init__(self, *args, tools: ToolCalling | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.logprobs: list[ChatTokenLogprob] = []
        self.tools = tools
        self.tool_stream = tools.parser.stream() if tools is not None else None
        self.num_tool_calls_sent = 0

    def prologue(self) -> list[dict]:
        # OpenAI's streams open with the role alone; content follows in later chunks.
        first = ChatStreamChoice(index=self.index, delta=ChatDelta(role="assistant", content=""))
        return [self._chunk_body([first], usage=None)]

    def add(self, chunk: GenerateChunk) -> ChatStreamChoice:
        self._fold(chunk)
        logprobs = None
        if self.wants_logprobs:
            content = [self._token_logprob(lp) for lp in chunk.logprobs]
            self.logprobs.extend(content)
            logprobs = ChatLogprobs(content=content)
        delta = ChatDelta(content=chunk.text) if self.tool_stream is None else self._tool_delta(chunk)
        finish = _chat_finish_reason(chunk.finish_reason, self.num_tool_calls_sent, self.tools)
        return ChatStreamChoice(index=self.index, delta=delta, logprobs=logprobs,
                                finish_reason=finish, stop_reason=chunk.stop_reason)

    @property
    def _text_only(self) -> bool:
        return not self.wants_logprobs and self.tool_stream is None

    def _text_body(self, text: str) -> dict:
        choice = ChatStreamChoice(index=self.index, delta=ChatDelta(content=text))
        return self._chunk_body([choice], usage=None)

    def stream_body(self, choice: ChatStreamChoice) -> dict | None:
        has_tokens = bool(choice.logprobs and choice.logprobs.content)
        has_output = bool(choice.delta.content or choice.delta.tool_calls)
        if not has_output and choice.finish_reason is None and not has_tokens:
            return None
        return self._chunk_body([choice], usage=None)

    def usage_chunk(self, usage: UsageInfo | None = None) -> dict:
        return self._chunk_body([], usage=usage or self.usage())

    def final_choice(self) -> ChatChoice:
        logprobs = ChatLogprobs(content=self.logprobs) if self.wants_logprobs else None
        message = ChatResponseMessage(content=self.text)
        if self.tools is not None:
            parsed = self.tools.parser.parse(self.text)
            calls = [tool_call_out(call) for call in self.tools.keep(parsed.tool_calls)]
            message = ChatResponseMessage(content=parsed.content, tool_calls=calls)
        return ChatChoice(index=self.index, message=message, logprobs=logprobs,
                          finish_reason=_chat_finish_reason(self.finish_reason,
                                                            len(message.tool_calls), self.tools),
                          stop_reason=self.stop_reason)

    def response(self, choices: list[ChatChoice] | None = None,
                 usage: UsageInfo | None = None) -> dict:
        """The whole body: this formatter's choice, or `choices` with their summed `usage`."""
        return ChatCompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                      choices=choices or [self.final_choice()],
                                      usage=usage or self.usage()).model_dump()

    def _tool_delta(self, chunk: GenerateChunk) -> ChatDelta:
        """The chunk's text through the tool-call stream: content, and the calls it completed."""
        assert self.tool_stream is not None and self.tools is not None
        released = self.tool_stream.feed(chunk.text)
        if chunk.finish_reason is not None:
            released = released + self.tool_stream.finish()
        calls = self.tools.keep(released.tool_calls, self.num_tool_calls_sent)
        deltas = [tool_call_delta(call, self.num_tool_calls_sent + k) for k, call in enumerate(calls)]
        self.num_tool_calls_sent += len(deltas)
        return ChatDelta(content=released.content or (None if deltas else ""),
                         tool_calls=deltas or None)

    def _chunk_body(self, choices: list[ChatStreamChoice], usage: UsageInfo | None) -> dict:
        return ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                   choices=choices, usage=usage).model_dump()

    def _token_logprob(self, logprob: Logprob) -> ChatTokenLogprob:
        token = self.token_text(logprob.token_id)
        top = [TopLogprob(token=text, logprob=value, bytes=list(text.encode("utf-8")))
               for text, value in self._top(logprob)]
        return ChatTokenLogprob(token=token, logprob=finite_logprob(logprob.logprob),
                                bytes=list(token.encode("utf-8")), top_logprobs=top)


def _chat_finish_reason(reason: str | None, num_tool_calls: int,
                        tools: ToolCalling | None) -> str | None:
    # A reply cut by max_tokens keeps "length": its last call may be the one cut.
    if reason == "stop" and num_tool_calls and tools is not None:
        return tools.finish_reason
    return reason


def finite_logprob(value: float) -> float:
    # `not >=` also catches NaN.
    return value if value >= LOGPROB_FLOOR else LOGPROB_FLOOR
