"""The `duct-messaging` command line.

Each subcommand lives in its own module exposing `add_parser(subparsers)`,
which registers the subcommand and sets `func` on its parser; `func(args)`
returns the process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from duct_messaging._logs import configure_logging
from duct_messaging.system import ConfigError, InitError

# Subcommand modules, in the order `--help` lists them.
_COMMANDS = ("_run", "_check", "_graph", "_dlq", "_deferred")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="duct-messaging",
        description="Run, check and inspect duct-messaging systems.",
    )
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO (default), WARNING or ERROR; also DUCT_LOG_LEVEL",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: the process arguments) and run the subcommand."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        where = getattr(args, "config", None) or "config"
        noun = "problem" if len(exc.problems) == 1 else "problems"
        print(f"{where}: {len(exc.problems)} {noun}", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    except InitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as Unix tools do.
        sys.stderr.close()
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
