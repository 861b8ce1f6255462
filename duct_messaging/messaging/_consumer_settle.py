"""Fetching from a worker's source, and settling each delivery with it.

Settling: what finished is acknowledged; a delivery whose dead letter was
written goes to the source's `reject` instead, when the source has one
(RabbitMQ, NATS), so the broker can route or drop it as dead. A tracking
source (one with a `finish` hook) is told at once instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from duct_messaging.messaging._consumer_errors import describe
from duct_messaging.messaging._consumer_lanes import Outcome, Status
from duct_messaging.messaging._consumer_pipeline import Pipeline
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.messaging.routing import Subscription
from duct_messaging.transports.base import ConsumerSource, Delivery

log = structlog.get_logger(__name__)

# A dead-letter write that has not returned by then counts as failed, so a
# hung sink cannot hold a lane (and its unacknowledged messages) forever.
DEADLETTER_WRITE_TIMEOUT_S = 30.0
# A failed fetch is retried after this long; the source reconnects meanwhile.
FETCH_FAILURE_BACKOFF_S = 1.0


@dataclass(slots=True)
class WorkerStats:
    """Counters a worker keeps for halt reports and tests."""

    handled: int = 0
    dead_lettered: int = 0
    released: int = 0
    dropped: int = 0
    abandoned: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


class SourceSettling:
    """Fetch from a worker's source and settle deliveries with it.

    `SubscriptionWorker` builds on this; the attributes below are set by
    its constructor.
    """

    subscription: Subscription
    source: ConsumerSource
    pipeline: Pipeline
    stats: WorkerStats
    _stop: asyncio.Event
    _unsettled: dict[int, Delivery]
    _unsettled_dead: dict[int, Delivery]
    _finish_hook: Callable[..., None] | None
    _can_reject: bool

    def _end_claim(self, delivery: Delivery) -> None:
        """End the claim of an attempt that failed unexpectedly."""
        hook = self._finish_hook
        if hook is None:
            return
        try:
            hook(delivery, finished=False)
        except Exception as exc:
            log.warning(
                "finish_failed_continuing",
                subscription=self.subscription.id,
                error=describe(exc),
                next="the delivery is released and comes again",
            )

    def _finished(
        self, delivery: Delivery, *, finished: bool, dead: bool = False
    ) -> None:
        rejected = dead and self._can_reject
        if self._finish_hook is not None:
            # A dead delivery of a rejecting source is settled by `reject`
            # (in `_settle`): the hook only ends its claim.
            self._finish_hook(delivery, finished=finished and not rejected)
        elif rejected:
            self._unsettled_dead[id(delivery)] = delivery
        elif finished:
            self._unsettled[id(delivery)] = delivery

    def _write_from_thread(
        self, dead_letter: DeadLetter, loop: asyncio.AbstractEventLoop
    ) -> bool:
        try:
            future = asyncio.run_coroutine_threadsafe(
                self._write_dead_letter(dead_letter), loop
            )
        except RuntimeError:  # the loop is closed: the system is gone
            return False
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if loop.is_closed() or not loop.is_running():
                    future.cancel()
                    return False

    async def _write_dead_letter(self, dead_letter: DeadLetter) -> bool:
        try:
            await asyncio.wait_for(
                self.pipeline.sink.write(dead_letter), DEADLETTER_WRITE_TIMEOUT_S
            )
        except Exception as exc:
            log.warning(
                "dead_letter_write_failed",
                subscription=self.subscription.id,
                topic=dead_letter.topic,
                message_id=dead_letter.message_id,
                error=repr(exc),
                next="the message stays unacknowledged and is delivered again",
            )
            return False
        log.error(
            "message_dead_lettered",
            subscription=self.subscription.id,
            topic=dead_letter.topic,
            message_id=dead_letter.message_id,
            dead_letter_id=dead_letter.id,
            status=str(dead_letter.status),
            attempts=dead_letter.attempts,
            error_type=dead_letter.error_type,
        )
        return True

    async def _fetch(self, limit: int, timeout: float) -> Sequence[Delivery]:
        try:
            batch = await self.source.fetch(limit, timeout)
        except Exception as exc:  # keep consuming; the source reconnects
            log.warning(
                "fetch_failed_retrying",
                subscription=self.subscription.id,
                error=repr(exc),
                delay_s=FETCH_FAILURE_BACKOFF_S,
            )
            await wait_for_stop(self._stop, FETCH_FAILURE_BACKOFF_S)
            return ()
        if batch:
            self.stats.batches += 1
        return batch

    async def _settle(
        self, outcomes: Sequence[Outcome], done: Sequence[Delivery] = ()
    ) -> None:
        """Acknowledge what finished (`done` handled too), release the rest.

        Dead-lettered deliveries are rejected instead when the source can
        reject; that holds for a tracking source too, whose `finish` hook
        did not acknowledge them.
        """
        if not outcomes and not done:
            return
        finished: list[Delivery] = list(done)
        dead: list[Delivery] = []
        released: list[Delivery] = []
        can_reject = self._can_reject
        stats = self.stats
        stats.handled += len(done)
        for outcome in outcomes:
            status = outcome.status
            if status is Status.DONE:
                stats.handled += 1
                finished.append(outcome.delivery)
            elif status is Status.DEAD:
                stats.dead_lettered += 1
                (dead if can_reject else finished).append(outcome.delivery)
            elif status is Status.RELEASED:
                stats.released += 1
                released.append(outcome.delivery)
            else:
                stats.dropped += 1
        if dead:
            await self._reject(dead)
        if finished and self._finish_hook is None:
            await self._ack(finished)
        await self._release(released)

    async def _ack(self, deliveries: Sequence[Delivery]) -> None:
        try:
            await self.source.ack(deliveries)
        except Exception as exc:
            # Unacknowledged deliveries come again: at-least-once still holds.
            log.warning(
                "ack_failed_continuing",
                subscription=self.subscription.id,
                count=len(deliveries),
                error=repr(exc),
            )
        for delivery in deliveries:
            self._unsettled.pop(id(delivery), None)

    async def _reject(self, deliveries: Sequence[Delivery]) -> None:
        try:
            await self.source.reject(deliveries)  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning(
                "reject_failed_continuing",
                subscription=self.subscription.id,
                count=len(deliveries),
                error=repr(exc),
                next="the messages come again and are dead-lettered again",
            )
        for delivery in deliveries:
            self._unsettled_dead.pop(id(delivery), None)

    async def _settle_unsettled(self) -> None:
        """Settle what finished while the fetch loop was being cancelled."""
        if self._unsettled_dead:
            await self._reject(list(self._unsettled_dead.values()))
        if self._unsettled:
            await self._ack(list(self._unsettled.values()))

    async def _release(self, deliveries: Sequence[Delivery]) -> None:
        release = getattr(self.source, "release", None)
        if not deliveries or release is None:
            return
        try:
            await release(deliveries)
        except Exception as exc:
            log.warning(
                "release_failed_continuing",
                subscription=self.subscription.id,
                count=len(deliveries),
                error=repr(exc),
            )


async def wait_for_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait until `stop` is set or `seconds` passed; return True if stopped."""
    if stop.is_set():
        return True
    if seconds <= 0:
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
