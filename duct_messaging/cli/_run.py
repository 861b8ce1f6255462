"""`duct-messaging run CONFIG`: start a system and run it until stopped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from duct_messaging.runner import run
from duct_messaging.system import load_config


def add_parser(subparsers: Any) -> None:
    """Register the `run` subcommand."""
    parser = subparsers.add_parser(
        "run",
        help="start a system and run it until SIGINT/SIGTERM or the app stops it",
        description=(
            "Load CONFIG, start every component in dependency order, run until "
            "SIGINT/SIGTERM or until the application calls request_stop(), then "
            "halt in reverse order. The config's folder is importable, so an "
            "app's modules can sit beside its config."
        ),
    )
    parser.add_argument("config", type=Path, help="the system config (YAML)")
    parser.add_argument(
        "--profile", help="the profile to select (dev, test, prod, ...)"
    )
    parser.add_argument("--timeout", type=float, help="give up after this many seconds")
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    folder = str(args.config.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    config = load_config(args.config, profile=args.profile)
    return run(config, timeout=args.timeout)
