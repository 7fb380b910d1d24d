"""`tandem bench`: flags, and the glue from flags to dataset, schedule, run, summary and files.

`add_bench_parser(subparsers)` registers the subcommand on tandem's CLI; `main(argv)` runs the same
flags standalone (`python -m tandem.bench`). `--compare A.json B.json` only reads two saved
summaries and needs no server. The exit status is 0 when at least one request succeeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from collections.abc import Sequence

from tandem.bench.arrivals import arrival_offsets_s
from tandem.bench.client_pauses import ClientPauses
from tandem.bench.clients import BACKENDS, make_client
from tandem.bench.datasets import (MultiTurnConfig, RandomDatasetConfig, SharedPrefixConfig,
                                   multi_turn_dataset, random_dataset, shared_prefix_dataset)
from tandem.bench.metrics import (ideal_prefix_hit_rate, parse_percentiles, parse_slo,
                                  summarize)
from tandem.bench.records import BenchRequest
from tandem.bench.report import format_comparison, format_errors, format_summary
from tandem.bench.runner import BenchRun, run_benchmark
from tandem.bench.sharegpt import ShareGPTConfig, load_sharegpt_dataset
from tandem.bench.trace import MOONCAKE_BLOCK_SIZE, TraceConfig, load_trace_dataset

logger = logging.getLogger(__name__)

DATASETS = ("random", "shared-prefix", "multi-turn", "trace:PATH", "sharegpt:PATH")
DEFAULT_RANDOM_REQUESTS = 100


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` on a subparsers object; the parsed args carry `func(args) -> int`."""
    parser = subparsers.add_parser(
        "bench", help="load-test a running server (OpenAI HTTP or gRPC)",
        description="Send a synthetic or replayed workload to a tandem (or any OpenAI-compatible) "
                    "server and report TTFT, ITL, TPOT, E2E, throughput, goodput and prefix hits.")
    add_bench_arguments(parser)
    parser.set_defaults(func=bench_main)
    return parser


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--backend", choices=BACKENDS, default="openai",
                        help="openai: /v1/completions; openai-chat: /v1/chat/completions (each "
                             "prompt as one user message, so the chat template applies); grpc: "
                             "tandem.v1.Generation")
    server.add_argument("--url", default=None,
                        help="http://127.0.0.1:8000 (openai) or 127.0.0.1:50051 (grpc) by default")
    server.add_argument("--model", default=None,
                        help="model name; default: the first of /v1/models (openai), the "
                             "server's model (grpc)")
    server.add_argument("--temperature", type=float, default=0.0)
    server.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    add_workload_arguments(parser)
    _add_output_arguments(parser)


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset and load flags: shared by `tandem bench` and the planner's simulator, so a
    simulated run is described by exactly the flags of the real one (`build_requests` reads them)."""
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset", default="random",
                      help=f"one of {', '.join(DATASETS)}; sharegpt:PATH reads a local ShareGPT "
                           "JSON file (first human turn as the prompt, the gpt reply's length in "
                           "tokens as the output length), as vllm bench serve does")
    data.add_argument("--tokenizer", default=None,
                      help="tokenizer for real-text datasets and for decoding token prompts for "
                           "openai-chat: a model directory, a cached Hub id, or builtin (random:"
                           "<preset> models); default: --model when it is a local directory")
    data.add_argument("--num-requests", type=int, default=None,
                      help=f"random: how many (default {DEFAULT_RANDOM_REQUESTS}); "
                           "trace: the first N rows (default all)")
    data.add_argument("--input-len", type=int, default=512)
    data.add_argument("--output-len", type=int, default=128)
    data.add_argument("--range-ratio", type=float, default=0.0,
                      help="random: lengths uniform in [len*(1-r), len*(1+r)]")
    data.add_argument("--vocab-size", type=int, default=2000,
                      help="token ids are drawn from [16, vocab-size)")
    data.add_argument("--num-groups", type=int, default=8)
    data.add_argument("--prompts-per-group", type=int, default=16)
    data.add_argument("--system-prompt-len", type=int, default=1024)
    data.add_argument("--question-len", type=int, default=128)
    data.add_argument("--num-conversations", type=int, default=16)
    data.add_argument("--turns", type=int, default=4)
    data.add_argument("--user-len", type=int, default=128, help="multi-turn: tokens per user turn")
    data.add_argument("--trace-block-size", type=int, default=MOONCAKE_BLOCK_SIZE,
                      help="tokens per hash id in the trace")
    data.add_argument("--trace-block-tokens", type=int, default=None,
                      help="tokens per hash id when replayed (scales input lengths); "
                           "default: --trace-block-size")
    data.add_argument("--output-scale", type=float, default=1.0)
    data.add_argument("--time-scale", type=float, default=1.0,
                      help="multiplies the trace's arrival times (0.5: twice as fast)")

    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="requests/s (default inf: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrival gaps; 1 is Poisson")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--seed", type=int, default=0)


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--slo", nargs="+", default=[], metavar="NAME=MS",
                     help="goodput bounds: ttft_ms, itl_ms (every gap), tpot_ms, e2e_ms")
    out.add_argument("--percentiles", default="50,90,99",
                     help="latency percentiles to report, e.g. 50,90,99,99.9 (p50, p90 and p99 "
                          "are always in the JSON)")
    out.add_argument("--block-size", type=int, default=16,
                     help="block size for ideal_prefix_hit_rate")
    out.add_argument("--out", default=None, help="write the summary as JSON")
    out.add_argument("--save-requests", action="store_true",
                     help="add every request's record to --out")
    out.add_argument("--plot", default=None, help="write latency CDFs and throughput (PNG)")
    out.add_argument("--no-progress", action="store_true")
    out.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                     help="print two saved summaries side by side and exit")


def bench_main(args: argparse.Namespace) -> int:
    """Run `tandem bench`; bad flags raise ValueError, an unreachable server or file returns 2."""
    try:
        if args.compare:
            return compare_main(*args.compare)
        return _bench(args)
    except (ConnectionError, FileNotFoundError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    if args.block_size <= 0:
        raise ValueError(f"--block-size must be positive, got {args.block_size}")
    slo = parse_slo(args.slo)
    percentiles = parse_percentiles(args.percentiles)
    requests = build_requests(args)
    if args.backend == "openai-chat":
        requests = _with_text(requests, args)
    if requests and requests[0].arrival_offset_s is not None and not math.isinf(args.request_rate):
        logger.warning("--request-rate is ignored: the dataset carries its own arrival times")
    offsets_s = arrival_offsets_s(requests, args.request_rate, args.burstiness, args.seed)
    with ClientPauses() as pauses:  # the prompts built above stay out of every collection
        run = asyncio.run(_run(args, requests, offsets_s))
    sent_order = sorted(run.records, key=lambda record: record.start_s)
    ideal = ideal_prefix_hit_rate([requests[r.request_index] for r in sent_order],
                                  args.block_size)
    summary = summarize(run.records, run.duration_s, slo, ideal, percentiles).to_json_dict()
    print(format_summary(summary, slo))
    if pauses.describe():
        print(pauses.describe())
    errors = [record.error for record in run.records if record.error is not None]
    if errors:
        print(format_errors(errors))
    if args.out:
        document = _output_document(summary, run, args)
        document["client_gc_pauses_ms"] = [round(s * 1e3, 1) for s in pauses.long_pauses_s]
        _write_json(args.out, document)
    if args.plot:
        from tandem.bench.plot import save_plot
        save_plot(run.records, run.duration_s, args.plot)
    return 0 if summary["num_errors"] < summary["num_requests"] else 1


def compare_main(path_a: str, path_b: str) -> int:
    with open(path_a, encoding="utf-8") as file_a, open(path_b, encoding="utf-8") as file_b:
        summary_a, summary_b = json.load(file_a), json.load(file_b)
    print(format_comparison(summary_a, summary_b, name_a=path_a, name_b=path_b))
    return 0


def build_requests(args: argparse.Namespace) -> list[BenchRequest]:
    """The dataset named by `--dataset`, built from the flags."""
    dataset = args.dataset
    if dataset == "random":
        return random_dataset(RandomDatasetConfig(
            num_requests=(DEFAULT_RANDOM_REQUESTS if args.num_requests is None
                          else args.num_requests), input_len=args.input_len,
            output_len=args.output_len, range_ratio=args.range_ratio,
            vocab_size=args.vocab_size), args.seed)
    if args.num_requests is not None and not dataset.startswith("trace:"):
        logger.warning("--num-requests is ignored by --dataset %s", dataset)
    if dataset == "shared-prefix":
        return shared_prefix_dataset(SharedPrefixConfig(
            num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
            system_prompt_len=args.system_prompt_len, question_len=args.question_len,
            output_len=args.output_len, vocab_size=args.vocab_size), args.seed)
    if dataset == "multi-turn":
        return multi_turn_dataset(MultiTurnConfig(
            num_conversations=args.num_conversations, turns=args.turns, user_len=args.user_len,
            output_len=args.output_len, vocab_size=args.vocab_size), args.seed)
    if dataset.startswith("trace:"):
        return load_trace_dataset(TraceConfig(
            path=dataset[len("trace:"):], num_requests=args.num_requests,
            trace_block_size=args.trace_block_size, block_tokens=args.trace_block_tokens,
            output_scale=args.output_scale, time_scale=args.time_scale,
            vocab_size=args.vocab_size), args.seed)
    if dataset.startswith("sharegpt:"):
        from tandem.bench.text import encoder
        tokenizer = _tokenizer(args, "--dataset sharegpt:PATH")
        return load_sharegpt_dataset(
            ShareGPTConfig(path=dataset[len("sharegpt:"):], num_requests=args.num_requests),
            encoder(tokenizer), args.seed)
    raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")


def _tokenizer(args: argparse.Namespace, needed_by: str):
    # Imported here: transformers is slow to import, and synthetic runs and the simulator
    # (which shares these flags) never need a tokenizer.
    from tandem.bench.text import bench_tokenizer_name, load_bench_tokenizer
    name = bench_tokenizer_name(getattr(args, "tokenizer", None), getattr(args, "model", None))
    if name is None:
        raise ValueError(f"{needed_by} needs a tokenizer: pass --tokenizer (a model directory, "
                         "a cached Hub id, or builtin) or --model as a local directory")
    return load_bench_tokenizer(name)


def _with_text(requests: list[BenchRequest], args: argparse.Namespace) -> list[BenchRequest]:
    """openai-chat sends text: token-id prompts are decoded with the tokenizer."""
    if all(request.prompt_text is not None for request in requests):
        return requests
    from tandem.bench.text import with_prompt_texts
    return with_prompt_texts(requests, _tokenizer(args, "--backend openai-chat with a "
                                                        "token-id dataset"))


async def _run(args: argparse.Namespace, requests: Sequence[BenchRequest],
               offsets_s: Sequence[float]) -> BenchRun:
    client = make_client(args.backend, args.url, args.model, args.timeout_s, args.temperature)
    try:
        await client.prepare()
        return await run_benchmark(client, requests, offsets_s, args.max_concurrency,
                                   show_progress=not args.no_progress)
    finally:
        await client.close()


def _output_document(summary: dict, run: BenchRun, args: argparse.Namespace) -> dict:
    document = dict(summary)
    document["config"] = {key: _jsonable(value) for key, value in sorted(vars(args).items())
                          if key not in ("func", "compare", "command")}
    if args.save_requests:
        # Each record's start_s counts from this wall-clock time, to line requests up with
        # server-side events (a log line, a metric change).
        document["started_at_epoch_s"] = run.started_at_epoch_s
        document["per_request"] = [record.to_json_dict() for record in run.records]
    return document


def _jsonable(value: object) -> object:
    # JSON has no infinity; the default request rate is one.
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def _write_json(path: str, document: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(document, file, indent=2)
        file.write("\n")
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench",
                                     description="tandem's load generator")
    parser.add_argument("--log-level", default="WARNING")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return bench_main(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
