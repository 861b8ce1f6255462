"""The deferred scheduler on a real PostgreSQL store, in one process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import structlog
from apscheduler import ConflictPolicy
from apscheduler.eventbrokers.local import LocalEventBroker

from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._deferred_payload import DeferredMessage
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.messaging.deferred import (
    DeferredClosedError,
    DeferredLoopError,
    DeferredOptionError,
    DeferredPayloadError,
    DeferredScheduler,
    DeliveryPolicy,
    list_pending,
)
from duct_messaging.transports.base import Target
from tests.deferred._support import ListProducer, ListSink, make_message, wait_until

pytestmark = pytest.mark.postgres

Factory = Callable[..., DeferredScheduler]


@pytest.fixture
async def schedulers(pg_store: dict[str, Any]) -> AsyncIterator[Factory]:
    """Return a factory of schedulers on this test's store; all closed after."""
    made: list[DeferredScheduler] = []

    def make(producers: dict[str, Any], **options: Any) -> DeferredScheduler:
        options.setdefault("lease_s", 5.0)
        options.setdefault("poll_interval_s", 0.2)
        scheduler = DeferredScheduler(producers, pg_store, **options)
        made.append(scheduler)
        return scheduler

    yield make
    for scheduler in made:
        await scheduler.aclose()


def soon(seconds: float = 0.3) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


async def store_document(store: dict[str, Any], document: str) -> None:
    """Store `document` as a message due now, through a handle of its own."""
    spec = stores.parse_store(store)
    item = DeferredMessage.new(make_message(), [Target("rec")], soon(0))
    async with AsyncExitStack() as stack:
        opened = stores.open_store(spec, stack)
        broker = LocalEventBroker()
        await broker.start(stack, stores.APSCHEDULER_LOG)
        await opened.data_store.start(stack, broker, stores.APSCHEDULER_LOG)
        await stores.add_message(
            opened.data_store, item, item.id, document, ConflictPolicy.exception
        )


class TestDelivery:
    async def test_message_is_delivered_at_due_time_with_original_headers(
        self, schedulers: Factory
    ) -> None:
        """A scheduled message reaches its target unchanged, not before its due time."""
        producer = ListProducer()
        scheduler = schedulers({"rec": producer})
        await scheduler.start()
        message = make_message()
        target = Target("rec", {"destination": "orders.v1"})
        due = soon()

        deferred_id = await scheduler.schedule(message, [target], due)

        [(sent_target, sent, at)] = await producer.wait_for(1)
        assert deferred_id
        assert sent_target == target
        assert sent == message
        assert sent.headers["traceparent"] == message.headers["traceparent"]
        assert at >= due.timestamp()

    async def test_every_target_gets_the_message_in_order(
        self, schedulers: Factory
    ) -> None:
        """Targets are sent to in the order they were given."""
        first, second = ListProducer("a"), ListProducer("b")
        scheduler = schedulers({"a": first, "b": second})
        await scheduler.start()

        await scheduler.schedule(make_message(), [Target("a"), Target("b")], soon(0.1))

        [(_, _, at_first)] = await first.wait_for(1)
        [(_, _, at_second)] = await second.wait_for(1)
        assert at_first <= at_second

    async def test_past_due_time_is_delivered_at_once(
        self, schedulers: Factory
    ) -> None:
        """A due time that has passed is delivered as soon as possible."""
        producer = ListProducer()
        scheduler = schedulers({"rec": producer})
        await scheduler.start()

        await scheduler.schedule(make_message(), [Target("rec")], soon(-5))

        assert len(await producer.wait_for(1)) == 1

    async def test_scheduling_is_logged_per_message_at_debug(
        self, schedulers: Factory
    ) -> None:
        """Scheduled and delivered are DEBUG events; start is one INFO event."""
        producer = ListProducer()
        scheduler = schedulers({"rec": producer})

        with structlog.testing.capture_logs() as logs:
            await scheduler.start()
            deferred_id = await scheduler.schedule(
                make_message(), [Target("rec")], soon(0.1)
            )
            await producer.wait_for(1)
            await scheduler.aclose()

        events = {(e["event"], e["log_level"]) for e in logs}
        assert ("deferred_scheduler_started", "info") in events
        assert ("deferred_scheduled", "debug") in events
        assert ("deferred_scheduler_stopped", "info") in events
        delivered = [e for e in logs if e["event"] == "deferred_delivered"]
        assert [e["deferred_id"] for e in delivered] == [deferred_id]
        assert delivered[0]["log_level"] == "debug"


