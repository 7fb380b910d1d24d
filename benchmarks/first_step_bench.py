"""Steps that stall the first time their shape is seen: an engine's eager steps, each run twice.

An engine compiles its kernels' variants at start-up so that no serving step waits for a compile
(`ModelRunner.compile_kernel_variants`, the graph captures). A step whose shape reaches a variant
that was not compiled then stops every sequence of its worker for the compile, a second or so.
This starts an engine as serving does, then runs each shape of a sweep twice: prompt chunks of
several sizes after several prefixes, alone and beside decodes of short and long contexts. A first
run far over the second is a stall; the table lists every shape and marks them.

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/first_step_bench.py [--model random:qwen3-0.6b]

A fresh Triton cache matters: a variant compiled by an earlier process is found on disk, and that
process's stall would not show here.
"""

from __future__ import annotations

import argparse

from tandem import LLM
from tandem.planner.profile_points import StepProbe

STALL_S = 0.05   # a first run this much over the second: a compile, not noise


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random:qwen3-0.6b")
    parser.add_argument("--chunks", default="5,64,65,700,1900", help="prompt tokens of the step")
    parser.add_argument("--cached", default="0,4091", help="prefix tokens before the chunk")
    parser.add_argument("--decodes", default="0,1,2,5,13", help="decode rows beside the chunk")
    parser.add_argument("--contexts", default="600,20000", help="each decode row's context")
    parser.add_argument("--max-model-len", type=int, default=32768)
    args = parser.parse_args()
    chunks, cached_list, contexts = _ints(args.chunks), _ints(args.cached), _ints(args.contexts)
    llm = LLM(model=args.model, max_model_len=args.max_model_len,
              max_num_batched_tokens=max(chunks) + max(_ints(args.decodes)))
    probe = StepProbe(llm.engine)
    print(f"{args.model}: each shape's first and second run")
    print("| chunk | cached | decodes x context | first ms | second ms | stall |")
    print("| --- | --- | --- | --- | --- | --- |")
    stalls = 0
    for context in contexts:
        for batch in _ints(args.decodes):
            for cached in cached_list:
                for chunk in chunks:
                    if batch == 0 and context != contexts[0]:
                        continue   # a chunk alone: once is enough
                    decodes = probe.place_decodes(batch, context) if batch else []
                    first = probe.mixed_once(chunk, cached, decodes)[0]
                    second = probe.mixed_once(chunk, cached, decodes)[0]
                    probe.clear()
                    stalled = first - second > STALL_S
                    stalls += stalled
                    print(f"| {chunk} | {cached} | {batch} x {context if batch else 0} | "
                          f"{first * 1e3:.1f} | {second * 1e3:.1f} | "
                          f"{'**stall**' if stalled else ''} |", flush=True)
    print(f"{stalls} shapes stalled on their first run")


if __name__ == "__main__":
    main()
