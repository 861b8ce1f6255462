"""OpenTelemetry spans across produce and consume, on memory and on Kafka.

A produce opens a `publish` span; the handler of that message runs in a
`process` span whose parent is that publish span, and a produce inside the
handler opens its `publish` span under the `process` one. One trace, four
spans, each hop parented to the one before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.tracing import (
    TraceContext,
    current_trace,
    disable_opentelemetry,
    opentelemetry_enabled,
)
from duct_messaging.system import Ref
from duct_messaging.testing.tansu import TansuBroker
from tests.conftest import kafka_client

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

WAIT_S = 30.0


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Make an in-memory exporter the global provider's; restore it afterwards.

    The tracing component enables spans on the global tracer provider, which
    the OpenTelemetry API lets a process set only once; the test swaps the
    stored provider instead and monkeypatch puts the old one back.
    """
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield spans
    disable_opentelemetry()
    provider.shutdown()


class Hops:
    """What each handler saw: its context, the trace bound while it ran, and
    the OpenTelemetry span current in its thread (0: none)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[MessageContext, TraceContext | None, int]] = {}
        self._changed = threading.Condition()

    def record(self, name: str, ctx: MessageContext) -> None:
        otel_span = trace.get_current_span().get_span_context().span_id
        with self._changed:
            self.seen[name] = (ctx, current_trace(), otel_span)
            self._changed.notify_all()

    def wait_for(self, *names: str) -> bool:
        with self._changed:
            return self._changed.wait_for(
                lambda: all(n in self.seen for n in names), WAIT_S
            )


def _handlers(
    style: str, hops: Hops, system: Callable[[], Any]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Return (billing, shipping): billing produces `order-billed` again."""

    def billing_sync(message: Any, ctx: MessageContext) -> None:
        hops.record("billing", ctx)
        system()["duct.messaging/producer"].produce(
            {"id": message["id"]}, topic="order-billed"
        )

    async def billing_async(message: Any, ctx: MessageContext) -> None:
        hops.record("billing", ctx)
        await system()["duct.messaging/producer"].aproduce(
            {"id": message["id"]}, topic="order-billed"
        )

    def shipping_sync(message: Any, ctx: MessageContext) -> None:
        hops.record("shipping", ctx)

    async def shipping_async(message: Any, ctx: MessageContext) -> None:
        hops.record("shipping", ctx)

    if style == "sync":
        return billing_sync, shipping_sync
    return billing_async, shipping_async


def _routing(
    client: str,
    source: str,
    billing: Callable[..., Any],
    shipping: Callable[..., Any],
    unique: Callable[[str], str],
) -> dict[str, Any]:
    created, billed = unique("otel.orders"), unique("otel.billed")
    return {
        "topics": {"order-created": {}, "order-billed": {}},
        "publish": {
            "order-created": {"targets": [{"client": client, "kafka_topic": created}]},
            "order-billed": {"targets": [{"client": client, "kafka_topic": billed}]},
        },
        "subscriptions": {
            "billing": {
                "topic": "order-created",
                "source": source,
                "client": client,
                "handler": billing,
                "options": {"group_id": unique("billing")},
            },
            "shipping": {
                "topic": "order-billed",
                "source": source,
                "client": client,
                "handler": shipping,
            },
        },
    }


def _system(transport: str, clients: Any, routing: dict[str, Any]) -> dict[str, Any]:
    return {
        f"duct.{transport}/clients": clients,
        f"duct.{transport}/producers": {"clients": Ref(f"duct.{transport}/clients")},
        "duct.messaging/producers": [Ref(f"duct.{transport}/producers")],
        "duct.messaging/routing": routing,
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        f"duct.{transport}/consumers": {
            "clients": Ref(f"duct.{transport}/clients"),
            "routing": Ref("duct.messaging/routing"),
        },
        "duct.messaging/tracing": {"opentelemetry": True},
    }


