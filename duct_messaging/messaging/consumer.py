"""The consumer runtime shared by every transport.

A transport's consumers component builds one `SubscriptionWorker` per
subscription whose `source` it serves. Each worker fetches batches from its
`ConsumerSource`, runs the message pipeline on every delivery (decode, check
the schema, bind the trace context, call the handler with retries), writes
dead letters, and acknowledges exactly the deliveries that finished.

Delivery is at-least-once. A delivery is acknowledged only after its handler
succeeded or its dead letter was durably written. When the dead-letter sink
fails, that delivery and the ones behind it in the batch are released
unacknowledged, so the broker delivers them again.

Synchronous handlers with `concurrency: 1` run a whole batch in one worker
thread call: batches, not single messages, cross between the event loop and
threads. Other handlers run per message, at most `concurrency` at a time.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import structlog
from duct_messaging.messaging.schemas import SchemaValidationError, Validator

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import envelope
from duct_messaging.messaging.codecs import Codec, DecodeError, get_codec
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    LoggerSink,
    error_details,
    utcnow,
)
from duct_messaging.messaging.retry import RetryPolicy
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.messaging.tracing import TraceContext, bind_trace, extract, unbind_trace
from duct_messaging.transports.base import ConsumerSource, Delivery

log = structlog.get_logger(__name__)

# A fetch waits at most this long, so a stop request is noticed quickly.
FETCH_TIMEOUT_S = 0.1
DEFAULT_BATCH_SIZE = 500
DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_START_TIMEOUT_S = 30.0


class ConsumerStartError(DuctMessagingError, RuntimeError):
    """Raised when a subscription's source could not start in time."""

    def __init__(self, subscription: str, reason: str) -> None:
        self.subscription = subscription
        super().__init__(f"Subscription {subscription!r} failed to start: {reason}")


class Poison(DuctMessagingError):
    """A message that can never be handled: undecodable or schema-invalid."""


@dataclass(slots=True)
class MessageContext:
    """What a handler may know about the message it handles.

    A handler that declares a second parameter receives this object.
    """

    headers: dict[str, str]
    topic: str
    subscription: str
    client: str
    source: str
    destination: str
    partition: int | None
    position: int | str | None
    attempt: int
    trace: TraceContext
    key: bytes | None = None

    @property
    def message_id(self) -> str | None:
        """Return the producer-assigned message id, if the message has one."""
        return self.headers.get(envelope.MESSAGE_ID)


class Status(Enum):
    """What became of one delivery."""

    DONE = "done"
    DEAD = "dead"
    RELEASED = "released"


@dataclass(slots=True)
class Outcome:
    """The result of the pipeline for one delivery."""

    delivery: Delivery
    status: Status
    dead_letter: DeadLetter | None = None


@dataclass(slots=True)
class WorkerStats:
    """Counters a worker keeps for halt reports and tests."""

    handled: int = 0
    dead_lettered: int = 0
    released: int = 0
    abandoned: int = 0
    batches: int = 0
    errors: list[str] = field(default_factory=list)


