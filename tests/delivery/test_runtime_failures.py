"""The consumer runtime when things go wrong outside the handler.

A bad message, a buggy source or a dying fetch loop must never silently end
a subscription; a source that fails to start is stopped again; stopping one
worker that fails still stops the rest; abandoned `def` handlers never keep
the process alive. These run the runtime on the in-memory transport, with
sources that add one fault to the real in-memory source.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging.consumer import (
    ConsumerRuntime,
    ConsumerStartError,
    ConsumerStopError,
)
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.messaging.routing import Subscription, build_routing
from duct_messaging.transports.base import Delivery
from duct_messaging.transports.memory import MemoryBroker, MemorySource
from tests.delivery._support import Recorder, RecordingSink, one_topic_routing

JSON = {"content-type": "application/json"}
ROOT = Path(__file__).resolve().parents[2]


def put(broker: MemoryBroker, topic: str, *numbers: int) -> None:
    for n in numbers:
        broker.append(topic, json.dumps({"n": n}).encode(), JSON, None)


def runtime(
    broker: MemoryBroker,
    routing: dict[str, Any],
    make_source: Callable[[Subscription], MemorySource] | None = None,
    **settings: Any,
) -> ConsumerRuntime:
    def plain(sub: Subscription) -> MemorySource:
        return MemorySource(broker, sub.topic, sub.id)

    settings.setdefault("sink", RecordingSink())
    return ConsumerRuntime(
        "memory",
        build_routing(routing),
        make_source or plain,
        sources=["memory"],
        **settings,
    )


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


async def wait_for(recorder: Recorder, count: int, timeout: float = 10.0) -> bool:
    return await asyncio.to_thread(recorder.wait_for, count, timeout)


class Weird(Exception):
    """An exception whose text cannot be rendered: repr and str fail."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __str__(self) -> str:
        raise RuntimeError("no str")


class TrackingMemorySource(MemorySource):
    """A memory source with `claim`/`finish`, counting claims not ended yet.

    `claim` raises once for the delivery at `fail_claim_at`.
    """

    def __init__(self, *args: Any, fail_claim_at: int | None = None) -> None:
        super().__init__(*args)
        self.open_claims = 0
        self._lock = threading.Lock()
        self._fail_claim_at = fail_claim_at

    def claim(self, delivery: Delivery) -> bool:
        if delivery.position == self._fail_claim_at:
            self._fail_claim_at = None
            raise RuntimeError("claim bookkeeping broke")
        with self._lock:
            self.open_claims += 1
        return True

    def finish(self, delivery: Delivery, *, finished: bool) -> None:
        with self._lock:
            self.open_claims -= 1
        if finished:
            self._settle([delivery], ack=True)


class TestBadMessages:
    async def test_a_validator_raising_any_error_makes_the_message_poison(
        self,
    ) -> None:
        """A validator's TypeError dead-letters that message; the next is handled."""
        topic = unique("orders")

        class Picky:
            def validate(self, message: Any) -> None:
                if message["n"] == 1:
                    raise TypeError("model validator blew up")

        handled = Recorder()
        sink = RecordingSink()
        broker = MemoryBroker("mem")
        put(broker, topic, 1, 2)
        routing = one_topic_routing(
            topic, "mem", handled.add, source="memory", schema=Picky()
        )
        consumers = runtime(broker, routing, sink=sink)
        await consumers.start()
        try:
            assert await wait_for(handled, 1)
            assert await wait_for(sink.letters, 1)
        finally:
            await consumers.stop()

        assert handled.snapshot() == [{"n": 2}]
        [letter] = sink.letters.snapshot()
        assert letter.status is DeadLetterStatus.POISON
        assert "TypeError" in letter.error_message
        assert "'worker'" in letter.error_message
        assert broker.pending(topic, "worker") == 0

    async def test_undecodable_poison_names_its_subscription_and_topic(
        self,
    ) -> None:
        """The poison message says which subscription and topic could not decode."""
        topic = unique("orders")
        sink = RecordingSink()
        broker = MemoryBroker("mem")
        broker.append(topic, b"\xff{nope", JSON, None)
        routing = one_topic_routing(topic, "mem", lambda m: None, source="memory")
        consumers = runtime(broker, routing, sink=sink)
        await consumers.start()
        try:
            assert await wait_for(sink.letters, 1)
        finally:
            await consumers.stop()

        [letter] = sink.letters.snapshot()
        assert "'worker'" in letter.error_message
        assert repr(topic) in letter.error_message
        assert "cannot decode" in letter.error_message

    async def test_a_failed_dead_letter_write_is_a_warning_saying_what_next(
        self,
    ) -> None:
        """The runtime recovers from a sink failure, so it logs a warning."""
        topic = unique("orders")
        sink = RecordingSink(failures=1)
        broker = MemoryBroker("mem")
        broker.append(topic, b"\xff{nope", JSON, None)
        routing = one_topic_routing(topic, "mem", lambda m: None, source="memory")
        consumers = runtime(broker, routing, sink=sink)
        with capture_logs() as logs:
            await consumers.start()
            try:
                assert await wait_for(sink.letters, 1)
            finally:
                await consumers.stop()

        [event] = [e for e in logs if e["event"] == "dead_letter_write_failed"]
        assert event["log_level"] == "warning"
        assert "again" in event["next"]


