"""The Kafka transport on real tansu brokers: fan-out, commits, subscriptions."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.messaging.producer import PublishError
from duct_messaging.system import Ref
from duct_messaging.testing.tansu import TansuBroker
from tests.conftest import kafka_client

pytestmark = pytest.mark.kafka

WAIT_S = 30.0


class Inbox:
    """Collects what handlers received, and lets a test wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, MessageContext]] = []
        self._changed = threading.Condition()

    def handler(self, name: str) -> Callable[[Any, MessageContext], None]:
        def handle(message: Any, ctx: MessageContext) -> None:
            with self._changed:
                self.items.append((name, message, ctx))
                self._changed.notify_all()

        return handle

    def wait_for(self, count: int, timeout: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.items) >= count, timeout)


def system_config(
    clients: dict[str, dict[str, Any]], routing: dict[str, Any], **consumers: Any
) -> dict[str, Any]:
    """Return a system config with Kafka clients, producers and consumers."""
    return {
        "duct.kafka/clients": clients,
        "duct.kafka/producers": {"clients": Ref("duct.kafka/clients")},
        "duct.messaging/producers": [Ref("duct.kafka/producers")],
        "duct.messaging/routing": routing,
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        "duct.kafka/consumers": {
            "clients": Ref("duct.kafka/clients"),
            "routing": Ref("duct.messaging/routing"),
            **consumers,
        },
    }


def two_cluster_routing(
    unique: Callable[[str], str], inbox: Inbox, *, alias: bool = False
) -> dict[str, Any]:
    client_field = "producer" if alias else "client"
    primary, data = unique("core.orders"), unique("core.orders.data")
    return {
        "topics": {"order-created": {}, "publish-only": {}},
        "publish": {
            "order-created": {
                "targets": [
                    {client_field: "kafka-primary", "kafka_topic": primary},
                    {client_field: "kafka-data", "kafka_topic": data},
                ]
            },
            "publish-only": {
                "targets": [{"client": "kafka-primary", "kafka_topic": unique("audit")}]
            },
        },
        "subscriptions": {
            "orders-worker": {
                "topic": "order-created",
                "source": "kafka",
                client_field: "kafka-primary",
                "handler": inbox.handler("orders-worker"),
                "options": {"group_id": unique("orders-core")},
            },
            "orders-data-worker": {
                "topic": "order-created",
                "source": "kafka",
                client_field: "kafka-data",
                "handler": inbox.handler("orders-data-worker"),
                "options": {"group_id": unique("orders-data")},
            },
        },
    }


