"""Model runner: owns the model and the KV cache, turns a scheduled batch into tensors, runs the
forward pass and samples.

The KV cache is one tensor, `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`
(DESIGN.md, "KV layout"), so one block is one contiguous region holding every layer's K and V for
`block_size` tokens: the unit that the block manager hands out and that kv_transfer moves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.cuda_graphs import DecodeGraphs
from tandem.engine.step_graphs import StepGraphs
from tandem.engine.step_inputs import (HostInputs, ModelInputs, ahead_inputs, block_table_array,
                                       host_inputs)
from tandem.engine.model_config import ModelConfig
from tandem.engine.models.decoder import DecoderModel
from tandem.engine.logits_processors import TokenHistory
from tandem.engine.sampler import PendingTokens, Sampler, SamplerOutput
from tandem.engine.scheduler import ScheduledBatch
from tandem.engine.sequence import Sequence
from tandem.engine.structured_output import token_mask

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int | None]
    logprobs: list[tuple[float, dict[int, float]] | None]


@dataclass(slots=True)
class PendingStep:
    """A step queued on the device; `ModelRunner.collect` waits for it."""
    num_seqs: int
    sampling_rows: list[int]             # rows of the batch that sample
    tokens: PendingTokens | None         # None when no row samples


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (num_blocks, config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return config.kv_elements_per_token * block_size * dtype.itemsize


class ModelRunner:
    def __init__(self, model: DecoderModel, block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.kv_cache = torch.empty(0, dtype=dtype, device=device)
        self.sampler = Sampler(device, seed, tuple(model.config.eos_token_ids))
        self.graphs: DecodeGraphs | None = None
        self.step_graphs: StepGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_cache = torch.zeros(kv_cache_shape(self.config, num_blocks, self.block_size),
                                    dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_logit_rows: int) -> int:
        """Peak activation memory of the largest step: a num_tokens-long prompt chunk (the step
        token budget), with logits for num_logit_rows sequences."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        num_blocks = -(-num_tokens // self.block_size)
        cache = torch.zeros(kv_cache_shape(self.config, num_blocks, self.block_size),
                            dtype=self.dtype, device=self.device)
        cache_bytes = cache.numel() * cache.element_size()
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(num_blocks, dtype=torch.int32,
                                      device=self.device)[None, :],
            slot_mapping=torch.arange(num_tokens, dtype=torch.int64, device=self.device),
            max_query_len=num_tokens, max_seq_len=num_tokens,
            query_start_loc_cpu=[0, num_tokens], seq_lens_cpu=[num_tokens])
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        # Positions only pick rotary rows: wrapped into the table, which holds max_model_len
        # rows and may be shorter than the step budget.
        positions = torch.arange(num_tokens, device=self.device) % self.model.rope[0].shape[0]
        hidden = self.model(ids, positions, meta, cache)
        self.model.compute_logits(hidden[:num_logit_rows])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline - cache_bytes
        del cache, hidden
        torch.cuda.empty_cache()
        return peak

    def compile_kernel_variants(self) -> None:
        """Compiles now the kernel variants an eager step may need later (CUDA only), so that none
        stalls a serving batch to compile."""
        from tandem.engine.kernels import decode_attention, prefill_attention   # CUDA only
        attn = self.model.layers[0].self_attn
        prep = decode_attention.QKVPrep(   # decode steps prepare q in the attention kernel
            torch.zeros(1, dtype=torch.int64, device=self.device), *self.model.rope,
            attn.q_norm_weight, attn.k_norm_weight, attn.qk_norm_eps,
            torch.full((1,), -1, dtype=torch.int64, device=self.device))
        decode_attention.compile_variants(self.kv_cache[:, 0], self.config.num_heads, prep)
        prefill_attention.compile_variants(self.kv_cache[:, 0], self.config.num_heads)

    def capture_graphs(self, max_batch: int, max_seq_len: int, max_step_tokens: int) -> None:
        """Decode graphs up to max_batch sequences of max_seq_len, and the pieces of steps up to
        max_step_tokens tokens (engine/step_graphs.py), in one memory pool."""
        from tandem.engine.kernels import skinny_gemm   # CUDA only: Triton is usable here
        self.graphs = DecodeGraphs(self.model, self.kv_cache, max_batch, max_seq_len,
                                   self.block_size)
        self.step_graphs = StepGraphs(self.model, self.kv_cache, max_step_tokens)
        # The capture's eager warm-up at each batch size is where the few-row matmuls are timed;
        # once serving, a row count not seen then borrows a choice instead of stalling the step.
        with skinny_gemm.allow_timing():
            self.graphs.capture()
            self.step_graphs.capture(self.graphs.pool)
        skinny_gemm.serve_without_timing()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> PendingStep:
        """Queue one step on the device and return without waiting for it: the caller's host work
        (detokenizing the previous step, say) overlaps the forward pass. `collect` gives its
        sampled tokens: one per sequence, None where the sequence does not sample."""
        order = decode_rows_first(batch)  # rows of `batch` in the order they run
        if order is not None:
            batch = ScheduledBatch([batch.seqs[i] for i in order],
                                   [batch.num_new_tokens[i] for i in order])
        host = host_inputs(batch, self.block_size)
        if not host.sampling_rows:
            self._forward(host)  # a prompt chunk that ends before the prompt does
            return PendingStep(len(batch.seqs), [], None)
        if self.graphs is not None and self.graphs.can_run(host):
            logits = self.graphs.run(host)
        else:
            logits = self._forward(host)
        seqs = [batch.seqs[i] for i in host.sampling_rows]
        # Computed on the host while the device still runs the forward pass.
        mask = token_mask([s.grammar for s in seqs], self.config.vocab_size)
        tokens = self.sampler.launch(logits, [s.params for s in seqs],
                                     [s.generator for s in seqs], _histories(seqs), mask)
        rows = host.sampling_rows if order is None else [order[i] for i in host.sampling_rows]
        return PendingStep(len(batch.seqs), rows, tokens)

    @torch.inference_mode()
    def launch_ahead(self, batch: ScheduledBatch, rows: list[int], previous: PendingStep
                     ) -> PendingStep:
        """Queue a decode step behind `previous`, still in flight, whose sampled tokens are this
        step's inputs: sequence k reads the token of row rows[k] there (engine/lookahead.py).
        Each sequence computes the position one past its last recorded token."""
        host = ahead_inputs(batch, self.block_size)
        input_ids = previous.tokens.token_ids  # one per sampling row of `previous`
        if rows != previous.sampling_rows:
            position = {row: k for k, row in enumerate(previous.sampling_rows)}
            index = [position[row] for row in rows]
            # Pinned: a copy from pageable memory would wait for the step in flight.
            index_host = torch.tensor(index, pin_memory=input_ids.is_cuda)
            input_ids = input_ids[index_host.to(input_ids.device, non_blocking=True)]
        if self.graphs is not None and self.graphs.can_run(host):
            logits = self.graphs.run(host, input_ids)
        else:
            inputs = self.to_device(host)
            hidden = self.model(input_ids, inputs.positions, inputs.meta, self.kv_cache)
            logits = self.model.compute_logits(hidden)
        tokens = self.sampler.launch(logits, [s.params for s in batch.seqs],
                                     [s.generator for s in batch.seqs])
        return PendingStep(len(batch.seqs), host.sampling_rows, tokens)

    def can_launch_ahead(self, num_seqs: int, max_seq_len: int) -> bool:
        """Whether a decode step of this shape can be launched ahead: on a CUDA device, only as a
        captured graph (an eager step's launches would cost what the overlap saves)."""
        if self.device.type != "cuda":
            return True
        return (self.graphs is not None and num_seqs <= self.graphs.max_batch
                and max_seq_len <= self.graphs.max_seq_len)

    def collect(self, pending: PendingStep) -> StepOutput:
        """Wait for a launched step's sampled tokens."""
        out = StepOutput([None] * pending.num_seqs, [None] * pending.num_seqs)
        if pending.tokens is None:
            return out
        sampled: SamplerOutput = self.sampler.read(pending.tokens)
        for k, row in enumerate(pending.sampling_rows):
            out.token_ids[row] = sampled.token_ids[k]
            out.logprobs[row] = sampled.logprobs[k]
        return out

    def _forward(self, host: HostInputs) -> torch.Tensor:
        """A step that is not a captured decode graph, through the step graphs' pieces where they
        hold it, eagerly otherwise; logits of the sequences that sample."""
        inputs = self.to_device(host)
        if self.step_graphs is not None and self.step_graphs.can_run(len(host.input_ids)):
            hidden = self.step_graphs.run(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        return self.model.compute_logits(hidden[inputs.sample_indices])

    def to_device(self, host: HostInputs) -> ModelInputs:
        device = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=tensor(host.query_start_loc, torch.int32),
            seq_lens=tensor(host.seq_lens, torch.int32),
            block_tables=torch.from_numpy(block_table_array(host.block_tables)).to(
                device, non_blocking=True),
            slot_mapping=tensor(host.slots, torch.int64),
            max_query_len=host.max_query_len,
            max_seq_len=max(host.seq_lens),
            query_start_loc_cpu=host.query_start_loc,
            seq_lens_cpu=host.seq_lens,
        )
        meta.num_decode_seqs, meta.rest = _mixed_split(host, meta)
        sample_indices = tensor([host.query_start_loc[i + 1] - 1 for i in host.sampling_rows],
                                torch.int64)
        return ModelInputs(tensor(host.input_ids, torch.int64),
                           tensor(host.positions, torch.int64), meta, sample_indices)


