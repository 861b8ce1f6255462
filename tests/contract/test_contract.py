"""The promises every transport keeps, checked against each one on real servers.

Each case runs once per transport (`kit`); the cross-transport fan-out runs
once per pair of different transports (`kit_pair`). A transport that cannot
keep a promise lists it in its kit, and the case is skipped with its reason.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

from duct_messaging.messaging import envelope
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetterStatus
from duct_messaging.messaging.tracing import TraceContext, use_trace
from duct_messaging.system import Ref, component
from duct_messaging.transports.base import OutgoingMessage, Target
from tests.contract.conftest import (
    TOPIC,
    WAIT_S,
    Inbox,
    World,
    require,
    run_on,
)
from tests.contract.kits import LATE_SUBSCRIBER, Kit

FAST_RETRY = {"backoff": {"initial_ms": 10, "max_ms": 50, "jitter": 0}}


@component("contract.test/halt_probe")
def halt_probe(value: dict[str, Any]) -> threading.Event:
    """Return the event that this component's halt sets."""
    signal: threading.Event = value["signal"]
    return signal


@halt_probe.halt
def _halt_probe(signal: threading.Event) -> None:
    signal.set()


def _order(n: int) -> dict[str, Any]:
    return {"n": n, "id": uuid.uuid4().hex}


class TestFanOut:
    def test_one_publish_reaches_two_clusters_of_one_transport(
        self, kit: Kit, world: World
    ) -> None:
        """One produce reaches both clusters in order; each subscription its own."""
        a, b = world.use(kit, 2)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, a), world.target(kit, b)],
            [
                world.subscription(kit, a, inbox.handler("on-a"), "on-a"),
                world.subscription(kit, b, inbox.handler("on-b"), "on-b"),
            ],
        )
        system = world.start(routing)

        receipts = system["duct.messaging/producer"].produce(_order(1), topic=TOPIC)

        assert [(r.client, r.transport) for r in receipts] == [
            (a, kit.name),
            (b, kit.name),
        ]
        assert inbox.wait_for("on-a", 1)
        assert inbox.wait_for("on-b", 1)
        assert [c.client for c in inbox.contexts("on-a")] == [a]
        assert [c.client for c in inbox.contexts("on-b")] == [b]
        assert inbox.of("on-a") == inbox.of("on-b")

    def test_one_publish_reaches_clusters_of_different_transports(
        self, kit_pair: tuple[Kit, Kit], world: World
    ) -> None:
        """One produce fans out across two transports; each side sees it once."""
        first, second = kit_pair
        [a] = world.use(first)
        [b] = world.use(second)
        inbox = Inbox()
        routing = world.routing(
            [world.target(first, a), world.target(second, b)],
            [
                world.subscription(first, a, inbox.handler("first"), "first"),
                world.subscription(second, b, inbox.handler("second"), "second"),
            ],
        )
        system = world.start(routing)
        order = _order(7)

        receipts = system["duct.messaging/producer"].produce(order, topic=TOPIC)

        assert [r.transport for r in receipts] == [first.name, second.name]
        assert inbox.wait_for("first", 1)
        assert inbox.wait_for("second", 1)
        assert inbox.of("first") == [order]
        assert inbox.of("second") == [order]


