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

A stop string is searched for only in the newly decoded text plus len(stop) - 1 characters before
it; of several matches the one that completes first (smallest end, then earliest start) wins, as if
text arrived one character at a time. Text once returned by `get_text_delta` is never cut, which is
what makes the concatenation of all deltas equal `output_text`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Enough to carry a SentencePiece word boundary or a split multi-byte character into the window.
_NUM_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, in deltas that are safe to stream."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str],
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        if isinstance(stop, str):
            raise ValueError(f"stop must be a list of strings, got the string {stop!r}; wrap it in a list")
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._tokenizer = tokenizer
        self._stop = list(stop)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._skip_special_tokens = skip_special_tokens

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
        self._tail = ""  # the last max_stop_len - 1 characters of the output text
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
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

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
        match = self._find_stop(new_text)
        self._pieces.append(new_text)
        self._num_chars += len(new_text)
        self._tail = self._updated_tail(self._tail, new_text)
        if match is None:
            return None
        stop, start = match
        self._matched_stop = stop
        self._truncate(start + len(stop) if self._include_stop else start)
        logger.debug("stop string %r matched at character %d", stop, start)
        return stop

    def _find_stop(self, new_text: str) -> tuple[str, int] | None:
        """(stop string, absolute start) of the first stop that completes within `new_text`."""
        if not self._stop:
            return None
        region = self._tail + new_text  # the tail is as long as the longest possible overlap
        region_start = self._num_chars - len(self._tail)
        best: tuple[int, int, str] | None = None  # (end, start, stop) in region coordinates
        for stop in self._stop:
            index = region.find(stop, max(0, len(self._tail) - len(stop) + 1))
            if index >= 0:
                candidate = (index + len(stop), index, stop)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        return best[2], region_start + best[1]

    def _num_chars_to_hold(self) -> int:
        """Length of the longest end of the text that begins some stop string."""
        num_held = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._tail)), num_held, -1):
                if self._tail.endswith(stop[:length]):
                    num_held = length
                    break
        return num_held

    def _truncate(self, num_chars: int) -> None:
        num_to_drop = self._num_chars - num_chars
        while num_to_drop > 0:
            piece = self._pieces.pop()
            if len(piece) > num_to_drop:
                self._pieces.append(piece[: len(piece) - num_to_drop])
            num_to_drop -= len(piece)
        self._num_chars = num_chars
        self._tail = self._updated_tail("", self._text_suffix(self._max_stop_len - 1))

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

    def _updated_tail(self, tail: str, new_text: str) -> str:
        keep = self._max_stop_len - 1
        if keep <= 0:
            return ""
        return (tail + new_text)[-keep:] if len(new_text) < keep else new_text[-keep:]
