"""`python -m tandem.planner.<command>_cli`: the planner's commands without the launcher.

`tandem profile|simulate|plan` are the usual way in (launcher/cli.py); these module entry points
exist for machines and scripts that import only the planner floor (a GPU host profiling, a
simulation in a job). One function parses, sets up logging and turns a ValueError or a missing
file into a one-line error and exit code 2, for all three.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def run_standalone(prog: str, description: str,
                   add_arguments: Callable[[argparse.ArgumentParser], None],
                   run: Callable[[argparse.Namespace], int],
                   argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--log-level", default="WARNING")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as err:
        print(f"error: {err.strerror}: {err.filename}", file=sys.stderr)
        return 2