def wants_context(handler: Callable[..., Any]) -> bool:
    """Return True if `handler` takes a second (context) argument."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _is_async(handler: Callable[..., Any]) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class Pipeline:
    """Decode, check, trace and handle one subscription's deliveries.

    Everything that can be decided once (codec, schema, handler shape, retry
    policy) is decided here at construction, not per message.
    """

    def __init__(
        self,
        subscription: Subscription,
        routing: Routing,
        sink: DeadLetterSink,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.subscription = subscription
        self.sink = sink
        self.policy = RetryPolicy.from_config(subscription.retry)
        self.handler = subscription.handler
        self.is_async = _is_async(self.handler)
        self.with_context = wants_context(self.handler)
        self.validator: Validator | None = routing.subscription_validators.get(
            subscription.id
        )
        self._default_codec: Codec = get_codec(subscription.codec)
        self._codecs: dict[str, Codec] = {}
        self._loop = loop

    def _codec(self, headers: dict[str, str]) -> Codec:
        content_type = headers.get(envelope.CONTENT_TYPE)
        if not content_type or content_type == self._default_codec.content_type:
            return self._default_codec
        codec = self._codecs.get(content_type)
        if codec is None:
            codec = self._codecs[content_type] = get_codec(content_type)
        return codec

    def prepare(self, delivery: Delivery) -> tuple[Any, MessageContext]:
        """Return the decoded message and its context; raise `Poison` if unusable."""
        try:
            message = self._codec(delivery.headers).decode(delivery.body)
        except (DecodeError, ValueError) as exc:
            raise Poison(f"cannot decode message: {exc}") from exc
        if self.validator is not None:
            try:
                self.validator.validate(message)
            except SchemaValidationError as exc:
                raise Poison(str(exc)) from exc
        incoming = extract(delivery.headers)
        trace = incoming.child() if incoming else TraceContext.new_root()
        sub = self.subscription
        ctx = MessageContext(
            headers=delivery.headers,
            topic=sub.topic,
            subscription=sub.id,
            client=sub.client,
            source=sub.source,
            destination=delivery.destination,
            partition=delivery.partition,
            position=delivery.position,
            attempt=delivery.attempt,
            trace=trace,
            key=delivery.key,
        )
        return message, ctx

    def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempts: int,
        status: DeadLetterStatus,
        first_failure: Any,
    ) -> DeadLetter:
        """Build the dead letter for `delivery`, which failed with `exc`."""
        kind, text, trace = error_details(exc)
        sub = self.subscription
        return DeadLetter(
            body=delivery.body,
            headers=dict(delivery.headers),
            topic=sub.topic,
            subscription=sub.id,
            client=sub.client,
            source=sub.source,
            destination=delivery.destination,
            attempts=attempts,
            status=status,
            error_type=kind,
            error_message=text,
            error_traceback=trace,
            first_failure_at=first_failure,
            last_failure_at=utcnow(),
            partition=delivery.partition,
            position=delivery.position,
            config=sub.deadletter,
        )

    def run_sync(self, delivery: Delivery, stop: threading.Event) -> Outcome:
        """Handle `delivery` with a synchronous handler, retrying per policy."""
        try:
            message, ctx = self.prepare(delivery)
        except Poison as exc:
            dl = self.dead_letter(delivery, exc, 1, DeadLetterStatus.POISON, utcnow())
            return Outcome(delivery, Status.DEAD, dl)
        args = (message, ctx) if self.with_context else (message,)
        first_failure = None
        attempt = 0
        while True:
            attempt += 1
            ctx.attempt = delivery.attempt + attempt - 1
            try:
                token = bind_trace(ctx.trace)
                try:
                    self.handler(*args)
                finally:
                    unbind_trace(token)
                return Outcome(delivery, Status.DONE)
            except Exception as exc:
                first_failure = first_failure or utcnow()
                if not self.policy.should_retry(exc, attempt):
                    dl = self.dead_letter(
                        delivery, exc, attempt, DeadLetterStatus.ELIGIBLE, first_failure
                    )
                    return Outcome(delivery, Status.DEAD, dl)
                self._log_retry(ctx, attempt, exc)
                if stop.wait(self.policy.delay(attempt)):
                    return Outcome(delivery, Status.RELEASED)

    async def run_async(self, delivery: Delivery, stop: asyncio.Event) -> Outcome:
        """Handle `delivery` with an async handler, retrying per policy."""
        try:
            message, ctx = self.prepare(delivery)
        except Poison as exc:
            dl = self.dead_letter(delivery, exc, 1, DeadLetterStatus.POISON, utcnow())
            return Outcome(delivery, Status.DEAD, dl)
        args = (message, ctx) if self.with_context else (message,)
        first_failure = None
        attempt = 0
        while True:
            attempt += 1
            ctx.attempt = delivery.attempt + attempt - 1
            try:
                token = bind_trace(ctx.trace)
                try:
                    await self.handler(*args)
                finally:
                    unbind_trace(token)
                return Outcome(delivery, Status.DONE)
            except Exception as exc:
                first_failure = first_failure or utcnow()
                if not self.policy.should_retry(exc, attempt):
                    dl = self.dead_letter(
                        delivery, exc, attempt, DeadLetterStatus.ELIGIBLE, first_failure
                    )
                    return Outcome(delivery, Status.DEAD, dl)
                self._log_retry(ctx, attempt, exc)
                try:
                    await asyncio.wait_for(stop.wait(), self.policy.delay(attempt))
                    return Outcome(delivery, Status.RELEASED)
                except TimeoutError:
                    pass

    def _log_retry(self, ctx: MessageContext, attempt: int, exc: Exception) -> None:
        log.warning(
            "handler_failed_retrying",
            subscription=ctx.subscription,
            topic=ctx.topic,
            message_id=ctx.message_id,
            attempt=attempt,
            max_attempts=self.policy.max_attempts,
            error=repr(exc),
        )


class SubscriptionWorker:
    """Runs one subscription: fetch a batch, handle it, acknowledge it."""

    def __init__(
        self,
        subscription: Subscription,
        source: ConsumerSource,
        pipeline: Pipeline,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.subscription = subscription
        self.source = source
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.stats = WorkerStats()
        self._stop = asyncio.Event()
        self._thread_stop = threading.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=subscription.concurrency,
            thread_name_prefix=f"duct-{subscription.id}",
        )
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._semaphore = asyncio.Semaphore(subscription.concurrency)

    async def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start the source, then the fetch loop; return once subscribed."""
        try:
            await asyncio.wait_for(self.source.start(), timeout)
        except Exception as exc:
            raise ConsumerStartError(self.subscription.id, repr(exc)) from exc
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"duct-subscription-{self.subscription.id}"
        )

    async def stop(self, deadline_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> WorkerStats:
        """Stop intake, drain in-flight handlers until the deadline, then close.

        A handler still running at the deadline is abandoned: its delivery is
        not acknowledged, and is counted in `stats.abandoned`.
        """
        self._stop.set()
        self._thread_stop.set()
        if self._task is not None:
            done, _ = await asyncio.wait({self._task}, timeout=deadline_s)
            if not done:
                self.stats.abandoned += max(len(self._in_flight), 1)
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.source.stop()
        return self.stats

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = await self.source.fetch(self.batch_size, FETCH_TIMEOUT_S)
            except Exception as exc:  # keep consuming; the source reconnects
                log.warning(
                    "fetch_failed_retrying",
                    subscription=self.subscription.id,
                    error=repr(exc),
                )
                await _sleep_or_stop(self._stop, 1.0)
                continue
            if not batch:
                continue
            self.stats.batches += 1
            outcomes = await self._process(batch)
            await self._settle(outcomes)

    async def _process(self, batch: Sequence[Delivery]) -> list[Outcome]:
        pipeline = self.pipeline
        if not pipeline.is_async and self.subscription.concurrency == 1:
            loop = asyncio.get_running_loop()
            ctx = contextvars.copy_context()
            return await loop.run_in_executor(
                self._executor, ctx.run, self._process_batch_sync, batch, loop
            )
        return await self._process_concurrently(batch)

    def _process_batch_sync(
        self, batch: Sequence[Delivery], loop: asyncio.AbstractEventLoop
    ) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for i, delivery in enumerate(batch):
            if self._thread_stop.is_set():
                outcomes.extend(Outcome(d, Status.RELEASED) for d in batch[i:])
                break
            outcome = self.pipeline.run_sync(delivery, self._thread_stop)
            if outcome.status is Status.DEAD and not self._write_dead_letter_from_thread(
                outcome, loop
            ):
                outcomes.append(Outcome(delivery, Status.RELEASED))
                outcomes.extend(Outcome(d, Status.RELEASED) for d in batch[i + 1 :])
                break
            outcomes.append(outcome)
        return outcomes

    def _write_dead_letter_from_thread(
        self, outcome: Outcome, loop: asyncio.AbstractEventLoop
    ) -> bool:
        future = asyncio.run_coroutine_threadsafe(self._write_dead_letter(outcome), loop)
        return future.result()

    async def _process_concurrently(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        failed = False

        async def one(delivery: Delivery) -> Outcome:
            async with self._semaphore:
                if self._stop.is_set() or failed:
                    return Outcome(delivery, Status.RELEASED)
                outcome = await self._run_one(delivery)
            return outcome

        if self.subscription.concurrency == 1:
            for delivery in batch:
                outcome = await one(delivery)
                if outcome.status is Status.DEAD and not await self._write_dead_letter(
                    outcome
                ):
                    failed = True
                    outcome = Outcome(delivery, Status.RELEASED)
                outcomes.append(outcome)
            return outcomes

        tasks = [asyncio.ensure_future(one(d)) for d in batch]
        self._in_flight.update(tasks)
        try:
            results = await asyncio.gather(*tasks)
        finally:
            self._in_flight.difference_update(tasks)
        for outcome in results:
            if outcome.status is Status.DEAD and not await self._write_dead_letter(outcome):
                outcome = Outcome(outcome.delivery, Status.RELEASED)
            outcomes.append(outcome)
        return outcomes

    async def _run_one(self, delivery: Delivery) -> Outcome:
        if self.pipeline.is_async:
            return await self.pipeline.run_async(delivery, self._stop)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(
            self._executor, ctx.run, self.pipeline.run_sync, delivery, self._thread_stop
        )

    async def _write_dead_letter(self, outcome: Outcome) -> bool:
        dead_letter = outcome.dead_letter
        assert dead_letter is not None
        try:
            await self.pipeline.sink.write(dead_letter)
        except Exception as exc:
            log.error(
                "dead_letter_write_failed",
                subscription=self.subscription.id,
                topic=dead_letter.topic,
                message_id=dead_letter.message_id,
                error=repr(exc),
            )
            return False
        log.error(
            "message_dead_lettered",
            subscription=self.subscription.id,
            topic=dead_letter.topic,
            message_id=dead_letter.message_id,
            status=str(dead_letter.status),
            attempts=dead_letter.attempts,
            error_type=dead_letter.error_type,
        )
        return True

    async def _settle(self, outcomes: Sequence[Outcome]) -> None:
        finished = [o.delivery for o in outcomes if o.status is not Status.RELEASED]
        released = [o.delivery for o in outcomes if o.status is Status.RELEASED]
        self.stats.handled += sum(1 for o in outcomes if o.status is Status.DONE)
        self.stats.dead_lettered += sum(1 for o in outcomes if o.status is Status.DEAD)
        self.stats.released += len(released)
        if finished:
            await self.source.ack(finished)
        if released:
            release = getattr(self.source, "release", None)
            if release is not None:
                await release(released)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


class ConsumerRuntime:
    """Starts and stops the workers of every subscription one transport serves.

    `make_source(subscription)` builds the transport's source. Subscriptions
    are filtered by `source`; each one's `client` must be a known client
    (checked before anything starts by the transport's component).
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
        return [s for s in self.routing.subscriptions.values() if s.source in self.sources]

    async def start(self) -> None:
        """Start a worker per subscription; stop them all if one fails."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        workers = {
            sub.id: SubscriptionWorker(
                sub,
                self._make_source(sub),
                Pipeline(sub, self.routing, self.sink, loop),
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
            await self.stop()
            raise errors[0]
        log.info(
            "consumers_started",
            transport=self.transport,
            subscriptions=sorted(self.workers),
            ms=round((time.monotonic() - started) * 1000, 1),
        )

    async def stop(self) -> dict[str, WorkerStats]:
        """Stop every worker, draining in-flight handlers until the deadline."""
        stats = await asyncio.gather(
            *(w.stop(self.drain_timeout_s) for w in self.workers.values())
        )
        report = dict(zip(self.workers, stats, strict=True))
        abandoned = sum(s.abandoned for s in stats)
        event = log.warning if abandoned else log.info
        event(
            "consumers_stopped",
            transport=self.transport,
            handled=sum(s.handled for s in stats),
            dead_lettered=sum(s.dead_lettered for s in stats),
            abandoned=abandoned,
        )
        self.workers = {}
        return report
