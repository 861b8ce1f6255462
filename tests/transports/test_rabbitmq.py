"""RabbitMQ specifics: topology, unroutable publishes, confirms, requeue, config."""

from __future__ import annotations

import asyncio
import functools
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from duct_messaging import init
from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging.producer import PublishError
from duct_messaging.system import ConfigError, InitError
from duct_messaging.transports.base import OutgoingMessage, Target
from duct_messaging.transports.rabbitmq import (
    RabbitTransportError,
    UnroutableMessageError,
)
from tests.contract.conftest import Inbox, RecordingSink
from tests.transports import _support as support
from tests.transports._support import (
    Systems,
    eventually,
    on_loop,
    running_systems,
)

pytestmark = pytest.mark.rabbitmq

URL = "amqp://guest:guest@127.0.0.1:5672/"
SINK = "test.rabbitmq/sink"


async def _with_channel(action: Any) -> Any:
    connection = await aio_pika.connect(URL)
    try:
        return await action(await connection.channel())
    finally:
        await connection.close()


def with_channel(action: Any) -> Any:
    """Run `action(channel)` on a fresh connection and return its result."""
    return asyncio.run(_with_channel(action))


def queue_depth(name: str) -> int:
    """Return the number of ready messages in queue `name`."""

    async def depth(channel: Any) -> int:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count)

    return int(with_channel(depth))


@pytest.fixture
def exchange() -> Iterator[str]:
    """An exchange name unique to the test; it and its queues are deleted after."""
    name = f"test.rabbit.{uuid.uuid4().hex[:10]}"
    yield name

    async def delete(channel: Any) -> None:
        for queue in ("worker", "audit", "billing", "flaky", "kept"):
            await channel.queue_delete(f"{name}.{queue}")
        await channel.exchange_delete(name)

    with_channel(delete)


@pytest.fixture
def systems() -> Iterator[Systems]:
    """Systems a test starts; halted after it."""
    yield from running_systems()


# A system with one client `main` publishing topic `orders` to `exchange`.
config = support.url_client_config("rabbitmq", URL, "exchange", sink=SINK)
subscription = functools.partial(support.subscription, "rabbitmq")


class TestTopology:
    def test_each_subscription_gets_a_durable_queue_named_after_it(
        self, exchange: str, systems: Systems
    ) -> None:
        """Queues default to `<exchange>.<subscription>`, and are empty once handled."""
        inbox = Inbox()
        subs = {
            "audit": subscription(inbox.handler("audit")),
            "billing": subscription(inbox.handler("billing")),
        }
        system = systems.start(config(exchange, subs), **{SINK: RecordingSink()})

        for n in range(10):
            system["duct.messaging/producer"].produce({"n": n}, topic="orders")

        assert inbox.wait_for("audit", 10)
        assert inbox.wait_for("billing", 10)
        systems.stop(system)
        assert queue_depth(f"{exchange}.audit") == 0
        assert queue_depth(f"{exchange}.billing") == 0

    def test_publish_nobody_can_receive_fails(
        self, exchange: str, systems: Systems
    ) -> None:
        """With no queue bound, a mandatory publish fails instead of vanishing."""
        system = systems.start(config(exchange), **{SINK: RecordingSink()})

        with pytest.raises(PublishError, match="no queue is bound") as caught:
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

        assert isinstance(caught.value.__cause__, UnroutableMessageError)
        assert caught.value.__cause__.exchange == exchange

    def test_queue_on_the_target_keeps_messages_for_a_later_subscription(
        self, exchange: str, systems: Systems
    ) -> None:
        """A target naming a queue keeps messages for a subscription started later."""
        kept = f"{exchange}.kept"
        publisher = systems.start(
            config(exchange, target={"queue": kept}), **{SINK: RecordingSink()}
        )
        for n in range(3):
            publisher["duct.messaging/producer"].produce({"n": n}, topic="orders")
        systems.stop(publisher)
        assert queue_depth(kept) == 3
        inbox = Inbox()

        systems.start(
            config(
                exchange,
                {"late": subscription(inbox.handler("late"))},
                target={"queue": kept},
            ),
            **{SINK: RecordingSink()},
        )

        assert inbox.wait_for("late", 3)
        assert [o["n"] for o in inbox.of("late")] == [0, 1, 2]

    def test_exchange_of_another_type_fails_the_start(
        self, exchange: str, systems: Systems
    ) -> None:
        """An existing exchange is never redeclared with another type."""
        with_channel(
            lambda channel: channel.declare_exchange(exchange, "fanout", durable=True)
        )
        subs = {"worker": subscription(lambda m: None)}

        with pytest.raises(InitError) as caught:
            systems.start(config(exchange, subs), **{SINK: RecordingSink()})

        cause = caught.value.__cause__.__cause__
        assert isinstance(cause, RabbitTransportError)
        assert "PRECONDITION_FAILED" in str(cause)

    def test_exchange_deleted_behind_our_back_is_declared_again(
        self, exchange: str, systems: Systems
    ) -> None:
        """After a send fails on a deleted exchange, the next one redeclares it."""
        kept = f"{exchange}.kept"
        system = systems.start(
            config(exchange, target={"queue": kept}), **{SINK: RecordingSink()}
        )
        producer = system["duct.messaging/producer"]
        producer.produce({"n": 1}, topic="orders")
        with_channel(lambda channel: channel.exchange_delete(exchange))

        with pytest.raises(PublishError, match="NOT_FOUND"):
            producer.produce({"n": 2}, topic="orders")
        producer.produce({"n": 3}, topic="orders")

        assert queue_depth(kept) == 2


