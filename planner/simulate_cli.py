"""`tandem simulate`: run a workload through a simulated deployment, write bench's JSON.

    tandem simulate --profile PROFILE.json --num-prefill 1 --num-decode 1 \
        --dataset random --input-len 4096 --output-len 256 --request-rate 6 --out sim.json

The dataset and load flags are `tandem bench`'s own (tandem.bench.cli.add_workload_arguments),
so a simulated run and a real one are described by the same flags, and the summary has the same
keys: `tandem bench --compare real.json sim.json` lines them up. Engine and router flags default to
the real config dataclasses; the KV cache size and context length default to what the profile
recorded. Needs neither a GPU, torch nor grpc. Standalone: `python -m tandem.planner.simulate_cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import sys

from tandem.bench.arrivals import arrival_offsets_s
from tandem.bench.cli import add_workload_arguments, build_requests
from tandem.bench.metrics import parse_slo
from tandem.bench.report import format_summary
from tandem.planner.standalone import run_standalone
from tandem.planner.perf_model import PerfModel
from tandem.planner.sim_config import SimConfig, sim_config_from_profile
from tandem.planner.sim_records import SimResult
from tandem.planner.simulator import Simulator
from tandem.router.kv_policy import KVPolicyConfig, RouterMode
from tandem.router.routing import RoutingConfig

logger = logging.getLogger(__name__)


def add_simulate_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `simulate`; the parsed args carry `func(args) -> int`."""
    parser = subcommands.add_parser(
        "simulate", help="simulate a deployment on a workload from a measured profile",
        description="Discrete-event simulation of P prefill and D decode workers running "
                    "tandem's real scheduler, block manager and router; times from a profile.")
    add_simulate_arguments(parser)
    parser.set_defaults(func=simulate_main)
    return parser


def add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    """Profile, engine and router flags (shared with `tandem plan`); None: the config default."""
    group = parser.add_argument_group("deployment")
    group.add_argument("--profile", required=True, help="a `tandem profile` JSON file")
    group.add_argument("--transfer-gbps", type=float, default=None,
                       help="price KV transfers between workers on a link of this many GB/s "
                            "instead of the profile's measured points: for a profile measured "
                            "on one device, or to ask what another interconnect would do")
    group.add_argument("--transfer-latency-us", type=float, default=20.0,
                       help="with --transfer-gbps: the fixed cost of one transfer")
    group.add_argument("--num-kv-blocks", type=int, default=None,
                       help="KV blocks per worker (default: what the profile recorded)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length (default: what the profile recorded)")
    group.add_argument("--max-num-seqs", type=int, default=None)
    group.add_argument("--max-num-batched-tokens", type=int, default=None,
                       help="step token budget (chunk size)")
    group.add_argument("--max-prefill-queue", type=int, default=None)
    group.add_argument("--router-mode", default=None, choices=[m.value for m in RouterMode])
    group.add_argument("--kv-overlap-weight", type=float, default=None)
    group.add_argument("--router-temperature", type=float, default=None)
    group.add_argument("--router-seed", type=int, default=0,
                       help="seeds random routing and temperature sampling (reproducible runs)")
    sim = parser.add_argument_group("simulation")
    sim.add_argument("--heartbeat-interval-s", type=float, default=None)
    sim.add_argument("--kv-event-delay-ms", type=float, default=0.0,
                     help="worker -> router KV event latency")
    # The serving overheads default to the profile's measured `serving` section (0 without one).
    sim.add_argument("--frontend-overhead-ms", type=float, default=None,
                     help="tokenize and route, per request (default: the profile's)")
    sim.add_argument("--rpc-ms", type=float, default=0.0, help="one frontend <-> worker hop")
    sim.add_argument("--step-overhead-ms", type=float, default=None,
                     help="serving work a worker adds to every engine step (default: the "
                          "profile's)")
    sim.add_argument("--token-overhead-us", type=float, default=None,
                     help="serving work per token a decode-only step streams, worker and "
                          "frontend (default: the profile's)")
    sim.add_argument("--chunk-overhead-ms", type=float, default=None,
                     help="serving work a worker adds to a step that carries a prompt chunk "
                          "(default: the profile's)")
    sim.add_argument("--prefill-token-overhead-us", type=float, default=None,
                     help="serving work a worker adds to a step for each prompt token it "
                          "carries (default: the profile's)")
    sim.add_argument("--extra-prompt-overhead-ms", type=float, default=None,
                     help="serving work a worker adds to a step for each prompt past the first "
                          "it carries (default: the profile's)")
    sim.add_argument("--frontend-us-per-token", type=float, default=None,
                     help="the frontend's time per streamed token, one server shared by every "
                          "worker that takes the streams in turn: caps the deployment at 1e6 / "
                          "this tok/s (default: the profile's)")
    sim.add_argument("--answer-at-step-boundary", action="store_true",
                     help="prefill workers answer at their next step boundary, as serving did "
                          "before answers left with the step's end (to replay runs made then)")
    sim.add_argument("--chunk-launch-ms", type=float, default=0.0,
                     help="with --answer-at-step-boundary: host time to launch a prompt chunk, "
                          "which an answer waiting for the next boundary waits behind")
    sim.add_argument("--prompt-launch-ms", type=float, default=None,
                     help="host time to launch a step with prompt tokens, which the tokens of "
                          "the step before wait behind (default: the profile's)")
    sim.add_argument("--no-decode-lookahead", action="store_true",
                     help="operations reach the next step even in a steady decode batch")
    sim.add_argument("--slo", nargs="+", default=[], metavar="NAME=MS",
                     help="goodput bounds, as `tandem bench --slo`")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("shape")
    group.add_argument("--num-prefill", type=int, default=1, help="0: aggregated workers")
    group.add_argument("--num-decode", type=int, default=1)
    group.add_argument("--remote-prefill-min-tokens", type=int, default=None)
    add_deployment_arguments(parser)
    add_workload_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", default=None, help="write bench's summary JSON here")
    out.add_argument("--step-log", default=None, metavar="DIR",
                     help="each worker's simulated steps as DIR/<worker id>.jsonl, in a serving "
                          "step log's format (benchmarks/step_log_report.py reads both)")
    out.add_argument("--save-requests", action="store_true",
                     help="add every request's record to --out")
    out.add_argument("--plot", default=None, help="latency CDFs and throughput (PNG)")