class TestDelivery:
    def test_each_subscription_sees_every_message(self, kit: Kit, world: World) -> None:
        """Two subscriptions on one topic each get every message exactly once."""
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [
                world.subscription(kit, client, inbox.handler("audit"), "audit"),
                world.subscription(kit, client, inbox.handler("billing"), "billing"),
            ],
        )
        system = world.start(routing)
        orders = [_order(n) for n in range(5)]

        for order in orders:
            system["duct.messaging/producer"].produce(order, topic=TOPIC)

        assert inbox.wait_for("audit", 5)
        assert inbox.wait_for("billing", 5)
        assert sorted(o["n"] for o in inbox.of("audit")) == list(range(5))
        assert sorted(o["n"] for o in inbox.of("billing")) == list(range(5))

    def test_instances_of_one_subscription_share_the_work(
        self, kit: Kit, world: World
    ) -> None:
        """Two running instances of one subscription split the messages, none twice."""
        [client] = world.use(kit)
        inbox = Inbox()

        def routing_for(instance: str) -> dict[str, Any]:
            return world.routing(
                [world.target(kit, client)],
                [world.subscription(kit, client, inbox.handler(instance), "workers")],
            )

        first = world.start(routing_for("first"))
        world.start(routing_for("second"))
        producer = first["duct.messaging/producer"]
        sent = []

        def both_busy() -> bool:
            return bool(inbox.of_unlocked("first")) and bool(
                inbox.of_unlocked("second")
            )

        # Publish one at a time until both instances took some: a consumer
        # group may still be settling who reads what when the first arrive.
        while not both_busy() and len(sent) < 400:
            order = _order(len(sent))
            producer.produce(order, topic=TOPIC, key=order["id"])
            sent.append(order["n"])
            inbox.wait_until(both_busy, 0.05)

        assert both_busy()
        assert inbox.wait_until(
            lambda: (
                len(inbox.of_unlocked("first")) + len(inbox.of_unlocked("second"))
                >= len(sent)
            )
        )
        seen = [o["n"] for o in inbox.of("first") + inbox.of("second")]
        assert sorted(seen) == sorted(sent)

    def test_order_is_kept_with_concurrency_one(self, kit: Kit, world: World) -> None:
        """With concurrency 1, messages of one key are handled in publish order."""
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("ordered"), "ordered")],
        )
        system = world.start(routing)

        for n in range(30):
            system["duct.messaging/producer"].produce(
                {"n": n}, topic=TOPIC, key="one-key"
            )

        assert inbox.wait_for("ordered", 30)
        assert [o["n"] for o in inbox.of("ordered")] == list(range(30))

    def test_new_subscription_reads_messages_published_before_it_started(
        self, kit: Kit, world: World
    ) -> None:
        """A subscription started after messages were published still gets them."""
        require(kit, LATE_SUBSCRIBER)
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("late"), "late")],
        )
        publisher = world.start(routing, consumers=False)
        for n in range(3):
            publisher["duct.messaging/producer"].produce({"n": n}, topic=TOPIC, key="k")

        world.start(routing)

        assert inbox.wait_for("late", 3)
        assert [o["n"] for o in inbox.of("late")] == [0, 1, 2]


class TestFailures:
    def test_failed_handler_is_retried_then_succeeds(
        self, kit: Kit, world: World
    ) -> None:
        """A handler failing twice succeeds on its third try; no dead letter."""
        [client] = world.use(kit)
        inbox = Inbox()
        calls: list[int] = []

        def flaky(message: Any, ctx: MessageContext) -> None:
            calls.append(ctx.attempt)
            if len(calls) < 3:
                raise RuntimeError(f"transient failure {len(calls)}")

        routing = world.routing(
            [world.target(kit, client)],
            [
                world.subscription(
                    kit,
                    client,
                    inbox.handler("flaky", flaky),
                    "flaky",
                    retry={"max_attempts": 3, **FAST_RETRY},
                )
            ],
        )
        system = world.start(routing)

        system["duct.messaging/producer"].produce({"n": 1}, topic=TOPIC)

        assert inbox.wait_for("flaky", 1)
        assert calls == [1, 2, 3]
        assert inbox.of("flaky") == [{"n": 1}]
        assert world.sink.letters == []

    def test_message_is_dead_lettered_after_max_attempts(
        self, kit: Kit, world: World
    ) -> None:
        """A message failing every try is dead-lettered once and acked."""
        [client] = world.use(kit)
        inbox = Inbox()
        tries: list[int] = []

        def picky(message: Any, ctx: MessageContext) -> None:
            if message["bad"]:
                tries.append(message["n"])
                raise ValueError("cannot handle this order")

        routing = world.routing(
            [world.target(kit, client)],
            [
                world.subscription(
                    kit,
                    client,
                    inbox.handler("picky", picky),
                    "picky",
                    retry={"max_attempts": 2, **FAST_RETRY},
                )
            ],
        )
        system = world.start(routing)
        producer = system["duct.messaging/producer"]

        producer.produce({"n": 1, "bad": True}, topic=TOPIC, key="k")
        producer.produce({"n": 2, "bad": False}, topic=TOPIC, key="k")

        assert world.sink.wait_for(1)
        assert inbox.wait_for("picky", 1)
        [letter] = world.sink.letters
        assert letter.status is DeadLetterStatus.ELIGIBLE
        assert letter.attempts == 2
        assert letter.error_type.endswith("ValueError")
        assert (letter.topic, letter.subscription, letter.client) == (
            TOPIC,
            "picky",
            client,
        )
        assert letter.headers[envelope.TOPIC] == TOPIC
        assert b'"bad":true' in letter.body.replace(b" ", b"")
        assert tries == [1, 1]
        assert inbox.of("picky") == [{"n": 2, "bad": False}]

    def test_undecodable_message_is_dead_lettered_as_poison(
        self, kit: Kit, world: World
    ) -> None:
        """Undecodable bytes skip the handler and are dead-lettered as poison."""
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("strict"), "strict")],
        )
        system = world.start(routing)
        target = Target(client, kit.target(world.ns, client, TOPIC))
        raw = OutgoingMessage(
            TOPIC,
            b"\xff\xfe{not json",
            {
                envelope.CONTENT_TYPE: "application/json",
                envelope.MESSAGE_ID: "poison-1",
            },
            b"k",
        )
        transport_producer = system["duct.messaging/producers"][client]

        run_on(system, transport_producer.send(target, raw))
        system["duct.messaging/producer"].produce({"n": 2}, topic=TOPIC, key="k")

        assert world.sink.wait_for(1)
        assert inbox.wait_for("strict", 1)
        [letter] = world.sink.letters
        assert letter.status is DeadLetterStatus.POISON
        assert letter.attempts == 1
        assert letter.body == b"\xff\xfe{not json"
        assert letter.message_id == "poison-1"
        assert inbox.of("strict") == [{"n": 2}]