class CountingOptions(dict[str, Any]):
    """Target options that count how often they are looked up."""

    lookups = 0

    def get(self, key: str, default: Any = None) -> Any:
        type(self).lookups += 1
        return super().get(key, default)


class TestProducer:
    def test_a_target_is_worked_out_once_not_per_message(
        self, exchange: str, systems: Systems
    ) -> None:
        """Exchange, routing key, topology and options are looked up once a target."""
        system = systems.start(
            config(exchange, target={"queue": f"{exchange}.kept"}),
            **{SINK: RecordingSink()},
        )
        producer = system["duct.rabbitmq/producers"]["main"]
        target = Target(
            "main", CountingOptions(exchange=exchange, queue=f"{exchange}.kept")
        )
        message = OutgoingMessage("orders", b"{}", {})
        on_loop(system, producer.send(target, message))
        first = CountingOptions.lookups

        for _ in range(10):
            on_loop(system, producer.send(target, message))

        assert CountingOptions.lookups == first
        assert eventually(lambda: queue_depth(f"{exchange}.kept") == 11)


class TestConfirmsAndAcks:
    def test_a_batch_is_confirmed_message_by_message(
        self, exchange: str, systems: Systems
    ) -> None:
        """500 sends in flight on one confirm channel all get receipts and arrive."""
        inbox = Inbox()
        system = systems.start(
            config(exchange, {"worker": subscription(inbox.handler("worker"))}),
            **{SINK: RecordingSink()},
        )
        producer = system["duct.messaging/producer"]

        receipts = on_loop(
            system,
            producer.aproduce_many([{"n": n} for n in range(500)], topic="orders"),
        )

        assert len(receipts) == 500
        assert {r[0].destination for r in receipts} == {exchange}
        assert inbox.wait_for("worker", 500)
        assert sorted(o["n"] for o in inbox.of("worker")) == list(range(500))

    def test_released_message_is_requeued_and_redelivered(
        self, exchange: str, systems: Systems
    ) -> None:
        """When the dead-letter sink fails, the message goes back to its queue."""
        system, sink, attempts = support.start_flaky(
            systems, lambda s: config(exchange, s), subscription, SINK, max_attempts=1
        )

        assert sink.wait_for(1)
        assert attempts == [1, 2]
        systems.stop(system)
        assert eventually(lambda: queue_depth(f"{exchange}.flaky") == 0)

    def test_stop_after_the_channel_was_closed_halts_cleanly(
        self, exchange: str, systems: Systems
    ) -> None:
        """A consumer channel already closed does not fail the halt."""
        system = systems.start(
            config(exchange, {"worker": subscription(lambda m: None)}),
            **{SINK: RecordingSink()},
        )
        source = system["duct.rabbitmq/consumers"].workers["worker"].source
        on_loop(system, source._channel.close())

        systems.stop(system)

        assert source._channel is None

    def test_dead_lettered_message_goes_to_the_queues_dead_letter_exchange(
        self, exchange: str, systems: Systems
    ) -> None:
        """A poison message is rejected: the broker moves it to the queue's DLX."""
        dlx, parked = f"{exchange}.dlx", f"{exchange}.parked"
        with_channel(_declare_parking(dlx, parked))
        try:
            inbox = Inbox()
            sink = RecordingSink()
            options = {"queue_arguments": {"x-dead-letter-exchange": dlx}}
            subs = {"worker": subscription(inbox.handler("worker"), options=options)}
            system = systems.start(config(exchange, subs), **{SINK: sink})

            with_channel(_publish_raw(exchange, b"\xff{nope"))
            system["duct.messaging/producer"].produce({"n": 2}, topic="orders")

            assert sink.wait_for(1)
            assert inbox.wait_for("worker", 1)
            systems.stop(system)
            assert eventually(lambda: queue_depth(parked) == 1)
            assert queue_depth(f"{exchange}.worker") == 0
            body, death = with_channel(_first_death(parked))
        finally:
            with_channel(_delete_parking(dlx, parked))

        assert body == b"\xff{nope"
        assert death["queue"] == f"{exchange}.worker"
        assert death["reason"] == "rejected"


def _declare_parking(dlx: str, parked: str) -> Any:
    async def declare(channel: Any) -> None:
        fanout = await channel.declare_exchange(
            dlx, aio_pika.ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(parked, durable=True)
        await queue.bind(fanout)

    return declare


def _delete_parking(dlx: str, parked: str) -> Any:
    async def delete(channel: Any) -> None:
        await channel.queue_delete(parked)
        await channel.exchange_delete(dlx)

    return delete


def _publish_raw(exchange: str, body: bytes) -> Any:
    async def publish(channel: Any) -> None:
        target = await channel.get_exchange(exchange)
        message = aio_pika.Message(body, content_type="application/json")
        await target.publish(message, routing_key="orders")

    return publish


def _first_death(queue_name: str) -> Any:
    """Return the body and first `x-death` entry of the next message in a queue."""

    async def first(channel: Any) -> tuple[bytes, dict[str, Any]]:
        queue = await channel.get_queue(queue_name)
        message = await queue.get(no_ack=True)
        death = message.headers["x-death"][0]
        return message.body, {k: _text(v) for k, v in death.items()}

    return first


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


class TestConfig:
    def test_client_without_url_is_a_config_error(self, exchange: str) -> None:
        """A client with no `url` is reported before anything starts."""
        with pytest.raises(ConfigError, match=r"main\.url: missing"):
            init(config(exchange, client={"url": None}))

    def test_import_without_aio_pika_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Importing the transport without aio-pika asks for the `rabbitmq` extra."""
        with pytest.raises(MissingExtraError, match=r"duct-messaging\[rabbitmq\]"):
            support.import_without(
                monkeypatch, "aio_pika", "duct_messaging.transports.rabbitmq"
            )