class TestFailures:
    async def test_failed_delivery_is_retried_with_backoff(
        self, schedulers: Factory
    ) -> None:
        """Two failures are retried with a WARNING each, then the third try lands."""
        producer = ListProducer(fail_times=2)
        policy = DeliveryPolicy(max_attempts=5, backoff_s=0.05, backoff_max_s=0.1)
        scheduler = schedulers({"rec": producer}, delivery=policy)
        await scheduler.start()

        with structlog.testing.capture_logs() as logs:
            await scheduler.schedule(make_message(), [Target("rec")], soon(0.1))
            await producer.wait_for(1)

        retries = [e for e in logs if e["event"] == "deferred_delivery_retry"]
        assert [e["attempt"] for e in retries] == [1, 2]
        assert all(e["log_level"] == "warning" for e in retries)
        assert [e["delay_s"] for e in retries] == [0.05, 0.1]
        assert producer.calls == 3

    async def test_exhausted_retries_are_dead_lettered(
        self, schedulers: Factory
    ) -> None:
        """After max_attempts failures the message goes to the sink, marked eligible."""
        producer = ListProducer(fail_always=True)
        sink = ListSink()
        policy = DeliveryPolicy(max_attempts=3, backoff_s=0.01, backoff_max_s=0.02)
        scheduler = schedulers({"rec": producer}, delivery=policy, deadletter=sink)
        await scheduler.start()
        message = make_message()

        with structlog.testing.capture_logs() as logs:
            await scheduler.schedule(
                message, [Target("rec", {"destination": "d"})], soon(0.1)
            )
            [letter] = await sink.wait_for(1)

        assert producer.calls == 3
        assert letter.status is DeadLetterStatus.ELIGIBLE
        assert letter.source == "deferred"
        assert letter.attempts == 3
        assert letter.body == message.body
        assert letter.key == message.key
        assert letter.headers == dict(message.headers)
        assert letter.topic == "orders"
        assert letter.client == "rec"
        assert letter.destination == "d"
        assert letter.error_type == "builtins.ConnectionError"
        assert "refused send 3" in letter.error_message
        assert letter.first_failure_at < letter.last_failure_at
        dead = [e for e in logs if e["event"] == "deferred_dead_lettered"]
        assert [e["log_level"] for e in dead] == ["error"]

    async def test_partial_failure_retries_only_the_remaining_targets(
        self, schedulers: Factory
    ) -> None:
        """A target that already accepted the message does not get it twice."""
        first, second = ListProducer("a"), ListProducer("b", fail_times=1)
        policy = DeliveryPolicy(max_attempts=3, backoff_s=0.01, backoff_max_s=0.01)
        scheduler = schedulers({"a": first, "b": second}, delivery=policy)
        await scheduler.start()

        await scheduler.schedule(make_message(), [Target("a"), Target("b")], soon(0.1))

        await second.wait_for(1)
        assert first.calls == 1
        assert second.calls == 2

    async def test_failing_sink_keeps_the_message_until_it_is_written(
        self, schedulers: Factory
    ) -> None:
        """When the sink fails the message stays stored and is written later."""
        producer = ListProducer(fail_always=True)
        sink = ListSink(fail_times=1)
        policy = DeliveryPolicy(max_attempts=1, backoff_s=0.01, backoff_max_s=0.05)
        scheduler = schedulers({"rec": producer}, delivery=policy, deadletter=sink)
        await scheduler.start()

        with structlog.testing.capture_logs() as logs:
            await scheduler.schedule(make_message(), [Target("rec")], soon(0.1))
            [letter] = await sink.wait_for(1)

        assert sink.calls == 2
        assert producer.calls == 1
        assert letter.attempts == 1
        assert "deferred_dead_letter_failed" in [e["event"] for e in logs]

    async def test_message_later_than_grace_is_dead_lettered(
        self, schedulers: Factory
    ) -> None:
        """A message due longer ago than grace_s goes to the sink, not the broker."""
        producer = ListProducer()
        sink = ListSink()
        scheduler = schedulers({"rec": producer}, grace_s=2.0, deadletter=sink)
        await scheduler.start()

        await scheduler.schedule(make_message(), [Target("rec")], soon(-10))
        on_time = make_message()
        await scheduler.schedule(on_time, [Target("rec")], soon(-1))

        [letter] = await sink.wait_for(1)
        [(_, sent, _)] = await producer.wait_for(1)
        assert sent == on_time
        assert letter.attempts == 0
        assert letter.error_type.endswith("DeliveryWindowMissedError")
        assert "beyond grace_s=2" in letter.error_message

    async def test_unreadable_document_is_dead_lettered_as_poison(
        self, schedulers: Factory, pg_store: dict[str, Any]
    ) -> None:
        """A stored document this code cannot read reaches the sink as poison."""
        producer = ListProducer()
        sink = ListSink()
        scheduler = schedulers({"rec": producer}, deadletter=sink)
        await scheduler.start()
        document = '{"v": 999, "id": "from-the-future"}'

        with structlog.testing.capture_logs() as logs:
            await store_document(pg_store, document)
            [letter] = await sink.wait_for(1)

        assert letter.status == DeadLetterStatus.POISON
        assert letter.body == document.encode()
        assert (letter.topic, letter.source, letter.attempts) == ("", "deferred", 0)
        assert letter.error_type.endswith("DeferredPayloadError")
        assert letter.first_failure_at == letter.last_failure_at
        assert producer.calls == 0
        assert "deferred_unreadable" in [e["event"] for e in logs]