class TestFanOut:
    def test_one_produce_reaches_both_clusters_in_target_order(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """One produce goes to each target in order; each sub reads its cluster."""
        inbox = Inbox()
        clients = {
            "kafka-primary": kafka_client(kafka_brokers[0]),
            "kafka-data": kafka_client(kafka_brokers[1]),
        }
        system = init(system_config(clients, two_cluster_routing(unique, inbox)))
        try:
            producer = system["duct.messaging/producer"]

            receipts = producer.produce({"id": 1}, topic="order-created", key="1")

            assert [r.client for r in receipts] == ["kafka-primary", "kafka-data"]
            assert receipts[0].destination.startswith("core.orders-")
            assert receipts[1].destination.startswith("core.orders.data-")
            assert inbox.wait_for(2)
            seen = {
                name: (msg, ctx.client, ctx.destination)
                for name, msg, ctx in inbox.items
            }
            assert seen["orders-worker"] == (
                {"id": 1},
                "kafka-primary",
                receipts[0].destination,
            )
            assert seen["orders-data-worker"] == (
                {"id": 1},
                "kafka-data",
                receipts[1].destination,
            )
        finally:
            halt(system)

    def test_failed_target_reports_the_targets_already_sent(
        self,
        kafka_brokers: list[TansuBroker],
        tansu_broker_factory: Callable[[], TansuBroker],
        unique: Callable[[str], str],
    ) -> None:
        """With the second cluster down the call fails, naming the sent targets."""
        doomed = tansu_broker_factory()
        clients = {
            "kafka-primary": kafka_client(kafka_brokers[0]),
            "kafka-data": kafka_client(
                doomed, producer={"message_timeout_ms": 2000, "retries": 0}
            ),
        }
        routing = two_cluster_routing(unique, Inbox())
        routing["subscriptions"] = {}
        system = init(system_config(clients, routing))
        try:
            doomed.stop()

            with pytest.raises(PublishError, match="kafka-data") as caught:
                system["duct.messaging/producer"].produce(
                    {"id": 2}, topic="order-created"
                )

            assert caught.value.target.client == "kafka-data"
            assert [r.client for r in caught.value.sent] == ["kafka-primary"]
            assert "Already sent to: kafka-primary" in str(caught.value)
        finally:
            halt(system)


class FailingSink:
    """A dead-letter sink whose storage is down."""

    def __init__(self) -> None:
        self.calls = 0

    async def write(self, dead_letter: DeadLetter) -> None:
        self.calls += 1
        raise OSError("dead-letter storage unavailable")


class TestCommits:
    def test_unfinished_message_is_not_committed_and_comes_back(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """A failed, not dead-lettered message is not committed and comes back."""
        topic, group = unique("payments"), unique("payments-group")
        failed = threading.Event()

        def broken(message: Any) -> None:
            failed.set()
            raise RuntimeError("handler bug")

        inbox = Inbox()

        def routing(handler: Any) -> dict[str, Any]:
            return {
                "topics": {"payment": {}},
                "publish": {
                    "payment": {"targets": [{"client": "main", "kafka_topic": topic}]}
                },
                "subscriptions": {
                    "payments": {
                        "topic": "payment",
                        "source": "kafka",
                        "client": "main",
                        "handler": handler,
                        "options": {"group_id": group},
                        "retry": {"max_attempts": 1},
                    }
                },
            }

        clients = {"main": kafka_client(kafka_brokers[0])}
        sink = FailingSink()
        config = system_config(
            clients, routing(broken), deadletter=Ref("app.test/sink")
        )
        config["app.test/sink"] = {}
        first = init(config, overrides={"app.test/sink": sink})
        try:
            first["duct.messaging/producer"].produce({"n": 1}, topic="payment")
            assert failed.wait(WAIT_S)
        finally:
            halt(first)
        assert sink.calls >= 1
        assert _committed(kafka_brokers[0], topic, group) in (None, 0)

        second = init(system_config(clients, routing(inbox.handler("payments"))))
        try:
            assert inbox.wait_for(1)
            assert inbox.items[0][1] == {"n": 1}
        finally:
            halt(second)
        assert _committed(kafka_brokers[0], topic, group) == 1

    def test_only_subscriptions_start_consumers(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """Publish-only topics start nothing; the `producer` alias names the client."""
        inbox = Inbox()
        clients = {
            "kafka-primary": kafka_client(kafka_brokers[0]),
            "kafka-data": kafka_client(kafka_brokers[1]),
        }
        system = init(
            system_config(clients, two_cluster_routing(unique, inbox, alias=True))
        )
        try:
            runtime = system["duct.kafka/consumers"]
            system["duct.messaging/producer"].produce({"id": 3}, topic="publish-only")
            receipts = system["duct.messaging/producer"].produce(
                {"id": 4}, topic="order-created"
            )

            assert sorted(runtime.workers) == ["orders-data-worker", "orders-worker"]
            assert [r.client for r in receipts] == ["kafka-primary", "kafka-data"]
            assert inbox.wait_for(2)
            assert {msg["id"] for _, msg, _ in inbox.items} == {4}
            clients_seen = {name: ctx.client for name, _, ctx in inbox.items}
            assert clients_seen == {
                "orders-worker": "kafka-primary",
                "orders-data-worker": "kafka-data",
            }
        finally:
            halt(system)


def _committed(broker: TansuBroker, topic: str, group: str) -> int | None:
    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap_servers, "group.id": group}, logger=None
    )
    try:
        [tp] = consumer.committed([TopicPartition(topic, 0)], timeout=10)
        return None if tp.offset < 0 else int(tp.offset)
    finally:
        consumer.close()


class TestWireFormat:
    def test_body_is_the_json_alone_and_metadata_travels_in_headers(
        self, kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
    ) -> None:
        """A plain confluent-kafka consumer reads the JSON body and our headers."""
        topic = unique("wire")
        routing = {
            "topics": {"order-created": {}},
            "publish": {
                "order-created": {"targets": [{"client": "main", "kafka_topic": topic}]}
            },
        }
        system = init(system_config({"main": kafka_client(kafka_brokers[0])}, routing))
        try:
            system["duct.messaging/producer"].produce(
                {"id": "a1", "amount": 2.5},
                topic="order-created",
                headers={"tenant": "x"},
            )
        finally:
            halt(system)

        consumer = Consumer(
            {
                "bootstrap.servers": kafka_brokers[0].bootstrap_servers,
                "group.id": unique("plain"),
                "auto.offset.reset": "earliest",
                "session.timeout.ms": 6000,
                "heartbeat.interval.ms": 500,
            },
            logger=None,
        )
        consumer.subscribe([topic])
        try:
            msg = None
            for _ in range(60):
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    break
            assert msg is not None
            assert msg.error() is None
            headers = {k: v.decode() for k, v in msg.headers() or []}
        finally:
            consumer.close()

        assert json.loads(msg.value()) == {"id": "a1", "amount": 2.5}
        assert headers["x-topic"] == "order-created"
        assert len(headers["x-message-id"]) == 32
        assert headers["x-produced-at"].endswith("+00:00")
        assert headers["content-type"] == "application/json"
        assert headers["tenant"] == "x"
        assert headers["traceparent"].startswith("00-")
