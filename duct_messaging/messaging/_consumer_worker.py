"""The worker that runs one subscription: fetch, handle in lanes, settle.

See `duct_messaging.messaging.consumer` for the delivery promises. Inside a
worker, `concurrency: 1` keeps ordered *lanes* (one per partition; one for
a source without partitions): a head waiting out its back-off holds only
its lane, and the worker goes on fetching and handling the others. With
`concurrency > 1` each delivery runs as its own task, at most `concurrency`
attempts at a time.

Settling: what finished is acknowledged; a delivery whose dead letter was
written goes to the source's `reject` instead, when the source has one
(RabbitMQ, NATS), so the broker can route or drop it as dead.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import structlog

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging._consumer_pipeline import Job, Pipeline, Step
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.messaging.routing import Subscription
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

    def next_ready(self) -> _Lane | None:
        """Return the first lane whose head may run now, if any."""
        now = 0.0
        for lane in self._lanes.values():
            if not lane.queue:
                continue
            if lane.ready_at == 0.0:
                return lane
            now = now or time.monotonic()
            if lane.ready_at <= now:
                lane.ready_at = 0.0
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
        # Deliveries whose handler (or dead-letter write) is running now;
        # only one thread at a time runs steps, so a plain counter will do.
        self._running = 0
        # Finished deliveries not acknowledged (or rejected) yet, by id(); a
        # tracking source is told at once instead.
        self._unsettled: dict[int, Delivery] = {}
        self._unsettled_dead: dict[int, Delivery] = {}
        self._sink_failed = False
        self._claim: Callable[[Delivery], bool] | None = getattr(source, "claim", None)
        self._finish_hook: Callable[..., None] | None = getattr(source, "finish", None)
        self._can_pause = hasattr(source, "pause") and hasattr(source, "resume")
        self._can_reject = hasattr(source, "reject")

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
                self.stats.abandoned = self._running
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await self._settle_unsettled()
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
            if lanes.next_ready() is not None:
                await self._update_pauses()
                done, outcomes = await self._process_ready()
                await self._settle(outcomes, done)
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
        outcome. This is `_begin`/`_end` inlined: it runs once per message
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
                if claim is not None and not claim(delivery):
                    lane.pop()
                    other.append(Outcome(delivery, Status.DROPPED))
                    continue
                self._running += 1
                job = lane.job
                if job is None:
                    opened = pipeline.open(delivery)
                    if isinstance(opened, DeadLetter):
                        written = self._write_from_thread(opened, loop)
                        other.extend(self._buried(lane, opened, written))
                        continue
                    job = lane.job = opened
                step = attempt(job)
                if step is None:
                    self._running -= 1
                    queue.popleft()
                    lane.job = None
                    if hook is not None:
                        hook(delivery, finished=True)
                    else:
                        unsettled[id(delivery)] = delivery
                    done.append(delivery)
                elif isinstance(step, DeadLetter):
                    written = self._write_from_thread(step, loop)
                    other.extend(self._buried(lane, step, written))
                else:
                    self._running -= 1
                    lane.ready_at = time.monotonic() + step
                    if hook is not None:
                        hook(delivery, finished=False)
        return done, other

    async def _run_lanes_async(self) -> list[Outcome]:
        """Handle every ready lane head on the event loop until none is ready."""
        outcomes: list[Outcome] = []
        lanes = self._lanes
        while not self._halting.is_set():
            lane = lanes.next_ready()
            if lane is None:
                break
            outcomes.extend(await self._step_async(lane))
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
                    outcomes = await self._step_async(lane)
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
    #
    # A step claims the lane's head (`_begin`), runs one attempt, and settles
    # it (`_end`); a dead letter is written between `_end` and `_buried`.
    # Each returns what finished: an empty list means the head failed and
    # waits until `lane.ready_at` for its next attempt.

    def _begin(self, lane: _Lane) -> Job | DeadLetter | list[Outcome]:
        """Claim the head; return its job, its poison dead letter, or DROPPED."""
        delivery = lane.queue[0]
        if self._claim is not None and not self._claim(delivery):
            lane.pop()
            return [Outcome(delivery, Status.DROPPED)]
        self._running += 1
        job = lane.job
        if job is None:
            opened = self.pipeline.open(delivery)
            if isinstance(opened, DeadLetter):
                return opened
            job = lane.job = opened
        return job

    def _end(self, lane: _Lane, step: Step) -> DeadLetter | list[Outcome]:
        """Settle one attempt: done, a back-off, or a dead letter to write."""
        if isinstance(step, DeadLetter):
            return step
        self._running -= 1
        if step is None:
            delivery = lane.pop()
            self._finished(delivery, finished=True)
            return [Outcome(delivery, Status.DONE)]
        lane.ready_at = time.monotonic() + step
        self._finished(lane.queue[0], finished=False)
        return []

    def _buried(
        self, lane: _Lane, dead_letter: DeadLetter, written: bool
    ) -> list[Outcome]:
        """Settle a dead-letter write: acknowledged, or the lane comes again."""
        self._running -= 1
        delivery = lane.queue[0]
        if written:
            lane.pop()
            self._finished(delivery, finished=True, dead=True)
            return [Outcome(delivery, Status.DEAD, dead_letter)]
        # The sink failed: this delivery and everything queued behind it in
        # its lane come again, so the lane's order is kept.
        self._finished(delivery, finished=False)
        self._sink_failed = True
        return [Outcome(d, Status.RELEASED) for d in lane.clear()]

    async def _step_async(self, lane: _Lane) -> list[Outcome]:
        work = self._begin(lane)
        if isinstance(work, Job):
            if self.pipeline.is_async:
                step = await self.pipeline.attempt_async(work)
            else:
                loop = asyncio.get_running_loop()
                ctx = contextvars.copy_context()
                step = await loop.run_in_executor(
                    self._executor, ctx.run, self.pipeline.attempt_sync, work
                )
            work = self._end(lane, step)
        if isinstance(work, DeadLetter):
            work = self._buried(lane, work, await self._write_dead_letter(work))
        return work

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