class TestLifecycle:
    async def test_halt_keeps_undelivered_messages_for_the_next_start(
        self, schedulers: Factory, pg_store: dict[str, Any]
    ) -> None:
        """Messages not yet due survive a halt and are listed and delivered later."""
        first = schedulers({"rec": ListProducer()})
        await first.start()
        deferred_id = await first.schedule(
            make_message(), [Target("rec", {"destination": "x"})], soon(1.0)
        )
        await first.aclose()

        pending = await list_pending(pg_store)

        assert [(p.id, p.topic, p.state) for p in pending] == [
            (deferred_id, "orders", "scheduled")
        ]
        assert pending[0].targets == (Target("rec", {"destination": "x"}),)
        producer = ListProducer()
        second = schedulers({"rec": producer})
        await second.start()
        assert [p.id for p in await second.pending()] == [deferred_id]
        await producer.wait_for(1)

        async def nothing_pending() -> bool:
            return await second.pending() == []

        await wait_until(nothing_pending, within_s=10)

    async def test_halt_puts_back_a_delivery_still_running(
        self, schedulers: Factory
    ) -> None:
        """A delivery cut off by halt is stored again and delivered after restart."""
        stuck = ListProducer(gate=asyncio.Event())
        first = schedulers({"rec": stuck}, halt_timeout_s=0.1)
        await first.start()
        message = make_message()
        await first.schedule(message, [Target("rec")], soon(0.1))
        async with asyncio.timeout(10):
            await stuck.started.wait()

        with structlog.testing.capture_logs() as logs:
            await first.aclose()

        assert "deferred_put_back" in [e["event"] for e in logs]
        producer = ListProducer()
        second = schedulers({"rec": producer})
        await second.start()
        [(_, sent, _)] = await producer.wait_for(1)
        assert sent == message

    async def test_schedule_from_other_threads_and_loops(
        self, schedulers: Factory
    ) -> None:
        """`schedule` hops to the scheduler's loop; `schedule_blocking` works off it."""
        producer = ListProducer()
        scheduler = schedulers({"rec": producer})
        await scheduler.start()
        ids: list[str] = []

        def other_thread() -> None:
            ids.append(
                asyncio.run(
                    scheduler.schedule(make_message(), [Target("rec")], soon(0.1))
                )
            )
            ids.append(
                scheduler.schedule_blocking(
                    make_message(), [Target("rec")], soon(0.1), 10
                )
            )

        thread = threading.Thread(target=other_thread)
        thread.start()
        await asyncio.to_thread(thread.join, 20)

        assert len(ids) == 2
        assert len(await producer.wait_for(2)) == 2
        with pytest.raises(DeferredLoopError, match="would block forever"):
            scheduler.schedule_blocking(make_message(), [Target("rec")], soon())

    async def test_several_instances_create_the_schema_together(
        self, schedulers: Factory
    ) -> None:
        """Four instances starting at once on a fresh schema all start."""
        started = [schedulers({"rec": ListProducer()}) for _ in range(4)]

        await asyncio.gather(*(s.start() for s in started))

        assert {s.state for s in started} == {"running"}


class TestRejections:
    async def test_naive_due_time_is_rejected(self, schedulers: Factory) -> None:
        """`due` must carry a timezone."""
        scheduler = schedulers({"rec": ListProducer()})
        await scheduler.start()

        with pytest.raises(DeferredOptionError, match=r"due=.*naive") as caught:
            await scheduler.schedule(make_message(), [Target("rec")], datetime.now())

        assert caught.value.option == "due"

    async def test_target_options_must_be_plain_data(self, schedulers: Factory) -> None:
        """An option that is a Python object cannot be stored."""
        scheduler = schedulers({"rec": ListProducer()})
        await scheduler.start()
        target = Target("rec", {"partitioner": object()})

        with pytest.raises(DeferredPayloadError, match=r"targets\[0\].options \(rec\)"):
            await scheduler.schedule(make_message(), [target], soon())

    async def test_scheduler_that_is_not_running_refuses(
        self, schedulers: Factory
    ) -> None:
        """Before start and after aclose, schedule raises DeferredClosedError."""
        scheduler = schedulers({"rec": ListProducer()})

        with pytest.raises(DeferredClosedError, match="it is new") as before:
            await scheduler.schedule(make_message(), [Target("rec")], soon())
        await scheduler.start()
        await scheduler.aclose()
        with pytest.raises(DeferredClosedError, match="it is closed"):
            await scheduler.schedule(make_message(), [Target("rec")], soon())

        assert before.value.state == "new"