def _run_two_hops(config_for: Callable[..., dict[str, Any]], style: str) -> Hops:
    """Start the system, produce once, wait for both handlers, halt."""
    hops = Hops()
    system: Any = None
    billing, shipping = _handlers(style, hops, lambda: system)
    system = init(config_for(billing, shipping))
    try:
        assert opentelemetry_enabled()
        system["duct.messaging/producer"].produce({"id": 7}, topic="order-created")

        assert hops.wait_for("billing", "shipping")
    finally:
        halt(system)
    assert not opentelemetry_enabled()
    return hops


def _check_spans(
    spans: tuple[ReadableSpan, ...], hops: Hops, billing_group: str
) -> None:
    by_name = {span.name: span for span in spans}
    assert sorted(by_name) == [
        "process order-billed",
        "process order-created",
        "publish order-billed",
        "publish order-created",
    ]
    assert len(spans) == 4
    first = by_name["publish order-created"]
    billing = by_name["process order-created"]
    second = by_name["publish order-billed"]
    shipping = by_name["process order-billed"]

    assert {s.context.trace_id for s in spans} == {first.context.trace_id}
    assert first.parent is None
    assert billing.parent is not None
    assert billing.parent.span_id == first.context.span_id
    assert second.parent is not None
    assert second.parent.span_id == billing.context.span_id
    assert shipping.parent is not None
    assert shipping.parent.span_id == second.context.span_id
    assert [s.kind for s in (first, billing, second, shipping)] == [
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
    ]

    for name, span, group in (
        ("billing", billing, billing_group),
        ("shipping", shipping, "shipping"),
    ):
        ctx, bound, otel_current = hops.seen[name]
        assert ctx.trace.span_id == f"{span.context.span_id:016x}"
        assert bound == ctx.trace
        assert otel_current == span.context.span_id
        assert span.attributes == {
            "messaging.destination.name": ctx.topic,
            "messaging.consumer.group.name": group,
            "messaging.message.id": ctx.message_id,
        }


@pytest.mark.parametrize("style", ["sync", "async"])
def test_memory_hops_chain_publish_and_process_spans(
    exporter: InMemorySpanExporter, unique: Callable[[str], str], style: str
) -> None:
    """On the memory transport: publish, process, publish, process in one trace."""

    def config_for(billing: Any, shipping: Any) -> dict[str, Any]:
        routing = _routing("mem", "memory", billing, shipping, unique)
        return _system("memory", {"mem": {}}, routing)

    hops = _run_two_hops(config_for, style)

    _check_spans(exporter.get_finished_spans(), hops, unique("billing"))


@pytest.mark.kafka
@pytest.mark.parametrize("style", ["sync", "async"])
def test_kafka_hops_chain_publish_and_process_spans(
    exporter: InMemorySpanExporter,
    kafka_brokers: list[TansuBroker],
    unique: Callable[[str], str],
    style: str,
) -> None:
    """On Kafka: publish, process, publish, process in one trace."""

    def config_for(billing: Any, shipping: Any) -> dict[str, Any]:
        routing = _routing("main", "kafka", billing, shipping, unique)
        clients = {"main": kafka_client(kafka_brokers[0])}
        return _system("kafka", clients, routing)

    hops = _run_two_hops(config_for, style)

    _check_spans(exporter.get_finished_spans(), hops, unique("billing"))


def test_without_opentelemetry_no_span_is_recorded(
    exporter: InMemorySpanExporter, unique: Callable[[str], str]
) -> None:
    """With the tracing component off, handlers still get a child trace, no spans."""
    hops = Hops()
    system: Any = None
    billing, shipping = _handlers("sync", hops, lambda: system)
    config = _system(
        "memory",
        {"mem": {}},
        _routing("mem", "memory", billing, shipping, unique),
    )
    config["duct.messaging/tracing"] = {"opentelemetry": False}
    system = init(config)
    try:
        system["duct.messaging/producer"].produce({"id": 7}, topic="order-created")

        assert hops.wait_for("billing", "shipping")
    finally:
        halt(system)

    assert exporter.get_finished_spans() == ()
    billing_ctx, _, _ = hops.seen["billing"]
    shipping_ctx, _, _ = hops.seen["shipping"]
    assert billing_ctx.trace.trace_id == shipping_ctx.trace.trace_id
