"""Replay: send stored dead letters back to where they were consumed from.

A replayed message is the original body, key and headers (without the
`x-dead-letter-*` ones) plus `x-replayed-from: <dead letter id>`, sent to
the client it was consumed from and to its original broker destination:
through the topic's publish target on that client when the routing has one
that resolves to the same destination, else straight to the destination.
Other clusters publishing the topic do not get it again.

Poison is never replayed; a dead letter already replayed is skipped. Each
dead letter is marked `replayed` in every store that holds it, after its
send succeeded (a crash in between replays it again: at-least-once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from duct_messaging.messaging.deadletter import (
    HEADER_PREFIX,
    DeadLetter,
    DeadLetterStatus,
    DeadLetterStore,
)
from duct_messaging.messaging.producer import Producer
from duct_messaging.transports.base import OutgoingMessage, Receipt, Target

REPLAYED_FROM = "x-replayed-from"


@dataclass(slots=True)
class ReplayResult:
    """What one replay did, dead letter by dead letter."""

    replayed: list[tuple[DeadLetter, list[Receipt]]] = field(default_factory=list)
    skipped: list[tuple[DeadLetter, str]] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


async def read_stores(
    stores: Sequence[DeadLetterStore],
    *,
    topic: str | None = None,
    status: DeadLetterStatus | None = None,
    ids: Sequence[str] | None = None,
) -> list[DeadLetter]:
    """Return the dead letters of every store, each id once, oldest first.

    A dead letter marked replayed in any store counts as replayed.
    """
    merged: dict[str, DeadLetter] = {}
    for store in stores:
        for dead_letter in await store.read(topic=topic, ids=ids):
            seen = merged.setdefault(dead_letter.id, dead_letter)
            if dead_letter.status is DeadLetterStatus.REPLAYED:
                seen.status = DeadLetterStatus.REPLAYED
    letters = sorted(merged.values(), key=lambda dl: dl.last_failure_at)
    if status is not None:
        letters = [dl for dl in letters if dl.status == status]
    return letters


def replay_message(
    dead_letter: DeadLetter, producer: Producer
) -> tuple[OutgoingMessage, list[Target]]:
    """Return the message and target that send `dead_letter` back."""
    headers = {
        k: v for k, v in dead_letter.headers.items() if not k.startswith(HEADER_PREFIX)
    }
    headers[REPLAYED_FROM] = dead_letter.id
    transport = producer.producers.get(dead_letter.client)
    if transport is not None:
        for target in producer.routing.publish.get(dead_letter.topic, ()):
            if (
                target.client == dead_letter.client
                and transport.destination(target, dead_letter.topic)
                == dead_letter.destination
            ):
                message = OutgoingMessage(
                    dead_letter.topic, dead_letter.body, headers, dead_letter.key
                )
                return message, [target]
    message = OutgoingMessage(
        dead_letter.destination, dead_letter.body, headers, dead_letter.key
    )
    return message, [Target(dead_letter.client)]


async def replay(
    stores: Sequence[DeadLetterStore],
    producer: Producer,
    *,
    topic: str,
    ids: Sequence[str] | None = None,
) -> ReplayResult:
    """Send the eligible dead letters of `topic` (or just `ids`) back.

    Must run on the producer's event loop. Never raises for one failed
    send: it is reported in `failed` and the rest go on.
    """
    result = ReplayResult()
    letters = await read_stores(stores, topic=topic, ids=ids)
    if ids is not None:
        found = {dl.id for dl in letters}
        result.missing = [i for i in ids if i not in found]
    for dead_letter in letters:
        if dead_letter.status is DeadLetterStatus.POISON:
            result.skipped.append((dead_letter, "poison, never replayed"))
            continue
        if dead_letter.status is DeadLetterStatus.REPLAYED:
            result.skipped.append((dead_letter, "already replayed"))
            continue

        message, targets = replay_message(dead_letter, producer)
        try:
            receipts = await producer.send_encoded(message, targets)
        except Exception as exc:
            result.failed.append((dead_letter, str(exc)))
            continue

        for store in stores:
            await store.mark([dead_letter.id], DeadLetterStatus.REPLAYED)
        dead_letter.status = DeadLetterStatus.REPLAYED
        result.replayed.append((dead_letter, receipts))
    return result
