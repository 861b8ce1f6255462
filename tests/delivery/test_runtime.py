"""The consumer runtime's delivery promises, on the in-memory transport."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from structlog.testing import capture_logs

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.messaging.retry import RetryPolicy, retry_problems
from duct_messaging.system import Ref
from tests.delivery._support import (
    SINK_KEY,
    WAIT_S,
    Recorder,
    RecordingSink,
    memory_system,
    on_event,
    one_topic_routing,
)

FAST_RETRY = {"max_attempts": 3, "backoff": {"initial_ms": 5, "max_ms": 20}}


def start(routing: dict[str, Any], sink: Any, **consumers: Any) -> Any:
    config = memory_system(routing, deadletter=Ref(SINK_KEY), **consumers)
    config[SINK_KEY] = {}
    return init(config, overrides={SINK_KEY: sink})


class TestRetries:
    def test_failures_are_retried_until_the_handler_succeeds(self) -> None:
        """A handler failing twice is called a third time; nothing is dead-lettered."""
        calls = Recorder()

        def handler(message: Any, ctx: MessageContext) -> None:
            calls.add(ctx.attempt)
            if ctx.attempt < 3:
                raise RuntimeError("flaky")

        sink = RecordingSink()
        routing = one_topic_routing(
            "orders", "mem", handler, source="memory", retry=FAST_RETRY
        )
        system = start(routing, sink)
        try:
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

            assert calls.wait_for(3)
        finally:
            halt(system)

        assert calls.snapshot() == [1, 2, 3]
        assert sink.letters.snapshot() == []

    def test_exhausted_retries_dead_letter_then_the_next_message_is_handled(
        self,
    ) -> None:
        """After `max_attempts` failures the message is dead-lettered with its story."""
        handled = Recorder()

        def handler(message: Any) -> None:
            if message["n"] == 1:
                raise RuntimeError("always fails")
            handled.add(message["n"])

        sink = RecordingSink()
        routing = one_topic_routing(
            "orders", "mem", handler, source="memory", retry=FAST_RETRY
        )
        system = start(routing, sink)
        try:
            producer = system["duct.messaging/producer"]
            producer.produce({"n": 1}, topic="orders")
            producer.produce({"n": 2}, topic="orders")

            assert sink.letters.wait_for(1)
            assert handled.wait_for(1)
        finally:
            halt(system)

        [letter] = sink.letters.snapshot()
        assert letter.attempts == 3
        assert letter.status is DeadLetterStatus.ELIGIBLE
        assert letter.error_type == "builtins.RuntimeError"
        assert letter.error_message == "always fails"
        assert "RuntimeError: always fails" in letter.error_traceback
        assert letter.first_failure_at <= letter.last_failure_at
        assert (letter.subscription, letter.client, letter.topic) == (
            "worker",
            "mem",
            "orders",
        )
        assert handled.snapshot() == [2]

    def test_non_retriable_errors_are_dead_lettered_at_once(self) -> None:
        """An exception type listed as non-retriable skips the remaining attempts."""
        calls = Recorder()

        def handler(message: Any) -> None:
            calls.add(message)
            raise ValueError("bad amount")

        sink = RecordingSink()
        retry = {**FAST_RETRY, "non_retriable": ["ValueError"]}
        routing = one_topic_routing(
            "orders", "mem", handler, source="memory", retry=retry
        )
        system = start(routing, sink)
        try:
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

            assert sink.letters.wait_for(1)
        finally:
            halt(system)

        assert len(calls.snapshot()) == 1
        assert sink.letters.snapshot()[0].attempts == 1

    def test_async_handlers_with_concurrency_retry_too(self) -> None:
        """Async handlers running several at once get the same retry policy."""
        attempts: dict[int, int] = {}
        done = Recorder()

        async def handler(message: Any) -> None:
            n = message["n"]
            attempts[n] = attempts.get(n, 0) + 1
            if n % 2 and attempts[n] < 2:
                raise RuntimeError("first try fails")
            await asyncio.sleep(0)
            done.add(n)

        sink = RecordingSink()
        routing = one_topic_routing(
            "orders", "mem", handler, source="memory", retry=FAST_RETRY, concurrency=4
        )
        system = start(routing, sink)
        try:
            for n in range(10):
                system["duct.messaging/producer"].produce({"n": n}, topic="orders")

            assert done.wait_for(10)
        finally:
            halt(system)

        assert sorted(done.snapshot()) == list(range(10))
        assert {n: attempts[n] for n in (1, 2)} == {1: 2, 2: 1}
        assert sink.letters.snapshot() == []

    def test_retry_policy_reports_its_worst_case_back_off(self) -> None:
        """The documented bound on back-off follows the configured policy."""
        policy = RetryPolicy.from_config(
            {
                "max_attempts": 4,
                "backoff": {
                    "initial_ms": 100,
                    "multiplier": 2,
                    "max_ms": 300,
                    "jitter": 0,
                },
            }
        )

        assert policy.worst_case_backoff_s() == pytest.approx(0.1 + 0.2 + 0.3)
        assert retry_problems({"max_attempts": 0, "backoff": {"initial_ms": -1}}) == [
            "max_attempts: expected an integer >= 1, got 0",
            "backoff.initial_ms: expected a number >= 0, got -1",
        ]


class TestPoison:
    def test_undecodable_body_is_dead_lettered_as_poison_without_the_handler(
        self,
    ) -> None:
        """Bytes the codec cannot read never reach the handler."""
        handled = Recorder()
        sink = RecordingSink()
        routing = one_topic_routing("orders", "mem", handled.add, source="memory")
        system = start(routing, sink)
        try:
            broker = system["duct.memory/clients"]["mem"]
            broker.append(
                "orders", b"\xff{nope", {"content-type": "application/json"}, None
            )
            system["duct.messaging/producer"].produce({"n": 2}, topic="orders")

            assert sink.letters.wait_for(1)
            assert handled.wait_for(1)
        finally:
            halt(system)

        [letter] = sink.letters.snapshot()
        assert letter.status is DeadLetterStatus.POISON
        assert letter.body == b"\xff{nope"
        assert handled.snapshot() == [{"n": 2}]


class TestDeadLetterFailures:
    def test_failed_sink_write_leaves_the_message_for_redelivery(self) -> None:
        """While the sink fails the message comes again; then it is kept once."""
        calls = Recorder()

        def handler(message: Any) -> None:
            calls.add(message["n"])
            if message["n"] == 1:
                raise RuntimeError("always fails")

        sink = RecordingSink(failures=2)
        routing = one_topic_routing(
            "orders", "mem", handler, source="memory", retry={"max_attempts": 1}
        )
        with on_event("dead_letter_write_failed") as failures:
            system = start(routing, sink)
            try:
                producer = system["duct.messaging/producer"]
                producer.produce({"n": 1}, topic="orders", headers={"x-trace": "t"})
                producer.produce({"n": 2}, topic="orders")

                assert sink.letters.wait_for(1)
                assert calls.wait_until(lambda items: 2 in items)
            finally:
                halt(system)

        assert calls.snapshot().count(1) == 3
        assert calls.snapshot().count(2) == 1
        assert len(sink.letters.snapshot()) == 1
        [first, *_] = failures.snapshot()
        assert first["subscription"] == "worker"
        assert first["message_id"] == sink.letters.snapshot()[0].message_id


class TestHalt:
    def test_halt_abandons_a_handler_past_the_deadline_and_says_so(self) -> None:
        """A handler outliving `drain_timeout_s` is not acknowledged and is counted."""
        started = threading.Event()
        release = threading.Event()

        def handler(message: Any) -> None:
            started.set()
            release.wait(WAIT_S)

        routing = one_topic_routing("orders", "mem", handler, source="memory")
        system = start(routing, RecordingSink(), drain_timeout_s=0.3)
        broker = system["duct.memory/clients"]["mem"]
        try:
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")
            assert started.wait(WAIT_S)
        finally:
            with capture_logs() as logs:
                halt(system)
            release.set()

        [event] = [e for e in logs if e["event"] == "consumers_stopped"]
        assert event["abandoned"] == 1
        assert event["abandoned_by_subscription"] == {"worker": 1}
        assert event["log_level"] == "warning"
        assert broker.pending("orders", "worker") == 1
