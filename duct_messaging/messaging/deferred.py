"""Deferred delivery: store an encoded message now, publish it at its due time.

A producer given `deliver_at_time`, `deliver_at_ms` or `delay_ms` (see
`resolve_due`) hands the encoded message and its resolved targets to a
`DeferredScheduler` instead of sending them. The scheduler keeps them in a
durable store as data only (body, headers, topic, key, targets, due time),
so a deploy of new code still delivers what the old one stored. At the due
time one instance sends the message through the same transport producers,
with its original headers, so its trace context survives the wait.

The scheduler is APScheduler 4's `AsyncScheduler`. On PostgreSQL several
app instances share one store: each message is delivered once in normal
operation, and at least once when an instance dies mid-delivery (another
instance takes it over when the dead one's lease expires). A SQLite file
serves a single instance. Failed deliveries are retried with backoff, then
written to the dead-letter sink; nothing is dropped silently.

Config (`duct.messaging/deferred`). Settings show their defaults, except
`store`, which defaults to the SQLite file::

    duct.messaging/deferred:
      producers: !ref duct.messaging/producers   # required
      store:                  # one of url / sqlite / memory
        url: postgresql+psycopg://app@db:5432/app  # shared by every instance
        schema: duct_deferred  # tables live here; NOTIFY channel: `channel`
      # store: {sqlite: var/deferred.sqlite}     # one instance only
      # store: {memory: true}                    # refused unless allowed
      allow_memory_store: false
      concurrency: 100        # deliveries this instance runs at once
      lease_s: 15             # an instance that died is taken over after this
      poll_interval_s: 1      # idle instances look for due or orphaned messages
      grace_s: null           # dead-letter instead of delivering later than this
      halt_timeout_s: 10      # halt waits this long for running deliveries
      delivery: {max_attempts: 5, backoff_s: 1, backoff_max_s: 60}
      deadletter: !ref app/dead-letters   # optional; default logs them
"""

from __future__ import annotations

import asyncio
import math
import os
import platform
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4, uuid5

import anyio
import structlog
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    JobAdded,
    Schedule,
    ScheduleUpdated,
    current_job,
)
from apscheduler.abc import DataStore
from apscheduler.triggers.date import DateTrigger

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._deferred_config import (
    DeferredConfigError,
    DeferredSettings,
    DeliveryPolicy,
    MemoryStoreRefusedError,
    settings_problems,
)
from duct_messaging.messaging._deferred_payload import (
    DeferredMessage,
    DeferredPayloadError,
    StoredError,
    decode,
    encode,
)
from duct_messaging.messaging._deferred_store import PendingMessage, StoreSpec
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    LoggerSink,
    error_details,
    utcnow,
)
from duct_messaging.messaging.producer import merge_registries, send_to_targets
from duct_messaging.system import CheckContext, component
from duct_messaging.transports.base import (
    OutgoingMessage,
    Receipt,
    Target,
    TransportProducer,
)

