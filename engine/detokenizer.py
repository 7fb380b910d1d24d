"""Incremental detokenization: generated token ids in, streamable text out, cut at stop strings.

Decoding the whole output again for every new token would cost O(length) per token. Instead we
decode a small window of recent token ids and take the difference, with two offsets into the ids:
text decoded from `[prefix_offset, read_offset)` has already been emitted, and the new text is what
`[prefix_offset, end)` decodes to beyond it. Starting the window a few tokens back (a few prompt
tokens at first) gives decoders that treat the first token of a string specially, such as
SentencePiece dropping a leading space, the context they need.

Text is withheld for two reasons:

- an incomplete UTF-8 character. Byte-level tokens can end in the middle of one, and the decoder
  renders that as U+FFFD; while the window's text ends in U+FFFD its tokens stay pending and the
  offsets do not move. A U+FFFD that later tokens cannot fix (invalid bytes) is emitted as soon as
  any character follows it, or when the request finishes.
- a possible stop string. `get_text_delta` keeps back the longest end of the text that is the start
  of some stop string (at most len(longest stop) - 1 characters), because if the stop string
  completes, the text is cut before it. With `include_stop_str_in_output` the cut falls after the
  stop string, so nothing needs holding back.

A stop string completed within the first `min_tokens` output tokens does not end the output (vLLM's
rule: stop conditions wait for min_tokens); the text stays and matching goes on.

Stop strings are matched by `stop_matcher.StopMatcher`, which reads each new character once (an
Aho-Corasick automaton), so matching and the hold-back length cost O(new text) per token however
many and however long the stop strings are; of several matches the one that completes first
(smallest end, then earliest start) wins, as if text arrived one character at a time. Text once returned by `get_text_delta` is never cut, which is
what makes the concatenation of all deltas equal `output_text`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

from tandem.engine.stop_matcher import StopMatcher

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Enough to carry a SentencePiece word boundary or a split multi-byte character into the window.
_NUM_PROMPT_CONTEXT_TOKENS = 5


def _decoder(tokenizer: PreTrainedTokenizerBase, skip_special_tokens: bool
             ) -> Callable[[list[int]], str]:
    """The tokenizer's decode, called on its Rust backend directly where that gives the same text
    (a fast tokenizer that does no clean-up of spaces). transformers' `decode` converts and checks
    its input on every call; at a few hundred sequences per step that cost 6x the decode itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
    return functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, in deltas that are safe to stream."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {stop!r}; wrap it in a list")
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._decode_ids = _decoder(tokenizer, skip_special_tokens)
        self._stop_matcher = StopMatcher(stop) if stop else None
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._num_output_tokens = 0

        context = [int(t) for t in prompt_token_ids[-_NUM_PROMPT_CONTEXT_TOKENS:]]
        context_text = self._decode(context)
        if context_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character: output would complete it and shift every offset.
            context, context_text = [], ""
        self._token_ids = context  # prompt context, then every output token
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = context_text  # decode of [prefix_offset, read_offset), kept to save a decode

        self._pieces: list[str] = []  # the output text, in the pieces it was decoded in
        self._num_chars = 0
        self._num_streamed_chars = 0
        self._matched_stop: str | None = None

    @property
    def output_text(self) -> str:
        """All text decoded so far, cut at the matched stop string (pending partial characters excluded)."""
        text = "".join(self._pieces)
        self._pieces = [text] if text else []  # so the next call joins only what came after
        return text

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, or None."""
        return self._matched_stop

    def add_tokens(self, token_ids: Sequence[int]) -> str | None:
        """Feed newly generated ids; returns the stop string they complete, else None."""
        if self._matched_stop is not None:
            raise ValueError(
                f"the output already stopped at {self._matched_stop!r}; finish the request instead of "
                "adding more tokens"
            )
        if not token_ids:
            return None
        self._token_ids.extend(int(t) for t in token_ids)
        self._num_output_tokens += len(token_ids)
        window_text = self._decode(self._token_ids[self._prefix_offset:])
        if window_text.endswith(_REPLACEMENT_CHAR) or len(window_text) <= len(self._prefix_text):
            return None  # pending: an unfinished character, or tokens that decode to nothing yet
        return self._append_text(self._advance_window(window_text))

    def get_text_delta(self, finished: bool) -> str:
        """Text that became safe to stream since the last call; `finished=True` flushes everything."""
        if finished:
            self._flush_pending_tokens()
        is_final = finished or self._matched_stop is not None
        num_held = 0 if is_final or self._include_stop else self._num_chars_to_hold()
        end = self._num_chars - num_held
        assert end >= self._num_streamed_chars, "held text must never reach into streamed text"
        if end == self._num_streamed_chars:
            return ""
        unstreamed = self._text_suffix(self._num_chars - self._num_streamed_chars)
        self._num_streamed_chars = end
        return unstreamed[: len(unstreamed) - num_held]

    def _decode(self, token_ids: list[int]) -> str:
        return self._decode_ids(token_ids)

    def _advance_window(self, window_text: str) -> str:
        """Move the offsets past the pending tokens; returns the text they added."""
        new_text = window_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        self._prefix_text = self._decode(self._token_ids[self._prefix_offset:self._read_offset])
        return new_text

    def _flush_pending_tokens(self) -> None:
        # Once a stop string matched, pending tokens lie after the cut and add nothing.
        if self._matched_stop is not None or self._read_offset == len(self._token_ids):
            return
        window_text = self._decode(self._token_ids[self._prefix_offset:])
        if len(window_text) > len(self._prefix_text):
            self._append_text(self._advance_window(window_text))

    def _append_text(self, new_text: str) -> str | None:
        """Add decoded text, cut it at the first stop string it completes, and return that string."""
        match = self._stop_matcher.feed(new_text) if self._stop_matcher is not None else None
        if match is not None and self._num_output_tokens < self._min_tokens:
            match = None   # too early to stop: the text stays and matching goes on
        num_chars_before = self._num_chars
        self._pieces.append(new_text)
        self._num_chars += len(new_text)
        if match is None:
            return None
        stop, start = match[0], num_chars_before + match[1]
        self._matched_stop = stop
        self._truncate(start + len(stop) if self._include_stop else start)
        logger.debug("stop string %r matched at character %d", stop, start)
        return stop

    def _num_chars_to_hold(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        return self._stop_matcher.num_chars_to_hold if self._stop_matcher is not None else 0

    @property
    def num_stop_chars_scanned(self) -> int:
        """Characters the stop matcher has read: the output's length, never more."""
        return self._stop_matcher.num_chars_scanned if self._stop_matcher is not None else 0

    def _truncate(self, num_chars: int) -> None:
        num_to_drop = self._num_chars - num_chars
        while num_to_drop > 0:
            piece = self._pieces.pop()
            if len(piece) > num_to_drop:
                self._pieces.append(piece[: len(piece) - num_to_drop])
            num_to_drop -= len(piece)
        self._num_chars = num_chars

    def _text_suffix(self, num_chars: int) -> str:
        """The last `num_chars` characters of the output text, joining only the pieces needed."""
        if num_chars <= 0:
            return ""
        parts: list[str] = []
        length = 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            length += len(piece)
            if length >= num_chars:
                break
        text = "".join(reversed(parts))
        return text[len(text) - num_chars:] if len(text) > num_chars else text
