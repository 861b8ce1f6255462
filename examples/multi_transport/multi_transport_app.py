"""Publishes orders once to three transports and checks every copy arrives.

Components (named in config.yaml):
- `multi_transport_app/ledger`: which order ids each subscription handled.
- `multi_transport_app/{kafka,redis,nats}_handler`: one handler per
  subscription, each printing where its copy came from.
- `multi_transport_app/driver`: publishes the orders once the system is
  up, then stops the service when all three subscriptions saw all of them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from duct_messaging import request_stop
from duct_messaging.messaging import MessageContext

Handler = Callable[[dict[str, Any], MessageContext], None]


def say(line: str) -> None:
    """Print one whole line at once, so lines of concurrent handlers never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Ledger:
    """Order ids handled, per subscription; safe to use from any thread."""

    def __init__(self, subscriptions: list[str]) -> None:
        self.handled: dict[str, list[str]] = {name: [] for name in subscriptions}
        self._lock = threading.Condition()

    def add(self, subscription: str, order_id: str) -> None:
        with self._lock:
            self.handled[subscription].append(order_id)
            self._lock.notify_all()

    def complete(self, order_ids: set[str], timeout: float) -> bool:
        """Wait until every subscription handled every id in `order_ids`."""

        def done() -> bool:
            return all(order_ids <= set(got) for got in self.handled.values())

        with self._lock:
            return self._lock.wait_for(done, timeout)


def ledger(value: Mapping[str, Any]) -> Ledger:
    return Ledger(list(value["subscriptions"]))


def _make_handler(value: Mapping[str, Any]) -> Handler:
    name: str = value["subscription"]
    book: Ledger = value["ledger"]

    def handle(order: dict[str, Any], ctx: MessageContext) -> None:
        say(
            f"[{name}] order {order['id']} via {ctx.source} "
            f"client {ctx.client} from {ctx.destination}"
        )
        book.add(name, order["id"])

    return handle


kafka_handler = _make_handler
redis_handler = _make_handler
nats_handler = _make_handler


async def driver(value: Mapping[str, Any]) -> asyncio.Task[None]:
    """Start publishing in the background; init returns at once."""
    return asyncio.get_running_loop().create_task(_publish_and_check(value))


async def _publish_and_check(value: Mapping[str, Any]) -> None:
    producer = value["producer"]
    book: Ledger = value["ledger"]
    sent: set[str] = set()
    for n in range(value["orders"]):
        order = {"id": str(uuid.uuid4()), "amount": 5.0 * (n + 1)}
        receipts = await producer.aproduce(
            order, topic="order-created", key=order["id"]
        )
        sent.add(order["id"])
        landed = ", ".join(f"{r.transport}:{r.client}@{r.position}" for r in receipts)
        say(f"published order {order['id']} -> {landed}")

    loop = asyncio.get_running_loop()
    if await loop.run_in_executor(None, book.complete, sent, value["timeout_s"]):
        counts = ", ".join(f"{k}={len(v)}" for k, v in book.handled.items())
        say(f"every copy of {len(sent)} orders handled ({counts})")
        request_stop(0, "all copies handled")
    else:
        request_stop(1, "timed out waiting for copies")
