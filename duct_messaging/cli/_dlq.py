"""`duct-messaging dlq list|replay CONFIG`: inspect and replay dead letters.

Both read every dead-letter store of the config (keys deriving from
`duct.deadletter/store`: `duct.deadletter/storage`, `duct.deadletter/postgres`)
and start nothing else, except that `replay` also starts the common
producer (`duct.messaging/producer`) and what it needs. No consumer starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from duct_messaging.messaging._deadletter_replay import (
    ReplayResult,
    read_stores,
    replay,
)
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterStatus,
    DeadLetterStore,
)
from duct_messaging.messaging.deadletter_sinks import STORE_TYPE
from duct_messaging.messaging.producer import Producer
from duct_messaging.system import ConfigError, System, halt, init, load_config

PRODUCER_KEY = "duct.messaging/producer"
T = TypeVar("T")


def add_parser(subparsers: Any) -> None:
    """Register the `dlq` subcommand and its `list` and `replay` actions."""
    parser = subparsers.add_parser(
        "dlq",
        help="list and replay stored dead letters",
        description="List and replay the dead letters kept by CONFIG's stores.",
    )
    actions = parser.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "list",
        help="list stored dead letters",
        description=(
            "Print the dead letters of every store in CONFIG (keys deriving "
            f"from {STORE_TYPE}), oldest first."
        ),
    )
    _common(listing)
    listing.add_argument("--topic", help="only this (routing) topic")
    listing.add_argument(
        "--status",
        choices=[str(s) for s in DeadLetterStatus],
        help="only dead letters with this status",
    )
    listing.add_argument(
        "--json", action="store_true", help="print one JSON object per dead letter"
    )
    listing.set_defaults(func=_list)

    replaying = actions.add_parser(
        "replay",
        help="send eligible dead letters back to their topic",
        description=(
            "Send eligible dead letters of TOPIC back to the client and "
            "destination they were consumed from, through the common producer, "
            "and mark them replayed. Poison is never replayed: it is skipped "
            "and reported. Exit status 1 if a send failed or an --id is unknown."
        ),
    )
    _common(replaying)
    replaying.add_argument("--topic", required=True, help="the (routing) topic")
    which = replaying.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--id", action="append", dest="ids", metavar="ID", help="a dead letter id"
    )
    which.add_argument(
        "--all", action="store_true", help="every eligible dead letter of the topic"
    )
    replaying.set_defaults(func=_replay)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="the system config (YAML)")
    parser.add_argument("--profile", help="the profile to select")


def _list(args: argparse.Namespace) -> int:
    system = _start(args, [STORE_TYPE])
    if system is None:
        return 2
    try:
        status = DeadLetterStatus(args.status) if args.status else None
        letters = _await(
            system, read_stores(_stores(system), topic=args.topic, status=status)
        )
    finally:
        halt(system)

    if args.json:
        for dead_letter in letters:
            print(json.dumps(dead_letter.to_record()))
    else:
        print(render(letters))
    return 0


def _replay(args: argparse.Namespace) -> int:
    system = _start(args, [STORE_TYPE, PRODUCER_KEY])
    if system is None:
        return 2
    try:
        producers = [v for v in system.values() if isinstance(v, Producer)]
        if len(producers) != 1:
            _fail(args, f"expected one {PRODUCER_KEY} in {args.config}")
            return 2
        result = _await(
            system,
            replay(_stores(system), producers[0], topic=args.topic, ids=args.ids),
        )
    finally:
        halt(system)

    print(render_replay(result))
    return 1 if result.failed or result.missing else 0


def render(letters: Sequence[DeadLetter]) -> str:
    """Return `letters` as an aligned table with a count line."""
    header = (
        *("ID", "STATUS", "TOPIC", "SUBSCRIPTION", "CLIENT", "ATTEMPTS", "ERROR"),
        "LAST FAILURE (UTC)",
    )
    rows = [
        (
            dl.id,
            str(dl.status),
            dl.topic,
            dl.subscription,
            dl.client,
            str(dl.attempts),
            dl.error_type.rsplit(".", 1)[-1],
            dl.last_failure_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        for dl in letters
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    noun = "dead letter" if len(rows) == 1 else "dead letters"
    lines.append(f"{len(rows)} {noun}")
    return "\n".join(lines)


def render_replay(result: ReplayResult) -> str:
    """Return one line per dead letter handled, then a summary line."""
    lines = []
    for dl, receipts in result.replayed:
        where = ", ".join(f"{r.client}:{r.destination}" for r in receipts)
        lines.append(f"replayed {dl.id} -> {where}")
    for dl, reason in result.skipped:
        lines.append(f"skipped {dl.id}: {reason}")
    for dl, error in result.failed:
        lines.append(f"failed {dl.id}: {error}")
    lines.extend(f"not found {missing}" for missing in result.missing)
    poison = sum(1 for dl, _ in result.skipped if dl.status is DeadLetterStatus.POISON)
    lines.append(
        f"replayed {len(result.replayed)}, skipped {len(result.skipped)} "
        f"(poison {poison}), failed {len(result.failed)}"
    )
    return "\n".join(lines)


def _start(args: argparse.Namespace, keys: list[str]) -> System | None:
    folder = str(args.config.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    config = load_config(args.config, profile=args.profile)
    try:
        return init(config, keys=keys)
    except ConfigError as exc:
        if any(STORE_TYPE in problem for problem in exc.problems):
            _fail(
                args,
                f"{args.config} has no dead-letter store; add "
                "duct.deadletter/storage or duct.deadletter/postgres",
            )
        elif any(repr(PRODUCER_KEY) in problem for problem in exc.problems):
            _fail(
                args,
                f"{args.config} has no {PRODUCER_KEY}; replay sends through it",
            )
        else:
            _fail(args, str(exc))
        return None


def _stores(system: System) -> list[DeadLetterStore]:
    return [v for v in system.values() if isinstance(v, DeadLetterStore)]


def _await(system: System, coro: Coroutine[Any, Any, T]) -> T:
    loop = system.loop
    if loop is None:
        return asyncio.run(coro)
    return asyncio.run_coroutine_threadsafe(coro, loop).result()


def _fail(args: argparse.Namespace, message: str) -> None:
    print(f"duct-messaging dlq {args.dlq_command}: {message}", file=sys.stderr)
