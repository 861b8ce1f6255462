"""NATS JetStream specifics: stream provisioning, de-duplication, acks, config."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js import api

from duct_messaging import init
from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging import envelope
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.producer import PublishError
from duct_messaging.system import ConfigError, InitError
from duct_messaging.transports.base import OutgoingMessage, Target
from duct_messaging.transports.nats import (
    ConsumerConfigMismatchError,
    NatsTransportError,
    StreamConfigMismatchError,
)
from tests.contract.conftest import Inbox, RecordingSink
from tests.transports import _support as support
from tests.transports._support import (
    Systems,
    eventually,
    on_loop,
    running_systems,
)

pytestmark = pytest.mark.nats

URL = "nats://127.0.0.1:4222"
SINK = "test.nats/sink"


async def _jetstream(action: Any) -> Any:
    connection = await nats.connect(URL)
    try:
        return await action(connection.jetstream())
    finally:
        await connection.close()


def jetstream(action: Any) -> Any:
    """Run `action(js)` on a fresh connection and return its result."""
    return asyncio.run(_jetstream(action))


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    """A stream name and subject prefix unique to the test; stream deleted after."""
    token = uuid.uuid4().hex[:10]
    stream = f"TEST_{token}".upper()
    yield stream, f"test.{token}"

    async def delete(js: Any) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)

    jetstream(delete)


@pytest.fixture
def systems() -> Iterator[Systems]:
    """Systems a test starts; halted after it."""
    yield from running_systems()


def config(
    names: tuple[str, str],
    subscriptions: dict[str, Any] | None = None,
    *,
    stream: dict[str, Any] | None = None,
    subject: str = "orders",
) -> dict[str, Any]:
    """Return a system with one NATS client `main` owning one stream."""
    name, prefix = names
    spec = {"subjects": [f"{prefix}.>"], "storage": "memory", **(stream or {})}
    return support.system_config(
        "nats",
        {"servers": URL, "streams": {name: spec}},
        topic="orders",
        target={"subject": f"{prefix}.{subject}"},
        subscriptions=subscriptions,
        sink=SINK,
    )


subscription = functools.partial(support.subscription, "nats")


def consumer_info(stream: str, durable: str) -> Any:
    return jetstream(lambda js: js.consumer_info(stream, durable))


class TestStreams:
    def test_missing_stream_is_created_and_an_equal_one_is_kept(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """The declared stream is created once and reused by an equal config."""
        first = systems.start(config(names), **{SINK: RecordingSink()})
        first["duct.messaging/producer"].produce({"n": 1}, topic="orders")
        systems.stop(first)

        systems.start(config(names), **{SINK: RecordingSink()})

        info = jetstream(lambda js: js.stream_info(names[0]))
        assert info.config.subjects == [f"{names[1]}.>"]
        assert info.state.messages == 1

    def test_stream_with_another_config_fails_init_and_is_left_alone(
        self, names: tuple[str, str]
    ) -> None:
        """An existing stream with other limits is left alone; init names the field."""
        jetstream(
            lambda js: js.add_stream(
                api.StreamConfig(
                    name=names[0],
                    subjects=[f"{names[1]}.>"],
                    storage=api.StorageType.MEMORY,
                    max_msgs=10,
                )
            )
        )

        with pytest.raises(InitError) as caught:
            init(
                config(names, stream={"max_msgs": 500}),
                overrides={SINK: RecordingSink()},
            )

        cause = caught.value.__cause__
        assert isinstance(cause, StreamConfigMismatchError)
        assert cause.stream == names[0]
        assert "max_msgs: config says 500, server has 10" in str(cause)
        assert jetstream(lambda js: js.stream_info(names[0])).config.max_msgs == 10

    def test_subject_no_stream_captures_fails_the_send(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """Publishing to a subject no stream captures fails, saying what to declare."""
        cfg = config(names)
        target = cfg["duct.messaging/routing"]["publish"]["orders"]["targets"][0]
        target["subject"] = f"nowhere.{uuid.uuid4().hex}"
        system = systems.start(cfg, **{SINK: RecordingSink()})

        with pytest.raises(
            PublishError, match="no JetStream stream captures"
        ) as caught:
            system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

        assert isinstance(caught.value.__cause__, NatsTransportError)

    def test_unknown_stream_field_is_a_config_error(
        self, names: tuple[str, str]
    ) -> None:
        """A misspelt stream field is reported before anything starts."""
        with pytest.raises(
            ConfigError, match=r"streams\.\w+\.max_age: unknown stream field"
        ):
            init(config(names, stream={"max_age": 60}))


class TestPublishing:
    def test_repeated_message_id_is_stored_once(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """Sending one message twice (same `x-message-id`) stores it once."""
        inbox = Inbox()
        system = systems.start(
            config(names, {"dedup": subscription(inbox.handler("dedup"))}),
            **{SINK: RecordingSink()},
        )
        producer = system["duct.messaging/producers"]["main"]
        target = Target("main", {"subject": f"{names[1]}.orders"})
        message = OutgoingMessage(
            "orders",
            b'{"n": 1}',
            {
                envelope.MESSAGE_ID: uuid.uuid4().hex,
                envelope.CONTENT_TYPE: "application/json",
            },
        )

        first = on_loop(system, producer.send(target, message))
        second = on_loop(system, producer.send(target, message))
        system["duct.messaging/producer"].produce({"n": 2}, topic="orders")

        assert first.position == second.position
        assert inbox.wait_for("dedup", 2)
        assert inbox.of("dedup") == [{"n": 1}, {"n": 2}]

    def test_dead_letter_and_replay_are_not_dropped_as_duplicates(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A dead letter and its replay keep the message id, yet are stored."""
        system = systems.start(config(names), **{SINK: RecordingSink()})
        producer = system["duct.messaging/producers"]["main"]
        target = Target("main", {"subject": f"{names[1]}.orders"})
        original = {envelope.MESSAGE_ID: uuid.uuid4().hex}
        dead = {**original, "x-dead-letter-id": "dl-1"}
        replay = {**original, "x-replayed-from": "dl-1"}

        positions = [
            on_loop(system, producer.send(target, OutgoingMessage("orders", b"{}", h)))
            for h in (original, dead, replay, dead)
        ]

        assert [p.position for p in positions[:3]] == [1, 2, 3]
        assert positions[3].position == 2  # the same dead letter, sent twice