class TestLifecycle:
    def test_halt_waits_for_the_handler_in_flight_and_acks_it(
        self, kit: Kit, world: World
    ) -> None:
        """A handler running when halt starts finishes, and its message is acked."""
        [client] = world.use(kit)
        inbox = Inbox()
        started = threading.Event()
        halting = threading.Event()
        finished = threading.Event()

        def slow(message: Any, ctx: MessageContext) -> None:
            if message["n"] == 1:
                started.set()
                assert halting.wait(WAIT_S)
                finished.set()

        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("slow", slow), "slow")],
        )
        consumers = f"duct.{kit.name}/consumers"
        probe = {
            "contract.test/halt_probe": {"signal": halting, "after": Ref(consumers)}
        }
        system = world.start(routing, extra=probe)
        system["duct.messaging/producer"].produce({"n": 1}, topic=TOPIC, key="k")
        assert started.wait(WAIT_S)

        world.stop(system)

        assert finished.is_set()
        assert inbox.of("slow") == [{"n": 1}]
        again = world.start(routing)
        again["duct.messaging/producer"].produce({"n": 2}, topic=TOPIC, key="k")
        assert inbox.wait_for("slow", 2)
        assert [o["n"] for o in inbox.of("slow")] == [1, 2]

    def test_restart_resumes_without_loss(self, kit: Kit, world: World) -> None:
        """Messages published while a subscription is down are handled after restart."""
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("durable"), "durable")],
        )
        first = world.start(routing)
        for n in range(5):
            first["duct.messaging/producer"].produce({"n": n}, topic=TOPIC, key="k")
        assert inbox.wait_for("durable", 5)
        world.stop(first)

        publisher = world.start(routing, consumers=False)
        for n in range(5, 10):
            publisher["duct.messaging/producer"].produce({"n": n}, topic=TOPIC, key="k")
        world.stop(publisher)
        world.start(routing)

        assert inbox.wait_for("durable", 10)
        assert [o["n"] for o in inbox.of("durable")] == list(range(10))


class TestMetadata:
    def test_headers_and_trace_context_round_trip(self, kit: Kit, world: World) -> None:
        """Caller headers, metadata and the W3C trace context reach the handler."""
        [client] = world.use(kit)
        inbox = Inbox()
        routing = world.routing(
            [world.target(kit, client)],
            [world.subscription(kit, client, inbox.handler("traced"), "traced")],
        )
        system = world.start(routing)
        producer = system["duct.messaging/producer"]
        root = TraceContext.new_root()

        async def produce_in_trace() -> Any:
            with use_trace(root):
                return await producer.aproduce(
                    {"n": 1}, topic=TOPIC, key="order-1", headers={"x-tenant": "acme"}
                )

        run_on(system, produce_in_trace())

        assert inbox.wait_for("traced", 1)
        [ctx] = inbox.contexts("traced")
        assert ctx.headers["x-tenant"] == "acme"
        assert ctx.headers[envelope.TOPIC] == TOPIC
        assert ctx.headers[envelope.CONTENT_TYPE] == "application/json"
        assert len(ctx.headers[envelope.MESSAGE_ID]) == 32
        assert envelope.PRODUCED_AT in ctx.headers
        assert ctx.trace.trace_id == root.trace_id
        assert ctx.headers[envelope.TRACEPARENT].split("-")[1] == root.trace_id
        assert ctx.key == b"order-1"
