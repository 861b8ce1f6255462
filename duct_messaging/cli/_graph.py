"""`duct-messaging graph CONFIG`: print start order and dependency edges."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from duct_messaging.cli._check import importable_config_folder
from duct_messaging.system import ConfigError, Plan, load_config, make_plan


def add_parser(subparsers: Any) -> None:
    """Register the `graph` subcommand."""
    parser = subparsers.add_parser(
        "graph",
        help="print the start order and the dependency edges of a config",
        description=(
            "Load CONFIG, resolve its refs and print the order init starts the "
            "components in, and which key refers to which. Edges point from a "
            "key to the key it refers to. Nothing is started."
        ),
    )
    parser.add_argument("config", type=Path, help="the system config (YAML)")
    parser.add_argument(
        "--profile", help="the profile to select (dev, test, prod, ...)"
    )
    parser.add_argument(
        "--format",
        choices=("text", "dot", "mermaid"),
        default="text",
        help="text (default), Graphviz dot, or a Mermaid flowchart",
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    importable_config_folder(args.config)
    try:
        plan = make_plan(load_config(args.config, profile=args.profile), checks=False)
    except ConfigError as exc:
        print(f"{args.config}: cannot build the graph", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1

    render = {"text": render_text, "dot": render_dot, "mermaid": render_mermaid}
    print(render[args.format](plan))
    return 0


def render_text(plan: Plan) -> str:
    """Return the start order, one key a line with what it refers to."""
    deps: dict[str, list[str]] = {key: [] for key in plan.order}
    for key, dep in plan.edges():
        deps[key].append(dep)
    lines = ["start order (each key after the keys it refers to):"]
    width = len(str(len(plan.order)))
    for number, key in enumerate(plan.order, start=1):
        refs = f"  -> {', '.join(deps[key])}" if deps[key] else ""
        kind = "" if plan.components.get(key) is not None else "  (data)"
        lines.append(f"  {number:>{width}}. {key}{kind}{refs}")
    if plan.overrides:
        lines.append("overrides (used as given): " + ", ".join(plan.overrides))
    return "\n".join(lines)


def _quote(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_dot(plan: Plan) -> str:
    """Return a Graphviz digraph; edges go from a key to what it refers to."""
    lines = ["digraph system {", "  rankdir=LR;"]
    lines.extend(f"  {_quote(key)};" for key in [*plan.order, *plan.overrides])
    lines.extend(f"  {_quote(key)} -> {_quote(dep)};" for key, dep in plan.edges())
    lines.append("}")
    return "\n".join(lines)


def render_mermaid(plan: Plan) -> str:
    """Return a Mermaid flowchart; edges go from a key to what it refers to."""
    keys = [*plan.order, *plan.overrides]
    ids = {key: f"k{index}" for index, key in enumerate(keys)}
    lines = ["flowchart LR"]
    for key, node in ids.items():
        label = key.replace('"', "#quot;")
        lines.append(f'  {node}["{label}"]')
    lines.extend(f"  {ids[key]} --> {ids[dep]}" for key, dep in plan.edges())
    return "\n".join(lines)
