"""Compiles while serving: how many of a decode step's eager shapes make Triton compile a new
variant of the decode-attention kernels, and what each costs the batch that waits for it.

A mixed step (a prompt chunk beside running decodes) runs eagerly, and its decode rows call
decode attention with that step's batch size and longest context. Every argument Triton
specializes on (an int's class: 1, a multiple of 16, other; a constexpr such as the merge's
width) can compile a new variant the first time a value of a new class shows up, which stalls
every running sequence of that worker for the compile. This sweeps batch sizes 1-32 over
contexts of 40-4100 tokens, each shape called once on a fresh Triton cache, and counts the calls
that took over 20 ms; then it times a few shapes at steady state.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/kernel_compile_bench.py \\
        [--against OTHER/decode_attention.py]

`--against` loads another version of engine/kernels/decode_attention.py (for example
`git show REV:engine/kernels/decode_attention.py > old.py`) and reports both, with the largest
difference between their outputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

# benchmarks/ holds helpers; appended, so an installed tandem still wins.
sys.path.append(str(Path(__file__).resolve().parents[1]))

from benchmarks.hardware import median_us

KERNEL = Path(__file__).resolve().parents[1] / "engine" / "kernels" / "decode_attention.py"
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 32, 8, 128, 16, 4096   # llama-3.1-8b
STALL_S = 0.02


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_call(module, kv: torch.Tensor, batch: int, context: int, seed: int = 0):
    generator = torch.Generator(device=kv.device).manual_seed(seed)
    query = torch.randn(batch, HEADS, HEAD_DIM, device=kv.device, dtype=kv.dtype,
                        generator=generator)
    out = torch.empty_like(query)
    tables = torch.randint(0, NUM_BLOCKS, (batch, -(-context // BLOCK_SIZE)), dtype=torch.int32,
                           device=kv.device, generator=generator)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=kv.device)
    return lambda: module.decode_attention(query, kv, tables, lengths, HEAD_DIM ** -0.5, out,
                                           max_seq_len=context)


def sweep(module, kv: torch.Tensor) -> tuple[list[tuple[int, int, float]], int]:
    stalls, calls = [], 0
    if hasattr(module, "compile_variants"):  # what an engine does at start-up, untimed
        module.compile_variants(kv, HEADS)
    elif hasattr(module, "compile_merge_widths"):
        module.compile_merge_widths(HEAD_DIM, kv.dtype, kv.device)
    for context in (40, 130, 300, 520, 700, 1000, 1150, 2100, 4100):
        for batch in range(1, 33):
            run = shape_call(module, kv, batch, context)
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            took = time.perf_counter() - start
            calls += 1
            if took > STALL_S:
                stalls.append((batch, context, took * 1e3))
    return stalls, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", type=Path, default=None,
                        help="another decode_attention.py to compare with")
    args = parser.parse_args()
    kv = torch.randn(NUM_BLOCKS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda",
                     dtype=torch.bfloat16)
    versions = {"this": load("decode_attention_this", KERNEL)}
    if args.against is not None:
        versions["against"] = load("decode_attention_against", args.against)
    for name, module in versions.items():
        stalls, calls = sweep(module, kv)
        print(f"{name}: {len(stalls)} of {calls} eager shapes took over {STALL_S * 1e3:.0f} ms "
              f"(compiles), {sum(s[2] for s in stalls):.0f} ms in all; first: "
              f"{[(b, c, round(ms)) for b, c, ms in stalls[:10]]}", flush=True)
    for batch, context in ((1, 1024), (1, 4096), (8, 1024), (32, 1024)):
        runs = {name: shape_call(module, kv, batch, context, seed=1)
                for name, module in versions.items()}
        results = {name: run().clone() for name, run in runs.items()}
        times = ", ".join(f"{name} {median_us(run):.1f} us" for name, run in runs.items())
        diff = ""
        if len(results) == 2:
            this, other = results.values()
            diff = f", max |difference| {float((this.float() - other.float()).abs().max()):.1e}"
        print(f"batch {batch}, context {context}: {times}{diff}", flush=True)


if __name__ == "__main__":
    main()
