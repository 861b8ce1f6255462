"""The APScheduler side of a deferred scheduler, from opening to draining.

`SchedulerRunner.run` opens the store, starts APScheduler 4's
`AsyncScheduler` on it with every deferred-delivery task pointing at a
`Courier`, and keeps two chores going while it delivers: waking the
scheduler so it looks for messages whose lease expired, and deleting
schedules that finished. When told to stop it takes no new deliveries,
waits for running ones up to `halt_timeout_s`, and closes everything;
deliveries still running then are cancelled and put back by the courier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any
from uuid import uuid4

import anyio
import structlog
from apscheduler import AsyncScheduler, JobAdded, ScheduleUpdated
from apscheduler.abc import DataStore

from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._deferred_delivery import Courier
from duct_messaging.messaging._deferred_store import StoreSpec
from duct_messaging.messaging.deadletter import utcnow

log = structlog.get_logger(__name__)

# Finished schedules are deleted this often (see `sweep_finished`).
_SWEEP_INTERVAL_S = 60.0

_WAKE_UP_ID = "duct.messaging/deferred:wake-up"


class SchedulerRunner:
    """Runs APScheduler for one deferred scheduler until it is told to stop.

    `courier` builds the courier for the opened store. `data_store` is the
    opened store while deliveries run, None before and after.
    """

    def __init__(
        self,
        spec: StoreSpec,
        identity: str,
        courier: Callable[[DataStore], Courier],
        *,
        concurrency: int,
        lease_s: float,
        poll_interval_s: float,
        halt_timeout_s: float,
    ) -> None:
        self.spec = spec
        self.identity = identity
        self.courier = courier
        self.concurrency = concurrency
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.halt_timeout_s = halt_timeout_s
        self.data_store: DataStore | None = None

    async def run(self, ready: asyncio.Future[None], stop: asyncio.Event) -> None:
        """Deliver until `stop` is set, then drain and close the store.

        Sets `ready` once deliveries have started, and raises what went
        wrong before or after. One task must run this from start to end:
        APScheduler runs on AnyIO task groups, which only the task that
        entered them may exit.
        """
        try:
            async with AsyncExitStack() as stack:
                scheduler, courier = await self._open(stack)
                async with anyio.create_task_group() as housekeeping:
                    housekeeping.start_soon(self._wake_periodically, scheduler)
                    housekeeping.start_soon(self._sweep_periodically)
                    ready.set_result(None)
                    await stop.wait()
                    await self._drain(scheduler, courier)
                    housekeeping.cancel_scope.cancel()
                # Leaving the stack stops the scheduler: deliveries still
                # running are cancelled and put back (see Courier.run_job).
        finally:
            self.data_store = None

    async def _open(self, stack: AsyncExitStack) -> tuple[AsyncScheduler, Courier]:
        opened = stores.open_store(self.spec, stack)
        courier = self.courier(opened.data_store)
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
        async with stores.schema_lock(self.spec):
            await stack.enter_async_context(scheduler)
            # No cluster-wide cap (APScheduler's default is 1): its running
            # count is never given back for jobs of an instance that was
            # killed, so a cap would shrink with every crash until nothing
            # runs. `concurrency` bounds each instance instead.
            for task_id in stores.task_ids():
                # A bound method has no import path, so the stored task
                # keeps none (func is NULL) and each process supplies its own
                # callable by task id: stored jobs name only the task id and
                # the document, never this module.
                await scheduler.configure_task(
                    task_id,
                    func=courier.run_job,
                    job_executor="async",
                    max_running_jobs=None,
                    misfire_grace_time=None,
                )
        await scheduler.start_in_background()
        self.data_store = opened.data_store
        return scheduler, courier

    async def _drain(self, scheduler: AsyncScheduler, courier: Courier) -> None:
        courier.closing = True
        # Zero capacity: the job loop stops acquiring, the rest keeps running.
        scheduler.max_concurrent_jobs = 0
        with anyio.move_on_after(self.halt_timeout_s):
            await courier.idle.wait()

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
            store = self.data_store
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