class TestUnexpectedFailures:
    async def test_an_ordered_lane_survives_a_failing_source_hook(self) -> None:
        """A claim that raises releases the message, backs off, then goes on."""
        topic = unique("orders")
        handled = Recorder()
        broker = MemoryBroker("mem")
        put(broker, topic, 1, 2)
        sources: list[TrackingMemorySource] = []

        def make(sub: Subscription) -> TrackingMemorySource:
            sources.append(
                TrackingMemorySource(broker, sub.topic, sub.id, fail_claim_at=0)
            )
            return sources[-1]

        routing = one_topic_routing(topic, "mem", handled.add, source="memory")
        consumers = runtime(broker, routing, make)
        with capture_logs() as logs:
            await consumers.start()
            try:
                assert await wait_for(handled, 2)
            finally:
                report = await consumers.stop()

        assert handled.snapshot() == [{"n": 1}, {"n": 2}]
        [event] = [e for e in logs if e["event"] == "delivery_failed_releasing"]
        assert event["log_level"] == "warning"
        assert "again" in event["next"]
        assert report["worker"].released >= 2
        assert sources[0].open_claims == 0
        assert broker.pending(topic, "worker") == 0

    async def test_concurrent_failure_after_the_claim_ends_it(self) -> None:
        """An error escaping an attempt still ends its claim and its running count."""
        topic = unique("orders")
        calls = Recorder()
        broker = MemoryBroker("mem")
        put(broker, topic, 1)
        sources: list[TrackingMemorySource] = []

        async def handler(message: Any) -> None:
            calls.add(message)
            if len(calls.snapshot()) == 1:
                raise Weird()

        def make(sub: Subscription) -> TrackingMemorySource:
            sources.append(TrackingMemorySource(broker, sub.topic, sub.id))
            return sources[-1]

        routing = one_topic_routing(
            topic, "mem", handler, source="memory", concurrency=2
        )
        consumers = runtime(broker, routing, make)
        await consumers.start()
        worker = consumers.workers["worker"]
        try:
            assert await wait_for(calls, 2)
        finally:
            report = await consumers.stop()

        assert worker._running == 0
        assert sources[0].open_claims == 0
        assert report["worker"].abandoned == 0
        assert broker.pending(topic, "worker") == 0

    async def test_cancelled_concurrent_handlers_are_awaited_by_stop(self) -> None:
        """At the drain deadline, abandoned handler tasks are done when stop returns."""
        topic = unique("orders")
        started = Recorder()
        cleaned = Recorder()
        broker = MemoryBroker("mem")
        put(broker, topic, 1, 2)

        async def handler(message: Any) -> None:
            started.add(message)
            try:
                await asyncio.Event().wait()
            finally:  # cleanup that takes a while after the cancellation
                await asyncio.sleep(0.05)
                cleaned.add(message)

        routing = one_topic_routing(
            topic, "mem", handler, source="memory", concurrency=2
        )
        consumers = runtime(broker, routing, drain_timeout_s=0.2)
        await consumers.start()
        try:
            assert await wait_for(started, 2)
        finally:
            report = await consumers.stop()

        assert report["worker"].abandoned == 2
        assert len(cleaned.snapshot()) == 2
        me = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not me] == []

    async def test_a_dying_fetch_loop_is_reported_and_what_finished_is_acked(
        self,
    ) -> None:
        """A loop killed by a source bug: logged at once, acked, raised by stop."""
        topic = unique("orders")
        broker = MemoryBroker("mem")
        put(broker, topic, 1)
        handled = asyncio.Event()
        unhandled: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: unhandled.append(context)
        )

        class Broken:
            def __iter__(self) -> Any:
                raise RuntimeError("source returned garbage")

        class BrokenFetch(MemorySource):
            calls = 0

            async def fetch(self, max_messages: int, timeout: float) -> Any:
                self.calls += 1
                if self.calls == 1:
                    return await super().fetch(max_messages, timeout)
                await handled.wait()
                return Broken()

        async def handler(message: Any) -> None:
            handled.set()

        def make(sub: Subscription) -> MemorySource:
            return BrokenFetch(broker, sub.topic, sub.id)

        routing = one_topic_routing(
            topic, "mem", handler, source="memory", concurrency=2
        )
        consumers = runtime(broker, routing, make)
        with capture_logs() as logs:
            await consumers.start()
            worker = consumers.workers["worker"]
            assert worker._task is not None
            await asyncio.wait({worker._task}, timeout=10)
            assert consumers.failed() == {"worker": worker.failure}
            with pytest.raises(ConsumerStopError) as raised:
                await consumers.stop()

        error = raised.value
        assert isinstance(error, DuctMessagingError)
        [(sub, failure)] = error.failures.items()
        assert sub == "worker"
        assert "source returned garbage" in str(failure.__cause__ or failure)
        assert "'worker'" in str(error)
        died = [e for e in logs if e["event"] == "subscription_stopped_for_good"]
        assert [e["log_level"] for e in died] == ["error"]
        assert [e["event"] for e in logs if e["event"] == "consumers_stopped"]
        assert consumers.workers == {}
        assert broker.pending(topic, "worker") == 0
        del worker, error, failure, raised
        gc.collect()
        assert unhandled == []


