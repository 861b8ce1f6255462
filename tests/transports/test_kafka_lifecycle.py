"""Kafka lifecycle edges: topic creation, producer close, source stop, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient

from duct_messaging.messaging.routing import Subscription
from duct_messaging.testing.tansu import TansuBroker, free_port
from duct_messaging.transports.base import OutgoingMessage, Target
from duct_messaging.transports.kafka import (
    KafkaClient,
    KafkaProducer,
    KafkaSource,
    KafkaTransportError,
)

pytestmark = pytest.mark.kafka

WAIT_S = 10.0


def _unreachable_client(name: str, **producer: object) -> KafkaClient:
    """A client whose broker address has nothing listening on it."""
    return KafkaClient.from_config(
        name,
        {
            "bootstrap_servers": f"127.0.0.1:{free_port()}",
            "producer": {"message_timeout_ms": 60_000, **producer},
        },
    )


def _message(topic: str) -> OutgoingMessage:
    return OutgoingMessage(topic=topic, body=b"{}", headers={}, key=None)


def test_auto_created_topics_take_the_broker_default_replication_factor() -> None:
    client = KafkaClient.from_config("rf", {"bootstrap_servers": "127.0.0.1:1"})
    assert client.new_topic("orders").replication_factor == -1
    assert client.new_topic("orders").num_partitions == 1
    configured = KafkaClient.from_config(
        "rf",
        {
            "bootstrap_servers": "127.0.0.1:1",
            "topics": {"replication_factor": 3, "partitions": 4},
        },
    )
    topic = configured.new_topic("orders")
    assert (topic.replication_factor, topic.num_partitions) == (3, 4)


def test_the_broker_default_replication_factor_creates_the_topic(
    kafka_brokers: list[TansuBroker], unique: Callable[[str], str]
) -> None:
    broker = kafka_brokers[0]
    client = KafkaClient.from_config(
        "rf", {"bootstrap_servers": broker.bootstrap_servers}
    )
    topic = unique("rf.default")
    client.ensure_topic(topic, 3)
    client.ensure_topic(topic, 3)  # an existing topic is left as is
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    metadata = admin.list_topics(topic, timeout=WAIT_S)
    assert len(metadata.topics[topic].partitions) == 3


async def test_close_fails_sends_still_waiting_for_the_broker() -> None:
    producer = KafkaProducer(_unreachable_client("stuck"), asyncio.get_running_loop())
    waiting = asyncio.ensure_future(
        producer.send(Target("stuck", {}), _message("orders"))
    )
    batch = asyncio.ensure_future(
        producer.send_many(Target("stuck", {}), [_message("orders")] * 2)
    )
    await asyncio.sleep(0)
    await asyncio.to_thread(producer.close, 0.05)
    with pytest.raises(KafkaTransportError) as caught:
        await asyncio.wait_for(waiting, WAIT_S)
    assert "'stuck'" in str(caught.value)
    assert "'orders'" in str(caught.value)
    with pytest.raises(KafkaTransportError):
        await asyncio.wait_for(batch, WAIT_S)


async def test_send_after_close_raises_at_once() -> None:
    producer = KafkaProducer(_unreachable_client("shut"), asyncio.get_running_loop())
    await asyncio.to_thread(producer.close, 0.05)
    with pytest.raises(KafkaTransportError, match="closed"):
        await asyncio.wait_for(
            producer.send(Target("shut", {}), _message("orders")), WAIT_S
        )
    with pytest.raises(KafkaTransportError, match="closed"):
        await asyncio.wait_for(
            producer.send_many(Target("shut", {}), [_message("orders")]), WAIT_S
        )


async def test_a_failed_delivery_names_the_client_the_topic_and_a_fix() -> None:
    producer = KafkaProducer(
        _unreachable_client("lost", message_timeout_ms=100),
        asyncio.get_running_loop(),
    )
    try:
        with pytest.raises(KafkaTransportError) as caught:
            await asyncio.wait_for(
                producer.send(Target("lost", {"kafka_topic": "audit"}), _message("x")),
                WAIT_S,
            )
    finally:
        await asyncio.to_thread(producer.close, 0.05)
    error = caught.value
    assert (error.client, error.topic) == ("lost", "audit")
    assert str(error).startswith("Kafka delivery failed: client 'lost', topic 'audit'")
    assert "bootstrap" in str(error)


def _subscription(name: str) -> Subscription:
    return Subscription(
        id=name,
        topic=name,
        source=name,
        client="c",
        handler=lambda message, ctx: None,
        handler_name="noop",
    )


def test_a_fatal_consumer_error_names_the_client_and_topic() -> None:
    client = KafkaClient.from_config("cons", {"bootstrap_servers": "127.0.0.1:1"})
    source = KafkaSource(client, _subscription("sub"), "payments")
    try:
        fatal = KafkaError(KafkaError._FATAL, "fenced", fatal=True)
        with pytest.raises(KafkaTransportError) as caught:
            source._consumer_error(fatal)
        assert (caught.value.client, caught.value.topic) == ("cons", "payments")
        assert "'sub'" in str(caught.value)
    finally:
        source._executor.shutdown(wait=False)


async def test_a_cancelled_stop_does_not_block_the_event_loop() -> None:
    client = KafkaClient.from_config("stop", {"bootstrap_servers": "127.0.0.1:1"})
    source = KafkaSource(client, _subscription("stopper"), "stopper")
    busy, release = threading.Event(), threading.Event()

    def occupy() -> None:
        busy.set()
        release.wait(WAIT_S)

    source._executor.submit(occupy)
    assert await asyncio.to_thread(busy.wait, WAIT_S)
    # Frees the worker if stop blocks the loop, so the test fails instead of
    # hanging.
    safety = threading.Timer(2.0, release.set)
    safety.start()
    try:
        stopping = asyncio.ensure_future(source.stop())
        await asyncio.sleep(0)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert not release.is_set(), "stop blocked the event loop on its worker"
    finally:
        release.set()
        safety.cancel()
