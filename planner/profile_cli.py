"""Command line of `tandem profile`: measure, write the profile, print the fit.

  tandem profile --model random:llama-3.1-8b --device cuda:0 --out llama-h200.json
  python -m tandem.planner.profile_cli --model random:tiny --device cpu --out tiny-cpu.json

At the end it prints a short table of the measured ranges and the performance model's error on
held-back points (planner/perf_model.py `holdout_error`), which is also stored in the profile under
`fit`, so a profile carries how far its own model can be trusted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tandem.planner.standalone import run_standalone

logger = logging.getLogger(__name__)


def add_profile_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subcommands.add_parser(
        "profile", help="measure a model's step times on this device into a profile file")
    add_profile_args(parser)
    parser.set_defaults(func=profile_main)
    return parser


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="random:tiny",
                        help="an HF model directory or random:<preset> (default: random:tiny)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--out", required=True, help="where to write the profile (JSON)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context length (default: the model's, as tandem serve uses)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=None,
                        help="KV cache size (default: sized from memory, as serving sizes it)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--transfer-peer", default="auto",
                        help="device to time KV transfers to: auto (the other of two GPUs), "
                             "none, or a device such as cuda:1")
    parser.add_argument("--quick", action="store_true",
                        help="a few points per step kind (smoke runs and tests)")
    parser.add_argument("--mixed-as-served", action="store_true",
                        help="time each mixed point as serving runs it: a series of a long "
                             "prompt's chunks beside its decode batch, each step queued before "
                             "the previous one's tokens are read")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def profile_main(args: argparse.Namespace) -> int:
    from tandem.planner.perf_model import holdout_error
    from tandem.planner.profile import ProfileSettings, run_profile

    settings = ProfileSettings(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs, transfer_peer=args.transfer_peer, quick=args.quick,
        mixed_as_served=args.mixed_as_served)
    profile = run_profile(settings, progress=not args.no_progress)
    profile["fit"] = holdout_error(profile)
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print_summary(profile, args.out)
    return 0


def print_summary(profile: dict, path: str) -> None:
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in profile.get("phase_s", {}).items())
    print(f"profile of {profile['model']} on {profile['device_name']}: {path} "
          f"({profile['wall_s']:.1f} s: {phases})")
    print(f"{'kind':9s} {'points':>6s} {'fastest':>10s} {'slowest':>10s} "
          f"{'held-back error: mean':>22s} {'p90':>7s} {'max':>7s}")
    for kind in ("prefill", "decode", "mixed", "transfer"):
        points = profile[kind]["points"] if kind == "transfer" else profile[kind]
        fit = profile.get("fit", {}).get(kind, {})
        if not points:
            print(f"{kind:9s} {0:6d}   (none: {profile[kind].get('note', '')})"
                  if kind == "transfer" else f"{kind:9s} {0:6d}")
            continue
        seconds = [p["seconds"] for p in points]
        errors = (f"{fit['mean']:22.1%} {fit['p90']:7.1%} {fit['max']:7.1%}"
                  if fit.get("num_points") else f"{'(too few points)':>22s}")
        print(f"{kind:9s} {len(points):6d} {min(seconds) * 1e3:8.3f}ms {max(seconds) * 1e3:8.3f}ms "
              f"{errors}")


def main(argv: list[str] | None = None) -> int:
    return run_standalone("tandem profile", __doc__.split("\n")[0], add_profile_args,
                          profile_main, argv)


if __name__ == "__main__":
    sys.exit(main())