def load_profile(args: argparse.Namespace) -> tuple[dict, PerfModel]:
    """The profile named by --profile and its model, with transfers on --transfer-gbps's link
    when that is given."""
    try:
        with open(args.profile, encoding="utf-8") as file:
            profile = json.load(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"--profile {args.profile} is not a JSON profile ({err}); "
                         f"`tandem profile` writes one") from err
    if not isinstance(profile, dict):
        raise ValueError(f"--profile {args.profile} holds no profile object; `tandem profile` "
                         f"writes one")
    model = PerfModel.from_profile(profile)
    if args.transfer_gbps is not None:
        model = model.with_transfer_link(args.transfer_gbps * 1e9,
                                         args.transfer_latency_us / 1e6)
    return profile, model


def sim_config_from_args(args: argparse.Namespace, profile: dict, num_prefill: int,
                         num_decode: int, remote_prefill_min_tokens: int | None = None,
                         max_num_batched_tokens: int | None = None) -> SimConfig:
    """A SimConfig from parsed flags; explicit arguments win over the flags (the planner's knobs)."""
    defaults_routing, defaults_policy = RoutingConfig(), KVPolicyConfig()
    policy = KVPolicyConfig(
        mode=_pick(args.router_mode, defaults_policy.mode),
        overlap_weight=_pick(args.kv_overlap_weight, defaults_policy.overlap_weight),
        temperature=_pick(args.router_temperature, defaults_policy.temperature),
        seed=args.router_seed)
    threshold = _pick(remote_prefill_min_tokens, defaults_routing.remote_prefill_min_tokens)
    routing = RoutingConfig(threshold,
                            _pick(args.max_prefill_queue, defaults_routing.max_prefill_queue),
                            policy)
    engine = {name: value for name, value in (
        ("max_num_seqs", args.max_num_seqs),
        ("max_num_batched_tokens", _pick(max_num_batched_tokens, args.max_num_batched_tokens)))
        if value is not None}
    overhead = serving_overheads(args, profile)
    timing = {"kv_event_delay_s": args.kv_event_delay_ms / 1e3,
              "frontend_overhead_s": overhead["frontend_overhead_ms"] / 1e3,
              "rpc_s": args.rpc_ms / 1e3,
              "step_overhead_s": overhead["step_overhead_ms"] / 1e3,
              "token_overhead_s": overhead["token_overhead_us"] / 1e6,
              "chunk_overhead_s": overhead["chunk_overhead_ms"] / 1e3,
              "prefill_token_overhead_s": overhead["prefill_token_overhead_us"] / 1e6,
              "extra_prompt_overhead_s": overhead["extra_prompt_overhead_ms"] / 1e3,
              "frontend_s_per_token": overhead["frontend_us_per_token"] / 1e6,
              "chunk_launch_s": args.chunk_launch_ms / 1e3,
              "prompt_launch_s": overhead["prompt_launch_ms"] / 1e3,
              "answer_at_step_boundary": args.answer_at_step_boundary,
              "decode_lookahead": not args.no_decode_lookahead,
              "record_steps": bool(getattr(args, "step_log", None))}
    if args.heartbeat_interval_s is not None:
        timing["heartbeat_interval_s"] = args.heartbeat_interval_s
    return sim_config_from_profile(profile, num_prefill, num_decode, args.num_kv_blocks,
                                   args.max_model_len, engine, routing, **timing)


