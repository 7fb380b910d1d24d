"""Offline generation: `LLM(model=...).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

from tqdm import tqdm

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.output_processor import OutputProcessor
from tandem.contracts.outputs import RequestOutput
from tandem.contracts.sampling_params import SamplingParams
from tandem.engine.sequence import FinishReason
from tandem.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, **engine_options):
        """`model`: an HF model directory or random:<preset> (None: EngineConfig's default);
        `engine_options`: any other EngineConfig field."""
        if model is not None:
            engine_options["model"] = model
        self.engine = LLMEngine(EngineConfig(**engine_options))
        self.tokenizer = load_tokenizer(self.engine.model_dir)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} "
                             "sampling parameter sets")
        order = [self._add(prompt, params) for prompt, params in zip(prompts, sampling_params)]
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), disable=not use_tqdm, desc="generating") as bar:
            # Each step's tokens are detokenized while the device runs the next one. A stop
            # string found there ends its request at once; its token in the step in flight is
            # dropped.
            for updates in self.engine.steps():
                outputs, stopped = self.processor.process(updates)
                for request_id in stopped:
                    self.engine.finish_request(request_id, FinishReason.STOP)
                for output in outputs:
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        missing = [request_id for request_id in order if request_id not in finished]
        if missing:
            raise RuntimeError(f"{len(missing)} requests were left unfinished, with nothing "
                               "left to schedule")
        return [finished[request_id] for request_id in order]

    def _add(self, prompt: Prompt, params: SamplingParams) -> str:
        request_id = str(next(self._ids))
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            text = prompt
        else:
            token_ids, text = list(prompt), None
        self.engine.add_request(request_id, token_ids, params)
        self.processor.add_request(request_id, text, token_ids, params)
        return request_id