__all__ = [
    "DeferredClosedError",
    "DeferredConfigError",
    "DeferredLoopError",
    "DeferredNotConfiguredError",
    "DeferredOptionError",
    "DeferredPayloadError",
    "DeferredScheduler",
    "DeferredStartError",
    "Deliver",
    "DeliveryPolicy",
    "DeliveryWindowMissedError",
    "MemoryStoreRefusedError",
    "PendingMessage",
    "StoreSpec",
    "list_pending",
    "resolve_due",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Sends one message to its targets in order; `send_to_targets` by default.
Deliver = Callable[
    [Mapping[str, TransportProducer], OutgoingMessage, Sequence[Target]],
    Awaitable[Sequence[Receipt]],
]

# Finished schedules are deleted this often (see `sweep_finished`).
_SWEEP_INTERVAL_S = 60.0

#: How long a cancelled delivery may take to put its message back in the
#: store while the scheduler stops.
_REQUEUE_TIMEOUT_S = 5.0

_WAKE_UP_ID = "duct.messaging/deferred:wake-up"
_DEAD_LETTER_IDS = UUID("5d1f0c8e-3b6a-4f7e-9a51-2c64d8e0b7a3")


class DeferredNotConfiguredError(DuctMessagingError, RuntimeError):
    """Raised when a future delivery is asked for but no scheduler is wired."""

    def __init__(self, topic: str | None = None) -> None:
        self.topic = topic
        what = f"topic {topic!r}" if topic else "a message"
        super().__init__(
            f"Deferred delivery not configured: {what} asked for a future "
            "delivery time, but the producer has no scheduler. Add a "
            "duct.messaging/deferred component and pass it to the producer "
            "(deferred: !ref duct.messaging/deferred), or publish without a "
            "delivery time."
        )


class DeferredOptionError(DuctMessagingError, ValueError):
    """Raised when a deferred-delivery option has the wrong type or value."""

    def __init__(self, option: str, value: Any, expected: str) -> None:
        self.option = option
        self.value = value
        self.expected = expected
        super().__init__(
            f"Deferred-delivery option rejected: {option}={value!r}. "
            f"Expected {expected}."
        )


class DeferredClosedError(DuctMessagingError, RuntimeError):
    """Raised when a scheduler that is not running is asked to do something."""

    def __init__(self, state: str) -> None:
        self.state = state
        super().__init__(
            f"Deferred scheduler not running: it is {state}. Call it between "
            "start() and aclose() (the component does both)."
        )


class DeferredLoopError(DuctMessagingError, RuntimeError):
    """Raised when `schedule_blocking` is called on the scheduler's own loop."""

    def __init__(self) -> None:
        super().__init__(
            "schedule_blocking() was called on the event loop the deferred "
            "scheduler runs on, where it would block forever. Use "
            "'await scheduler.schedule(...)' there."
        )


class DeferredStartError(DuctMessagingError):
    """Raised when the scheduler could not reach its store in time."""

    def __init__(self, store: str, timeout_s: float) -> None:
        self.store = store
        self.timeout_s = timeout_s
        super().__init__(
            f"Deferred scheduler did not start: store {store} was not ready "
            f"within {timeout_s:g}s. Check that the database is reachable."
        )


class DeliveryWindowMissedError(DuctMessagingError):
    """Recorded on a dead letter when a message came due too long ago.

    Raised by nothing: it describes why a message was dead-lettered instead
    of being delivered later than `grace_s` allows.
    """

    def __init__(
        self, deferred_id: str, due: datetime, late_s: float, grace_s: float
    ) -> None:
        self.deferred_id = deferred_id
        self.due = due
        self.late_s = late_s
        self.grace_s = grace_s
        super().__init__(
            f"Deferred delivery too late: message {deferred_id} was due at "
            f"{due.isoformat()}, {late_s:.1f}s ago, beyond grace_s={grace_s:g}. "
            "It was dead-lettered instead; replay it if it still matters."
        )


def resolve_due(
    *,
    deliver_at_time: datetime | None = None,
    deliver_at_ms: int | None = None,
    delay_ms: float | None = None,
    now: datetime | None = None,
) -> datetime | None:
    """Return when a message should be delivered, or None to publish it now.

    The first option given wins: `deliver_at_time` (a timezone-aware
    datetime), then `deliver_at_ms` (epoch milliseconds, an int), then
    `delay_ms` (milliseconds from `now`, int or float). Every option given
    is checked, even one that loses. The result is a UTC datetime only when
    it lies strictly after `now` (default: the current time); a time that
    has passed, or no option at all, gives None.

    Raises:
        DeferredOptionError: an option has the wrong type, a naive datetime,
            or a value that is not a finite time.
    """
    current = _aware(now, "now") if now is not None else utcnow()

    candidates: list[datetime] = []
    if deliver_at_time is not None:
        candidates.append(_aware(deliver_at_time, "deliver_at_time"))
    if deliver_at_ms is not None:
        candidates.append(_from_epoch_ms(deliver_at_ms))
    if delay_ms is not None:
        candidates.append(current + _delay(delay_ms))

    if not candidates:
        return None
    due = candidates[0].astimezone(UTC)
    return due if due > current else None


def _aware(value: Any, option: str) -> datetime:
    if not isinstance(value, datetime):
        raise DeferredOptionError(option, value, "a timezone-aware datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise DeferredOptionError(
            option,
            value,
            "a timezone-aware datetime (this one is naive; add tzinfo, "
            "e.g. datetime.now(UTC))",
        )
    return value


def _from_epoch_ms(value: Any) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DeferredOptionError("deliver_at_ms", value, "epoch milliseconds (int)")
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise DeferredOptionError(
            "deliver_at_ms", value, f"epoch milliseconds within range ({exc})"
        ) from exc


def _delay(value: Any) -> timedelta:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DeferredOptionError("delay_ms", value, "milliseconds (int or float)")
    if not math.isfinite(value):
        raise DeferredOptionError("delay_ms", value, "a finite number of milliseconds")
    try:
        return timedelta(milliseconds=value)
    except OverflowError as exc:
        raise DeferredOptionError(
            "delay_ms", value, "milliseconds within range"
        ) from exc


class DeferredScheduler:
    """Stores encoded messages and publishes each at its due time.

    `start` (async) opens the store and starts delivering; `aclose` stops
    taking new deliveries, lets running ones finish for up to
    `halt_timeout_s`, puts back any still running, and closes the store:
    undelivered messages stay stored for the next start. The scheduler
    lives on the event loop `start` ran on; `schedule` and `pending` may be
    awaited from any loop (they hop over) and `schedule_blocking` called
    from any other thread.

    Args:
        producers: client name -> transport producer (or a list of such
            registries, merged).
        store: a `StoreSpec` or a `store` setting (`{url: ...}`,
            `{sqlite: path}`, `{memory: true}`); None is a SQLite file at
            `var/deferred.sqlite`.
        delivery: retry policy for failed deliveries.
        deadletter: where messages go once retries are exhausted or they
            are later than `grace_s`; logged (`LoggerSink`) by default.
        grace_s: how late past its due time a message may still be
            delivered; None means any lateness.
        concurrency: deliveries this instance runs at once.
        lease_s: how long an instance holds a due message; if it dies,
            another instance delivers the message once the lease expired.
        poll_interval_s: how often an idle instance looks for due and
            orphaned messages, besides being woken by new ones.
        halt_timeout_s: how long `aclose` waits for running deliveries.
        allow_memory_store: accept `{memory: true}` (tests only).
        deliver: replaces `send_to_targets` (tests, instrumentation).

    Raises:
        MemoryStoreRefusedError: a memory store without `allow_memory_store`.
        DeferredConfigError: an invalid `store` setting.
    """

    def __init__(
        self,
        producers: Mapping[str, TransportProducer]
        | Sequence[Mapping[str, TransportProducer]],
        store: StoreSpec | Mapping[str, Any] | None = None,
        *,
        delivery: DeliveryPolicy | None = None,
        deadletter: DeadLetterSink | None = None,
        grace_s: float | None = None,
        concurrency: int = 100,
        lease_s: float = 15.0,
        poll_interval_s: float = 1.0,
        halt_timeout_s: float = 10.0,
        allow_memory_store: bool = False,
        deliver: Deliver | None = None,
    ) -> None:
        if isinstance(store, StoreSpec):
            spec = store
        else:
            try:
                spec = stores.parse_store(store)
            except ValueError as exc:
                raise DeferredConfigError(str(exc).split("; ")) from exc
        if spec.kind == "memory" and not allow_memory_store:
            raise MemoryStoreRefusedError()

        self.store = spec
        self.producers = merge_registries(producers)
        self.delivery = delivery or DeliveryPolicy()
        self.deadletter: DeadLetterSink = deadletter or LoggerSink()
        self.grace_s = grace_s
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.halt_timeout_s = halt_timeout_s
        self.identity = f"{platform.node()}-{os.getpid()}-{uuid4().hex[:8]}"
        self._deliver: Deliver = deliver or send_to_targets

        self._state = "new"
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._data_store: DataStore | None = None

    @classmethod
    def from_config(cls, value: Mapping[str, Any]) -> DeferredScheduler:
        """Return a scheduler for a resolved `duct.messaging/deferred` value."""
        settings = DeferredSettings.parse(value)
        return cls(
            settings.producers,
            settings.store,
            delivery=settings.delivery,
            deadletter=settings.deadletter,
            grace_s=settings.grace_s,
            concurrency=settings.concurrency,
            lease_s=settings.lease_s,
            poll_interval_s=settings.poll_interval_s,
            halt_timeout_s=settings.halt_timeout_s,
            allow_memory_store=settings.allow_memory_store,
        )

    def __repr__(self) -> str:
        return f"<DeferredScheduler {self.store.describe()} {self._state}>"

    @property
    def state(self) -> str:
        """Return `new`, `starting`, `running`, `closing`, `failed` or `closed`."""
        return self._state

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """Return the event loop the scheduler runs on (None before start)."""
        return self._loop

    async def start(self, timeout_s: float = 30.0) -> None:
        """Open the store and start delivering; return once ready.

        Creates the store's tables when missing (one instance at a time on
        PostgreSQL). Raises `DeferredStartError` when the store is not ready
        within `timeout_s`, `DeferredClosedError` when already started.
        """
        if self._state != "new":
            raise DeferredClosedError(self._state)
        self._loop = asyncio.get_running_loop()
        self._state = "starting"
        ready: asyncio.Future[None] = self._loop.create_future()
        self._runner = asyncio.create_task(
            self._run(ready), name=f"deferred scheduler {self.identity}"
        )

        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except BaseException as exc:
            self._stop.set()
            self._runner.cancel()
            with suppress(BaseException):
                await self._runner
            self._state = "closed"
            if isinstance(exc, TimeoutError):
                raise DeferredStartError(self.store.describe(), timeout_s) from exc
            raise

        self._state = "running"
        log.info(
            "deferred_scheduler_started",
            store=self.store.describe(),
            identity=self.identity,
            concurrency=self.concurrency,
        )

    async def aclose(self) -> None:
        """Stop delivering and close the store; safe to call twice.

        New deliveries stop at once; running ones get `halt_timeout_s` to
        finish, and any still running then are cancelled and put back in
        the store, to be delivered after the next start (possibly twice, if
        the broker had already accepted them).
        """
        runner = self._runner
        if runner is None or self._state == "closed":
            self._state = "closed"
            return
        assert self._loop is not None
        self._state = "closing"

        if _running_loop() is self._loop:
            self._stop.set()
            await _finish(runner)
        else:
            self._loop.call_soon_threadsafe(self._stop.set)
            future = asyncio.run_coroutine_threadsafe(_finish(runner), self._loop)
            await asyncio.wrap_future(future)
        self._state = "closed"
        log.info("deferred_scheduler_stopped", identity=self.identity)

    async def schedule(
        self,
        message: OutgoingMessage,
        targets: Sequence[Target],
        due: datetime,
    ) -> str:
        """Store `message` for delivery to `targets` at `due`; return its id.

        Returns once the message is durably stored. `due` must be
        timezone-aware; a time that has passed is delivered as soon as
        possible. Target options must be plain data.

        Raises:
            DeferredOptionError: `due` is not a timezone-aware datetime.
            DeferredPayloadError: a target option is not plain data.
            DeferredClosedError: the scheduler is not running.
        """
        due = _aware(due, "due").astimezone(UTC)
        item = DeferredMessage.new(message, targets, due)
        document = encode(item)

        await self._on_loop(
            self._add(item, item.id, document, ConflictPolicy.exception)
        )
        log.debug(
            "deferred_scheduled",
            deferred_id=item.id,
            topic=message.topic,
            message_id=message.headers.get("x-message-id"),
            due=due.isoformat(),
            targets=len(item.targets),
        )
        return item.id

    def schedule_blocking(
        self,
        message: OutgoingMessage,
        targets: Sequence[Target],
        due: datetime,
        timeout_s: float | None = None,
    ) -> str:
        """Call `schedule` from a thread that is not the scheduler's loop.

        Blocks until the message is stored (or `timeout_s` passed). Raises
        `DeferredLoopError` when called on the scheduler's own loop, where it
        would block forever, and `DeferredClosedError` when not running.
        """
        loop = self._loop
        if loop is None or self._state != "running":
            raise DeferredClosedError(self._state)
        if _running_loop() is loop:
            raise DeferredLoopError()
        future = asyncio.run_coroutine_threadsafe(
            self.schedule(message, targets, due), loop
        )
        return future.result(timeout_s)

    async def pending(self) -> list[PendingMessage]:
        """Return the messages stored and not delivered yet, by due time."""
        store = self._data_store
        if store is None:
            raise DeferredClosedError(self._state)
        return await self._on_loop(stores.read_pending(store))

    async def _on_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None or self._state != "running":
            coro.close()
            raise DeferredClosedError(self._state)
        if _running_loop() is loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        return await asyncio.wrap_future(future)

    async def _run(self, ready: asyncio.Future[None]) -> None:
        # One task owns the scheduler from start to stop, because APScheduler
        # runs on AnyIO task groups, which must be exited by the task that
        # entered them; start() and aclose() usually run in different tasks.
        try:
            async with AsyncExitStack() as stack:
                scheduler = await self._open(stack)
                async with anyio.create_task_group() as housekeeping:
                    housekeeping.start_soon(self._wake_periodically, scheduler)
                    housekeeping.start_soon(self._sweep_periodically)
                    ready.set_result(None)
                    await self._stop.wait()
                    await self._drain(scheduler)
                    housekeeping.cancel_scope.cancel()
                # Leaving the stack stops the scheduler: deliveries still
                # running are cancelled and put back (see _run_job).
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, Exception):
                    ready.set_exception(exc)
                else:
                    ready.cancel()
                return
            if self._state in ("closing", "closed"):
                raise
            self._state = "failed"
            log.error(
                "deferred_scheduler_crashed",
                identity=self.identity,
                error=repr(exc),
                exc_info=exc,
            )
        finally:
            self._data_store = None

    async def _open(self, stack: AsyncExitStack) -> AsyncScheduler:
        opened = stores.open_store(self.store, stack)
        # Built from a plain dict: APScheduler's attrs converters accept None
        # for these, its annotations do not.
        options: dict[str, Any] = {
            "identity": self.identity,
            "max_concurrent_jobs": self.concurrency,
            # Off: APScheduler's clean-up deletes the jobs of dead instances
            # instead of handing them over; see stores.sweep_finished.
            "cleanup_interval": None,
            "lease_duration": timedelta(seconds=self.lease_s),
            "logger": stores.APSCHEDULER_LOG,
        }
        scheduler = AsyncScheduler(opened.data_store, opened.event_broker, **options)
        async with stores.schema_lock(self.store):
            await stack.enter_async_context(scheduler)
            # No cluster-wide cap (APScheduler's default is 1): its running
            # count is never given back for jobs of an instance that was
            # killed, so a cap would shrink with every crash until nothing
            # runs. `concurrency` bounds each instance instead.
            for task_id in stores.task_ids():
                await scheduler.configure_task(
                    task_id,
                    func=self._run_job,
                    job_executor="async",
                    max_running_jobs=None,
                    misfire_grace_time=None,
                )
        await scheduler.start_in_background()
        self._data_store = opened.data_store
        return scheduler

    async def _drain(self, scheduler: AsyncScheduler) -> None:
        self._closing = True
        # Zero capacity: the job loop stops acquiring, the rest keeps running.
        scheduler.max_concurrent_jobs = 0
        with anyio.move_on_after(self.halt_timeout_s):
            await self._idle.wait()

    async def _wake_periodically(self, scheduler: AsyncScheduler) -> None:
        # APScheduler 4.0.0a6 looks for due schedules and jobs only when an
        # event wakes it. A message held by an instance that died is free
        # again once its lease expires, but no event says so; these local
        # events make this instance look again.
        broker = scheduler.event_broker
        while True:
            await anyio.sleep(self.poll_interval_s)
            await broker.publish_local(
                JobAdded(job_id=uuid4(), task_id=stores.TASK_ID, schedule_id=None)
            )
            await broker.publish_local(
                ScheduleUpdated(
                    schedule_id=_WAKE_UP_ID,
                    task_id=stores.TASK_ID,
                    next_fire_time=utcnow(),
                )
            )

    async def _sweep_periodically(self) -> None:
        while True:
            await anyio.sleep(_SWEEP_INTERVAL_S)
            store = self._data_store
            if store is None:
                continue
            try:
                await stores.sweep_finished(store)
            except Exception as exc:
                log.warning(
                    "deferred_sweep_failed",
                    error=repr(exc),
                    retry_in_s=_SWEEP_INTERVAL_S,
                )

    async def _add(
        self,
        item: DeferredMessage,
        schedule_id: str,
        document: str,
        conflict: ConflictPolicy,
    ) -> None:
        store = self._data_store
        if store is None:
            raise DeferredClosedError(self._state)
        trigger = DateTrigger(item.run_at)
        options: dict[str, Any] = {
            "kwargs": {stores.DOCUMENT_ARG: document},
            # Never let APScheduler skip a late job: lateness is ours to
            # judge (grace_s), and a skipped job would vanish without trace.
            "misfire_grace_time": None,
            "job_executor": "async",
            "job_result_expiration_time": 0,
        }
        schedule = Schedule(
            id=schedule_id, task_id=stores.task_for(item.id), trigger=trigger, **options
        )
        schedule.next_fire_time = trigger.next()
        await store.add_schedule(schedule, conflict)

    async def _store_again(self, item: DeferredMessage, schedule_id: str) -> None:
        # Retries and put-backs use ids derived from the job, so storing the
        # same one twice (a job re-run after its lease expired) is harmless.
        await self._add(item, schedule_id, encode(item), ConflictPolicy.do_nothing)

    async def _run_job(self, deferred: str) -> None:
        job_id: UUID = current_job.get().id
        try:
            item = decode(deferred)
        except DeferredPayloadError as exc:
            await self._dead_letter_unreadable(deferred, exc)
            return
        if self._closing:
            await self._put_back(item, job_id)
            return

        self._inflight += 1
        self._idle.clear()
        try:
            await self._attempt(item)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._put_back(item, job_id)
            raise
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    async def _attempt(self, item: DeferredMessage) -> None:
        policy = self.delivery
        if item.attempt > policy.max_attempts and item.last_error is not None:
            # An earlier dead-letter write failed; try only that again.
            await self._dead_letter(item, item.last_error, policy.max_attempts)
            return

        late_s = (utcnow() - item.run_at).total_seconds()
        if self.grace_s is not None and late_s > self.grace_s:
            missed = DeliveryWindowMissedError(
                item.id, item.run_at, late_s, self.grace_s
            )
            await self._dead_letter(item, _stored(missed), item.attempt - 1)
            return

        try:
            receipts = await self._deliver(self.producers, item.message, item.targets)
        except Exception as exc:
            await self._failed(item, exc)
            return

        log.debug(
            "deferred_delivered",
            deferred_id=item.id,
            topic=item.message.topic,
            message_id=item.message.headers.get("x-message-id"),
            attempt=item.attempt,
            late_s=round(late_s, 4),
            receipts=len(receipts),
        )

    async def _failed(self, item: DeferredMessage, exc: Exception) -> None:
        # A PublishError says which targets were sent; retry only the rest.
        sent = getattr(exc, "sent", None)
        remaining = item.targets
        if isinstance(sent, tuple | list) and len(sent) < len(item.targets):
            remaining = item.targets[len(sent) :]
        # Record the broker's own error rather than its PublishError wrapper.
        cause = exc.__cause__ if sent is not None and exc.__cause__ else exc
        error = _stored(cause)

        if item.attempt >= self.delivery.max_attempts:
            await self._dead_letter(
                replace(item, targets=remaining), error, item.attempt
            )
            return

        delay_s = self.delivery.delay_s(item.attempt)
        retry = item.next_attempt(
            utcnow() + timedelta(seconds=delay_s), remaining, error
        )
        await self._store_again(retry, f"{item.id}.{retry.attempt}")
        log.warning(
            "deferred_delivery_retry",
            deferred_id=item.id,
            topic=item.message.topic,
            message_id=item.message.headers.get("x-message-id"),
            attempt=item.attempt,
            max_attempts=self.delivery.max_attempts,
            delay_s=delay_s,
            error=error.message,
            error_type=error.type,
        )

    async def _dead_letter(
        self, item: DeferredMessage, error: StoredError, attempts: int
    ) -> None:
        target = item.targets[0] if item.targets else None
        letter = DeadLetter(
            body=item.message.body,
            headers=dict(item.message.headers),
            topic=item.message.topic,
            subscription="",
            client=target.client if target else "",
            source="deferred",
            destination=self._destination(target, item.message.topic),
            attempts=attempts,
            status=DeadLetterStatus.ELIGIBLE,
            error_type=error.type,
            error_message=error.message,
            error_traceback=error.traceback,
            first_failure_at=item.first_failure_at or error.at,
            last_failure_at=error.at,
            key=item.message.key,
            # One id per deferred message: a store keeps it once even when
            # the write is repeated (a sink timeout, a job run twice).
            id=uuid5(_DEAD_LETTER_IDS, item.id).hex,
        )
        try:
            await self.deadletter.write(letter)
        except Exception as exc:
            await self._park(item, error, exc)
            return

        log.error(
            "deferred_dead_lettered",
            deferred_id=item.id,
            topic=item.message.topic,
            message_id=item.message.headers.get("x-message-id"),
            attempts=attempts,
            error_type=error.type,
            error=error.message,
        )

    async def _park(
        self, item: DeferredMessage, error: StoredError, exc: Exception
    ) -> None:
        # The sink failed: keep the message stored and try the sink again
        # later, rather than losing it.
        delay_s = self.delivery.backoff_max_s
        parked = replace(
            item,
            attempt=max(item.attempt, self.delivery.max_attempts) + 1,
            run_at=utcnow() + timedelta(seconds=delay_s),
            first_failure_at=item.first_failure_at or error.at,
            last_error=error,
        )
        await self._store_again(parked, f"{item.id}.{parked.attempt}")
        log.error(
            "deferred_dead_letter_failed",
            deferred_id=item.id,
            topic=item.message.topic,
            error=repr(exc),
            retry_in_s=delay_s,
        )

    async def _put_back(self, item: DeferredMessage, job_id: UUID) -> None:
        with anyio.move_on_after(_REQUEUE_TIMEOUT_S) as scope:
            await self._store_again(item, f"{item.id}.{item.attempt}.{job_id.hex}")
        if scope.cancelled_caught:
            # The job stays leased; another instance re-runs it once the
            # lease expires, unless the release below still reaches the store.
            log.error("deferred_put_back_failed", deferred_id=item.id)
            return
        log.debug("deferred_put_back", deferred_id=item.id, attempt=item.attempt)

    async def _dead_letter_unreadable(
        self, document: str, exc: DeferredPayloadError
    ) -> None:
        now = utcnow()
        kind, text, trace = error_details(exc)
        letter = DeadLetter(
            body=document.encode(),
            headers={},
            topic="",
            subscription="",
            client="",
            source="deferred",
            destination="",
            attempts=0,
            status=DeadLetterStatus.POISON,
            error_type=kind,
            error_message=text,
            error_traceback=trace,
            first_failure_at=now,
            last_failure_at=now,
        )
        await self.deadletter.write(letter)
        log.error("deferred_unreadable", error=text)

    def _destination(self, target: Target | None, topic: str) -> str:
        producer = self.producers.get(target.client) if target else None
        if target is None or producer is None:
            return ""
        try:
            return producer.destination(target, topic)
        except Exception:
            return ""


