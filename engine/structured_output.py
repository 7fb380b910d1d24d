"""Structured output: a request's JSON schema as a token mask, one matcher per sequence.

A request with `SamplingParams.json_schema` gets a `JsonGrammar` when its sequence is made. Before
each of its samples the grammar fills a bitmask of the tokens that keep the output a valid prefix of
a document matching the schema (only eos once the document is complete); the sampler sets every
other logit to -inf before it chooses, greedy rows included. After the step the engine advances the
grammar over the token that was sampled. The mask is applied to the logits the model runner returns,
outside any CUDA graph, as the sampler's other work is. In disaggregated serving the prefill worker
samples the first token under the same mask; the decode worker rebuilds the grammar from the schema
that travels in the sampling parameters and advances it over that first token.

The grammar library is llguidance, chosen over xgrammar and outlines-core (all three install here
with pip): its `LLMatcher` is exactly a per-request matcher that fills a 32-bit-per-word token
bitmask from the tokenizer's vocabulary and advances on accepted tokens, and it computes each mask
lazily from the parser state (tens of microseconds, no per-schema precompilation over the
vocabulary), so a new schema costs nothing up front. It covers JSON Schema broadly (refs, anyOf,
bounds, lengths, patterns), is what vLLM and SGLang offer as their `guidance` backend, and its wheel
has no dependencies. xgrammar offers the same matcher API but pulls in triton and a TVM runtime;
outlines-core builds a full index over the vocabulary for each schema (seconds for large ones) and
converts schemas through regular expressions, which cannot express recursion.

llguidance is imported lazily and is optional (`pip install tandem[structured]`): a host without it
serves everything else, and a request asking for a format gets a ValueError (a 400) saying so.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tandem.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

BITS_PER_WORD = 32   # the bitmask holds one bit per token in int32 words, as llguidance fills it
# No free whitespace between tokens of the document: a weak model that may emit spaces between
# any two tokens can pad forever and never close it (vLLM's `disable-any-whitespace` does the
# same). The separators are json.dumps' defaults, the layout models have read most. A schema may
# set its own with llguidance's "x-guidance" key.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def check_json_schema(schema: str) -> None:
    """Raises ValueError when structured output is unavailable or `schema` cannot be compiled."""
    _compile(_library(), schema)


class JsonGrammar:
    """One sequence's position in its schema's grammar."""

    def __init__(self, matcher: Any):
        self._matcher = matcher
        self.is_broken = False   # set when a token outside the grammar was forced on it

    def accept(self, token_id: int) -> None:
        if self.is_broken:
            return
        if not self._matcher.consume_token(token_id):
            # Only a token the mask allowed can be sampled, so this is a bug or a forced token;
            # the rest of the output goes unmasked rather than masked to nothing.
            self.is_broken = True
            logger.warning("structured output: token %d left the grammar (%s); the rest of this "
                           "output is not constrained", token_id, self._matcher.get_error())


class StructuredOutput:
    """The engine's grammar factory: the tokenizer's vocabulary as llguidance sees it, built once."""

    def __init__(self, model_dir: Path | None, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.model_dir = model_dir
        self.vocab_size = vocab_size          # the logits' width, which may exceed the tokenizer's
        self.eos_token_ids = eos_token_ids
        self._tokenizer: Any = None

    def grammar(self, schema: str) -> JsonGrammar:
        """A fresh grammar for `schema`; raises ValueError (library missing, bad schema)."""
        library = _library()
        compiled = _compile(library, schema)
        return JsonGrammar(library.LLMatcher(self._llg_tokenizer(), compiled))

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            # Deferred: only engines that see a structured request pay for the vocabulary scan.
            from llguidance.hf import from_tokenizer
            hf_tokenizer = load_tokenizer(str(self.model_dir) if self.model_dir else None)
            self._tokenizer = from_tokenizer(hf_tokenizer, n_vocab=self.vocab_size,
                                             eos_token=list(self.eos_token_ids))
        return self._tokenizer


@dataclass(frozen=True, slots=True)
class TokenMask:
    """The allowed tokens of the rows of a batch that have a grammar."""
    rows: list[int]              # which rows of the logits
    bitmask: torch.Tensor        # (len(rows), ceil(vocab / 32)) int32: bit t of row i allows token t


def token_mask(grammars: list[JsonGrammar | None], vocab_size: int) -> TokenMask | None:
    """The mask for a batch whose row i has `grammars[i]`; None when no row has one."""
    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return None
    words = -(-vocab_size // BITS_PER_WORD)
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)  # a broken grammar allows all
    live = [(grammars[i]._matcher, k) for k, i in enumerate(rows) if not grammars[i].is_broken]
    if live:
        # One call for the batch: llguidance fills the rows in parallel, without the GIL.
        _executor().unsafe_compute_mask_ptr(live, bitmask.data_ptr(), words * 4, len(rows))
    return TokenMask(rows, bitmask)


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> torch.Tensor:
    """A copy of `logits` (num_rows, vocab) with every token its row's mask forbids at -inf."""
    vocab = logits.shape[-1]
    device = logits.device
    words = mask.bitmask.to(device, non_blocking=True)            # (len(rows), num_words)
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=device)
    allowed = ((words[:, :, None] >> shifts) & 1).bool()          # (len(rows), num_words, 32)
    allowed = allowed.reshape(len(mask.rows), -1)[:, :vocab]       # (len(rows), vocab)
    index = torch.tensor(mask.rows, device=device)
    out = logits.clone()
    out[index] = out[index].masked_fill(~allowed, float("-inf"))
    return out


@functools.cache
def _executor() -> Any:
    return _library().LLExecutor()


def _library() -> Any:
    try:
        import llguidance
    except ImportError:
        raise ValueError("structured output (response_format json_object/json_schema, "
                         "guided_json) needs the llguidance package, which this server lacks: "
                         "pip install 'tandem[structured]'") from None
    return llguidance


def _compile(library: Any, schema: str) -> str:
    try:
        json.loads(schema)
        grammar = library.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    except ValueError as exc:
        raise ValueError(f"the JSON schema is not valid: {exc}") from None
    error = library.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"the JSON schema cannot be used for structured output: {error}")
    return grammar
