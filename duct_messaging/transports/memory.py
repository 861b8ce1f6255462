"""The in-memory transport: brokers that live inside the process.

It is the embedded default (an app runs with no server at all) and the
stand-in an application's own tests swap in for a real cluster. It keeps
the same promises as the real transports: consumer groups share work,
each subscription's group sees every message, unacknowledged deliveries
are delivered again, and a restarted consumer resumes where its group
stopped. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from duct_messaging.messaging._config_check import Fields, MapOf, as_schema
from duct_messaging.messaging.components import (
    consumer_settings,
    consumers_problems,
    consumers_spec,
    producers_spec,
)
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import CheckContext, component
from duct_messaging.transports.base import Delivery, OutgoingMessage, Receipt, Target

log = structlog.get_logger(__name__)

TRANSPORT = "memory"
# Target and subscription options a memory destination may be named by, so a
# memory cluster can stand in for any real one without config changes.
DESTINATION_OPTIONS = ("destination", "kafka_topic", "stream", "subject", "queue")


@dataclass(slots=True)
class _Record:
    body: bytes
    headers: dict[str, str]
    key: bytes | None


@dataclass(slots=True)
class _Group:
    next: int = 0
    redeliver: deque[int] = field(default_factory=deque)
    attempts: dict[int, int] = field(default_factory=dict)
    in_flight: set[int] = field(default_factory=set)


class MemoryBroker:
    """One in-memory cluster: append-only logs and consumer-group cursors.

    Thread-safe; waiting consumers on any event loop are woken on append.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._logs: dict[str, list[_Record]] = {}
        self._groups: dict[tuple[str, str], _Group] = {}
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def append(
        self,
        destination: str,
        body: bytes,
        headers: Mapping[str, str],
        key: bytes | None,
    ) -> int:
        """Append a message to `destination` and return its position."""
        with self._lock:
            log_ = self._logs.setdefault(destination, [])
            log_.append(_Record(body, dict(headers), key))
            position = len(log_) - 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)
        return position

    def messages(self, destination: str) -> list[bytes]:
        """Return every body appended to `destination`, in order."""
        with self._lock:
            return [r.body for r in self._logs.get(destination, [])]

    def take(self, destination: str, group: str, limit: int) -> list[Delivery]:
        """Hand out up to `limit` deliveries to a consumer of `group`."""
        with self._lock:
            log_ = self._logs.get(destination, [])
            state = self._groups.setdefault((destination, group), _Group())
            picked: list[int] = []
            while state.redeliver and len(picked) < limit:
                picked.append(state.redeliver.popleft())
            while state.next < len(log_) and len(picked) < limit:
                picked.append(state.next)
                state.next += 1
            out = []
            for index in picked:
                record = log_[index]
                attempt = state.attempts.get(index, 0) + 1
                state.attempts[index] = attempt
                state.in_flight.add(index)
                out.append(
                    Delivery(
                        body=record.body,
                        headers=dict(record.headers),
                        destination=destination,
                        key=record.key,
                        position=index,
                        attempt=attempt,
                    )
                )
            return out

    def settle(
        self, destination: str, group: str, positions: Sequence[int], *, ack: bool
    ) -> None:
        """Acknowledge `positions`, or release them for delivery again."""
        with self._lock:
            state = self._groups.setdefault((destination, group), _Group())
            for index in positions:
                if index not in state.in_flight:
                    continue
                state.in_flight.discard(index)
                if ack:
                    state.attempts.pop(index, None)
                else:
                    state.redeliver.append(index)
        if not ack:
            self._wake_all()

    def pending(self, destination: str, group: str) -> int:
        """Return how many messages `group` has not acknowledged yet."""
        with self._lock:
            state = self._groups.get((destination, group), _Group())
            backlog = len(self._logs.get(destination, [])) - state.next
            return backlog + len(state.redeliver) + len(state.in_flight)

    async def wait(self, timeout: float) -> None:
        """Wait until something is appended or released, or `timeout` passes."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.append((loop, future))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(future, timeout)

    def _wake_all(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_wake, future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def destination_for(options: Mapping[str, Any], default: str) -> str:
    """Return the memory destination named by `options`, else `default`."""
    for name in DESTINATION_OPTIONS:
        if options.get(name):
            return str(options[name])
    return default


class MemoryProducer:
    """Appends messages to one in-memory cluster."""

    transport = TRANSPORT

    def __init__(self, client: str, broker: MemoryBroker) -> None:
        self.client = client
        self.broker = broker

    def destination(self, target: Target, topic: str) -> str:
        """Return the destination `target` names for `topic`."""
        return destination_for(target.options, topic)

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Append `message` to the target's destination."""
        destination = self.destination(target, message.topic)
        position = self.broker.append(
            destination, message.body, message.headers, message.key
        )
        return Receipt(self.client, TRANSPORT, destination, None, position)


