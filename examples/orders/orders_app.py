"""A small order service: publishes orders and shows each subscription's view.

Components (named in config.yaml / config.kafka.yaml):
- `orders_app/tracker`: records which orders each subscription received.
- `orders_app/primary_handler`, `orders_app/data_handler`: the handlers.
- `orders_app/reminder_handler`: receives the deferred payment reminders.
- `orders_app/driver`: publishes a batch of orders once the system is up,
  and for each a payment reminder deferred by a few seconds; stops the
  service when every subscription has seen every order and reminder.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from duct_messaging import request_stop
from duct_messaging.messaging import MessageContext


def say(line: str) -> None:
    """Print one whole line at once, so lines of concurrent handlers never mix."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Tracker:
    """Remembers the order ids each subscription has handled."""

    def __init__(self, subscriptions: list[str]) -> None:
        self.seen: dict[str, list[str]] = {name: [] for name in subscriptions}
        self._changed = threading.Condition()

    def record(self, subscription: str, order_id: str) -> None:
        with self._changed:
            self.seen[subscription].append(order_id)
            self._changed.notify_all()

    def wait_for(self, order_ids: set[str], timeout: float) -> bool:
        """Wait until every subscription has seen every id in `order_ids`."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all(order_ids <= set(ids) for ids in self.seen.values()),
                timeout,
            )


def tracker(value: Mapping[str, Any]) -> Tracker:
    return Tracker(list(value["subscriptions"]))


def _handler(
    value: Mapping[str, Any],
) -> Callable[[dict[str, Any], MessageContext], None]:
    subscription: str = value["subscription"]
    seen: Tracker = value["tracker"]

    def on_order(order: dict[str, Any], ctx: MessageContext) -> None:
        say(
            f"[{subscription}] order {order['id']} amount {order['amount']:.2f} "
            f"(client {ctx.client}, {ctx.destination})"
        )
        seen.record(subscription, order["id"])

    return on_order


primary_handler = _handler
data_handler = _handler


def reminder_handler(
    value: Mapping[str, Any],
) -> Callable[[dict[str, Any], MessageContext], None]:
    seen: Tracker = value["tracker"]

    def on_reminder(reminder: dict[str, Any], ctx: MessageContext) -> None:
        due = datetime.fromisoformat(reminder["due_at"])
        late_ms = (datetime.now(UTC) - due).total_seconds() * 1000
        say(
            f"[payment-reminders] reminder for order {reminder['order_id']} "
            f"arrived {late_ms:.0f} ms after its due time ({ctx.destination})"
        )
        seen.record("payment-reminders", reminder["order_id"])

    return on_reminder


async def driver(value: Mapping[str, Any]) -> asyncio.Task[None]:
    """Publish the orders in the background once everything has started."""
    return asyncio.get_running_loop().create_task(_drive(value))


async def _drive(value: Mapping[str, Any]) -> None:
    producer = value["producer"]
    seen: Tracker = value["tracker"]
    ids = set()
    for n in range(value["orders"]):
        order_id = str(uuid.uuid4())
        ids.add(order_id)
        receipts = await producer.aproduce(
            {"id": order_id, "amount": 10.0 + n}, topic="order-created", key=order_id
        )
        where = ", ".join(f"{r.client}/{r.destination}" for r in receipts)
        say(f"published order {order_id} to {where}")
        delay_ms = value["reminder_delay_ms"]
        due = datetime.now(UTC) + timedelta(milliseconds=delay_ms)
        await producer.aproduce(
            {"order_id": order_id, "due_at": due.isoformat()},
            topic="payment-reminder",
            key=order_id,
            deliver_at_time=due,
        )
    say(f"scheduled {len(ids)} payment reminders, due in {delay_ms} ms")
    loop = asyncio.get_running_loop()
    ok = await loop.run_in_executor(None, seen.wait_for, ids, value["timeout_s"])
    if ok:
        counts = ", ".join(f"{name}: {len(got)}" for name, got in seen.seen.items())
        say(f"all {len(ids)} orders seen by every subscription ({counts})")
        request_stop(0, "all orders handled")
    else:
        request_stop(1, "timed out waiting for the orders")
