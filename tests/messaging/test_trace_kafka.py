"""Trace context across two Kafka hops on a real tansu broker.

A message is produced under a trace; its handler produces to a second topic;
a second handler consumes that. Every step must stay in the one trace, each
with its own span id, and the `traceparent` header must be plain W3C text
that any Kafka client can read.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.tracing import TraceContext, current_trace, use_trace
from duct_messaging.system import Ref
from duct_messaging.testing.tansu import TansuBroker
from tests.conftest import kafka_client

pytestmark = pytest.mark.kafka

WAIT_S = 30.0
W3C_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01")


class Hops:
    """What each handler saw, plus a way to wait for it."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Any, MessageContext, TraceContext | None]] = {}
        self._changed = threading.Condition()

    def record(self, name: str, message: Any, ctx: MessageContext) -> None:
        with self._changed:
            self.seen[name] = (message, ctx, current_trace())
            self._changed.notify_all()

    def wait_for(self, *names: str) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: all(n in self.seen for n in names), WAIT_S
            )


def _config(
    broker: TansuBroker,
    unique: Callable[[str], str],
    first: Callable[..., Any],
    second: Callable[..., Any],
) -> tuple[dict[str, Any], str, str]:
    created, billed = unique("trace.orders"), unique("trace.billing")
    routing = {
        "topics": {"order-created": {}, "order-billed": {}},
        "publish": {
            "order-created": {"targets": [{"client": "main", "kafka_topic": created}]},
            "order-billed": {"targets": [{"client": "main", "kafka_topic": billed}]},
        },
        "subscriptions": {
            "billing": {
                "topic": "order-created",
                "source": "kafka",
                "client": "main",
                "handler": first,
                "options": {"group_id": unique("billing")},
            },
            "shipping": {
                "topic": "order-billed",
                "source": "kafka",
                "client": "main",
                "handler": second,
                "options": {"group_id": unique("shipping")},
            },
        },
    }
    config = {
        "duct.kafka/clients": {"main": kafka_client(broker)},
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
        },
    }
    return config, created, billed


def _read_plain(broker: TansuBroker, topic: str) -> tuple[dict[str, bytes], Any]:
    """Read the first record of `topic` with a bare confluent-kafka consumer."""
    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": f"plain-{topic}",
            "enable.auto.commit": False,
        },
        logger=None,
    )
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            record = consumer.poll(0.5)
            if record is None or record.error():
                continue
            headers = dict(record.headers() or [])
            return headers, orjson.loads(record.value())
        raise AssertionError(f"no record on {topic} within {WAIT_S}s")
    finally:
        consumer.close()


def _span_ids(traceparent: bytes | str) -> tuple[str, str]:
    text = traceparent.decode() if isinstance(traceparent, bytes) else traceparent
    match = W3C_TRACEPARENT.fullmatch(text)
    assert match is not None, f"not a W3C traceparent: {text!r}"
    return match.group(1), match.group(2)


@pytest.mark.parametrize("style", ["sync", "async"])
def test_two_hops_share_one_trace_with_a_span_each(
    kafka_brokers: list[TansuBroker], unique: Callable[[str], str], style: str
) -> None:
    """Producer and both handlers share a trace id; each hop has its own span."""
    hops = Hops()
    system: Any = None

    def billing_sync(message: Any, ctx: MessageContext) -> None:
        hops.record("billing", message, ctx)
        system["duct.messaging/producer"].produce(
            {"id": message["id"], "billed": True}, topic="order-billed"
        )

    async def billing_async(message: Any, ctx: MessageContext) -> None:
        hops.record("billing", message, ctx)
        await system["duct.messaging/producer"].aproduce(
            {"id": message["id"], "billed": True}, topic="order-billed"
        )

    def shipping(message: Any, ctx: MessageContext) -> None:
        hops.record("shipping", message, ctx)

    first = billing_sync if style == "sync" else billing_async
    config, created, billed = _config(kafka_brokers[0], unique, first, shipping)
    root = TraceContext.new_root()
    system = init(config)
    try:
        with use_trace(root):
            system["duct.messaging/producer"].produce({"id": 7}, topic="order-created")

        assert hops.wait_for("billing", "shipping")
    finally:
        halt(system)

    billing_msg, billing_ctx, billing_bound = hops.seen["billing"]
    shipping_msg, shipping_ctx, shipping_bound = hops.seen["shipping"]
    assert billing_msg == {"id": 7}
    assert shipping_msg == {"id": 7, "billed": True}
    assert billing_bound == billing_ctx.trace
    assert shipping_bound == shipping_ctx.trace

    first_trace, first_span = _span_ids(billing_ctx.headers["traceparent"])
    second_trace, second_span = _span_ids(shipping_ctx.headers["traceparent"])
    traces = {
        root.trace_id,
        first_trace,
        billing_ctx.trace.trace_id,
        second_trace,
        shipping_ctx.trace.trace_id,
    }
    spans = [
        root.span_id,
        first_span,
        billing_ctx.trace.span_id,
        second_span,
        shipping_ctx.trace.span_id,
    ]
    assert traces == {root.trace_id}
    assert len(set(spans)) == len(spans), spans

    plain_created, created_body = _read_plain(kafka_brokers[0], created)
    plain_billed, billed_body = _read_plain(kafka_brokers[0], billed)
    assert created_body == {"id": 7}
    assert billed_body == {"id": 7, "billed": True}
    assert _span_ids(plain_created["traceparent"]) == (root.trace_id, first_span)
    assert _span_ids(plain_billed["traceparent"]) == (root.trace_id, second_span)
