"""The worker that runs one subscription: fetch, handle in lanes, settle.

See `duct_messaging.messaging.consumer` for the delivery promises. Inside a
worker, `concurrency: 1` keeps ordered *lanes* (one per partition; one for
a source without partitions): a head waiting out its back-off holds only
its lane, and the worker goes on fetching and handling the others. With
`concurrency > 1` each delivery runs as its own task, at most `concurrency`
attempts at a time. Fetching and settling live in `_consumer_settle`.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from duct_messaging.messaging import envelope
from duct_messaging.messaging._consumer_errors import (
    ConsumerStartError,
    ConsumerStopError,
    SubscriptionFailedError,
    describe,
)
from duct_messaging.messaging._consumer_lanes import Lane, Lanes, Outcome, Status
from duct_messaging.messaging._consumer_pipeline import Job, Pipeline, Step
from duct_messaging.messaging._consumer_settle import (
    SourceSettling,
    WorkerStats,
    wait_for_stop,
)
from duct_messaging.messaging._daemon_pool import DaemonPool
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.messaging.routing import Subscription
from duct_messaging.transports.base import ConsumerSource, Delivery

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_DRAIN_TIMEOUT_S",
    "DEFAULT_START_TIMEOUT_S",
    "FETCH_TIMEOUT_S",
    "ConsumerStartError",
    "ConsumerStopError",
    "Outcome",
    "Status",
    "SubscriptionFailedError",
    "SubscriptionWorker",
    "WorkerStats",
]

log = structlog.get_logger(__name__)

# A fetch waits at most this long, so a stop request is noticed quickly.
FETCH_TIMEOUT_S = 0.1
DEFAULT_BATCH_SIZE = 500
DEFAULT_DRAIN_TIMEOUT_S = 10.0
DEFAULT_START_TIMEOUT_S = 30.0
# After a dead-letter write failed (the sink is likely down), or a delivery
# failed outside its handler, wait this long before fetching again instead
# of spinning on redeliveries.
FAILURE_BACKOFF_S = 0.5
# After the drain deadline, how long cancelled handler tasks get to end.
CANCEL_GRACE_S = 1.0


class SubscriptionWorker(SourceSettling):
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
        self._executor = DaemonPool(subscription.concurrency, f"duct-{subscription.id}")
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._semaphore = asyncio.Semaphore(subscription.concurrency)
        self._lanes = Lanes()
        # Deliveries whose handler (or dead-letter write) is running now;
        # only one thread at a time runs steps, so a plain counter will do.
        self._running = 0
        # Finished deliveries not acknowledged (or rejected) yet, by id(); a
        # tracking source is told at once instead.
        self._unsettled: dict[int, Delivery] = {}
        self._unsettled_dead: dict[int, Delivery] = {}
        # Set when a sink write or a delivery failed: fetch again after a pause.
        self._back_off = False
        self._claim: Callable[[Delivery], bool] | None = getattr(source, "claim", None)
        self._finish_hook: Callable[..., None] | None = getattr(source, "finish", None)
        self._can_pause = hasattr(source, "pause") and hasattr(source, "resume")
        self._can_reject = hasattr(source, "reject")

    @property
    def failure(self) -> BaseException | None:
        """Return what killed the fetch loop, if it died; None while healthy."""
        return self._failure

    async def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start the source, then the fetch loop; return once subscribed.

        A source that fails to start, or not within `timeout`, is stopped
        again before `ConsumerStartError` is raised.
        """
        try:
            await asyncio.wait_for(self.source.start(), timeout)
        except Exception as exc:
            self._executor.shutdown(wait=False, cancel_futures=True)
            await self._stop_failed_source(exc, timeout)
            raise ConsumerStartError.of(self.subscription, exc, timeout) from exc
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"duct-subscription-{self.subscription.id}"
        )
        self._task.add_done_callback(self._loop_ended)

    async def _stop_failed_source(self, exc: BaseException, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.source.stop(), timeout)
        except Exception as stop_exc:
            log.warning(
                "source_stop_failed_after_start_failure",
                subscription=self.subscription.id,
                error=describe(stop_exc),
                start_error=describe(exc),
                next="the start error is raised; the source may hold a connection",
            )

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """Note and log a fetch loop that died, the moment it dies."""
        failure = None if task.cancelled() else task.exception()
        if failure is None:
            return
        self._failure = failure
        log.error(
            "subscription_stopped_for_good",
            subscription=self.subscription.id,
            topic=self.subscription.topic,
            error=describe(failure),
            exc_info=failure,
            next="its messages are not consumed until the service restarts; "
            "halting acknowledges what finished and raises this error",
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

        If the fetch loop had died, what finished is still acknowledged, the
        source is stopped, and `SubscriptionFailedError` is raised.
        """
        self.request_stop()
        task = self._task
        failure: BaseException | None = None
        if task is not None:
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=deadline_s)
                if not done:
                    self.stats.abandoned = self._running
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if not task.cancelled():
                failure = task.exception()
            await self._settle_unsettled()
            if failure is not None:
                await self._release(self._lanes.drain())
        self._executor.shutdown(wait=False, cancel_futures=True)
        try:
            await self.source.stop()
        except Exception as exc:
            if failure is None:
                raise
            log.warning(
                "source_stop_failed",
                subscription=self.subscription.id,
                error=describe(exc),
                next="the subscription's own failure is raised instead",
            )
        if failure is not None:
            raise SubscriptionFailedError(self.subscription.id, failure) from failure
        return self.stats

    async def _run(self) -> None:
        if self._ordered:
            await self._run_ordered()
        else:
            await self._run_concurrent()

    # -- ordered: lanes, one handler call at a time ---------------------------

    async def _run_ordered(self) -> None:
        lanes = self._lanes
        while not self._stop.is_set():
            if lanes.next_ready() is not None:
                await self._update_pauses()
                done, outcomes = await self._process_ready()
                await self._settle(outcomes, done)
            await self._update_pauses()
            if self._back_off:
                self._back_off = False
                await wait_for_stop(self._stop, FAILURE_BACKOFF_S)
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
                await wait_for_stop(self._stop, wait)
        await self._release(lanes.drain())

    async def _process_ready(self) -> tuple[list[Delivery], list[Outcome]]:
        if self.pipeline.is_async:
            return [], await self._run_lanes_async()
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        result: tuple[list[Delivery], list[Outcome]] = await loop.run_in_executor(
            self._executor, ctx.run, self._run_lanes_sync, loop
        )
        return result

    def _run_lanes_sync(
        self, loop: asyncio.AbstractEventLoop
    ) -> tuple[list[Delivery], list[Outcome]]:
        """Handle every ready lane head, in a worker thread, until none is ready.

        Returns the deliveries handled successfully, then every other
        outcome. This is `_step_async` inlined: it runs once per message
        at up to ~100k messages per second, where each call counts.
        """
        done: list[Delivery] = []
        other: list[Outcome] = []
        halting = self._halting
        claim = self._claim
        hook = self._finish_hook
        unsettled = self._unsettled
        pipeline = self.pipeline
        attempt = pipeline.sync_attempt()
        while not halting.is_set():
            lane = self._lanes.next_ready()
            if lane is None:
                break
            queue = lane.queue
            while queue and lane.ready_at == 0.0 and not halting.is_set():
                delivery = queue[0]
                # True while this attempt holds a claim that must be ended.
                claimed = False
                try:
                    if claim is not None:
                        if not claim(delivery):
                            lane.pop()
                            other.append(Outcome(delivery, Status.DROPPED))
                            continue
                        claimed = hook is not None
                    self._running += 1
                    job = lane.job
                    if job is None:
                        opened = pipeline.open(delivery)
                        if isinstance(opened, DeadLetter):
                            written = self._write_from_thread(opened, loop)
                            claimed = False
                            other.extend(self._buried(lane, opened, written))
                            self._running -= 1
                            continue
                        job = lane.job = opened
                    step = attempt(job)
                    if step is None:
                        self._running -= 1
                        queue.popleft()
                        lane.job = None
                        if hook is not None:
                            claimed = False
                            hook(delivery, finished=True)
                        else:
                            unsettled[id(delivery)] = delivery
                        done.append(delivery)
                    elif isinstance(step, DeadLetter):
                        written = self._write_from_thread(step, loop)
                        claimed = False
                        other.extend(self._buried(lane, step, written))
                        self._running -= 1
                    else:
                        self._running -= 1
                        lane.ready_at = time.monotonic() + step
                        if hook is not None:
                            claimed = False
                            hook(delivery, finished=False)
                except Exception as exc:
                    # Ordered: nothing else runs meanwhile, so none is running.
                    self._running = 0
                    if claimed:
                        self._end_claim(delivery)
                    other.extend(self._lane_failed(lane, exc))
        return done, other

    async def _run_lanes_async(self) -> list[Outcome]:
        """Handle every ready lane head on the event loop until none is ready."""
        outcomes: list[Outcome] = []
        lanes = self._lanes
        while not self._halting.is_set():
            lane = lanes.next_ready()
            if lane is None:
                break
            try:
                outcomes.extend(await self._step_async(lane))
            except Exception as exc:
                outcomes.extend(self._lane_failed(lane, exc))
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
                if self._back_off:
                    self._back_off = False
                    await wait_for_stop(self._stop, FAILURE_BACKOFF_S)
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
            await self._end_tasks({*tasks, stopped})

    async def _end_tasks(self, tasks: set[asyncio.Task[Any]]) -> None:
        """Cancel `tasks` and wait briefly for them to end; retrieve every result."""
        for task in tasks:
            task.cancel()
            task.add_done_callback(_retrieve)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
        if pending:
            log.warning(
                "handlers_ignored_cancellation",
                subscription=self.subscription.id,
                count=len(pending),
                grace_s=CANCEL_GRACE_S,
                next="they run on unowned; their deliveries are not acknowledged",
            )

    async def _handle_one(self, delivery: Delivery) -> list[Outcome]:
        lane = Lane(delivery.partition, deque([delivery]))
        try:
            while True:
                async with self._semaphore:
                    if self._halting.is_set():
                        return [Outcome(delivery, Status.RELEASED)]
                    outcomes = await self._step_async(lane)
                if outcomes:
                    return outcomes
                if await wait_for_stop(self._stop, lane.ready_at - time.monotonic()):
                    return [Outcome(delivery, Status.RELEASED)]
        except Exception as exc:
            return self._lane_failed(lane, exc)

    # -- one step of one lane, shared by both modes ---------------------------

    async def _step_async(self, lane: Lane) -> list[Outcome]:
        """Claim the lane's head, run one attempt, and settle it.

        Returns what finished: an empty list means the head failed and waits
        until `lane.ready_at` for its next attempt. Whatever happens, the
        running count and the claim are ended before it returns or raises.
        """
        delivery = lane.queue[0]
        if self._claim is not None and not self._claim(delivery):
            lane.pop()
            return [Outcome(delivery, Status.DROPPED)]
        claimed = self._finish_hook is not None
        self._running += 1
        try:
            step: Step
            job = lane.job
            if job is None:
                opened = self.pipeline.open(delivery)
                if isinstance(opened, Job):
                    job = lane.job = opened
                else:
                    step = opened
            if job is not None:
                step = await self._attempt(job)
            if isinstance(step, DeadLetter):
                written = await self._write_dead_letter(step)
                claimed = False
                return self._buried(lane, step, written)
            claimed = False
            if step is None:
                lane.pop()
                self._finished(delivery, finished=True)
                return [Outcome(delivery, Status.DONE)]
            lane.ready_at = time.monotonic() + step
            self._finished(delivery, finished=False)
            return []
        except BaseException:
            if claimed:
                self._end_claim(delivery)
            raise
        finally:
            self._running -= 1

    async def _attempt(self, job: Job) -> Step:
        if self.pipeline.is_async:
            return await self.pipeline.attempt_async(job)
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        step: Step = await loop.run_in_executor(
            self._executor, ctx.run, self.pipeline.attempt_sync, job
        )
        return step

    def _buried(
        self, lane: Lane, dead_letter: DeadLetter, written: bool
    ) -> list[Outcome]:
        """Settle a dead-letter write: acknowledged, or the lane comes again."""
        delivery = lane.queue[0]
        if written:
            lane.pop()
            self._finished(delivery, finished=True, dead=True)
            return [Outcome(delivery, Status.DEAD, dead_letter)]
        # The sink failed: this delivery and everything queued behind it in
        # its lane come again, so the lane's order is kept.
        self._finished(delivery, finished=False)
        self._back_off = True
        return [Outcome(d, Status.RELEASED) for d in lane.clear()]

    def _lane_failed(self, lane: Lane, exc: Exception) -> list[Outcome]:
        """Release a lane whose head failed outside its handler; back off.

        The head and everything queued behind it come again (in order), so
        one bad delivery or a source bug never ends the subscription.
        """
        released = lane.clear()
        self._back_off = True
        head = released[0] if released else None
        log.warning(
            "delivery_failed_releasing",
            subscription=self.subscription.id,
            topic=self.subscription.topic,
            message_id=head.headers.get(envelope.MESSAGE_ID) if head else None,
            released=len(released),
            error=f"{type(exc).__name__}: {describe(exc)}",
            exc_info=exc,
            next=f"the message and those queued behind it come again after "
            f"{FAILURE_BACKOFF_S:g} s",
        )
        return [Outcome(d, Status.RELEASED) for d in released]


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a task's exception retrieved: its owner logged or ignored it."""
    if not task.cancelled():
        task.exception()
