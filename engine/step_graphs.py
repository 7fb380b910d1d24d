"""CUDA graphs for the steps that are not decode-only: prompt chunks, alone or beside decodes.

Launched eagerly such a step costs the host about 12 ms whatever its size (about ten launches per
layer at 30-40 us each, measured on H200 for llama-3.1-8b and qwen3-0.6b), more than the device
needs for a few hundred tokens: every admission of a new request into a decode batch stalled the
batch that long, and longer again when the worker's event loop wanted the GIL meanwhile.

A step's attention depends on its sequences (how many, their query and context lengths), so it
stays eager; the rest of each layer does not, so it is captured, per bucket of token counts, in
pieces that run from one layer's attention to the next. A step of n tokens runs the pieces of the
smallest bucket that holds it:

    piece 0        embed, layer 0 before attention          -> Q, R
    attention 0    eager, rows :n of Q                      -> A
    piece l        layer l-1 after attention, layer l before -> Q, R
    ...
    piece L        layer L-1 after attention, the final norm -> H

Q, R, A and H are static buffers, sized for the largest bucket, that carry a step from one piece
to the next; whatever a piece makes on the way lives in the graphs' pool. Padding rows keep the
tokens and positions an earlier step left there, with slot -1 (the KV store skips them); attention
never reads them, and every other op works row by row, so they touch no real row.
"""

from __future__ import annotations

import logging

import torch

from tandem.engine.step_buckets import bucket_sizes, padded_tokens
from tandem.engine.step_inputs import ModelInputs
from tandem.engine.models.decoder import DecoderModel

logger = logging.getLogger(__name__)


class StepGraphs:
    def __init__(self, model: DecoderModel, kv_cache: torch.Tensor, max_tokens: int):
        config = model.config
        device, dtype = kv_cache.device, kv_cache.dtype
        self.model = model
        self.kv_layers = [kv_cache[:, i] for i in range(config.num_layers)]
        self.max_tokens = max_tokens
        self.sizes = bucket_sizes(max_tokens)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.q = torch.zeros(max_tokens, config.num_heads, config.head_dim, dtype=dtype,
                             device=device)
        self.attn = torch.zeros_like(self.q)
        self.residual = torch.zeros(max_tokens, config.hidden_size, dtype=dtype, device=device)
        self.hidden = torch.zeros_like(self.residual)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _piece(self, index: int, n: int) -> None:
        """Piece `index` of a bucket of n tokens: from layer index-1's attention output to layer
        index's query (or the final hidden states)."""
        model = self.model
        if index == 0:
            x, residual = model.embed_tokens(self.input_ids[:n]), None
        else:
            x, residual = model.layers[index - 1].after_attention(self.attn[:n],
                                                                 self.residual[:n])
        if index == len(model.layers):
            self.hidden[:n].copy_(model.norm(x, residual)[0])
            return
        q, residual = model.layers[index].before_attention(
            x, residual, self.positions[:n], self.kv_layers[index], self.slot_mapping[:n],
            model.rope)
        self.q[:n].copy_(q)
        self.residual[:n].copy_(residual)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Captures every bucket's pieces, largest first, into `pool` (a graph pool to share)."""
        free_before = torch.cuda.mem_get_info()[0]
        num_pieces = len(self.model.layers) + 1
        for n in reversed(self.sizes):
            for index in range(num_pieces):
                self._piece(index, n)  # warm up: Triton compiles, matmuls are chosen, outside
            torch.cuda.synchronize()
            pieces = []
            for index in range(num_pieces):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(index, n)
                pool = graph.pool() if pool is None else pool
                pieces.append(graph)
            self.graphs[n] = pieces
        torch.cuda.synchronize()
        used_mib = (free_before - torch.cuda.mem_get_info()[0]) / 2**20
        logger.info("captured step CUDA graphs for %d token counts up to %d, %d pieces each "
                    "(%.0f MiB)", len(self.sizes), self.max_tokens, num_pieces, used_mib)

    def can_run(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        """Final hidden states (num_tokens, hidden) of a step: the pieces replayed, attention
        launched between them."""
        n = inputs.input_ids.shape[0]
        bucket = padded_tokens(n, self.max_tokens)
        self.input_ids[:n].copy_(inputs.input_ids)
        self.positions[:n].copy_(inputs.positions)
        self.slot_mapping[:n].copy_(inputs.meta.slot_mapping)
        self.slot_mapping[n:bucket].fill_(-1)  # a larger step before may have left real slots
        q, attn = self.q[:n], self.attn[:n]
        pieces = self.graphs[bucket]
        for layer, piece, kv_layer in zip(self.model.layers, pieces, self.kv_layers):
            piece.replay()
            layer.self_attn.attend(q, kv_layer, inputs.meta, out=attn)
        pieces[-1].replay()
        return self.hidden[:n]
