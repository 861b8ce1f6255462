"""The consumer runtime shared by every transport.

A transport's consumers component builds one `SubscriptionWorker` per
subscription whose `source` it serves. Each worker fetches deliveries from
its `ConsumerSource`, runs the message pipeline on each (decode, check the
schema, bind the trace context, call the handler with retries), writes dead
letters, and acknowledges exactly the deliveries that finished.

Delivery is at-least-once. A delivery is acknowledged only after its handler
succeeded or its dead letter was durably written; a source that can reject
(RabbitMQ, NATS) gets a dead-lettered delivery through `reject` instead of
`ack`, so the broker treats it as dead, not done. Poison (a body that cannot
be decoded, or fails the subscription's schema) is dead-lettered as `poison`
without calling the handler. When the dead-letter sink fails, that delivery
and the ones queued behind it are released unacknowledged, so the broker
delivers them again, and the worker backs off briefly before fetching more.

Ordering and retries. With `concurrency: 1` (the default) deliveries are
handled one at a time, in order per *lane*: a partition for Kafka, the whole
subscription for transports without partitions. A failed delivery waiting
out its back-off holds up only its own lane: the worker keeps fetching and
handling the other lanes, and asks a source that can (Kafka) to pause the
waiting partition meanwhile. Synchronous handlers run a whole run of ready
work in one worker-thread call: batches, not single messages, cross between
the event loop and threads. With `concurrency: N > 1`, up to N deliveries
are handled at once, in no particular order; sync handlers then cross to a
thread per message.

Halting stops intake, interrupts back-offs (those deliveries are released),
and lets running handlers finish until the drain deadline. A handler still
running at the deadline is abandoned: its delivery is not acknowledged, and
`WorkerStats.abandoned` and the `consumers_stopped` event count it. `def`
handlers run on daemon threads, so an abandoned one never keeps the process
from exiting.

Failures outside the handler. A message the codec or the schema validator
cannot take (whatever the validator raises) is poison. Any other unexpected
error while handling one delivery (a source hook, a broken exception)
releases that delivery and those queued behind it in its lane, logs
`delivery_failed_releasing`, and backs off; the subscription goes on. If a
fetch loop still dies, `subscription_stopped_for_good` is logged at once,
`ConsumerRuntime.failed()` names it, and `stop` acknowledges what finished
and raises `ConsumerStopError`.

Sources may offer optional capabilities, found by attribute (see
`ReleasingSource`, `RejectingSource`, `TrackingSource`, `PausingSource`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from duct_messaging.messaging._consumer_pipeline import (
    Job,
    MessageContext,
    Pipeline,
    Poison,
    Step,
    wants_context,
)
from duct_messaging.messaging._consumer_worker import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_START_TIMEOUT_S,
    FETCH_TIMEOUT_S,
    ConsumerStartError,
    ConsumerStopError,
    Outcome,
    Status,
    SubscriptionFailedError,
    SubscriptionWorker,
    WorkerStats,
)
from duct_messaging.messaging.deadletter import DeadLetterSink, LoggerSink
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.transports.base import ConsumerSource, Delivery

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_START_TIMEOUT_S",
    "FETCH_TIMEOUT_S",
    "ConsumerRuntime",
    "ConsumerStartError",
    "ConsumerStopError",
    "Job",
    "MessageContext",
    "Outcome",
    "PausingSource",
    "Pipeline",
    "Poison",
    "RejectingSource",
    "ReleasingSource",
    "Status",
    "Step",
    "SubscriptionFailedError",
    "SubscriptionWorker",
    "TrackingSource",
    "WorkerStats",
    "wants_context",
]

log = structlog.get_logger(__name__)


class ReleasingSource(Protocol):
    """A source that can hand deliveries back for delivery again."""

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make `deliveries` come again (to this or another consumer)."""
        ...


class RejectingSource(Protocol):
    """A source that settles dead-lettered deliveries apart from handled ones.

    A delivery whose dead letter was durably written is passed to `reject`,
    never to `ack`; deliveries handled successfully are still acked. A
    source without `reject` acks both alike.
    """

    async def reject(self, deliveries: Sequence[Delivery]) -> None:
        """Settle `deliveries` as dead: never delivered to this subscription again.

        The broker may route them on (a RabbitMQ dead-letter exchange). A
        failure is logged and the deliveries come again, so a source must
        not raise for a delivery it can no longer settle.
        """
        ...


class TrackingSource(Protocol):
    """A source told about each delivery as it starts and finishes.

    Both methods are called from worker threads and the event loop, must be
    thread-safe and must not block. For such a source `finish(...,
    finished=True)` is the acknowledgement: the runtime does not call `ack`
    for it again. If it also has `reject`, a dead-lettered delivery ends
    with `finish(..., finished=False)` and is then passed to `reject`.
    Kafka uses them to commit finished offsets without waiting for the rest
    of a batch, and to drop deliveries of partitions revoked since they
    were fetched.
    """

    def claim(self, delivery: Delivery) -> bool:
        """Return False if `delivery` must not be handled any more (revoked)."""
        ...

    def finish(self, delivery: Delivery, *, finished: bool) -> None:
        """Record the end of one attempt; `finished` acknowledges the delivery."""
        ...


