"""CUDA graphs for decode steps.

A decode step of a large model at small batch is a few hundred short kernels; launching them one by
one from Python costs more than running them. Each batch-size bucket is captured once, model forward
and LM head together, over static input buffers; a step copies its inputs into the buffers and
replays the graph of the smallest bucket that fits. Padding rows get slot -1 (the KV store skips
them) and seq_len 0 (the decode kernel writes zeros for them), so they touch nothing real.

The decode kernel's number of KV splits is fixed per bucket at capture, from the longest context the
engine serves; the pieces each sequence's context is cut into are computed on the GPU from seq_lens
at the step's start (kernels/decode_pieces.py), so one graph serves every mix of context lengths.
"""

from __future__ import annotations

import logging

import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.step_buckets import decode_batch_sizes
from tandem.engine.step_inputs import HostInputs
from tandem.engine.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, kv_cache: torch.Tensor, max_batch: int,
                 max_seq_len: int, block_size: int):
        from tandem.engine.kernels.decode_attention import choose_num_splits
        from tandem.engine.kernels.decode_pieces import Pieces

        self.model = model
        self.kv_cache = kv_cache
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        device = kv_cache.device
        max_blocks = -(-max_seq_len // block_size)
        self.sizes = list(decode_batch_sizes(max_batch))
        # Staging: input ids, positions, slots and lengths side by side, max_batch each, so that
        # one copy moves them; the graphs read views of it. Two pinned buffers, used in turn: a
        # step launched ahead fills one while the previous step's copy may still read the other.
        self.staged_pinned = [torch.zeros(4 * max_batch, dtype=torch.int64, pin_memory=True)
                              for _ in range(2)]
        self.staged = torch.zeros(4 * max_batch, dtype=torch.int64, device=device)
        self.staged[2 * max_batch:3 * max_batch] = -1
        self.tables_pinned = [torch.zeros(max_batch, max_blocks, dtype=torch.int32,
                                          pin_memory=True) for _ in range(2)]
        self.turn = 0
        self.input_ids = self.staged[0:max_batch]
        self.positions = self.staged[max_batch:2 * max_batch]
        self.slot_mapping = self.staged[2 * max_batch:3 * max_batch]
        self.seq_lens_staged = self.staged[3 * max_batch:]
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.num_splits = {bs: choose_num_splits(bs, model.config.num_kv_heads, max_seq_len, device)
                           for bs in self.sizes}
        self.pieces = Pieces.empty(max_batch, max(self.num_splits.values()), device)
        self.pool = None

    def _meta(self, batch: int) -> AttentionMetadata:
        from tandem.engine.kernels.decode_attention import step_pieces

        num_splits = self.num_splits[batch]
        pieces = step_pieces(self.seq_lens[:batch], self.model.config.num_kv_heads, num_splits,
                             self.pieces.view(batch, num_splits))
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:batch + 1], seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch], slot_mapping=self.slot_mapping[:batch],
            max_query_len=1, max_seq_len=self.max_seq_len, query_start_loc_cpu=[],
            seq_lens_cpu=[], num_splits=num_splits, pieces=pieces)

    def _forward(self, batch: int) -> torch.Tensor:
        self.seq_lens[:batch].copy_(self.seq_lens_staged[:batch])  # int64 -> int32, in the graph
        # The piece table, made here, ahead of every kernel that may launch programmatically.
        meta = self._meta(batch)
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], meta, self.kv_cache)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        from tandem.engine.kernels import pdl   # CUDA only: Triton is usable here
        free_before = torch.cuda.mem_get_info()[0]
        for batch in reversed(self.sizes):  # largest first: it sizes the pool
            programmatic = batch <= pdl.DECODE_MAX_BATCH
            with pdl.programmatic_launches(programmatic):
                self._forward(batch)  # warm up: Triton compiles outside the capture
            if programmatic:  # and the plain variants, which eager steps of as many rows launch
                self._forward(batch)
            torch.cuda.synchronize()
            with pdl.programmatic_launches(programmatic):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[batch] = self._forward(batch)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()
        used_mib = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info("captured decode CUDA graphs for batch sizes %s (%.0f MiB)",
                    sorted(self.graphs), used_mib)

    def can_run(self, host: HostInputs) -> bool:
        return (host.is_decode_only and len(host.seq_lens) <= self.max_batch
                and max(host.seq_lens) <= self.max_seq_len)

    def run(self, host: HostInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (num_seqs, vocab) of a decode-only batch.

        The step's vectors go to the GPU as one copy from pinned memory, and its block table as
        another; padding rows get slot -1 and length 0. `input_ids`, a device tensor, replaces
        host.input_ids (a step launched ahead reads the previous step's sampled tokens there).
        """
        n = len(host.seq_lens)
        batch = next(b for b in self.sizes if b >= n)
        m = self.max_batch
        self.turn ^= 1
        staged_pinned, tables_pinned = self.staged_pinned[self.turn], self.tables_pinned[self.turn]
        staged = staged_pinned.numpy()
        if input_ids is None:
            staged[0:n] = host.input_ids
        staged[m:m + n] = host.positions
        staged[2 * m:2 * m + n] = host.slots
        staged[2 * m + n:2 * m + batch] = -1
        staged[3 * m:3 * m + n] = host.seq_lens
        staged[3 * m + n:3 * m + batch] = 0
        self.staged.copy_(staged_pinned, non_blocking=True)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        # Entries past a row's own blocks keep whatever they held: the kernel reads only the
        # blocks that seq_len covers.
        tables = tables_pinned.numpy()
        width = 0
        for row, table in enumerate(host.block_tables):
            tables[row, :len(table)] = table
            width = max(width, len(table))
        self.block_tables[:n, :width].copy_(tables_pinned[:n, :width], non_blocking=True)
        self.graphs[batch].replay()
        return self.logits[batch][:n]