class RecordingSource(MemorySource):
    """A memory source that records `stop` and may fail `start` or `stop`."""

    def __init__(
        self,
        *args: Any,
        start_error: Exception | None = None,
        start_hangs: bool = False,
        stop_error: Exception | None = None,
    ) -> None:
        super().__init__(*args)
        self.start_error = start_error
        self.start_hangs = start_hangs
        self.stop_error = stop_error
        self.stops = 0

    async def start(self) -> None:
        if self.start_hangs:
            await asyncio.Event().wait()
        if self.start_error is not None:
            raise self.start_error

    async def stop(self) -> None:
        self.stops += 1
        await super().stop()
        if self.stop_error is not None:
            raise self.stop_error


def two_subscriptions(topic: str, handler: Any) -> dict[str, Any]:
    routing = one_topic_routing(topic, "mem", handler, source="memory")
    routing["subscriptions"]["other"] = {
        **routing["subscriptions"]["worker"],
    }
    return routing


class TestStartAndStop:
    @pytest.mark.parametrize("hangs", [False, True], ids=["raises", "times-out"])
    async def test_a_source_failing_to_start_is_stopped(self, hangs: bool) -> None:
        """The failed source gets `stop`; the error says what failed and what to do."""
        topic = unique("orders")
        broker = MemoryBroker("mem")
        sources: dict[str, RecordingSource] = {}

        def make(sub: Subscription) -> RecordingSource:
            bad = sub.id == "other"
            sources[sub.id] = RecordingSource(
                broker,
                sub.topic,
                sub.id,
                start_error=ConnectionError("refused") if bad else None,
                start_hangs=bad and hangs,
            )
            return sources[sub.id]

        consumers = runtime(
            broker, two_subscriptions(topic, lambda m: None), make, start_timeout_s=0.2
        )
        with pytest.raises(ConsumerStartError) as raised:
            await consumers.start()

        assert sources["other"].stops == 1
        assert sources["worker"].stops == 1
        text = str(raised.value)
        assert raised.value.subscription == "other"
        assert "'other'" in text
        assert "memory" in text
        assert "'mem'" in text
        assert ("0.2" in text) if hangs else ("ConnectionError: refused" in text)
        assert "Check" in text

    async def test_a_failing_worker_stop_still_stops_the_others(self) -> None:
        """Every worker stops; the error carries each failure; the stop is logged."""
        topic = unique("orders")
        broker = MemoryBroker("mem")
        sources: dict[str, RecordingSource] = {}

        def make(sub: Subscription) -> RecordingSource:
            error = OSError("socket gone") if sub.id == "worker" else None
            sources[sub.id] = RecordingSource(
                broker, sub.topic, sub.id, stop_error=error
            )
            return sources[sub.id]

        consumers = runtime(broker, two_subscriptions(topic, lambda m: None), make)
        await consumers.start()
        with capture_logs() as logs, pytest.raises(ConsumerStopError) as raised:
            await consumers.stop()

        assert {s: src.stops for s, src in sources.items()} == {
            "worker": 1,
            "other": 1,
        }
        assert list(raised.value.failures) == ["worker"]
        assert isinstance(raised.value.failures["worker"], OSError)
        assert "'worker'" in str(raised.value)
        assert [e["event"] for e in logs if e["event"] == "consumers_stopped"]
        assert consumers.workers == {}


def test_abandoned_def_handlers_do_not_keep_the_process_alive(
    tmp_path: Path,
) -> None:
    """A `def` handler still running after halt does not block interpreter exit."""
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            """
            import threading
            from duct_messaging import halt, init
            from tests.delivery._support import memory_system, one_topic_routing

            started = threading.Event()

            def handler(message):
                started.set()
                threading.Event().wait()  # never returns

            routing = one_topic_routing("orders", "mem", handler, source="memory")
            system = init(memory_system(routing, drain_timeout_s=0.2))
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")
            assert started.wait(30)
            halt(system)
            print("halted", flush=True)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "halted" in done.stdout