class TestConsuming:
    def test_durable_consumer_is_named_after_the_subscription_and_fully_acked(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A durable consumer per subscription; nothing is left unacked after halt."""
        inbox = Inbox()
        system = systems.start(
            config(names, {"orders.audit": subscription(inbox.handler("audit"))}),
            **{SINK: RecordingSink()},
        )
        for n in range(20):
            system["duct.messaging/producer"].produce({"n": n}, topic="orders")
        assert inbox.wait_for("audit", 20)

        systems.stop(system)

        info = consumer_info(names[0], "orders_audit")
        assert info.config.filter_subject == f"{names[1]}.orders"
        assert info.num_ack_pending == 0
        assert info.num_pending == 0

    def test_existing_consumer_on_another_subject_fails_the_start(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A durable name already reading another subject fails; no silent rebind."""
        systems.stop(systems.start(config(names), **{SINK: RecordingSink()}))
        jetstream(
            lambda js: js.add_consumer(
                names[0],
                api.ConsumerConfig(
                    durable_name="taken",
                    name="taken",
                    ack_policy=api.AckPolicy.EXPLICIT,
                    filter_subject=f"{names[1]}.other",
                ),
            )
        )
        subs = {"audit": subscription(lambda m: None, options={"durable": "taken"})}

        with pytest.raises(InitError) as caught:
            systems.start(config(names, subs), **{SINK: RecordingSink()})

        assert isinstance(caught.value.__cause__.__cause__, ConsumerConfigMismatchError)

    def test_consumer_deleted_behind_our_back_is_recreated(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """An idle source recreates its deleted consumer, resuming after its acks."""
        inbox = Inbox()
        subs = {
            "audit": subscription(
                inbox.handler("audit"), options={"consumer_check_s": 0.1}
            )
        }
        system = systems.start(config(names, subs), **{SINK: RecordingSink()})
        producer = system["duct.messaging/producer"]
        producer.produce({"n": 1}, topic="orders")
        assert inbox.wait_for("audit", 1)
        jetstream(lambda js: js.delete_consumer(names[0], "audit"))

        producer.produce({"n": 2}, topic="orders")

        assert inbox.wait_for("audit", 2)
        assert inbox.of("audit") == [{"n": 1}, {"n": 2}]

    @pytest.mark.slow
    def test_messages_held_longer_than_ack_wait_are_not_redelivered(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A batch handled for longer than `ack_wait_s` is kept alive: one call each."""
        stream, prefix = names
        systems.stop(systems.start(config(names), **{SINK: RecordingSink()}))

        async def publish(js: Any) -> None:
            for n in range(30):
                await js.publish(f"{prefix}.orders", json.dumps({"n": n}).encode())

        jetstream(publish)
        calls: list[Any] = []

        def slow(message: Any) -> None:
            calls.append(message)
            time.sleep(0.1)  # the work itself, not a synchronisation

        inbox = Inbox()
        subs = {
            "slow": subscription(
                inbox.handler("slow", lambda m, c: slow(m)),
                options={"ack_wait_s": 1},
            )
        }
        systems.start(config(names, subs), **{SINK: RecordingSink()})

        assert inbox.wait_for("slow", 30)
        assert eventually(lambda: consumer_info(stream, "slow").num_ack_pending == 0)
        assert len(calls) == 30
        assert consumer_info(stream, "slow").num_redelivered == 0

    def test_a_fetch_with_no_time_left_returns_instead_of_failing(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A zero fetch timeout (a back-off ending now) is an empty fetch, no error."""
        subs = {"quick": subscription(lambda m: None)}
        system = systems.start(config(names, subs), **{SINK: RecordingSink()})
        source = system["duct.nats/consumers"].workers["quick"].source

        assert on_loop(system, source.fetch(10, 0.0)) == []

    def test_recreated_consumer_starts_at_the_lowest_unsettled_message(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A consumer recreated while message 1 backs off starts again at 1."""
        stream, _ = names
        inbox = Inbox()
        failed: list[int] = []

        def first_fails(message: Any, ctx: MessageContext) -> None:
            if message["n"] == 1 and not failed:
                failed.append(1)
                raise RuntimeError("once")

        subs = {
            "lanes": subscription(
                inbox.handler("lanes", first_fails),
                concurrency=2,
                retry={
                    "max_attempts": 2,
                    "backoff": {"initial_ms": 60000, "max_ms": 60000},
                },
                options={"consumer_check_s": 0.1},
            )
        }
        system = systems.start(config(names, subs), **{SINK: RecordingSink()})
        producer = system["duct.messaging/producer"]
        producer.produce({"n": 1}, topic="orders")
        producer.produce({"n": 2}, topic="orders")
        assert inbox.wait_for("lanes", 1)
        assert eventually(lambda: consumer_info(stream, "lanes").num_ack_pending == 1)

        jetstream(lambda js: js.delete_consumer(stream, "lanes"))

        def recreated() -> Any:
            try:
                return consumer_info(stream, "lanes")
            except nats.js.errors.NotFoundError:
                return None

        assert eventually(lambda: recreated() is not None)
        assert recreated().config.opt_start_seq == 1

    def test_released_message_is_nakked_and_redelivered(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """When the dead-letter sink fails, the message is nakked and comes back."""
        _, sink, attempts = support.start_flaky(
            systems,
            lambda s: config(names, s),
            subscription,
            SINK,
            max_attempts=1,
            backoff={"initial_ms": 10},
        )

        assert sink.wait_for(1)
        assert attempts == [1, 2]
        assert eventually(lambda: consumer_info(names[0], "flaky").num_ack_pending == 0)

    def test_dead_lettered_message_is_terminated_not_redelivered(
        self, names: tuple[str, str], systems: Systems
    ) -> None:
        """A poison message is terminated: an advisory says so, nothing is pending."""
        stream, prefix = names
        inbox = Inbox()
        sink = RecordingSink()
        subs = {"worker": subscription(inbox.handler("worker"))}
        system = systems.start(config(names, subs), **{SINK: sink})
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{stream}.worker"
        terminated: list[dict[str, Any]] = []
        listener = on_loop(system, _listen(advisory, terminated))
        try:
            jetstream(lambda js: js.publish(f"{prefix}.orders", b"\xff{nope"))
            system["duct.messaging/producer"].produce({"n": 2}, topic="orders")

            assert sink.wait_for(1)
            assert inbox.wait_for("worker", 1)
            assert eventually(lambda: len(terminated) == 1)
        finally:
            on_loop(system, listener.close())
        systems.stop(system)

        assert terminated[0]["stream_seq"] == 1
        assert sink.letters[0].position == 1
        info = consumer_info(stream, "worker")
        assert info.num_ack_pending == 0
        assert info.num_redelivered == 0
        assert info.num_pending == 0
        assert info.ack_floor.stream_seq == 2


async def _listen(subject: str, into: list[dict[str, Any]]) -> Any:
    """Subscribe to `subject` on a new connection; append each JSON payload."""
    connection = await nats.connect(URL)

    async def record(msg: Any) -> None:
        into.append(json.loads(msg.data))

    await connection.subscribe(subject, cb=record)
    await connection.flush()
    return connection


class TestExtra:
    def test_import_without_nats_py_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Importing the transport without nats-py asks for the `nats` extra."""
        with pytest.raises(MissingExtraError, match=r"duct-messaging\[nats\]"):
            support.import_without(
                monkeypatch, "nats", "duct_messaging.transports.nats"
            )
