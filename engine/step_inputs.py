"""The inputs of one engine step: as host lists first, then as device tensors.

`host_inputs` flattens a scheduled batch: each sequence contributes the tokens it computes this
step, at their positions, with the KV-cache slot each one is written to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.scheduler import ScheduledBatch


@dataclass(slots=True)
class HostInputs:
    input_ids: list[int]         # (num_tokens,)
    positions: list[int]         # (num_tokens,)
    slots: list[int]             # (num_tokens,) block_id * block_size + offset
    query_start_loc: list[int]   # (num_seqs + 1,)
    seq_lens: list[int]          # (num_seqs,) context length including the new tokens
    block_tables: list[list[int]]  # (num_seqs, that sequence's blocks): the sequences' own lists
    sampling_rows: list[int]     # which sequences of the batch sample
    max_query_len: int

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


@dataclass(slots=True)
class ModelInputs:
    input_ids: torch.Tensor   # (num_tokens,)
    positions: torch.Tensor   # (num_tokens,)
    meta: AttentionMetadata
    sample_indices: torch.Tensor  # (num_sampling_seqs,) rows of the hidden states to sample from



def host_inputs(batch: ScheduledBatch, block_size: int) -> HostInputs:
    """The step's inputs as host lists: flat tokens, positions, KV slots, per-sequence lengths."""
    if all(n == 1 for n in batch.num_new_tokens):
        return _decode_inputs(batch, block_size)
    host = HostInputs([], [], [], [0], [], [], [], max(batch.num_new_tokens))
    for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        host.input_ids.extend(seq.token_ids[start:end])
        host.positions.extend(range(start, end))
        host.slots.extend(seq.block_table[p // block_size] * block_size + p % block_size
                          for p in range(start, end))
        host.query_start_loc.append(host.query_start_loc[-1] + num_new)
        host.seq_lens.append(end)
        if batch.samples(i):
            host.sampling_rows.append(i)
    host.block_tables = [seq.block_table for seq in batch.seqs]
    return host


def _decode_inputs(batch: ScheduledBatch, block_size: int) -> HostInputs:
    """One token per sequence: the same lists, built a column at a time (a decode step of a few
    hundred sequences is the engine's most frequent step)."""
    seqs = batch.seqs
    positions = [seq.num_computed_tokens for seq in seqs]
    return _one_token_each(
        seqs, positions, [seq.token_ids[p] for seq, p in zip(seqs, positions)],
        [i for i, seq in enumerate(seqs) if seq.num_computed_tokens + 1 == seq.num_tokens],
        block_size)


def ahead_inputs(batch: ScheduledBatch, block_size: int) -> HostInputs:
    """A decode step launched ahead (engine/lookahead.py): each sequence computes the position one
    past its last recorded token; its input token is still on the device (input_ids here: zeros)."""
    seqs = batch.seqs
    return _one_token_each(seqs, [seq.num_tokens for seq in seqs], [0] * len(seqs),
                           list(range(len(seqs))), block_size)


def _one_token_each(seqs: list, positions: list[int], input_ids: list[int],
                    sampling_rows: list[int], block_size: int) -> HostInputs:
    return HostInputs(
        input_ids=input_ids,
        positions=positions,
        slots=[seq.block_table[p // block_size] * block_size + p % block_size
               for seq, p in zip(seqs, positions)],
        query_start_loc=list(range(len(seqs) + 1)),
        seq_lens=[p + 1 for p in positions],
        block_tables=[seq.block_table for seq in seqs],
        sampling_rows=sampling_rows,
        max_query_len=1)


def block_table_array(block_tables: list[list[int]]) -> np.ndarray:
    """(num_seqs, longest table) int32, each row padded with block 0. Filled a row at a time: a
    nested list through torch.tensor took about four times as long (6 ms for 49 tables of up to
    1,150 blocks on an H200 host), all of it before a mixed step's first kernel."""
    width = max(len(table) for table in block_tables)
    out = np.zeros((len(block_tables), width), dtype=np.int32)
    for row, table in enumerate(block_tables):
        out[row, :len(table)] = table
    return out