class MemorySource:
    """Feeds one subscription from an in-memory cluster's consumer group."""

    def __init__(self, broker: MemoryBroker, destination: str, group: str) -> None:
        self.broker = broker
        self.destination = destination
        self.group = group
        self._held: set[int] = set()

    async def start(self) -> None:
        """Nothing to connect: a memory source is ready at once."""

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Return waiting deliveries, or wait up to `timeout` for some."""
        batch = self.broker.take(self.destination, self.group, max_messages)
        if not batch:
            await self.broker.wait(timeout)
            batch = self.broker.take(self.destination, self.group, max_messages)
        self._held.update(int(d.position) for d in batch)  # type: ignore[arg-type]
        return batch

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries` in the group."""
        self._settle(deliveries, ack=True)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Hand `deliveries` back to the group for delivery again."""
        self._settle(deliveries, ack=False)

    async def stop(self) -> None:
        """Release what this consumer still holds, as a dead consumer would."""
        held = sorted(self._held)
        self._held.clear()
        self.broker.settle(self.destination, self.group, held, ack=False)

    def _settle(self, deliveries: Sequence[Delivery], *, ack: bool) -> None:
        positions = [int(d.position) for d in deliveries]  # type: ignore[arg-type]
        self._held.difference_update(positions)
        self.broker.settle(self.destination, self.group, positions, ack=ack)


def group_for(subscription: Subscription) -> str:
    """Return the consumer group of `subscription` (default: its id)."""
    options = subscription.options
    return str(options.get("group_id") or options.get("group") or subscription.id)


class MemoryClients(dict[str, MemoryBroker]):
    """The in-memory clusters of a system, by client name."""


def make_runtime(
    clients: Mapping[str, MemoryBroker],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from in-memory clusters."""

    def make_source(subscription: Subscription) -> MemorySource:
        destination = destination_for(
            subscription.options,
            _routed_destination(routing, subscription),
        )
        return MemorySource(
            clients[subscription.client], destination, group_for(subscription)
        )

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


def _routed_destination(routing: Routing, subscription: Subscription) -> str:
    for option in DESTINATION_OPTIONS:
        destination = routing.consumer_destination(subscription, option)
        if destination != subscription.topic:
            return destination
    return subscription.topic


CLIENTS = MapOf(
    Fields(
        {},
        noun="setting",
        hint="A memory client takes no settings: write `name: {}`",
    ),
    expected="a mapping of client name -> {}",
)


@component("duct.memory/clients", schema=as_schema(CLIENTS))
def clients(value: Mapping[str, Any] | None) -> MemoryClients:
    """Return one in-memory cluster per client name."""
    return MemoryClients({name: MemoryBroker(name) for name in value or {}})


@component("duct.memory/producers", schema=as_schema(producers_spec(TRANSPORT)))
def producers(value: Mapping[str, Any]) -> dict[str, MemoryProducer]:
    """Return one producer per in-memory cluster, by client name."""
    return {
        name: MemoryProducer(name, broker) for name, broker in value["clients"].items()
    }


@component("duct.memory/consumers", schema=as_schema(consumers_spec(TRANSPORT)))
async def consumers(value: Mapping[str, Any]) -> ConsumerRuntime:
    """Start the subscriptions served from in-memory clusters.

    `sources` (default `[memory]`) lists the subscription sources served, so
    memory clusters can stand in for real ones: `sources: [kafka]`.
    """
    runtime = make_runtime(
        value["clients"], value["routing"], **consumer_settings(value)
    )
    await runtime.start()
    return runtime


@consumers.halt
async def _halt_consumers(runtime: ConsumerRuntime) -> None:
    await runtime.stop()


@consumers.check
def _check_consumers(value: Any, ctx: CheckContext) -> Iterator[str]:
    yield from consumers_problems(value, ctx, TRANSPORT)