class PausingSource(Protocol):
    """A source that can stop fetching some partitions for a while."""

    async def pause(self, partitions: Sequence[int]) -> None:
        """Stop fetching `partitions` until `resume`; nothing fetched is lost."""
        ...

    async def resume(self, partitions: Sequence[int]) -> None:
        """Fetch `partitions` again from where their deliveries stopped."""
        ...


class ConsumerRuntime:
    """Starts and stops the workers of every subscription one transport serves.

    `make_source(subscription)` builds the transport's source. Subscriptions
    are filtered by `source`; each one's `client` must be a known client
    (checked before anything starts by the transport's component).
    `drain_timeout_s` bounds how long `stop` waits for running handlers.
    """

    def __init__(
        self,
        transport: str,
        routing: Routing,
        make_source: Callable[[Subscription], ConsumerSource],
        *,
        sources: Sequence[str] | None = None,
        sink: DeadLetterSink | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
    ) -> None:
        self.transport = transport
        self.routing = routing
        self.sources = tuple(sources or (transport,))
        self.sink = sink or LoggerSink()
        self.batch_size = batch_size
        self.drain_timeout_s = drain_timeout_s
        self.start_timeout_s = start_timeout_s
        self._make_source = make_source
        self.workers: dict[str, SubscriptionWorker] = {}

    def subscriptions(self) -> list[Subscription]:
        """Return the subscriptions this runtime serves, in routing order."""
        return [
            s for s in self.routing.subscriptions.values() if s.source in self.sources
        ]

    def failed(self) -> dict[str, BaseException]:
        """Return what killed each subscription whose fetch loop died."""
        return {
            sub: worker.failure
            for sub, worker in self.workers.items()
            if worker.failure is not None
        }

    async def start(self) -> None:
        """Start a worker per subscription; stop them all if one fails."""
        started = time.monotonic()
        workers = {
            sub.id: SubscriptionWorker(
                sub,
                self._make_source(sub),
                Pipeline(sub, self.routing, self.sink),
                batch_size=self.batch_size,
            )
            for sub in self.subscriptions()
        }
        results = await asyncio.gather(
            *(w.start(self.start_timeout_s) for w in workers.values()),
            return_exceptions=True,
        )
        self.workers = {
            sub_id: w
            for (sub_id, w), r in zip(workers.items(), results, strict=True)
            if not isinstance(r, BaseException)
        }
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            try:
                await self.stop()
            except ConsumerStopError as exc:
                log.warning(
                    "consumers_stop_failed_after_start_failure",
                    transport=self.transport,
                    error=str(exc),
                    next="the start error is raised",
                )
            raise errors[0]
        log.info(
            "consumers_started",
            transport=self.transport,
            subscriptions=sorted(self.workers),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def stop(self) -> dict[str, WorkerStats]:
        """Stop every worker, draining running handlers until the deadline.

        Logs `consumers_stopping` once intake stopped, then `consumers_stopped`:
        a warning naming the abandoned count per subscription when a handler
        outlived the deadline, or naming the failed subscriptions.

        Every worker is stopped even if some fail to; then
        `ConsumerStopError` is raised, carrying each failure (a worker whose
        fetch loop had died fails with `SubscriptionFailedError`).
        """
        started = time.monotonic()
        for worker in self.workers.values():
            worker.request_stop()
        log.info(
            "consumers_stopping",
            transport=self.transport,
            subscriptions=sorted(self.workers),
            drain_timeout_s=self.drain_timeout_s,
        )
        results = await asyncio.gather(
            *(w.stop(self.drain_timeout_s) for w in self.workers.values()),
            return_exceptions=True,
        )
        failures = {
            sub: result
            for sub, result in zip(self.workers, results, strict=True)
            if isinstance(result, BaseException)
        }
        report = {sub: worker.stats for sub, worker in self.workers.items()}
        stats = list(report.values())
        abandoned = {sub: s.abandoned for sub, s in report.items() if s.abandoned}
        event = log.warning if abandoned or failures else log.info
        event(
            "consumers_stopped",
            transport=self.transport,
            handled=sum(s.handled for s in stats),
            dead_lettered=sum(s.dead_lettered for s in stats),
            released=sum(s.released for s in stats),
            abandoned=sum(abandoned.values()),
            abandoned_by_subscription=abandoned,
            failed=sorted(failures),
            drain_timeout_s=self.drain_timeout_s,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        self.workers = {}
        if failures:
            raise ConsumerStopError(self.transport, failures)
        return report
