"""The consumer runtime shared by every transport.

A transport's consumers component builds one `SubscriptionWorker` per
subscription whose `source` it serves. Each worker fetches deliveries from
its `ConsumerSource`, runs the message pipeline on each (decode, check the
schema, bind the trace context, call the handler with retries), writes dead
letters, and acknowledges exactly the deliveries that finished.

Delivery is at-least-once. A delivery is acknowledged only after its handler
succeeded or its dead letter was durably written. Poison (a body that cannot
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
`WorkerStats.abandoned` and the `consumers_stopped` event count it.

Sources may offer optional capabilities, found by attribute (see
`ReleasingSource`, `TrackingSource`, `PausingSource`).
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

import structlog

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import envelope
from duct_messaging.messaging.codecs import Codec, get_codec
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    LoggerSink,
    dead_letter_id,
    error_details,
    utcnow,
)
from duct_messaging.messaging.retry import RetryPolicy
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.messaging.schemas import SchemaValidationError, Validator
from duct_messaging.messaging.tracing import (
    TraceContext,
    bind_trace,
    extract,
    unbind_trace,
)
from duct_messaging.transports.base import ConsumerSource, Delivery

log = structlog.get_logger(__name__)

# A fetch waits at most this long, so a stop request is noticed quickly.
FETCH_TIMEOUT_S = 0.1
DEFAULT_BATCH_SIZE = 500
DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_START_TIMEOUT_S = 30.0
# A dead-letter write that has not returned by then counts as failed, so a
# hung sink cannot hold a lane (and its unacknowledged messages) forever.
DEADLETTER_WRITE_TIMEOUT_S = 30.0
# After a dead-letter write failed the sink is likely down: wait this long
# before fetching again instead of spinning on redeliveries.
SINK_FAILURE_BACKOFF_S = 0.5
# A failed fetch is retried after this long; the source reconnects meanwhile.
FETCH_FAILURE_BACKOFF_S = 1.0


class ConsumerStartError(DuctMessagingError, RuntimeError):
    """Raised when a subscription's source could not start in time."""

    def __init__(self, subscription: str, reason: str) -> None:
        self.subscription = subscription
        super().__init__(f"Subscription {subscription!r} failed to start: {reason}")


class Poison(DuctMessagingError):
    """A message that can never be handled: undecodable or schema-invalid."""


