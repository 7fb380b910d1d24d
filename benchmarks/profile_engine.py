"""Where the engine's time goes, on one NVIDIA GPU: kernels per decode step and per prefill, and host
against device time in an offline throughput run.

  python benchmarks/profile_engine.py [--only decode,prefill,replay,throughput] [--model M ...]

- decode: for each batch size and context, the kernels of one decode step (the captured graph's
  forward, run eagerly under torch.profiler so every kernel is its own record), grouped by kernel
  name, with the step's graph replay time beside the roofline (weights + KV read / copy rate).
- prefill: the kernels of one prompt of 4096 tokens.
- replay: the kernels of one decode step as its captured graph replays them (with programmatic
  launch they overlap): each kernel charged the time it runs past the end of every kernel before
  it, by kernel name, and the start and length of each kernel of one layer in the middle.
- throughput: nano-vllm's workload (engine_bench.py) with each phase of a step timed on the host:
  scheduling, input preparation and launch, the wait for the sampled tokens, postprocessing,
  detokenization (which LLM.generate overlaps with the next step's device work).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# benchmarks/ and tests/ hold helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_bench import fill_decode, release, workload
from benchmarks.hardware import copy_rate_gbs, median_us
from tandem import LLM, SamplingParams


def kernel_table(prof, num_steps: int, top: int = 14) -> list[tuple[str, float, int]]:
    """(kernel name, us per step, calls per step), largest first."""
    times: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.key] += event.device_time_total / num_steps
            calls[event.key] += event.count // num_steps
    ranked = sorted(times.items(), key=lambda kv: -kv[1])
    return [(name[:70], us, calls[name]) for name, us in ranked[:top]]


def profile_decode(model: str, hbm_gbs: float, batches: list[int], contexts: list[int],
                   profiled: tuple[int, ...] = (1, 32, 256)) -> None:
    llm = LLM(model=model, max_model_len=max(contexts) + 64)
    engine = llm.engine
    graphs = engine.runner.graphs
    weights = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    kv_per_token = engine.model_config.kv_elements_per_token * engine.dtype.itemsize
    for context in contexts:
        for batch in batches:
            bucket = next(b for b in graphs.sizes if b >= batch)
            if not fill_decode(graphs, bucket, context, engine.config.block_size,
                               engine.num_blocks):
                print(f"decode {model} batch {batch} ctx {context}: KV does not fit, skipped")
                continue
            step_us = median_us(graphs.graphs[bucket].replay)
            moved = weights + batch * context * kv_per_token
            roof_us = moved / hbm_gbs / 1e3
            print(f"| decode | {model} | {batch} | {context} | {step_us:.0f} us | "
                  f"roofline {roof_us:.0f} us | {step_us / roof_us:.2f}x |", flush=True)
            if batch in profiled and context == contexts[0]:
                with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(4):
                        graphs._forward(bucket)
                    torch.cuda.synchronize()
                for name, us, calls in kernel_table(prof, 4):
                    print(f"    {us:8.1f} us  x{calls:<4d} {name}")


def critical_times(kernels: list[tuple[str, float, float]]
                   ) -> tuple[dict[str, float], dict[str, int], float]:
    """From (name, start, end) in start order: per name, the time its kernels ran past the end of
    every kernel before them (overlapping kernels are not counted twice) and their count; and the
    time no kernel ran."""
    charged: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    idle, last_end = 0.0, kernels[0][1] if kernels else 0.0
    for name, start, end in kernels:
        idle += max(start - last_end, 0.0)
        charged[name] += max(end - max(start, last_end), 0.0)
        calls[name] += 1
        last_end = max(last_end, end)
    return dict(charged), dict(calls), idle


def profile_replay(model: str, batches: list[int], context: int, replays: int = 3) -> None:
    llm = LLM(model=model, max_model_len=context + 64)
    engine, graphs = llm.engine, llm.engine.runner.graphs
    for batch in batches:
        bucket = next(b for b in graphs.sizes if b >= batch)
        if not fill_decode(graphs, bucket, context, engine.config.block_size, engine.num_blocks):
            continue
        graph = graphs.graphs[bucket]
        step_us = median_us(graph.replay)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
        events = sorted((e for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA),
                        key=lambda e: e.time_range.start)
        last = events[-len(events) // replays:]  # the last replay
        origin = last[0].time_range.start
        kernels = [(e.name[:60], e.time_range.start - origin, e.time_range.end - origin)
                   for e in last]
        charged, calls, idle = critical_times(kernels)
        print(f"replay {model} batch {batch} ctx {context}: {step_us:.0f} us a replay, "
              f"{len(kernels)} kernels, {idle:.0f} us with none running")
        for name, us in sorted(charged.items(), key=lambda kv: -kv[1]):
            print(f"    {us:8.1f} us  x{calls[name]:<4d} {name}")
        per_layer = (len(kernels) - 4) // len(engine.runner.model.layers)
        middle = len(kernels) // 2
        print("  one layer, start and length (us):")
        for name, start, end in kernels[middle:middle + per_layer + 1]:
            print(f"    {start:9.1f} {end - start:7.1f}  {name}")


def profile_prefill(model: str, tokens: int = 4096) -> None:
    llm = LLM(model=model, max_model_len=8192, max_num_batched_tokens=tokens)
    engine = llm.engine
    prompt = list(range(100, 100 + tokens))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for i in range(3):
        engine.block_manager.reset_prefix_cache()
        engine.add_request(f"w{i}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
    engine.block_manager.reset_prefix_cache()
    engine.add_request("p", prompt, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        engine.step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    table = kernel_table(prof, 1, top=16)
    gpu_us = sum(t for _, t, _ in kernel_table(prof, 1, top=10_000))
    print(f"prefill {model} {tokens} tokens: wall {wall * 1e3:.1f} ms (profiled), "
          f"kernel time {gpu_us / 1e3:.1f} ms")
    for name, us, calls in table:
        print(f"    {us:8.1f} us  x{calls:<4d} {name}")
    host = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                  key=lambda e: -e.self_cpu_time_total)[:12]
    print("  host (self CPU time):")
    for event in host:
        print(f"    {event.self_cpu_time_total:8.1f} us  x{event.count:<4d} {event.key[:70]}")


def profile_throughput(model: str) -> None:
    """The throughput workload with each phase of every step timed on the host."""
    requests = workload()
    llm = LLM(model=model)
    engine = llm.engine
    llm.generate([p[:16] for p, _ in requests[:4]], SamplingParams(max_tokens=4))
    phases: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            phases[name] += time.perf_counter() - start
            counts[name] += 1
            return result
        return wrapper

    runner = engine.runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.postprocess = timed("postprocess", engine.scheduler.postprocess)
    runner.launch = timed("launch (inputs, forward and sampling queued)", runner.launch)
    runner.collect = timed("collect (wait for the tokens)", runner.collect)
    llm.processor.process = timed("detokenize (output processor)", llm.processor.process)
    graph_steps = [0]
    can_run = runner.graphs.can_run

    def counting(host):
        ok = can_run(host)
        graph_steps[0] += ok
        return ok
    runner.graphs.can_run = counting
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate([p for p, _ in requests], params)
    seconds = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    steps = counts["schedule"]
    print(f"throughput {model}: {num_out / seconds:.0f} tok/s, {seconds:.2f} s, {steps} steps "
          f"({graph_steps[0]} as graphs), {seconds / steps * 1e3:.2f} ms per step")
    for name, total in phases.items():
        print(f"    {name:50s} {total:7.2f} s  {total / steps * 1e3:6.2f} ms/step")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="decode,prefill,throughput")
    parser.add_argument("--model", nargs="+", default=["random:qwen3-0.6b", "random:llama-3.1-8b"])
    parser.add_argument("--batches", default="1,32,128,256")
    parser.add_argument("--contexts", default="1024,4096")
    args = parser.parse_args()
    parts = args.only.split(",")
    hbm = copy_rate_gbs()
    print(f"{torch.cuda.get_device_name()}: copy {hbm:.0f} GB/s")
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    for model in args.model:
        if "decode" in parts:
            profile_decode(model, hbm, batches, contexts)
            release(None)  # the engine is gone once the function returns
        if "prefill" in parts:
            profile_prefill(model)
            release(None)
        if "replay" in parts:
            profile_replay(model, batches, contexts[0])
            release(None)
    if "throughput" in parts:
        profile_throughput("random:qwen3-0.6b")


if __name__ == "__main__":
    main()
