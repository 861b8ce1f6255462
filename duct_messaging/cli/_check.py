"""`duct-messaging check CONFIG`: validate a config without starting it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from duct_messaging.system import ConfigError, check_config, load_config, make_plan


def add_parser(subparsers: Any) -> None:
    """Register the `check` subcommand."""
    parser = subparsers.add_parser(
        "check",
        help="validate a config without starting anything",
        description=(
            "Load CONFIG and run every check init runs before it starts "
            "components: env values, includes, unknown keys, refs, cycles, "
            "schemas and check hooks. Modules named by keys are imported; no "
            "init function runs. Prints every problem with its location and "
            "exits 1, or prints a summary and exits 0."
        ),
    )
    parser.add_argument("config", type=Path, help="the system config (YAML)")
    parser.add_argument(
        "--profile", help="the profile to select (dev, test, prod, ...)"
    )
    parser.set_defaults(func=_main)


def importable_config_folder(config: Path) -> None:
    """Make the config's folder importable, so app modules beside it resolve."""
    folder = str(config.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _main(args: argparse.Namespace) -> int:
    importable_config_folder(args.config)
    try:
        config = load_config(args.config, profile=args.profile)
    except ConfigError as exc:
        return _report(args.config, exc.problems)

    problems = check_config(config)
    if problems:
        return _report(args.config, problems)

    plan = make_plan(config, checks=False)
    profile = config.profile or "none"
    print(
        f"ok: {args.config}: {len(plan.order)} components, "
        f"{len(plan.edges())} refs, profile {profile}"
    )
    return 0


def _report(config: Path, problems: list[str]) -> int:
    noun = "problem" if len(problems) == 1 else "problems"
    print(f"{config}: {len(problems)} {noun}", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    return 1
