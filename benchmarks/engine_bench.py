"""Engine benchmark on one NVIDIA GPU, each figure next to the limit it is measured against.

  python benchmarks/engine_bench.py [--only itl,prefill,sweep,steps,mixed,throughput] [--hf]
                                    [--pdl 0,wait,1]

--pdl runs the per-model parts once for each programmatic-dependent-launch mode (TANDEM_PDL,
engine/kernels/pdl.py: 0 off, wait without the matmuls' weight prefetch, 1 both), each with its
own engine and captured graphs, so the modes compare within one run.

1. Batch-1 inter-token latency at 1k and 4k context (random:llama-3.1-8b, random:qwen3-0.6b), next
   to the roofline: (weight bytes + KV bytes read) / HBM bandwidth measured by a 1 GiB copy.
2. Prefill throughput at 1k and 4k tokens, next to FLOPs / measured bf16 matmul rate.
3. sweep: the decode step (its captured graph replayed) at batch 1, 32, 128 and 256 with 1k and 4k
   contexts, next to the same roofline.
   steps: decode steps as a serving worker runs them (`StepProbe.decode`: `LLMEngine.steps()`,
   graphs, lookahead, the contexts growing by one a step) at batch 1, 32, 64 and 128, from 1000,
   1024 and 4096 tokens (a step from 1024 reads 1025, just past a multiple of the decode
   attention's pieces, where 1000 is not); the same roofline beside each. Not in the default list.
4. mixed: a 2048-token prompt chunk scheduled beside 32 decoding sequences at 1k context (and 64 at
   4k, where aggregated serving of 4k prompts runs), against the chunk alone
   plus the decode step alone.
5. Offline throughput on nano-vllm's workload: 256 requests, input and output lengths uniform in
   [100, 1024], ignore_eos, seed 0 (both models), next to its roofline: the fewest decode steps
   (the longest output) each reading the weights, every generated token reading its context's KV,
   over the copy rate, plus the prompts' FLOPs over the matmul rate. With --hf, HF transformers
   on the same shapes, GPU and run: `generate` with static batches, and its continuous batching
   (`generate_batch`) where the installed version has it.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch


# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import copy_rate_gbs, matmul_tflops, median_us
from tandem import LLM, SamplingParams
from tandem.engine.kernels import skinny_gemm
from tandem.planner.profile_grid import Repeats
from tandem.planner.profile_points import StepProbe

ROWS: list[tuple[str, ...]] = []


def row(*cells) -> None:
    ROWS.append(tuple(str(c) for c in cells))
    print(" | ".join(ROWS[-1]), flush=True)


def weight_bytes(llm: LLM) -> int:
    return sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())


def kv_bytes(llm: LLM, context: int) -> int:
    config = llm.engine.model_config
    return config.kv_elements_per_token * context * llm.engine.dtype.itemsize


def timed_steps(llm: LLM, prompt: list[int], num_decode: int) -> tuple[float, list[float]]:
    """(prefill seconds, decode step seconds) of one request run alone."""
    engine = llm.engine
    engine.add_request("bench", prompt, SamplingParams(temperature=0, max_tokens=num_decode + 1,
                                                       ignore_eos=True))
    times = []
    start = time.perf_counter()
    # Each step's token is read back before it is yielded; the gap between yields is the
    # inter-token latency a caller sees, with the next step already queued (LLMEngine.steps).
    for _ in engine.steps():
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times[0], times[1:]


def bench_itl(model: str, hbm_gbs: float) -> None:
    release(None)
    llm = LLM(model=model, max_model_len=8192)
    weights = weight_bytes(llm)
    for context in (1024, 4096):
        prompt = [random.randrange(16, 2000) for _ in range(context)]
        timed_steps(llm, prompt[:64], 8)  # warm-up
        _, steps = timed_steps(llm, prompt, 64)
        itl_s = sorted(steps)[len(steps) // 2]
        moved = weights + kv_bytes(llm, context)
        roofline_s = moved / (hbm_gbs * 1e9)
        gpu_s = graph_replay_s(llm, context)
        row("itl", model, f"ctx {context}", f"{itl_s * 1e3:.2f} ms",
            f"{moved / itl_s / 1e9:.0f} GB/s", f"roofline {roofline_s * 1e3:.2f} ms",
            f"{roofline_s / itl_s:.0%} of roofline",
            f"GPU time of the step {gpu_s * 1e3:.2f} ms (host {1e3 * (itl_s - gpu_s):.2f} ms)")
    release(llm)


def graph_replay_s(llm: LLM, context: int) -> float:
    """GPU time of one batch-1 decode step alone: the captured graph replayed at `context`."""
    graphs = llm.engine.runner.graphs
    fill_decode(graphs, 1, context, llm.engine.config.block_size, llm.engine.num_blocks)
    return median_us(graphs.graphs[1].replay) / 1e6


def fill_decode(graphs, batch: int, context: int, block_size: int, num_blocks: int) -> bool:
    """Static graph inputs for `batch` sequences of `context` tokens on distinct blocks, writing
    nothing into the cache; False when the cache is too small for that."""
    per_seq = -(-context // block_size)
    if batch * per_seq > num_blocks:
        return False
    m = graphs.max_batch
    graphs.staged[3 * m:3 * m + batch] = context        # seq_lens, copied in by the graph
    graphs.staged[3 * m + batch:] = 0
    graphs.staged[2 * m:3 * m] = -1                     # slots: store nothing
    tables = torch.arange(batch * per_seq, device="cuda", dtype=torch.int32).view(batch, per_seq)
    graphs.block_tables[:batch, :per_seq] = tables
    return True


def bench_sweep(model: str, hbm_gbs: float) -> None:
    """Decode step time over batch size and context, next to the roofline."""
    release(None)
    llm = LLM(model=model, max_model_len=4096 + 64)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    weights = weight_bytes(llm)
    for context in (1024, 4096):
        for batch in (1, 32, 128, 256):
            if not fill_decode(graphs, batch, context, engine.config.block_size,
                               engine.num_blocks):
                row("sweep", model, f"batch {batch}", f"ctx {context}", "KV does not fit")
                continue
            step_s = median_us(graphs.graphs[batch].replay) / 1e6
            roofline_s = (weights + kv_bytes(llm, batch * context)) / (hbm_gbs * 1e9)
            row("sweep", model, f"batch {batch}", f"ctx {context}", f"{step_s * 1e3:.2f} ms",
                f"roofline {roofline_s * 1e3:.2f} ms", f"{step_s / roofline_s:.2f}x roofline")
    del engine, graphs
    release(llm)


def bench_steps(model: str, hbm_gbs: float) -> None:
    """Decode steps timed as serving runs them, next to the roofline."""
    release(None)
    llm = LLM(model=model, max_model_len=8192)
    probe, weights = StepProbe(llm.engine), weight_bytes(llm)
    for context in (1000, 1024, 4096):
        for batch in (1, 32, 64, 128):
            step_s = probe.decode(batch, context, Repeats(3, 10, 10))["seconds"]
            roofline_s = (weights + kv_bytes(llm, batch * context)) / (hbm_gbs * 1e9)
            row("steps", model, f"batch {batch}", f"from ctx {context}", f"{step_s * 1e3:.3f} ms",
                f"roofline {roofline_s * 1e3:.2f} ms", f"{step_s / roofline_s:.2f}x roofline")
    del probe
    release(llm)


def bench_mixed(model: str, chunk: int = 2048, batch: int = 32, context: int = 1024) -> None:
    """A prompt chunk beside a decode batch against each alone (engine steps, host included)."""
    release(None)
    llm = LLM(model=model, max_model_len=8192, max_num_batched_tokens=chunk + batch)
    probe = StepProbe(llm.engine)
    probe.warm_up(chunk)
    chunk_s = statistics.median(probe.prefill_once(chunk, 0) for _ in range(5))
    decode_s = probe.decode(batch, context, Repeats(3, 10, 10))["seconds"]
    decodes = probe.place_decodes(batch, context)
    mixed_s = statistics.median(probe.mixed_once(chunk, 0, decodes)[0] for _ in range(5))
    probe.clear()
    row("mixed", model, f"{chunk}-token chunk + {batch} decodes at ctx {context}",
        f"{mixed_s * 1e3:.2f} ms", f"chunk alone {chunk_s * 1e3:.2f} ms",
        f"decode alone {decode_s * 1e3:.2f} ms", f"{mixed_s / (chunk_s + decode_s):.2f}x their sum")
    del probe
    release(llm)


def bench_prefill(model: str, tflops: float) -> None:
    release(None)
    llm = LLM(model=model, max_model_len=8192, max_num_batched_tokens=4096)
    config = llm.engine.model_config
    linear_params = sum(p.numel() for name, p in llm.engine.runner.model.named_parameters()
                        if "embed" not in name and p.dim() == 2)
    for tokens in (1024, 4096):
        prompt = [random.randrange(16, 2000) for _ in range(tokens)]
        runs = []
        for _ in range(4):  # the first run compiles the kernels for this shape
            llm.engine.block_manager.reset_prefix_cache()  # a cache hit would skip the work
            runs.append(timed_steps(llm, prompt, 0)[0])
        seconds = min(runs[1:])
        attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * tokens**2 / 2
        flops = 2 * linear_params * tokens + attention
        achieved = flops / seconds / 1e12
        row("prefill", model, f"{tokens} tokens", f"{seconds * 1e3:.1f} ms",
            f"{achieved:.0f} TFLOP/s", f"matmul {tflops:.0f} TFLOP/s",
            f"{achieved / tflops:.0%} of matmul rate")
    release(llm)


def workload(seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(16, 2000) for _ in range(rng.randint(100, 1024))],
             rng.randint(100, 1024)) for _ in range(256)]


def bench_throughput(model: str, hf: bool, hbm_gbs: float, tflops: float,
                     max_num_batched_tokens: int) -> None:
    requests = workload()
    release(None)
    llm = LLM(model=model, max_num_batched_tokens=max_num_batched_tokens)
    llm.generate([p[:16] for p, _ in requests[:4]], SamplingParams(max_tokens=4))  # warm-up
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert num_out == sum(n for _, n in requests)
    roofline_s = throughput_roofline_s(llm, requests, hbm_gbs, tflops)
    row("throughput", model, f"256 req, step budget {max_num_batched_tokens} tokens",
        f"{num_out / seconds:.0f} tok/s", f"{seconds:.1f} s",
        f"{num_out} output tokens", f"roofline {num_out / roofline_s:.0f} tok/s "
        f"({roofline_s:.1f} s)", f"{roofline_s / seconds:.0%} of roofline")
    config = llm.engine.model_config
    del llm, outputs
    release(None)
    if hf:
        bench_hf(config, requests)


def throughput_roofline_s(llm: LLM, requests: list[tuple[list[int], int]], hbm_gbs: float,
                          tflops: float) -> float:
    """No schedule runs the workload faster: at least max(output) decode steps, each reading the
    weights; every generated token reading its context's KV; the prompts' matmul FLOPs."""
    max_steps = max(n for _, n in requests)
    kv_tokens = sum(len(p) * n + n * (n - 1) // 2 for p, n in requests)
    bytes_moved = max_steps * weight_bytes(llm) + kv_bytes(llm, kv_tokens)
    linear_params = sum(p.numel() for name, p in llm.engine.runner.model.named_parameters()
                        if "embed" not in name and p.dim() == 2)
    prompt_flops = 2 * linear_params * sum(len(p) for p, _ in requests)
    return bytes_moved / (hbm_gbs * 1e9) + prompt_flops / (tflops * 1e12)


def bench_hf(config, requests, batch_size: int = 64) -> None:
    import transformers
    hf_config = transformers.Qwen3Config(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, rope_theta=config.rope_theta)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16)
    model.eval()
    # Static batches: each batch is padded on the left and runs until its longest output is done.
    subset = requests[:batch_size]
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(subset), batch_size):
            chunk = subset[i:i + batch_size]
            width = max(len(p) for p, _ in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in chunk], device="cuda")
            mask = (torch.arange(width, device="cuda")[None, :]
                    >= torch.tensor([width - len(p) for p, _ in chunk], device="cuda")[:, None])
            model.generate(ids, attention_mask=mask.long(), do_sample=False,
                           max_new_tokens=max(n for _, n in chunk),
                           min_new_tokens=max(n for _, n in chunk), pad_token_id=0)
    seconds = time.perf_counter() - start
    useful = sum(n for _, n in subset)
    row("throughput", "HF generate", f"{len(subset)} req, static batch {batch_size}",
        f"{useful / seconds:.0f} tok/s", f"{seconds:.1f} s", f"{useful} useful output tokens",
        f"transformers {transformers.__version__}")
    if hasattr(model, "generate_batch"):
        from transformers import GenerationConfig
        gen = GenerationConfig(max_new_tokens=1024, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
        inputs = [p for p, _ in subset]
        start = time.perf_counter()
        try:
            model.generate_batch(inputs=inputs, generation_config=gen)
            seconds = time.perf_counter() - start
            row("throughput", "HF generate_batch", f"{len(subset)} req, max_new 1024",
                f"{len(subset) * 1024 / seconds:.0f} tok/s", f"{seconds:.1f} s", "", "")
        except Exception as err:  # an API that differs by version: report, don't hide
            row("throughput", "HF generate_batch", "failed", type(err).__name__, str(err)[:80])
    del model
    release(None)


def release(llm: LLM | None) -> None:
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def bench_models(parts: list[str], hbm: float, tflops: float) -> None:
    for model in ("random:llama-3.1-8b", "random:qwen3-0.6b"):
        if "itl" in parts:
            bench_itl(model, hbm)
        if "prefill" in parts:
            bench_prefill(model, tflops)
        if "sweep" in parts:
            bench_sweep(model, hbm)
        if "steps" in parts:
            bench_steps(model, hbm)
        if "mixed" in parts:
            bench_mixed(model)
            bench_mixed(model, batch=64, context=4096)  # aggregated serving at ISL 4096


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="itl,prefill,sweep,mixed,throughput")
    parser.add_argument("--hf", action="store_true")
    parser.add_argument("--pdl", default=None, help="comma-separated TANDEM_PDL modes to compare")
    args = parser.parse_args()
    random.seed(0)
    hbm, tflops = copy_rate_gbs(), matmul_tflops()
    row("hardware", torch.cuda.get_device_name(), f"copy {hbm:.0f} GB/s",
        f"bf16 matmul {tflops:.0f} TFLOP/s")
    parts = args.only.split(",")
    for mode in args.pdl.split(",") if args.pdl else [None]:
        if mode is not None:
            os.environ["TANDEM_PDL"] = mode
            skinny_gemm._chosen.clear()  # each mode times its own matmul choices
            row("pdl", f"TANDEM_PDL={mode}")
        bench_models(parts, hbm, tflops)
    if "throughput" in parts:
        # The serving default step budget (2048 tokens), and a larger one for offline batches.
        for model in ("random:qwen3-0.6b", "random:llama-3.1-8b"):
            for budget in (2048, 8192):
                bench_throughput(model, args.hf and model == "random:qwen3-0.6b" and budget == 2048,
                                 hbm, tflops, budget)
    print("\n".join(" | ".join(r) for r in ROWS))


if __name__ == "__main__":
    main()
