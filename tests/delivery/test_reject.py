"""Dead-lettered deliveries go to a source's `reject`, handled ones to `ack`.

The sources here are in-memory ones that also record how each delivery was
settled; the consumer runtime under test is the real one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.messaging.routing import Subscription, build_routing
from duct_messaging.transports.base import Delivery
from duct_messaging.transports.memory import MemoryBroker, MemorySource
from tests.delivery._support import WAIT_S, RecordingSink, one_topic_routing

POISON = b"\xff{nope"
JSON = {"content-type": "application/json"}


class Ledger:
    """How a source settled deliveries, by position; tests wait on it."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.rejected: list[int] = []
        self.finished: list[tuple[int, bool]] = []
        self._changed = asyncio.Event()

    def note(self, into: list[Any], items: Sequence[Any]) -> None:
        into.extend(items)
        self._changed.set()

    async def wait_until(self, check: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT_S):
            while not check():
                self._changed.clear()
                await self._changed.wait()


def _positions(deliveries: Sequence[Delivery]) -> list[int]:
    return [int(d.position) for d in deliveries]  # type: ignore[arg-type]


class AckingSource(MemorySource):
    """A memory source that records its acks; it cannot reject."""

    def __init__(self, broker: MemoryBroker, ledger: Ledger) -> None:
        super().__init__(broker, "orders", "worker")
        self.ledger = ledger

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        self.ledger.note(self.ledger.acked, _positions(deliveries))
        await super().ack(deliveries)


class RejectingSource(AckingSource):
    """A memory source that records acks and rejects apart."""

    async def reject(self, deliveries: Sequence[Delivery]) -> None:
        self.ledger.note(self.ledger.rejected, _positions(deliveries))
        await super(AckingSource, self).ack(deliveries)


class TrackingRejectingSource(RejectingSource):
    """A rejecting source that is also told when each attempt ends."""

    def __init__(self, broker: MemoryBroker, ledger: Ledger) -> None:
        super().__init__(broker, ledger)
        self._lock = threading.Lock()
        self.finished: list[tuple[int, bool]] = []

    def claim(self, delivery: Delivery) -> bool:
        return True

    def finish(self, delivery: Delivery, *, finished: bool) -> None:
        with self._lock:
            self.finished.append((int(delivery.position), finished))  # type: ignore[arg-type]
        if finished:  # the acknowledgement of a tracking source
            self.broker.settle("orders", "worker", [int(delivery.position)], ack=True)  # type: ignore[arg-type]


def _runtime(
    handler: Any,
    source: Callable[[MemoryBroker, Ledger], MemorySource],
    sink: RecordingSink,
    **fields: Any,
) -> tuple[ConsumerRuntime, MemoryBroker, Ledger]:
    broker = MemoryBroker("mem")
    ledger = Ledger()
    routing = build_routing(
        one_topic_routing(
            "orders",
            "mem",
            handler,
            source="memory",
            retry={"max_attempts": 1},
            **fields,
        )
    )

    def make_source(subscription: Subscription) -> MemorySource:
        return source(broker, ledger)

    runtime = ConsumerRuntime(
        "memory", routing, make_source, sink=sink, drain_timeout_s=0.3
    )
    return runtime, broker, ledger


def _append(broker: MemoryBroker, *bodies: bytes) -> None:
    for body in bodies:
        broker.append("orders", body, JSON, None)


def _handler(style: str) -> Any:
    def handle(message: Any) -> None:
        if message["n"] == 1:
            raise RuntimeError("order 1 always fails")

    async def ahandle(message: Any) -> None:
        handle(message)

    return handle if style == "sync" else ahandle


class TestReject:
    @pytest.mark.parametrize(
        ("style", "concurrency"),
        [("sync", 1), ("async", 1), ("sync", 4), ("async", 4)],
    )
    async def test_dead_letters_are_rejected_and_handled_messages_acked(
        self, style: str, concurrency: int
    ) -> None:
        """Poison and exhausted retries go to `reject`; the good message to `ack`."""
        sink = RecordingSink()
        runtime, broker, ledger = _runtime(
            _handler(style), RejectingSource, sink, concurrency=concurrency
        )
        await runtime.start()
        try:
            _append(broker, POISON, b'{"n": 1}', b'{"n": 2}')

            await ledger.wait_until(
                lambda: len(ledger.acked) + len(ledger.rejected) == 3
            )
        finally:
            stats = await runtime.stop()

        assert sorted(ledger.rejected) == [0, 1]
        assert ledger.acked == [2]
        assert stats["worker"].dead_lettered == 2
        assert stats["worker"].handled == 1
        statuses = {d.position: d.status for d in sink.letters.snapshot()}
        assert statuses == {0: DeadLetterStatus.POISON, 1: DeadLetterStatus.ELIGIBLE}
        assert broker.pending("orders", "worker") == 0

    async def test_source_without_reject_acks_dead_letters(self) -> None:
        """A source that cannot reject acknowledges dead letters like the rest."""
        runtime, broker, ledger = _runtime(
            _handler("sync"), AckingSource, RecordingSink()
        )
        await runtime.start()
        try:
            _append(broker, POISON, b'{"n": 1}', b'{"n": 2}')

            await ledger.wait_until(lambda: len(ledger.acked) == 3)
        finally:
            await runtime.stop()

        assert sorted(ledger.acked) == [0, 1, 2]
        assert broker.pending("orders", "worker") == 0

    @pytest.mark.parametrize("style", ["sync", "async"])
    async def test_tracking_source_ends_the_claim_then_rejects(
        self, style: str
    ) -> None:
        """`finish` acknowledges only the handled message; dead ones are rejected."""
        sources: list[TrackingRejectingSource] = []

        def make(broker: MemoryBroker, ledger: Ledger) -> MemorySource:
            sources.append(TrackingRejectingSource(broker, ledger))
            return sources[-1]

        runtime, broker, ledger = _runtime(_handler(style), make, RecordingSink())
        await runtime.start()
        try:
            _append(broker, POISON, b'{"n": 1}', b'{"n": 2}')

            await ledger.wait_until(lambda: len(ledger.rejected) == 2)
            await ledger.wait_until(lambda: broker.pending("orders", "worker") == 0)
        finally:
            await runtime.stop()

        [source] = sources
        assert sorted(ledger.rejected) == [0, 1]
        assert ledger.acked == []
        assert sorted(source.finished) == [(0, False), (1, False), (2, True)]

    async def test_dead_letter_written_before_an_abandoned_handler_is_rejected(
        self,
    ) -> None:
        """Stopping past the deadline rejects the finished dead letter, acks nothing."""
        started = threading.Event()
        release = threading.Event()

        def handler(message: Any) -> None:
            started.set()
            release.wait(WAIT_S)

        runtime, broker, ledger = _runtime(handler, RejectingSource, RecordingSink())
        # Both wait before the worker starts, so one fetch takes them together
        # and the poison's outcome is still held when the stop cancels the run.
        _append(broker, POISON, b'{"n": 2}')
        await runtime.start()
        try:
            assert await asyncio.to_thread(started.wait, WAIT_S)
        finally:
            stats = await runtime.stop()
            release.set()

        assert ledger.rejected == [0]
        assert ledger.acked == []
        assert stats["worker"].abandoned == 1
        assert broker.pending("orders", "worker") == 1
