"""Decode steps whose contexts are uneven (one long context among short ones) against steps of the
same batch and the same total context spread evenly.

A profile places its decode batches with one context length for every sequence, and the
performance model prices a decode step by its batch size and total context. Serving batches are
uneven: on the conversation trace one 20-30k-token conversation decodes beside short ones. This
times both kinds of step as serving runs them (`StepProbe.decode_contexts`: through
`LLMEngine.steps()`, CUDA graphs, lookahead) and prints how much the uneven one costs over the
even one.

    python benchmarks/uneven_decode_bench.py [--model random:llama-3.1-8b] [--batches 8,32,64]
"""

from __future__ import annotations

import argparse

from tandem import LLM
from tandem.planner.profile_grid import Repeats
from tandem.planner.profile_points import StepProbe

REPEATS = Repeats(warmup=3, min_timed=10, max_timed=10)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def uneven(batch: int, short: int, long: int) -> list[int]:
    """One sequence of `long` tokens, the others of `short`."""
    return [long] + [short] * (batch - 1)


def even(contexts: list[int]) -> list[int]:
    """As many sequences, the same total context, spread evenly."""
    total, batch = sum(contexts), len(contexts)
    return [total // batch + (i < total % batch) for i in range(batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--batches", default="4,8,16,32,64,96")
    parser.add_argument("--short", default="1000,3000", help="the short contexts' tokens")
    parser.add_argument("--long", default="16000,30000", help="the long context's tokens")
    parser.add_argument("--max-model-len", type=int, default=32768)
    args = parser.parse_args()
    llm = LLM(model=args.model, max_model_len=args.max_model_len)
    probe = StepProbe(llm.engine)
    print(f"{args.model}: decode step, one long context among short ones, against the same "
          f"total context spread evenly (median of {REPEATS.min_timed} steps)")
    print("| batch | short | long | total context | even ms | uneven ms | uneven / even |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for batch in _ints(args.batches):
        for short in _ints(args.short):
            for long in _ints(args.long):
                contexts = uneven(batch, short, long)
                even_s = probe.decode_contexts(even(contexts), REPEATS)["seconds"]
                uneven_s = probe.decode_contexts(contexts, REPEATS)["seconds"]
                print(f"| {batch} | {short} | {long} | {sum(contexts)} | {even_s * 1e3:.2f} | "
                      f"{uneven_s * 1e3:.2f} | {uneven_s / even_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