SERVING_OVERHEADS = ("frontend_overhead_ms", "step_overhead_ms", "token_overhead_us",
                     "chunk_overhead_ms", "prefill_token_overhead_us", "extra_prompt_overhead_ms",
                     "frontend_us_per_token", "prompt_launch_ms")


def serving_overheads(args: argparse.Namespace, profile: dict) -> dict[str, float]:
    """What serving adds to the profile's steps: each flag given wins, then the profile's measured
    `serving` section (benchmarks/sim_accuracy_bench.py overheads --write-profile), then 0."""
    measured = profile.get("serving") or {}
    chosen = {}
    for name in SERVING_OVERHEADS:
        flag = getattr(args, name)
        chosen[name] = float(flag if flag is not None else measured.get(name, 0.0))
    return chosen


def simulate(args: argparse.Namespace, config: SimConfig, model: PerfModel,
             requests=None) -> SimResult:
    """Build the workload from the flags (unless given) and run it through the simulator."""
    if requests is None:
        requests = build_requests(args)
    offsets_s = arrival_offsets_s(requests, args.request_rate, args.burstiness, args.seed)
    simulator = Simulator(config, model)
    try:
        return simulator.run(requests, offsets_s, args.max_concurrency)
    finally:
        simulator.close()


def simulate_main(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    slo = parse_slo(args.slo)
    profile, model = load_profile(args)
    if args.num_prefill > 0 and not model.has_transfer:
        raise ValueError(model.NO_TRANSFER)
    config = sim_config_from_args(args, profile, args.num_prefill, args.num_decode,
                                  args.remote_prefill_min_tokens)
    # A second core, when there is one, takes the router's KV indexes: the same results, sooner.
    config = dataclasses.replace(config, kv_index_process=len(os.sched_getaffinity(0)) > 1)
    requests = build_requests(args)
    # The workload lives as long as this command and holds no cycles: out of the collector's
    # sight, its token ids (145M for the whole conversation trace) are never walked.
    gc.freeze()
    result = _simulate_frozen(args, config, model, requests)
    records = result.records(keep_chunks=bool(args.plot))
    summary = result.summary(slo, records)
    print(format_summary(summary, slo))
    stats = result.stats()
    print(f"simulated {result.duration_s:.1f} s in {stats['wall_s']:.1f} s wall, "
          f"{stats['num_steps']} steps, {stats['num_remote_prefills']} remote prefills")
    if args.out:
        document = dict(summary)
        document["config"] = {key: _jsonable(value) for key, value in sorted(vars(args).items())
                              if key not in ("func", "command")}
        document["simulator"] = stats
        if args.save_requests:
            document["per_request"] = [record.to_json_dict() for record in records]
        with open(args.out, "w", encoding="utf-8") as file:
            json.dump(document, file, indent=2)
            file.write("\n")
        logger.info("wrote %s", args.out)
    if args.step_log:
        write_step_logs(result, args.step_log)
    if args.plot:
        from tandem.bench.plot import save_plot
        save_plot(records, result.duration_s, args.plot)
    return 0 if summary["num_errors"] < summary["num_requests"] else 1


def write_step_logs(result: SimResult, directory: str) -> None:
    """Each worker's simulated steps as DIR/<worker id>.jsonl, the lines a serving worker's step
    log has (engine/step_log.py), for benchmarks/step_log_report.py beside a real run's."""
    os.makedirs(directory, exist_ok=True)
    for worker_id, worker in result.simulator.workers.items():
        with open(os.path.join(directory, f"{worker_id}.jsonl"), "w", encoding="utf-8") as file:
            file.writelines(json.dumps(step) + "\n" for step in worker.step_log)


def _simulate_frozen(args: argparse.Namespace, config: SimConfig, model: PerfModel,
                     requests) -> SimResult:
    """simulate, with what the run leaves alive (the router, the workers' caches, every request's
    times) frozen too: it lasts to the end of the command, and the collections that building
    the records and the summary set off walked it all (1.4 s for the whole conversation trace).
    The collector stays off until then, so none runs as the run ends either."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return simulate(args, config, model, requests)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _pick(value, default):
    return default if value is None else value


def _jsonable(value: object) -> object:
    if isinstance(value, float) and math.isinf(value):
        return "inf"  # JSON has no infinity; bench writes the default rate the same way
    return value


def main(argv: list[str] | None = None) -> int:
    return run_standalone("python -m tandem.planner.simulate_cli",
                          "tandem's deployment simulator", add_simulate_arguments, simulate_main,
                          argv)


if __name__ == "__main__":
    sys.exit(main())
