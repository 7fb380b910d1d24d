"""Where a batch-1 decode step of random:llama-3.1-8b spends its GPU time.

  python benchmarks/profile_decode.py

Times each kind of kernel of one layer alone at batch 1 (the projections as cuBLAS runs them, the
decode attention at 1k context, the fused norms and rotary), scales by the layer count and sets the
sum beside the replayed CUDA graph of the whole step and beside the HBM roofline of each part.
"""

from __future__ import annotations

import torch

from benchmarks.hardware import copy_rate_gbs, median_us
from tandem import LLM
from tandem.engine import kernels


def main() -> None:
    hbm = copy_rate_gbs()
    llm = LLM(model="random:llama-3.1-8b", max_model_len=8192, num_kv_blocks=2048)
    model = llm.engine.runner.model
    config = model.config
    layer = model.layers[0]
    x = torch.randn(1, config.hidden_size, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(1, config.intermediate_size, dtype=torch.bfloat16, device="cuda")
    q = torch.randn(1, config.num_heads * config.head_dim, dtype=torch.bfloat16, device="cuda")
    parts = {
        "qkv_proj": (lambda: layer.self_attn.qkv_proj(x), layer.self_attn.qkv_proj.weight),
        "o_proj": (lambda: layer.self_attn.o_proj(q), layer.self_attn.o_proj.weight),
        "gate_up_proj": (lambda: layer.mlp.gate_up_proj(x), layer.mlp.gate_up_proj.weight),
        "down_proj": (lambda: layer.mlp.down_proj(h), layer.mlp.down_proj.weight),
    }
    rows = []
    total_us = 0.0
    for name, (fn, weight) in parts.items():
        us = median_us(fn)
        nbytes = weight.numel() * weight.element_size()
        rows.append((name, us * config.num_layers, nbytes * config.num_layers / us / 1e3))
        total_us += us * config.num_layers
    head_us = median_us(lambda: model.compute_logits(x))
    head_bytes = model.lm_head.weight.numel() * 2
    rows.append(("lm_head + fp32 logits", head_us, head_bytes / head_us / 1e3))
    total_us += head_us
    norm_us = median_us(lambda: kernels.rms_norm(x, layer.input_layernorm.weight, 1e-5, x))
    rows.append(("2 fused rms_norm per layer", 2 * norm_us * config.num_layers, 0.0))
    total_us += 2 * norm_us * config.num_layers
    graphs = llm.engine.runner.graphs
    graphs.seq_lens[:1].fill_(1024)
    graphs.slot_mapping[:1].fill_(-1)
    graphs.block_tables[0, :64] = torch.arange(64, device="cuda")
    step_us = median_us(graphs.graphs[1].replay)
    weights = sum(p.numel() * 2 for p in model.parameters())
    print(f"HBM copy rate {hbm:.0f} GB/s; weights {weights / 1e9:.2f} GB; "
          f"roofline {weights / hbm / 1e3:.0f} us")
    for name, us, gbs in rows:
        print(f"{name:28s} {us:8.0f} us  {gbs:6.0f} GB/s  ({gbs / hbm:.0%} of copy rate)")
    print(f"{'sum of the parts above':28s} {total_us:8.0f} us")
    print(f"{'whole step (graph replay)':28s} {step_us:8.0f} us; the rest (attention, rotary, "
          f"activation, embedding, gaps): {step_us - total_us:.0f} us")


if __name__ == "__main__":
    main()
