"""Helpers of the delivery suite: system configs, recorders, structlog hooks
and plain confluent-kafka probes."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.system import Ref
from duct_messaging.testing.tansu import TansuBroker

WAIT_S = 30.0
SINK_KEY = "app.test/sink"


class Recorder:
    """Things handlers or sinks saw, with waiting on a condition."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = threading.Condition()

    def add(self, item: Any) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def wait_until(
        self, predicate: Callable[[list[Any]], bool], timeout: float = WAIT_S
    ) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.items), timeout)

    def wait_for(self, count: int, timeout: float = WAIT_S) -> bool:
        return self.wait_until(lambda items: len(items) >= count, timeout)

    def snapshot(self) -> list[Any]:
        with self._changed:
            return list(self.items)


class RecordingSink:
    """A dead-letter sink keeping what it got; fails its first `failures` writes."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.letters = Recorder()

    async def write(self, dead_letter: DeadLetter) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError("dead-letter storage unavailable")
        self.letters.add(dead_letter)


@contextlib.contextmanager
def on_event(name: str) -> Iterator[Recorder]:
    """Record every structlog event called `name` while the block runs."""
    seen = Recorder()

    def hook(logger: Any, method: str, event_dict: Any) -> Any:
        if event_dict.get("event") == name:
            seen.add(dict(event_dict))
        return event_dict

    old = structlog.get_config()
    structlog.configure(processors=[hook, *old["processors"]])
    try:
        yield seen
    finally:
        structlog.configure(**old)


def kafka_system(
    clients: dict[str, dict[str, Any]],
    routing: dict[str, Any],
    *,
    extra: dict[str, Any] | None = None,
    **consumers: Any,
) -> dict[str, Any]:
    """Return a system config: Kafka clients, producers, routing and consumers."""
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
        **(extra or {}),
    }


def memory_system(routing: dict[str, Any], **consumers: Any) -> dict[str, Any]:
    """Return a system config on one in-memory cluster named `mem`."""
    return {
        "duct.memory/clients": {"mem": {}},
        "duct.memory/producers": {"clients": Ref("duct.memory/clients")},
        "duct.messaging/producers": [Ref("duct.memory/producers")],
        "duct.messaging/routing": routing,
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        "duct.memory/consumers": {
            "clients": Ref("duct.memory/clients"),
            "routing": Ref("duct.messaging/routing"),
            **consumers,
        },
    }


def one_topic_routing(
    topic: str,
    client: str,
    handler: Any,
    *,
    source: str = "kafka",
    subscription: str = "worker",
    kafka_topic: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """Return a routing with one topic, published to and consumed from `client`."""
    target: dict[str, Any] = {"client": client}
    if kafka_topic:
        target["kafka_topic"] = kafka_topic
    return {
        "topics": {topic: {}},
        "publish": {topic: {"targets": [target]}},
        "subscriptions": {
            subscription: {
                "topic": topic,
                "source": source,
                "client": client,
                "handler": handler,
                **fields,
            }
        },
    }


def produce_raw(
    broker: TansuBroker,
    topic: str,
    messages: list[tuple[bytes, dict[str, str]]],
    *,
    partition: int = 0,
) -> None:
    """Produce raw bodies with a plain confluent-kafka producer, in order."""
    producer = Producer({"bootstrap.servers": broker.bootstrap_servers})
    for body, headers in messages:
        producer.produce(
            topic, body, headers=list(headers.items()), partition=partition
        )
    assert producer.flush(10) == 0


def committed(
    broker: TansuBroker, topic: str, group: str, partitions: int = 1
) -> dict[int, int | None]:
    """Return the committed offset of `group` per partition (None: nothing)."""
    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap_servers, "group.id": group}, logger=None
    )
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
        return {tp.partition: (tp.offset if tp.offset >= 0 else None) for tp in found}
    finally:
        consumer.close()


def read_topic(
    broker: TansuBroker, topic: str, count: int, timeout: float = WAIT_S
) -> list[Any]:
    """Return the messages of `topic`, read from the start by a plain consumer.

    Waits until `count` arrived (or `timeout`), then briefly for any surplus,
    so a test can tell "exactly n" from "at least n".
    """
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": f"probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 5,
        },
        logger=None,
    )
    out: list[Any] = []
    deadline = threading.Event()
    timer = threading.Timer(timeout, deadline.set)
    timer.start()
    try:
        partitions: list[int] = []
        while not partitions and not deadline.is_set():
            metadata = consumer.list_topics(topic, timeout=5).topics.get(topic)
            if metadata is not None and metadata.error is None:
                partitions = sorted(metadata.partitions)
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        )
        while len(out) < count and not deadline.is_set():
            out.extend(m for m in consumer.consume(100, 0.2) if m.error() is None)
        out.extend(m for m in consumer.consume(100, 0.3) if m.error() is None)
    finally:
        timer.cancel()
        consumer.close()
    return out
