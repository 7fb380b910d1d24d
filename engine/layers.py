"""Elementwise layers of the decoder, torch reference paths: fused residual RMSNorm and rotary
embedding (HF's rotate-half convention, with llama3 frequency scaling).

On a GPU the model calls the Triton kernels in `engine/kernels/`, which are tested against these.
"""

from __future__ import annotations

import math

import torch

from tandem.engine.attention import store_kv_reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); residual None means zero.

    Math is done in fp32 and cast back, as HF does, so results match it bit for bit on a CPU.
    """
    if residual is not None:
        x = x + residual
    residual_out = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual_out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), with llama3 scaling when `scaling` asks for it."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, max_positions: int, device: torch.device | str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_positions, head_dim), fp32."""
    pos = torch.arange(max_positions, dtype=torch.int64, device=device).float()
    freqs = torch.outer(pos, inv_freq.to(device))        # (max_positions, head_dim // 2)
    emb = torch.cat((freqs, freqs), dim=-1)              # (max_positions, head_dim)
    return emb.cos(), emb.sin()


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (num_tokens, num_heads, head_dim), k: (num_tokens, num_kv_heads, head_dim)."""
    c = cos[positions].unsqueeze(1)                      # (num_tokens, 1, head_dim)
    s = sin[positions].unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * c + rotated.float() * s).to(x.dtype)

    return rotate(q), rotate(k)


def prepare_qkv_reference(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor, q_weight: torch.Tensor | None,
                          k_weight: torch.Tensor | None, eps: float, kv_layer: torch.Tensor,
                          slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                          head_dim: int) -> torch.Tensor:
    """Attention's inputs from a fused QKV projection (num_tokens, (heads + 2 * kv_heads) *
    head_dim): q and k normalized per head (when the weights are given) and rotated, K and V stored
    at slot_mapping (slots < 0 are padding and skipped). Returns q (num_tokens, heads, head_dim)."""
    num_tokens = qkv.shape[0]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)      # (tokens, heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)   # (tokens, kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    if q_weight is not None:
        q = rms_norm_reference(q, q_weight, eps)[0]
        k = rms_norm_reference(k, k_weight, eps)[0]
    q, k = apply_rotary_reference(q, k, positions, cos, sin)
    keep = slot_mapping >= 0
    store_kv_reference(k[keep], v[keep], kv_layer, slot_mapping[keep])
    return q


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation: x is (num_tokens, 2 * intermediate), gate first, then up."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
