"""Per-request sampling parameters, in the shape users know from vLLM's `SamplingParams`.

The penalties follow vLLM (and OpenAI for presence/frequency): `presence_penalty` and
`frequency_penalty` count the output tokens only, `repetition_penalty` (HF's, CTRL paper) every
token the sequence holds, prompt included; all three, like `logit_bias`, change the logits before
temperature. `min_tokens` keeps eos and the stop tokens from ending a request before that many
output tokens. `json_schema` (JSON Schema text) constrains the output to a JSON document matching
it (`{"type": "object"}` for OpenAI's `json_object`); the engine turns it into a token mask
(engine/structured_output.py), and it travels with the request so each worker can rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int | None = 16        # None: until the context is full
    temperature: float = 1.0           # 0 means greedy
    top_k: int = 0                     # 0 or -1: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None            # makes sampling for this request reproducible
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None        # None: none; 0: the sampled token's; n: plus the top n
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0      # subtracted once from every token the output holds
    frequency_penalty: float = 0.0     # subtracted per occurrence in the output
    repetition_penalty: float = 1.0    # > 1 discourages tokens of prompt and output alike
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0                # eos and stop tokens are masked until this many outputs
    json_schema: str | None = None     # JSON Schema text the output must match; None: free text
    # A migrated request's streamed output sits at the end of its prompt: the grammar of
    # json_schema starts after the prompt's last `num_schema_prompt_tokens` tokens.
    num_schema_prompt_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def changes_logits(self) -> bool:
        """Whether the sampler must touch this row's logits before choosing (it needs the
        sequence's tokens to do so)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        self._validate_penalties()
        self._validate_json_schema()

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0.0:
            raise ValueError(f"repetition_penalty must be positive (1 disables it), got "
                             f"{self.repetition_penalty}")
        for token_id, bias in self.logit_bias.items():
            if token_id < 0:
                raise ValueError(f"logit_bias token ids must be non-negative, got {token_id}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for "
                                 f"token {token_id}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be non-negative, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                             f"({self.max_tokens})")

    def _validate_json_schema(self) -> None:
        if self.num_schema_prompt_tokens < 0:
            raise ValueError(f"num_schema_prompt_tokens must be non-negative, got "
                             f"{self.num_schema_prompt_tokens}")
        if self.json_schema is None:
            return
        try:
            schema = json.loads(self.json_schema)
        except ValueError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"json_schema must be a JSON object (or true or false), got a "
                             f"{type(schema).__name__}")
