"""`duct-messaging deferred list CONFIG`: show deferred messages not yet delivered.

Reads the store named by the config's `duct.messaging/deferred` key without
starting anything else and without delivering: it lists, it never sends.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from duct_messaging.messaging._deferred_store import store_problems
from duct_messaging.messaging.deferred import (
    DeferredConfigError,
    PendingMessage,
    list_pending,
)
from duct_messaging.system import load_config
from duct_messaging.transports.base import Target

DEFERRED_TYPE = "duct.messaging/deferred"


def add_parser(subparsers: Any) -> None:
    """Register the `deferred` subcommand and its `list` action."""
    parser = subparsers.add_parser(
        "deferred",
        help="inspect deferred deliveries",
        description="Inspect the messages a deferred-delivery store holds.",
    )
    actions = parser.add_subparsers(
        dest="deferred_command", required=True, metavar="ACTION"
    )
    listing = actions.add_parser(
        "list",
        help="list deferred messages not delivered yet",
        description=(
            "Print the pending messages of the store that CONFIG's "
            f"{DEFERRED_TYPE} key names: id, topic, targets, due time (UTC), "
            "attempt and state. Nothing is started or delivered."
        ),
    )
    listing.add_argument("config", type=Path, help="the system config (YAML)")
    listing.add_argument("--profile", help="the profile to select")
    listing.add_argument(
        "--key", help=f"the {DEFERRED_TYPE} key to read, when there are several"
    )
    listing.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    config = load_config(args.config, profile=args.profile)
    candidates = [key for key in config if DEFERRED_TYPE in key.split()]
    keys = candidates
    if args.key is not None:
        keys = [key for key in candidates if key == args.key]
    if not candidates:
        _fail(
            f"{args.config}: no {DEFERRED_TYPE} key, so nothing is deferred; "
            f"add a {DEFERRED_TYPE} component to use deferred delivery"
        )
        return 2
    if len(keys) != 1:
        found = ", ".join(candidates)
        wanted = f"--key {args.key!r} matches none of" if args.key else "several:"
        _fail(f"{args.config}: {wanted} {found}; name one with --key")
        return 2

    value = config[keys[0]]
    store = value.get("store") if isinstance(value, Mapping) else None
    problems = [f"{keys[0]} {problem}" for problem in store_problems(store)]
    if problems:
        _fail("; ".join(problems))
        return 2

    try:
        pending = asyncio.run(list_pending(store))
    except DeferredConfigError as exc:
        _fail(str(exc))
        return 2
    print(render(pending))
    return 0


def render(pending: Sequence[PendingMessage]) -> str:
    """Return `pending` as an aligned table with a count line."""
    header = ("ID", "TOPIC", "TARGETS", "DUE (UTC)", "ATTEMPT", "STATE")
    rows = [
        (
            item.id,
            item.topic,
            ", ".join(_target(target) for target in item.targets),
            item.due.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            str(item.attempt),
            item.state,
        )
        for item in pending
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    noun = "message" if len(rows) == 1 else "messages"
    lines.append(f"{len(rows)} pending {noun}")
    return "\n".join(line.rstrip() for line in lines)


def _target(target: Target) -> str:
    if not target.options:
        return target.client
    options = ",".join(f"{k}={v}" for k, v in sorted(target.options.items()))
    return f"{target.client}({options})"


def _fail(message: str) -> None:
    print(f"duct-messaging deferred list: {message}", file=sys.stderr)
