"""The `tandem` command line: `serve` (the main job), `generate` (offline), `bench` (load against a
server), `profile`, `simulate` and `plan` (capacity planning), `worker` (one worker process, started
by `serve`).

`serve` and `worker` need torch and the frontend, about 3 s of imports: their modules are imported
only when one of them is the command (its --help included), so that `tandem --help`, `tandem bench`
and the planner's commands start without them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from tandem.bench import add_bench_parser
from tandem.planner.plan_cli import add_plan_parser
from tandem.planner.profile_cli import add_profile_parser
from tandem.planner.simulate_cli import add_simulate_parser


class CommandParser(argparse.ArgumentParser):
    """A command's parser whose arguments may be added only once the command is chosen: `fill`
    runs before its arguments are parsed (or its help printed), and at most once."""

    def __init__(self, *args, fill: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None):
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)
        return super().parse_known_args(args, namespace)


def _fill_serve(parser: argparse.ArgumentParser) -> None:
    from tandem.launcher.serve import add_serve_arguments
    add_serve_arguments(parser)


def _fill_worker(parser: argparse.ArgumentParser) -> None:
    from tandem.launcher.worker import add_worker_arguments
    add_worker_arguments(parser)


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    # Unset flags take EngineConfig's defaults: one place for each.
    parser.add_argument("--model", help="an HF model directory or random:<preset> "
                        "(default: random:tiny)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 or float16 (default: auto)")
    parser.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    parser.add_argument("--num-kv-blocks", type=int, help="KV blocks (default: sized from memory)")
    parser.add_argument("--block-size", type=int, help="tokens per KV block (default: 16)")


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")


def generate_main(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, min_p=args.min_p, seed=args.seed, stop=args.stop,
        ignore_eos=args.ignore_eos)
    engine_flags = ("model", "device", "dtype", "max_model_len", "num_kv_blocks", "block_size")
    llm = LLM(**{name: getattr(args, name) for name in engine_flags
                 if getattr(args, name) is not None})
    for output in llm.generate(args.prompts, params):
        completion = output.outputs[0]
        print(f"prompt: {output.prompt!r}")
        print(f"output: {completion.text!r}")
        print(f"tokens: {len(completion.token_ids)}, finish reason: {completion.finish_reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="disaggregated LLM serving")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING or ERROR (default: TANDEM_LOG_LEVEL, else "
                             "WARNING); `tandem serve --log-level` works too")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    gen = commands.add_parser("generate", help="generate text offline")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.set_defaults(func=generate_main)
    commands.add_parser("serve", help="serve a model: frontend, prefill and decode workers",
                        fill=_fill_serve)
    add_bench_parser(commands)
    add_profile_parser(commands)
    add_simulate_parser(commands)
    add_plan_parser(commands)
    commands.add_parser("worker", help="one worker process (started by `tandem serve`)",
                        fill=_fill_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or os.environ.get("TANDEM_LOG_LEVEL") or "WARNING"
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        # A file a flag names (a profile, a trace, a model directory): no traceback for a typo.
        print(f"error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the group; no traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
