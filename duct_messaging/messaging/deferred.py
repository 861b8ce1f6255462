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
import os
import platform
import threading
from collections.abc import Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import uuid4

import structlog

from duct_messaging.errors import MissingExtraError

try:
    from apscheduler import ConflictPolicy
    from apscheduler.abc import DataStore
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("Deferred delivery", "deferred", "apscheduler") from exc

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._config_check import RefTo
from duct_messaging.messaging._deferred_config import (
    DeferredConfigError,
    DeferredSettings,
    DeliveryPolicy,
    MemoryStoreRefusedError,
    settings_problems,
)
from duct_messaging.messaging._deferred_delivery import Courier, Deliver
from duct_messaging.messaging._deferred_options import (
    DeferredNotConfiguredError,
    DeferredOptionError,
    aware_datetime,
    resolve_due,
)
from duct_messaging.messaging._deferred_payload import (
    DeferredMessage,
    DeferredPayloadError,
    encode,
)
from duct_messaging.messaging._deferred_runner import SchedulerRunner
from duct_messaging.messaging._deferred_store import PendingMessage, StoreSpec
from duct_messaging.messaging.deadletter import DeadLetterSink, LoggerSink
from duct_messaging.messaging.producer import merge_registries, send_to_targets
from duct_messaging.system import CheckContext, component
from duct_messaging.transports.base import OutgoingMessage, Target, TransportProducer

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: SchedulerRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

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
        self._runner = SchedulerRunner(
            self.store,
            self.identity,
            self._courier,
            concurrency=self.concurrency,
            lease_s=self.lease_s,
            poll_interval_s=self.poll_interval_s,
            halt_timeout_s=self.halt_timeout_s,
        )
        ready: asyncio.Future[None] = self._loop.create_future()
        self._task = asyncio.create_task(
            self._run(self._runner, ready), name=f"deferred scheduler {self.identity}"
        )

        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout_s)
        except BaseException as exc:
            self._stop.set()
            self._task.cancel()
            self._state = "closed"
            # A cancellation of this call while waiting here propagates.
            await _finish(self._task)
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
        task = self._task
        if task is None or self._state == "closed":
            self._state = "closed"
            return
        assert self._loop is not None
        self._state = "closing"

        if _running_loop() is self._loop:
            self._stop.set()
            await _finish(task)
        else:
            self._loop.call_soon_threadsafe(self._stop.set)
            future = asyncio.run_coroutine_threadsafe(_finish(task), self._loop)
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
        due = aware_datetime(due, "due").astimezone(UTC)
        item = DeferredMessage.new(message, targets, due)
        document = encode(item)

        await self._on_loop(self._add(item, document))
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
        would block forever, and `DeferredClosedError` when not running. On
        `TimeoutError` the call is cancelled, so a retry does not store the
        message twice (unless the store had already committed it).
        """
        loop = self._loop
        if loop is None or self._state != "running":
            raise DeferredClosedError(self._state)
        if _running_loop() is loop:
            raise DeferredLoopError()
        given_up = threading.Event()

        async def schedule_unless_given_up() -> str:
            # The loop may only get to this call after the caller gave up.
            if given_up.is_set():
                raise asyncio.CancelledError
            return await self.schedule(message, targets, due)

        future = asyncio.run_coroutine_threadsafe(schedule_unless_given_up(), loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            given_up.set()
            future.cancel()
            raise

    async def pending(self) -> list[PendingMessage]:
        """Return the messages stored and not delivered yet, by due time."""
        return await self._on_loop(stores.read_pending(self._data_store()))

    async def _on_loop(self, coro: Coroutine[Any, Any, _T]) -> _T:
        loop = self._loop
        if loop is None or self._state != "running":
            coro.close()
            raise DeferredClosedError(self._state)
        if _running_loop() is loop:
            return await coro
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        return await asyncio.wrap_future(future)

    async def _run(self, runner: SchedulerRunner, ready: asyncio.Future[None]) -> None:
        # One task owns the runner from start to stop (see its `run`), because
        # start() and aclose() usually run in different tasks.
        try:
            await runner.run(ready, self._stop)
        except BaseException as exc:
            if not ready.done():
                if isinstance(exc, Exception):
                    ready.set_exception(exc)
                    return
                ready.cancel()
                raise
            if self._state in ("closing", "closed"):
                raise
            self._state = "failed"
            log.error(
                "deferred_scheduler_crashed",
                identity=self.identity,
                error=repr(exc),
                exc_info=exc,
            )
            if not isinstance(exc, Exception):
                raise  # cancelled (or interrupted): the task ends so

    def _courier(self, store: DataStore) -> Courier:
        return Courier(
            store,
            self.producers,
            deliver=self._deliver,
            policy=self.delivery,
            deadletter=self.deadletter,
            grace_s=self.grace_s,
        )

    def _data_store(self) -> DataStore:
        store = self._runner.data_store if self._runner else None
        if store is None:
            raise DeferredClosedError(self._state)
        return store

    async def _add(self, item: DeferredMessage, document: str) -> None:
        await stores.add_message(
            self._data_store(), item, item.id, document, ConflictPolicy.exception
        )


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


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _finish(task: asyncio.Task[None]) -> None:
    """Wait for the scheduler task to end, whatever its outcome.

    Its crash, if any, was logged when it happened; a task that ended
    cancelled is fine. Cancelling this call cancels the task, waits for it
    to unwind, and propagates.
    """
    try:
        await asyncio.wait([task])
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait([task])
        raise
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not report it again


@component("duct.messaging/deferred")
async def _scheduler_component(value: Mapping[str, Any]) -> DeferredScheduler:
    """Start the deferred-delivery scheduler a config value describes."""
    scheduler = DeferredScheduler.from_config(value)
    await scheduler.start()
    return scheduler


@_scheduler_component.halt
async def _halt_deferred(scheduler: DeferredScheduler) -> None:
    await scheduler.aclose()


_PRODUCERS = RefTo("duct.messaging/producers")


@_scheduler_component.check
def _check_deferred(value: Any, ctx: CheckContext) -> list[str]:
    problems = list(settings_problems(value))
    if isinstance(value, Mapping):
        found = _PRODUCERS.problems(value.get("producers"), ("producers",))
        problems.extend(str(problem) for problem in found)
    return problems
