"""The deferred scheduler under cancellation and timeouts; store spec checks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from duct_messaging.messaging._deferred_config import DeferredConfigError
from duct_messaging.messaging._deferred_store import StoreSpec
from duct_messaging.messaging.deferred import DeferredScheduler
from duct_messaging.transports.base import Target
from tests.deferred._support import ListProducer, make_message

WAIT_S = 10.0


def later() -> datetime:
    return datetime.now(UTC) + timedelta(hours=1)


def memory_scheduler() -> DeferredScheduler:
    return DeferredScheduler(
        {"rec": ListProducer()},
        {"memory": True},
        allow_memory_store=True,
        poll_interval_s=0.2,
        halt_timeout_s=1.0,
    )


@pytest.fixture
def loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT_S)
    loop.close()


def test_a_timed_out_schedule_blocking_is_not_stored_later(
    loop_thread: asyncio.AbstractEventLoop,
) -> None:
    """A caller that retries after a timeout must not end up with two copies."""
    scheduler = memory_scheduler()
    asyncio.run_coroutine_threadsafe(scheduler.start(), loop_thread).result(WAIT_S)
    try:
        busy, release = threading.Event(), threading.Event()

        def occupy() -> None:
            busy.set()
            release.wait(WAIT_S)

        loop_thread.call_soon_threadsafe(occupy)
        assert busy.wait(WAIT_S)
        target = [Target("rec", {})]
        with pytest.raises(TimeoutError):
            scheduler.schedule_blocking(make_message(), target, later(), 0.05)
        release.set()
        kept = scheduler.schedule_blocking(make_message(), target, later(), WAIT_S)
        pending = asyncio.run_coroutine_threadsafe(
            scheduler.pending(), loop_thread
        ).result(WAIT_S)
        assert [item.id for item in pending] == [kept]
    finally:
        release.set()
        asyncio.run_coroutine_threadsafe(scheduler.aclose(), loop_thread).result(WAIT_S)


async def test_a_cancelled_scheduler_task_ends_cancelled_and_closes() -> None:
    scheduler = memory_scheduler()
    await scheduler.start()
    task = scheduler._task
    assert task is not None
    task.cancel()
    await asyncio.wait_for(asyncio.wait([task]), WAIT_S)
    assert task.cancelled()
    await asyncio.wait_for(scheduler.aclose(), WAIT_S)


async def test_closing_a_scheduler_while_cancelled_propagates_the_cancel() -> None:
    scheduler = memory_scheduler()
    await scheduler.start()
    closing = asyncio.ensure_future(scheduler.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, WAIT_S)


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (lambda: StoreSpec("postgresql", schema="s", channel="c"), "store.url"),
        (lambda: StoreSpec("postgresql", url="postgresql://x/y"), "store.schema"),
        (lambda: StoreSpec("sqlite"), "store.sqlite"),
        (lambda: StoreSpec("redis"), "store: 'redis'"),
    ],
)
def test_an_incomplete_store_spec_is_refused(spec: object, problem: str) -> None:
    with pytest.raises(DeferredConfigError) as caught:
        spec()  # type: ignore[operator]
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value