async def list_pending(
    store: StoreSpec | Mapping[str, Any] | None,
) -> list[PendingMessage]:
    """Return the pending messages of a store without delivering any.

    Opens the store on the running loop (creating its tables if missing)
    and closes it again. Raises `DeferredConfigError` for a memory store,
    which only exists inside the process that runs it.
    """
    spec = store if isinstance(store, StoreSpec) else stores.parse_store(store)
    if spec.kind == "memory":
        raise DeferredConfigError(
            ["store.memory: an in-memory store can only be read by its own process"]
        )
    return await stores.list_pending(spec)


def _stored(exc: BaseException) -> StoredError:
    kind, text, trace = error_details(exc)
    return StoredError(type=kind, message=text, traceback=trace, at=utcnow())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _finish(task: asyncio.Task[None]) -> None:
    # The crash, if any, was logged when it happened.
    with suppress(Exception):
        await task


@component("duct.messaging/deferred")
async def _scheduler_component(value: Mapping[str, Any]) -> DeferredScheduler:
    """Start the deferred-delivery scheduler a config value describes."""
    scheduler = DeferredScheduler.from_config(value)
    await scheduler.start()
    return scheduler


@_scheduler_component.halt
async def _halt_deferred(scheduler: DeferredScheduler) -> None:
    await scheduler.aclose()


@_scheduler_component.check
def _check_deferred(value: Any, ctx: CheckContext) -> list[str]:
    return list(settings_problems(value))
