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
from tandem.engine.model_config import ModelConfig
from tandem.engine.models.decoder import DecoderModel
from tandem.engine.sampler import Sampler, SamplerOutput
from tandem.engine.scheduler import ScheduledBatch

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor   # (num_tokens,)
    positions: torch.Tensor   # (num_tokens,)
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # (num_sampling_seqs,) rows of the hidden states to sample from
    sampling_rows: list[int]      # which sequences of the batch sample


@dataclass(slots=True)
class StepOutput:
    token_ids: list[int | None]
    logprobs: list[tuple[float, dict[int, float]] | None]


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (num_blocks, config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return config.kv_elements_per_token * block_size * dtype.itemsize


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype, seed: int):
        self.model = model
        self.config = model.config
        self.block_size = block_size
        self.device = device
        self.kv_cache = torch.zeros(kv_cache_shape(self.config, num_blocks, block_size),
                                    dtype=dtype, device=device)
        self.sampler = Sampler(device, seed)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Run one step; a sampled token per sequence, None where the sequence does not sample."""
        inputs = self.prepare(batch)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        out = StepOutput([None] * len(batch.seqs), [None] * len(batch.seqs))
        if not inputs.sampling_rows:
            return out
        logits = self.model.compute_logits(hidden[inputs.sample_indices])
        seqs = [batch.seqs[i] for i in inputs.sampling_rows]
        sampled: SamplerOutput = self.sampler(logits, [s.params for s in seqs],
                                              [s.generator for s in seqs])
        for k, row in enumerate(inputs.sampling_rows):
            out.token_ids[row] = sampled.token_ids[k]
            out.logprobs[row] = sampled.logprobs[k]
        return out

    def prepare(self, batch: ScheduledBatch) -> ModelInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens: list[int] = []
        sampling_rows: list[int] = []
        bs = self.block_size
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + num_new)
            seq_lens.append(end)
            if batch.samples(i):
                sampling_rows.append(i)
        max_blocks = max(len(seq.block_table) for seq in batch.seqs)
        block_tables = [seq.block_table + [0] * (max_blocks - len(seq.block_table))
                        for seq in batch.seqs]
        device = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        meta = AttentionMetadata(
            query_start_loc=tensor(query_start_loc, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            slot_mapping=tensor(slots, torch.int64),
            max_query_len=max(batch.num_new_tokens),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=query_start_loc,
            seq_lens_cpu=seq_lens,
        )
        sample_indices = tensor([query_start_loc[i + 1] - 1 for i in sampling_rows], torch.int64)
        return ModelInputs(tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta,
                           sample_indices, sampling_rows)
