"""Delivery guarantees on real tansu brokers: commits, retries, poison, sinks, halt."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from duct_messaging import halt, init
from duct_messaging.messaging._deadletter_replay import replay
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.system import Ref, System
from duct_messaging.testing.tansu import TansuBroker
from tests.conftest import kafka_client
from tests.delivery._support import (
    SINK_KEY,
    WAIT_S,
    Recorder,
    RecordingSink,
    committed,
    kafka_system,
    on_event,
    one_topic_routing,
    produce_raw,
    read_topic,
)

pytestmark = pytest.mark.kafka

FAST_RETRY = {"max_attempts": 3, "backoff": {"initial_ms": 5, "max_ms": 20}}
SCHEMA = ["map", {"closed": True}, ["id", "uuid"], ["amount", "double"]]


def start(config: dict[str, Any], sink: Any = None) -> System:
    if sink is None:
        return init(config)
    config = {**config, SINK_KEY: {}}
    config["duct.kafka/consumers"] = {
        **config["duct.kafka/consumers"],
        "deadletter": Ref(SINK_KEY),
    }
    return init(config, overrides={SINK_KEY: sink})


def on_loop(system: System, coro: Any, timeout: float = 60.0) -> Any:
    assert system.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, system.loop).result(timeout)


class TestCommits:
    @pytest.mark.slow
    def test_every_seventh_fails_twice_yet_each_is_handled_once_in_order(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """1,000 messages over 4 partitions: each succeeds once, no offset skipped."""
        broker = kafka_brokers[0]
        topic, group = unique("payments"), unique("payments-group")
        attempts: Counter[int] = Counter()
        successes = Recorder()
        lock = threading.Lock()

        def handler(message: Any, ctx: MessageContext) -> None:
            n = message["n"]
            with lock:
                attempts[n] += 1
                tries = attempts[n]
            if n % 7 == 0 and tries <= 2:
                raise RuntimeError(f"payment {n} failed on try {tries}")
            successes.add((n, ctx.partition, ctx.position))

        routing = one_topic_routing(
            "payment",
            "main",
            handler,
            kafka_topic=topic,
            options={"group_id": group},
            retry=FAST_RETRY,
        )
        clients = {"main": kafka_client(broker, topics={"partitions": 4})}
        sink = RecordingSink()
        system = start(kafka_system(clients, routing, commit_interval_s=0.2), sink)
        try:
            producer = system["duct.messaging/producer"]

            async def produce_all() -> list[Any]:
                return await asyncio.gather(
                    *(
                        producer.aproduce({"n": n}, topic="payment", key=str(n))
                        for n in range(1000)
                    )
                )

            receipts = [r for rs in on_loop(system, produce_all()) for r in rs]
            assert successes.wait_for(1000, timeout=90)
        finally:
            halt(system)

        handled = successes.snapshot()
        assert Counter(n for n, _, _ in handled) == Counter(range(1000))
        assert all(attempts[n] == (3 if n % 7 == 0 else 1) for n in range(1000))
        assert sink.letters.snapshot() == []
        produced: dict[int, set[int]] = {}
        for receipt in receipts:
            produced.setdefault(receipt.partition, set()).add(receipt.position)
        assert len(produced) == 4
        seen: dict[int, set[int]] = {}
        for _, partition, offset in handled:
            seen.setdefault(partition, set()).add(offset)
        assert seen == produced
        assert committed(broker, topic, group, 4) == {
            p: max(offsets) + 1 for p, offsets in produced.items()
        }

    def test_back_off_holds_its_partition_only(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """While a message waits to retry, other partitions go on; its own waits."""
        broker = kafka_brokers[0]
        topic, group = unique("stock"), unique("stock-group")
        events = Recorder()

        def handler(message: Any, ctx: MessageContext) -> None:
            events.add((message["n"], ctx.attempt))
            if message["n"] == 0 and ctx.attempt == 1:
                raise RuntimeError("first try fails")

        retry = {"max_attempts": 2, "backoff": {"initial_ms": 3000, "jitter": 0}}
        routing = one_topic_routing(
            "stock",
            "main",
            handler,
            kafka_topic=topic,
            options={"group_id": group},
            retry=retry,
        )
        clients = {"main": kafka_client(broker, topics={"partitions": 2})}
        system = start(kafka_system(clients, routing), RecordingSink())
        try:
            producer = system["duct.messaging/producer"]

            def send(n: int, partition: int) -> None:
                target = {
                    "client": "main",
                    "kafka_topic": topic,
                    "partition": partition,
                }
                producer.produce({"n": n}, topic="stock", targets=[target])

            send(0, 0)
            assert events.wait_for(1)
            send(1, 1)
            send(2, 0)
            assert events.wait_for(4)
        finally:
            halt(system)

        assert events.snapshot() == [(0, 1), (1, 1), (0, 2), (2, 1)]
        assert committed(broker, topic, group, 2) == {0: 2, 1: 1}


class TestDeadLetters:
    def test_always_failing_message_goes_to_the_dl_topic_of_its_own_cluster(
        self,
        kafka_brokers: list[TansuBroker],
        unique: Callable[[str], str],
        tmp_path: Path,
    ) -> None:
        """Exhausted retries: stored with its story, published on its `<topic>.dl`."""
        topic = unique("orders")
        groups = {
            "primary-worker": unique("g-primary"),
            "data-worker": unique("g-data"),
        }
        handled = Recorder()

        def handler(name: str) -> Callable[[Any], None]:
            def handle(message: Any) -> None:
                if message["n"] == 2:
                    raise RuntimeError(f"order {message['n']} always fails")
                handled.add((name, message["n"]))

            return handle

        clients = {
            "kafka-primary": kafka_client(kafka_brokers[0]),
            "kafka-data": kafka_client(kafka_brokers[1]),
        }
        routing = {
            "topics": {topic: {}},
            "publish": {
                topic: {
                    "targets": [{"client": "kafka-primary"}, {"client": "kafka-data"}]
                }
            },
            "subscriptions": {
                name: {
                    "topic": topic,
                    "source": "kafka",
                    "client": client,
                    "handler": handler(name),
                    "options": {"group_id": groups[name]},
                    "retry": FAST_RETRY,
                }
                for name, client in (
                    ("primary-worker", "kafka-primary"),
                    ("data-worker", "kafka-data"),
                )
            },
        }
        sinks = {
            "duct.deadletter/storage": {"directory": str(tmp_path / "dead-letters")},
            "duct.deadletter/producer": {"producers": Ref("duct.messaging/producers")},
            "duct.deadletter/hybrid": {
                "storage": Ref("duct.deadletter/storage"),
                "producer": Ref("duct.deadletter/producer"),
            },
        }
        config = kafka_system(
            clients, routing, extra=sinks, deadletter=Ref("duct.deadletter/hybrid")
        )
        system = init(config)
        try:
            producer = system["duct.messaging/producer"]
            for n in (1, 2, 3):
                producer.produce({"n": n}, topic=topic, key="same-partition")

            assert handled.wait_for(4)
            store = system["duct.deadletter/storage"]
            letters = on_loop(system, store.read(topic=topic))
        finally:
            halt(system)

        assert sorted(handled.snapshot()) == [
            ("data-worker", 1),
            ("data-worker", 3),
            ("primary-worker", 1),
            ("primary-worker", 3),
        ]
        by_sub = {dl.subscription: dl for dl in letters}
        assert sorted(by_sub) == ["data-worker", "primary-worker"]
        for name, client in (
            ("primary-worker", "kafka-primary"),
            ("data-worker", "kafka-data"),
        ):
            letter = by_sub[name]
            assert letter.client == client
            assert letter.attempts == 3
            assert letter.status is DeadLetterStatus.ELIGIBLE
            assert "RuntimeError: order 2 always fails" in letter.error_traceback
            assert json.loads(letter.body) == {"n": 2}
            assert committed(
                kafka_brokers[0 if client == "kafka-primary" else 1],
                topic,
                groups[name],
            ) == {0: 3}

        for broker, name in (
            (kafka_brokers[0], "primary-worker"),
            (kafka_brokers[1], "data-worker"),
        ):
            [published] = read_topic(broker, f"{topic}.dl", 1)
            headers = {k: v.decode() for k, v in published.headers()}
            assert headers["x-dead-letter-subscription"] == name
            assert headers["x-dead-letter-id"] == by_sub[name].id
            assert headers["x-dead-letter-attempts"] == "3"
            assert "always fails" in headers["x-dead-letter-error-traceback"]
            assert json.loads(published.value()) == {"n": 2}
            assert published.key() == b"same-partition"

    def test_poison_is_dead_lettered_once_acked_and_never_replayed(
        self,
        kafka_brokers: list[TansuBroker],
        unique: Callable[[str], str],
        tmp_path: Path,
    ) -> None:
        """Undecodable or schema-invalid (topic or subscription schema) is poison."""
        broker = kafka_brokers[0]
        strict_topic, loose_topic = unique("strict"), unique("loose")
        groups = {
            "strict-worker": unique("g-strict"),
            "loose-worker": unique("g-loose"),
        }
        handled = Recorder()
        routing = {
            "topics": {"strict": {"schema": {"canonical": SCHEMA}}, "loose": {}},
            "publish": {
                "strict": {
                    "targets": [{"client": "main", "kafka_topic": strict_topic}]
                },
                "loose": {"targets": [{"client": "main", "kafka_topic": loose_topic}]},
            },
            "subscriptions": {
                "strict-worker": {
                    "topic": "strict",
                    "source": "kafka",
                    "client": "main",
                    "handler": handled.add,
                    "options": {"group_id": groups["strict-worker"]},
                },
                "loose-worker": {
                    "topic": "loose",
                    "source": "kafka",
                    "client": "main",
                    "handler": handled.add,
                    "schema": ["map", ["id", "uuid"]],
                    "options": {"group_id": groups["loose-worker"]},
                },
            },
        }
        sinks = {"duct.deadletter/storage": {"directory": str(tmp_path / "dl")}}
        config = kafka_system(
            {"main": kafka_client(broker)},
            routing,
            extra=sinks,
            deadletter=Ref("duct.deadletter/storage"),
        )
        json_headers = {"content-type": "application/json"}
        system = init(config)
        try:
            produce_raw(
                broker,
                strict_topic,
                [
                    (b"\xff\xfe{not json", json_headers),
                    (b'{"id": "not-a-uuid", "amount": "lots"}', json_headers),
                ],
            )
            produce_raw(broker, loose_topic, [(b'{"id": 42}', json_headers)])
            good_id = str(uuid.uuid4())
            producer = system["duct.messaging/producer"]
            producer.produce({"id": good_id, "amount": 9.5}, topic="strict")
            producer.produce({"id": good_id}, topic="loose")

            assert handled.wait_for(2)
            store = system["duct.deadletter/storage"]
            letters = on_loop(system, store.read())
            result = on_loop(
                system, replay([store], producer, topic="strict", ids=None)
            )
        finally:
            halt(system)

        assert sorted(m["id"] for m in handled.snapshot()) == [good_id, good_id]
        assert sorted((dl.subscription, dl.status) for dl in letters) == [
            ("loose-worker", DeadLetterStatus.POISON),
            ("strict-worker", DeadLetterStatus.POISON),
            ("strict-worker", DeadLetterStatus.POISON),
        ]
        assert {dl.body for dl in letters} == {
            b"\xff\xfe{not json",
            b'{"id": "not-a-uuid", "amount": "lots"}',
            b'{"id": 42}',
        }
        assert result.replayed == []
        assert [reason for _, reason in result.skipped] == [
            "poison, never replayed"
        ] * 2
        assert committed(broker, strict_topic, groups["strict-worker"]) == {0: 3}
        assert committed(broker, loose_topic, groups["loose-worker"]) == {0: 2}

    def test_failing_sink_leaves_the_message_to_be_delivered_again(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """A dead letter that cannot be written is not committed; it comes back."""
        broker = kafka_brokers[0]
        topic, group = unique("refunds"), unique("refunds-group")
        calls = Recorder()

        def handler(message: Any) -> None:
            calls.add(message["n"])
            if message["n"] == 1:
                raise RuntimeError("always fails")

        routing = one_topic_routing(
            "refund",
            "main",
            handler,
            kafka_topic=topic,
            options={"group_id": group},
            retry={"max_attempts": 1},
        )
        sink = RecordingSink(failures=2)
        with on_event("dead_letter_write_failed") as failures:
            system = start(kafka_system({"main": kafka_client(broker)}, routing), sink)
            try:
                producer = system["duct.messaging/producer"]
                producer.produce({"n": 1}, topic="refund")
                producer.produce({"n": 2}, topic="refund")

                assert sink.letters.wait_for(1)
                assert calls.wait_until(lambda items: 2 in items)
            finally:
                halt(system)

        assert Counter(calls.snapshot()) == {1: 3, 2: 1}
        [letter] = sink.letters.snapshot()
        assert [(e["subscription"], e["message_id"]) for e in failures.snapshot()] == [
            ("worker", letter.message_id)
        ] * 2
        assert committed(broker, topic, group) == {0: 2}


class TestHalt:
    def test_halt_commits_what_finished_and_leaves_the_rest_for_the_next_consumer(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """A handler done during the drain is committed; one past the deadline not."""
        broker = kafka_brokers[0]
        topic, group = unique("invoices"), unique("invoices-group")
        started = Recorder()
        finished = Recorder()
        never = threading.Event()

        with on_event("consumers_stopping") as stopping:

            def handler(message: Any) -> None:
                n = message["n"]
                started.add(n)
                if n == 4:
                    assert stopping.wait_for(1)
                elif n == 5:
                    never.wait(WAIT_S)
                finished.add(n)

            routing = one_topic_routing(
                "invoice",
                "main",
                handler,
                kafka_topic=topic,
                options={"group_id": group},
                concurrency=2,
            )
            config = kafka_system(
                {"main": kafka_client(broker)}, routing, drain_timeout_s=1.5
            )
            first = init(config)
            try:
                for n in range(10):
                    first["duct.messaging/producer"].produce({"n": n}, topic="invoice")
                assert started.wait_until(lambda items: {4, 5} <= set(items))
            finally:
                with on_event("consumers_stopped") as stopped:
                    halt(first)
        try:
            assert sorted(finished.snapshot()) == [0, 1, 2, 3, 4]
            assert 6 not in started.snapshot()
            assert [e["abandoned"] for e in stopped.snapshot()] == [1]
            assert committed(broker, topic, group) == {0: 5}

            again = Recorder()
            routing["subscriptions"]["worker"]["handler"] = lambda m: again.add(m["n"])
            second = init(kafka_system({"main": kafka_client(broker)}, routing))
            try:
                assert again.wait_for(5)
            finally:
                halt(second)
        finally:
            never.set()

        assert sorted(again.snapshot()) == [5, 6, 7, 8, 9]
        assert committed(broker, topic, group) == {0: 10}


class TestGroupMembership:
    @pytest.mark.slow
    def test_rebalance_never_hands_one_consumer_a_message_twice(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """A second consumer joining mid-stream causes no re-handling."""
        broker = kafka_brokers[0]
        topic, group = unique("shipments"), unique("shipments-group")
        seen = Recorder()

        def handler(name: str) -> Callable[[Any, MessageContext], None]:
            def handle(message: Any, ctx: MessageContext) -> None:
                time.sleep(0.01)  # stands for the handler's work
                seen.add((name, message["n"]))

            return handle

        clients = {"main": kafka_client(broker, topics={"partitions": 4})}

        def config(name: str) -> dict[str, Any]:
            routing = one_topic_routing(
                "shipment",
                "main",
                handler(name),
                kafka_topic=topic,
                options={"group_id": group},
            )
            return kafka_system(clients, routing, commit_interval_s=0.2)

        first = init(config("first"))
        second = None
        try:
            producer = first["duct.messaging/producer"]

            async def produce_all() -> list[Any]:
                return await asyncio.gather(
                    *(
                        producer.aproduce({"n": n}, topic="shipment", key=str(n))
                        for n in range(600)
                    )
                )

            receipts = [r for rs in on_loop(first, produce_all()) for r in rs]
            assert seen.wait_for(20)
            second = init(config("second"))
            assert seen.wait_until(
                lambda items: {n for _, n in items} == set(range(600)), timeout=60
            )
        finally:
            if second is not None:
                halt(second)
            halt(first)

        handled = seen.snapshot()
        assert {name for name, _ in handled} == {"first", "second"}
        assert Counter(handled).most_common(1)[0][1] == 1
        assert len(handled) == 600
        ends: dict[int, int] = {}
        for receipt in receipts:
            ends[receipt.partition] = max(
                ends.get(receipt.partition, 0), receipt.position + 1
            )
        assert committed(broker, topic, group, 4) == ends

    @pytest.mark.slow
    def test_handler_slower_than_max_poll_interval_keeps_the_partition(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """The source keeps polling while a handler outlives `max.poll.interval.ms`."""
        broker = kafka_brokers[0]
        topic, group = unique("reports"), unique("reports-group")
        handled = Recorder()

        def handler(message: Any) -> None:
            if message["n"] == 1:
                time.sleep(4.5)  # stands for a report that takes long to build
            handled.add(message["n"])

        clients = {
            "main": {
                "bootstrap_servers": broker.bootstrap_servers,
                "consumer": {
                    "session_timeout_ms": 3000,
                    "heartbeat_interval_ms": 500,
                    "max_poll_interval_ms": 3000,
                },
            }
        }
        routing = one_topic_routing(
            "report", "main", handler, kafka_topic=topic, options={"group_id": group}
        )
        with on_event("kafka_partitions_revoked") as revoked:
            system = init(kafka_system(clients, routing))
            try:
                system["duct.messaging/producer"].produce({"n": 1}, topic="report")
                system["duct.messaging/producer"].produce({"n": 2}, topic="report")
                assert handled.wait_for(2)
                revoked_while_running = revoked.snapshot()
            finally:
                halt(system)

        assert revoked_while_running == []
        assert handled.snapshot() == [1, 2]
        assert committed(broker, topic, group) == {0: 2}