def decode_rows_first(batch: ScheduledBatch) -> list[int] | None:
    """For a mixed step (one-token rows beside longer ones) whose one-token rows are not already
    first: the batch's rows with those first, each group in its own order. None otherwise."""
    single = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
    if not single or len(single) == len(batch.seqs) or single[-1] == len(single) - 1:
        return None
    return single + [i for i, n in enumerate(batch.num_new_tokens) if n != 1]


def _mixed_split(host: HostInputs, meta: AttentionMetadata
                 ) -> tuple[int, AttentionMetadata | None]:
    """(number of leading one-token sequences, metadata of the others) of a mixed step; (0, None)
    for any other step."""
    qsl = host.query_start_loc
    num_seqs = len(host.seq_lens)
    d = 0
    while d < num_seqs and qsl[d + 1] - qsl[d] == 1:
        d += 1
    if d == 0 or d == num_seqs:
        return 0, None
    # Copies, not views: a view's address moves with d, and the kernels are specialized on
    # their pointers' alignment, so views would compile new variants while serving.
    rest = AttentionMetadata(
        query_start_loc=meta.query_start_loc[d:] - d, seq_lens=meta.seq_lens[d:].clone(),
        block_tables=meta.block_tables[d:].clone(), slot_mapping=meta.slot_mapping[d:],
        max_query_len=meta.max_query_len, max_seq_len=max(host.seq_lens[d:]),
        query_start_loc_cpu=[x - d for x in qsl[d:]], seq_lens_cpu=host.seq_lens[d:])
    return d, rest


def _histories(seqs: list[Sequence]) -> list[TokenHistory] | None:
    """The rows' tokens, only when some row's parameters read them (penalties, min_tokens)."""
    if not any(s.params.changes_logits for s in seqs):
        return None
    return [TokenHistory(s.prompt_token_ids, s.output_token_ids) for s in seqs]