class ReleasingSource(Protocol):
    """A source that can hand deliveries back for delivery again."""

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Make `deliveries` come again (to this or another consumer)."""
        ...


class TrackingSource(Protocol):
    """A source told about each delivery as it starts and finishes.

    Both methods are called from worker threads and the event loop, must be
    thread-safe and must not block. Kafka uses them to commit finished
    offsets without waiting for the rest of a batch, and to drop deliveries
    of partitions revoked since they were fetched.
    """

    def claim(self, delivery: Delivery) -> bool:
        """Return False if `delivery` must not be handled any more (revoked)."""
        ...

    def finish(self, delivery: Delivery, *, finished: bool) -> None:
        """Record the end of one attempt; `finished` means it may be acknowledged."""
        ...


class PausingSource(Protocol):
    """A source that can stop fetching some partitions for a while."""

    async def pause(self, partitions: Sequence[int]) -> None:
        """Stop fetching `partitions` until `resume`; nothing fetched is lost."""
        ...

    async def resume(self, partitions: Sequence[int]) -> None:
        """Fetch `partitions` again from where their deliveries stopped."""
        ...


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
    DROPPED = "dropped"


@dataclass(slots=True)
class Outcome:
    """The result of the pipeline for one delivery.

    `DROPPED` means the source withdrew the delivery (its Kafka partition
    was revoked): it is neither acknowledged nor released.
    """

    delivery: Delivery
    status: Status
    dead_letter: DeadLetter | None = None


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


@dataclass(slots=True)
class Job:
    """One delivery being handled: its decoded arguments and retry state."""

    delivery: Delivery
    args: tuple[Any, ...]
    ctx: MessageContext
    attempts: int = 0
    first_failure: datetime | None = None


# What one handler attempt says: None (done), a back-off in seconds before
# the next attempt, or the dead letter to write.
Step = DeadLetter | float | None


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
    policy) is decided here at construction, not per message. `open` turns a
    delivery into a `Job` (or a poison dead letter); each `attempt_*` call
    runs the handler once and says what comes next.
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
        except Exception as exc:  # any codec failure means the bytes are unusable
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

    def open(self, delivery: Delivery) -> Job | DeadLetter:
        """Return the job for `delivery`, or its poison dead letter."""
        try:
            message, ctx = self.prepare(delivery)
        except Poison as exc:
            # One attempt: the decode (or schema check) that failed.
            now = utcnow()
            return self.dead_letter(delivery, exc, 1, DeadLetterStatus.POISON, now)
        args = (message, ctx) if self.with_context else (message,)
        return Job(delivery, args, ctx)

    def attempt_sync(self, job: Job) -> Step:
        """Call the synchronous handler once for `job`; see `Step`."""
        self._count(job)
        token = bind_trace(job.ctx.trace)
        try:
            self.handler(*job.args)
        except Exception as exc:
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    async def attempt_async(self, job: Job) -> Step:
        """Await the async handler once for `job`; see `Step`."""
        self._count(job)
        token = bind_trace(job.ctx.trace)
        try:
            await self.handler(*job.args)
        except Exception as exc:
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    def _count(self, job: Job) -> None:
        job.attempts += 1
        job.ctx.attempt = job.delivery.attempt + job.attempts - 1

    def _failed(self, job: Job, exc: Exception) -> Step:
        job.first_failure = job.first_failure or utcnow()
        if not self.policy.should_retry(exc, job.attempts):
            return self.dead_letter(
                job.delivery,
                exc,
                job.attempts,
                DeadLetterStatus.ELIGIBLE,
                job.first_failure,
            )
        delay = self.policy.delay(job.attempts)
        log.warning(
            "handler_failed_retrying",
            subscription=job.ctx.subscription,
            topic=job.ctx.topic,
            message_id=job.ctx.message_id,
            attempt=job.attempts,
            max_attempts=self.policy.max_attempts,
            delay_s=round(delay, 3),
            error=repr(exc),
        )
        return delay

    def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempts: int,
        status: DeadLetterStatus,
        first_failure: datetime,
    ) -> DeadLetter:
        """Build the dead letter for `delivery`, which failed with `exc`."""
        kind, text, trace = error_details(exc)
        sub = self.subscription
        headers = dict(delivery.headers)
        return DeadLetter(
            body=delivery.body,
            headers=headers,
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
            id=dead_letter_id(
                sub.id,
                sub.client,
                delivery.destination,
                delivery.partition,
                delivery.position,
                headers.get(envelope.MESSAGE_ID),
            ),
            config=sub.deadletter,
            key=delivery.key,
        )


@dataclass(slots=True)
class _Lane:
    """Deliveries handled in order: one partition, or a whole subscription."""

    key: int | None
    queue: deque[Delivery] = field(default_factory=deque)
    job: Job | None = None
    ready_at: float = 0.0
    paused: bool = False

    def waiting(self, now: float) -> bool:
        return bool(self.queue) and self.ready_at > now

    def pop(self) -> Delivery:
        self.job = None
        self.ready_at = 0.0
        return self.queue.popleft()

    def clear(self) -> list[Delivery]:
        self.job = None
        self.ready_at = 0.0
        out = list(self.queue)
        self.queue.clear()
        return out


class _Lanes:
    """The ordered lanes of one worker, keyed by partition."""

    def __init__(self) -> None:
        self._lanes: dict[int | None, _Lane] = {}

    def add(self, deliveries: Iterable[Delivery]) -> None:
        for delivery in deliveries:
            lane = self._lanes.get(delivery.partition)
            if lane is None:
                lane = self._lanes[delivery.partition] = _Lane(delivery.partition)
            lane.queue.append(delivery)

    def next_ready(self, now: float) -> _Lane | None:
        for lane in self._lanes.values():
            if lane.queue and lane.ready_at <= now:
                return lane
        return None

    def until_ready(self, now: float) -> float | None:
        """Return seconds until some lane can go on (0: now; None: all empty)."""
        waits = [
            max(lane.ready_at - now, 0.0) for lane in self._lanes.values() if lane.queue
        ]
        return min(waits) if waits else None

    def room(self, limit: int, now: float, can_pause: bool) -> int:
        """Return how many more deliveries may be fetched."""
        queued = 0
        for lane in self._lanes.values():
            if lane.paused:
                continue
            if not can_pause and lane.waiting(now):
                return 0  # fetching more would only pile up behind the back-off
            queued += len(lane.queue)
        return max(limit - queued, 0)

    def pause_changes(self, now: float, can_pause: bool) -> tuple[list[int], list[int]]:
        """Return (partitions to pause, partitions to resume); drop idle lanes."""
        to_pause: list[int] = []
        to_resume: list[int] = []
        for key, lane in list(self._lanes.items()):
            waiting = lane.waiting(now)
            if key is not None and lane.paused and not waiting:
                lane.paused = False
                to_resume.append(key)
            elif key is not None and can_pause and waiting and not lane.paused:
                lane.paused = True
                to_pause.append(key)
            if not lane.queue and not lane.paused:
                del self._lanes[key]
        return to_pause, to_resume

    def drain(self) -> list[Delivery]:
        out: list[Delivery] = []
        for lane in self._lanes.values():
            out.extend(lane.clear())
        self._lanes.clear()
        return out


# What the steps generators ask their driver to do: run one attempt of a
# `Job`, or write a `DeadLetter` (answered with True when it is durable).
_Request = Job | DeadLetter
_Steps = Generator[_Request, Any, list[Outcome]]


class SubscriptionWorker:
    """Runs one subscription: fetch, handle, acknowledge, until stopped."""

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
        self._ordered = subscription.concurrency == 1
        self._stop = asyncio.Event()
        # The same stop request, readable from worker threads.
        self._halting = threading.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=subscription.concurrency,
            thread_name_prefix=f"duct-{subscription.id}",
        )
        self._task: asyncio.Task[None] | None = None
        self._semaphore = asyncio.Semaphore(subscription.concurrency)
        self._lanes = _Lanes()
        # Deliveries whose handler (or dead-letter write) is running now.
        self._active: set[int] = set()
        # Finished deliveries not acknowledged yet, by id().
        self._unsettled: dict[int, Delivery] = {}
        self._sink_failed = False
        self._claim: Callable[[Delivery], bool] | None = getattr(source, "claim", None)
        self._finish_hook: Callable[..., None] | None = getattr(source, "finish", None)
        self._can_pause = hasattr(source, "pause") and hasattr(source, "resume")

    async def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start the source, then the fetch loop; return once subscribed."""
        try:
            await asyncio.wait_for(self.source.start(), timeout)
        except Exception as exc:
            raise ConsumerStartError(self.subscription.id, repr(exc)) from exc
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"duct-subscription-{self.subscription.id}"
        )

    def request_stop(self) -> None:
        """Stop intake now: nothing new starts, back-offs end; `stop` drains."""
        self._stop.set()
        self._halting.set()

    async def stop(self, deadline_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> WorkerStats:
        """Stop intake, drain running handlers until the deadline, then close.

        Deliveries not started, and those waiting out a back-off, are
        released. A handler still running at the deadline is abandoned: its
        delivery is not acknowledged and is counted in `stats.abandoned`.
        What finished is acknowledged before the source stops.
        """
        self.request_stop()
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=deadline_s)
            if not done:
                self.stats.abandoned = len(self._active)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self._ack_unsettled()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.source.stop()
        return self.stats

    async def _run(self) -> None:
        try:
            if self._ordered:
                await self._run_ordered()
            else:
                await self._run_concurrent()
        except Exception:
            log.error(
                "subscription_failed", subscription=self.subscription.id, exc_info=True
            )
            raise

    # -- ordered: lanes, one handler call at a time ---------------------------

    async def _run_ordered(self) -> None:
        lanes = self._lanes
        while not self._stop.is_set():
            now = time.monotonic()
            if lanes.next_ready(now) is not None:
                await self._update_pauses()
                outcomes = await self._process_ready()
                await self._settle(outcomes)
            await self._update_pauses()
            if self._sink_failed:
                self._sink_failed = False
                await _wait_for_stop(self._stop, SINK_FAILURE_BACKOFF_S)
                continue
            now = time.monotonic()
            room = lanes.room(self.batch_size, now, self._can_pause)
            wait = lanes.until_ready(now)
            if room > 0:
                timeout = (
                    FETCH_TIMEOUT_S if wait is None else min(FETCH_TIMEOUT_S, wait)
                )
                lanes.add(await self._fetch(room, timeout))
            elif wait:
                await _wait_for_stop(self._stop, wait)
        await self._release(lanes.drain())

    async def _process_ready(self) -> list[Outcome]:
        steps = self._ready_steps()
        if self.pipeline.is_async:
            return await self._drive_async(steps)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        outcomes: list[Outcome] = await loop.run_in_executor(
            self._executor, ctx.run, self._drive_sync, steps, loop
        )
        return outcomes

    def _ready_steps(self) -> _Steps:
        outcomes: list[Outcome] = []
        while not self._halting.is_set():
            lane = self._lanes.next_ready(time.monotonic())
            if lane is None:
                break
            outcomes.extend((yield from self._advance(lane)))
        return outcomes

    async def _update_pauses(self) -> None:
        to_pause, to_resume = self._lanes.pause_changes(
            time.monotonic(), self._can_pause
        )
        try:
            if to_resume:
                await self.source.resume(to_resume)  # type: ignore[attr-defined]
            if to_pause:
                await self.source.pause(to_pause)  # type: ignore[attr-defined]
        except Exception as exc:
            log.warning(
                "pause_failed_continuing",
                subscription=self.subscription.id,
                error=repr(exc),
            )

    # -- concurrent: up to `concurrency` handlers at once, unordered ----------

    async def _run_concurrent(self) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[list[Outcome]]] = set()
        stopped = loop.create_task(self._stop.wait())
        try:
            while not self._stop.is_set():
                done = {t for t in tasks if t.done()}
                if done:
                    tasks -= done
                    await self._settle([o for t in done for o in t.result()])
                if self._sink_failed:
                    self._sink_failed = False
                    await _wait_for_stop(self._stop, SINK_FAILURE_BACKOFF_S)
                    continue
                room = self.batch_size - len(tasks)
                if room <= 0:
                    await asyncio.wait(
                        {*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED
                    )
                    continue
                for delivery in await self._fetch(room, FETCH_TIMEOUT_S):
                    tasks.add(loop.create_task(self._handle_one(delivery)))
            if tasks:
                await asyncio.wait(tasks)
                await self._settle([o for t in tasks for o in t.result()])
                tasks.clear()
        finally:
            stopped.cancel()
            for task in tasks:
                task.cancel()

    async def _handle_one(self, delivery: Delivery) -> list[Outcome]:
        lane = _Lane(delivery.partition, deque([delivery]))
        try:
            while True:
                async with self._semaphore:
                    if self._halting.is_set():
                        return [Outcome(delivery, Status.RELEASED)]
                    outcomes = await self._drive_async(self._advance(lane))
                if outcomes:
                    return outcomes
                if await _wait_for_stop(self._stop, lane.ready_at - time.monotonic()):
                    return [Outcome(delivery, Status.RELEASED)]
        except Exception:
            log.error(
                "delivery_failed_releasing",
                subscription=self.subscription.id,
                exc_info=True,
            )
            return [Outcome(delivery, Status.RELEASED)]

    # -- one step of one lane, shared by both modes ---------------------------

    def _advance(self, lane: _Lane) -> _Steps:
        """Run the next attempt of `lane`'s head; return what finished.

        An empty result means the head failed and waits until
        `lane.ready_at` for its next attempt.
        """
        delivery = lane.queue[0]
        if self._claim is not None and not self._claim(delivery):
            lane.pop()
            return [Outcome(delivery, Status.DROPPED)]
        self._active.add(id(delivery))
        try:
            if lane.job is None:
                opened = self.pipeline.open(delivery)
                if isinstance(opened, DeadLetter):
                    return (yield from self._bury(lane, opened))
                lane.job = opened
            step = yield lane.job
            if step is None:
                self._finished(lane.pop(), finished=True)
                return [Outcome(delivery, Status.DONE)]
            if isinstance(step, DeadLetter):
                return (yield from self._bury(lane, step))
            lane.ready_at = time.monotonic() + step
            self._finished(delivery, finished=False)
            return []
        finally:
            self._active.discard(id(delivery))

    def _bury(self, lane: _Lane, dead_letter: DeadLetter) -> _Steps:
        delivery = lane.queue[0]
        if (yield dead_letter):
            self._finished(lane.pop(), finished=True)
            return [Outcome(delivery, Status.DEAD, dead_letter)]
        # The sink failed: this delivery and everything queued behind it in
        # its lane come again, so the lane's order is kept.
        self._finished(delivery, finished=False)
        self._sink_failed = True
        return [Outcome(d, Status.RELEASED) for d in lane.clear()]

    def _finished(self, delivery: Delivery, *, finished: bool) -> None:
        if finished:
            self._unsettled[id(delivery)] = delivery
        if self._finish_hook is not None:
            self._finish_hook(delivery, finished=finished)

    def _drive_sync(
        self, steps: _Steps, loop: asyncio.AbstractEventLoop
    ) -> list[Outcome]:
        reply: Any = None
        while True:
            try:
                request = steps.send(reply)
            except StopIteration as stop:
                outcomes: list[Outcome] = stop.value
                return outcomes
            if isinstance(request, Job):
                reply = self.pipeline.attempt_sync(request)
            else:
                reply = self._write_from_thread(request, loop)

    async def _drive_async(self, steps: _Steps) -> list[Outcome]:
        reply: Any = None
        while True:
            try:
                request = steps.send(reply)
            except StopIteration as stop:
                outcomes: list[Outcome] = stop.value
                return outcomes
            if isinstance(request, DeadLetter):
                reply = await self._write_dead_letter(request)
            elif self.pipeline.is_async:
                reply = await self.pipeline.attempt_async(request)
            else:
                loop = asyncio.get_running_loop()
                ctx = contextvars.copy_context()
                reply = await loop.run_in_executor(
                    self._executor, ctx.run, self.pipeline.attempt_sync, request
                )

    # -- dead letters, fetching, settling -------------------------------------

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
            log.error(
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
            await _wait_for_stop(self._stop, FETCH_FAILURE_BACKOFF_S)
            return ()
        if batch:
            self.stats.batches += 1
        return batch

    async def _settle(self, outcomes: Sequence[Outcome]) -> None:
        if not outcomes:
            return
        finished: list[Delivery] = []
        released: list[Delivery] = []
        stats = self.stats
        for outcome in outcomes:
            status = outcome.status
            if status is Status.DONE:
                stats.handled += 1
                finished.append(outcome.delivery)
            elif status is Status.DEAD:
                stats.dead_lettered += 1
                finished.append(outcome.delivery)
            elif status is Status.RELEASED:
                stats.released += 1
                released.append(outcome.delivery)
            else:
                stats.dropped += 1
        if finished:
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

    async def _ack_unsettled(self) -> None:
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


async def _wait_for_stop(stop: asyncio.Event, seconds: float) -> bool:
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
        """Stop every worker, draining running handlers until the deadline.

        Logs `consumers_stopping` once intake stopped, then `consumers_stopped`:
        a warning naming the abandoned count per subscription when a handler
        outlived the deadline.
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
        stats = await asyncio.gather(
            *(w.stop(self.drain_timeout_s) for w in self.workers.values())
        )
        report = dict(zip(self.workers, stats, strict=True))
        abandoned = {sub: s.abandoned for sub, s in report.items() if s.abandoned}
        event = log.warning if abandoned else log.info
        event(
            "consumers_stopped",
            transport=self.transport,
            handled=sum(s.handled for s in stats),
            dead_lettered=sum(s.dead_lettered for s in stats),
            released=sum(s.released for s in stats),
            abandoned=sum(abandoned.values()),
            abandoned_by_subscription=abandoned,
            drain_timeout_s=self.drain_timeout_s,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        self.workers = {}
        return report
