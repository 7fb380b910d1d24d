"""Prefill and mixed steps after long prefixes, measured, against a profile's performance model.

A profile's mixed points stop at a short prefix (4096 cached tokens in the default grid), and its
prefill points go much further. On a decode worker that prefills a long prompt itself, every step
carries a chunk after a growing prefix beside the running batch. This times those steps on the
device (the profile's own probe, each the median of `--repeats`) and prints the model's price
beside each, so the model's error where serving meets it is a measured figure.

    python benchmarks/step_model_bench.py --profile planner/profiles/random-llama-3.1-8b-h200.json
        [--model random:llama-3.1-8b] [--chunk 2048] [--cached 0,4096,8192,16384,28672]
        [--decodes 16,48] [--context 4096] [--prompts 1,4]

--prompts: mixed steps whose chunk is the last tokens of that many prompts at once (the trace sends
up to 16 requests at the same instant), each after the same prefix; the model prices them as one.
"""

from __future__ import annotations

import argparse
import statistics

from tandem import LLM
from tandem.planner.perf_model import PerfModel
from tandem.planner.profile_points import StepProbe


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", default="random:llama-3.1-8b")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--cached", default="0,4096,8192,16384,28672")
    parser.add_argument("--decodes", default="16,48", help="decode rows beside the chunk")
    parser.add_argument("--context", type=int, default=4096, help="each decode row's context")
    parser.add_argument("--prompts", default="1", help="prompts the mixed steps' chunk is cut into")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = PerfModel.load(args.profile)
    cached_list, chunk = _ints(args.cached), args.chunk
    llm = LLM(model=args.model, max_model_len=max(cached_list + [args.context]) + chunk + 64,
              max_num_batched_tokens=chunk + max(_ints(args.decodes)))
    probe = StepProbe(llm.engine)
    probe.warm_up(chunk)
    print(f"{args.model}, chunks of {chunk}; model from {args.profile}")
    print("| step | cached | decode rows | prompts | measured ms | model ms | model / measured |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cached in cached_list:
        seconds = statistics.median(probe.prefill_once(chunk, cached)
                                    for _ in range(args.repeats))
        priced = model.prefill_s(chunk, cached)
        print(f"| prefill | {cached} | 0 | 1 | {seconds * 1e3:.2f} | {priced * 1e3:.2f} | "
              f"{priced / seconds:.3f} |", flush=True)
    for batch in _ints(args.decodes):
        decodes = probe.place_decodes(batch, args.context)
        for cached in cached_list:
            for prompts in _ints(args.prompts):
                runs = [probe.mixed_once(chunk, cached, decodes, prompts)
                        for _ in range(args.repeats)]
                seconds = statistics.median(r[0] for r in runs)
                priced = model.step_s(chunk, cached, batch, runs[0][1])
                print(f"| mixed | {cached} | {batch} x {args.context} | {prompts} | "
                      f"{seconds * 1e3:.2f} | {priced * 1e3:.2f} | {priced / seconds:.3f} |",
                      flush=True)
        probe.clear()


if __name__ == "__main__":
    main()
