"""The `tandem` command line imports torch and the frontend only for the commands that run them:
`tandem --help`, `tandem bench` and the planner's commands start without them, and `serve` and
`worker` still get every flag."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tandem.launcher.cli import build_parser

HEAVY = ("torch", "transformers", "fastapi", "tandem.launcher.serve", "tandem.launcher.worker")


def modules_after(code: str, tmp_path) -> dict:
    """Which heavy modules a fresh interpreter holds after running `code` (outside the checkout,
    whose folders would shadow the installed package)."""
    probe = f"import sys, json\n{code}\nprint(json.dumps({{m: m in sys.modules for m in {HEAVY}}}))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_and_parsing_bench_pulls_no_torch(tmp_path):
    loaded = modules_after(
        "from tandem.launcher.cli import build_parser\n"
        "args = build_parser().parse_args(['bench', '--backend', 'grpc', '--num-requests', '3'])\n"
        "assert args.command == 'bench' and args.backend == 'grpc'", tmp_path)
    assert not any(loaded.values()), loaded


def test_top_level_help_lists_every_command_without_torch(tmp_path):
    loaded = modules_after(
        "from tandem.launcher.cli import build_parser\n"
        "text = build_parser().format_help()\n"
        "for name in ('generate', 'serve', 'bench', 'profile', 'simulate', 'plan', 'worker'):\n"
        "    assert name in text, name\n"
        "assert 'serve a model: frontend, prefill and decode workers' in text", tmp_path)
    assert not any(loaded.values()), loaded


def test_serve_and_worker_get_their_flags_when_chosen():
    from tandem.launcher.serve import serve_main
    from tandem.launcher.worker import worker_main

    serve = build_parser().parse_args(["--log-level", "INFO", "serve", "--num-decode", "2",
                                       "--no-enforce-eager", "--log-level", "debug"])
    assert (serve.func, serve.num_decode, serve.enforce_eager) == (serve_main, 2, False)
    assert (serve.log_level, serve.serve_log_level) == ("INFO", "debug")
    worker = build_parser().parse_args(["worker", "--parent-pid", "12"])
    assert (worker.func, worker.parent_pid) == (worker_main, 12)


def test_serve_help_shows_its_settings_and_their_defaults(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0
    assert text.startswith("usage: tandem serve")
    assert "--num-decode NUM_DECODE" in text and "Precedence: flag > environment" in text
