"""The decoder-only transformer behind Llama, Mistral, Qwen2 and Qwen3.

Pre-norm blocks of grouped-query attention and a SwiGLU MLP, with rotary position embeddings. The
families differ in three switches of ModelConfig: a bias on the q/k/v projections (Qwen2), an
RMSNorm on each head of q and k before rotary (Qwen3) and tied input/output embeddings.

q/k/v are one fused projection and gate/up another (the loader stacks HF's separate weights), so a
layer runs two matmuls where HF runs five. Attention reads and writes the paged KV cache
(engine/attention.py); the model itself holds no cache state.
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.engine import ops
from tandem.engine.attention import AttentionMetadata
from tandem.engine.layers import rope_cos_sin, rope_inv_freq
from tandem.engine.model_config import ModelConfig


def _linear(layer: nn.Linear, x: torch.Tensor, partial: bool = False
            ) -> torch.Tensor | ops.PartialSums:
    """The layer's matmul through ops (a decode step's few rows may take a Triton kernel). With
    `partial` the result may be split-K partial sums, which only an RMSNorm reads."""
    return ops.linear(x, layer.weight, layer.bias, partial)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qk_norm_eps = config.rms_norm_eps

    @property
    def q_norm_weight(self) -> torch.Tensor | None:
        return None if self.q_norm is None else self.q_norm.weight

    @property
    def k_norm_weight(self) -> torch.Tensor | None:
        return None if self.k_norm is None else self.k_norm.weight

    def project(self, x: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                slot_mapping: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> torch.Tensor:
        """q (tokens, heads, head_dim) of x, with K and V stored at slot_mapping (slots < 0
        skipped): the projection, qk-norm and rotary in one pass after the matmul."""
        qkv = _linear(self.qkv_proj, x)            # (tokens, (heads + 2 * kv_heads) * head_dim)
        return ops.prepare_qkv(qkv, positions, *rope, self.q_norm_weight, self.k_norm_weight,
                               self.qk_norm_eps, kv_layer, slot_mapping, self.num_heads,
                               self.num_kv_heads, self.head_dim)

    def project_and_attend(self, x: torch.Tensor, positions: torch.Tensor,
                           kv_layer: torch.Tensor, meta: AttentionMetadata,
                           rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """`project` then `attend` in one: a decode step's attention prepares q and stores K and
        V itself (ops.prepare_and_attend)."""
        qkv = _linear(self.qkv_proj, x)
        return ops.prepare_and_attend(qkv, positions, *rope, self.q_norm_weight,
                                      self.k_norm_weight, self.qk_norm_eps, kv_layer, meta,
                                      self.scale, self.num_heads, self.num_kv_heads,
                                      self.head_dim)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q over the paged context; (tokens, heads, head_dim), into `out` if given."""
        return ops.paged_attention(q, kv_layer, meta, self.scale, out)

    def output(self, attn: torch.Tensor) -> torch.Tensor | ops.PartialSums:
        """The output projection, for the post-attention norm only."""
        return _linear(self.o_proj, attn.reshape(attn.shape[0], self.q_size), partial=True)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | ops.PartialSums:
        """For the next norm only (the next layer's input norm or the model's final one)."""
        return _linear(self.down_proj, ops.swiglu(x, self.gate_up_proj.weight), partial=True)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    # A layer runs in two halves around attention, so that a CUDA graph can hold each half while
    # attention, whose launch depends on the step's sequences, runs eagerly (engine/step_graphs.py).

    def before_attention(self, x: torch.Tensor, residual: torch.Tensor | None,
                         positions: torch.Tensor, kv_layer: torch.Tensor,
                         slot_mapping: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, residual): the input norm and the q/k/v projection, K and V stored."""
        h, residual = self.input_layernorm(x, residual)
        return self.self_attn.project(h, positions, kv_layer, slot_mapping, rope), residual

    def attention(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                  kv_layer: torch.Tensor, meta: AttentionMetadata,
                  rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output, residual): the input norm, the q/k/v projection and attention, for
        a step whose whole layer runs in one piece (the model's own forward; captured step pieces
        cut the layer at attention, engine/step_graphs.py)."""
        h, residual = self.input_layernorm(x, residual)
        return self.self_attn.project_and_attend(h, positions, kv_layer, meta, rope), residual

    def after_attention(self, attn: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual): the output projection, the post-attention norm and the MLP."""
        h, residual = self.post_attention_layernorm(self.self_attn.output(attn), residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """Takes a flat batch of tokens, returns their final hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def init_rope(self, max_positions: int, device: torch.device) -> None:
        """cos/sin tables live outside the parameters: they are computed, never loaded."""
        inv_freq = rope_inv_freq(self.config.head_dim, self.config.rope_theta,
                                 self.config.rope_scaling)
        self.rope = rope_cos_sin(inv_freq, max_positions, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor) -> torch.Tensor:
        assert self.rope is not None, "init_rope() must run before the first forward"
        x = self.embed_tokens(input_ids)  # (num_tokens, hidden)
        residual = None
        for i, layer in enumerate(self.layers):
            kv_layer = kv_cache[:, i]  # (blocks, 2, block_size, kv_heads, head_dim)
            attn, residual = layer.attention(x, residual, positions, kv_layer, meta, self.rope)
            x, residual = layer.after_attention(attn, residual)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _linear(self.lm_head, hidden).float()  # (num_sampled, vocab)
