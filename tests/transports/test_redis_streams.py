"""Redis Streams specifics: wire format, trimming, groups, claims, acks, config."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from duct_messaging import init
from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.producer import PublishError
from duct_messaging.system import ConfigError, InitError
from duct_messaging.transports.base import OutgoingMessage, Target
from duct_messaging.transports.redis_streams import (
    RedisTransportError,
    ReservedFieldError,
)
from tests.contract.conftest import Inbox, RecordingSink
from tests.transports import _support as support
from tests.transports._support import (
    Systems,
    eventually,
    on_loop,
    running_systems,
)

pytestmark = pytest.mark.redis

URL = "redis://127.0.0.1:6379/6"
SINK = "test.redis/sink"


@pytest.fixture
def stream() -> Iterator[str]:
    """A stream name unique to the test; deleted afterwards."""
    name = f"test.redis.{uuid.uuid4().hex[:10]}"
    yield name
    client = redis.Redis.from_url(URL)
    client.delete(name)
    client.close()


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    """A plain synchronous client on the test database."""
    client = redis.Redis.from_url(URL)
    yield client
    client.close()


@pytest.fixture
def systems() -> Iterator[Systems]:
    """Systems a test starts; halted after it."""
    yield from running_systems()


# A system with one client `main` publishing topic `orders` to `stream`.
config = support.url_client_config("redis", URL, "stream", sink=SINK)
subscription = functools.partial(support.subscription, "redis")


def pending(raw: redis.Redis, stream: str, group: str) -> int:
    return int(raw.xpending(stream, group)["pending"])


class TestWireFormat:
    def test_entry_holds_body_key_and_one_field_per_header(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """A plain XRANGE shows the JSON body, the key and readable header fields."""
        system = systems.start(config(stream), **{SINK: RecordingSink()})

        [receipt] = system["duct.messaging/producer"].produce(
            {"id": 1}, topic="orders", key="order-1", headers={"x-tenant": "acme"}
        )

        [(entry_id, fields)] = raw.xrange(stream)
        assert entry_id.decode() == receipt.position
        assert fields[b"body"] == b'{"id":1}'
        assert fields[b"key"] == b"order-1"
        assert fields[b"x-tenant"] == b"acme"
        assert fields[b"x-topic"] == b"orders"
        assert fields[b"content-type"] == b"application/json"
        assert len(fields[b"x-message-id"]) == 32
        assert fields[b"traceparent"].startswith(b"00-")

    def test_header_named_like_a_reserved_field_fails_the_send(
        self, stream: str, systems: Systems
    ) -> None:
        """A header called `body` would overwrite the message, so the send fails."""
        system = systems.start(config(stream), **{SINK: RecordingSink()})

        with pytest.raises(PublishError, match="'body'") as caught:
            system["duct.messaging/producer"].produce(
                {"id": 1}, topic="orders", headers={"body": "oops"}
            )

        assert isinstance(caught.value.__cause__, ReservedFieldError)
        assert caught.value.sent == ()

    def test_maxlen_trims_the_stream_approximately(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """With `maxlen` on the target the stream stays near that length."""
        system = systems.start(
            config(stream, target={"maxlen": 50}), **{SINK: RecordingSink()}
        )
        producer = system["duct.messaging/producer"]

        on_loop(
            system,
            producer.aproduce_many([{"n": n} for n in range(1000)], topic="orders"),
        )

        # Approximate trimming drops whole radix-tree nodes of 100 entries.
        assert 50 <= raw.xlen(stream) < 300


class TestProducer:
    def test_a_send_rejected_before_reaching_redis_fails_not_hangs(
        self, stream: str, systems: Systems
    ) -> None:
        """A negative `maxlen` fails that send at once; later sends still work."""
        system = systems.start(config(stream), **{SINK: RecordingSink()})
        producer = system["duct.redis/producers"]["main"]
        message = OutgoingMessage("orders", b"{}", {})

        async def send_both() -> tuple[Any, Any]:
            bad = producer.send(
                Target("main", {"stream": stream, "maxlen": -1}), message
            )
            good = producer.send(Target("main", {"stream": stream}), message)
            return tuple(
                await asyncio.wait_for(
                    asyncio.gather(bad, good, return_exceptions=True), 5
                )
            )

        bad, good = on_loop(system, send_both())

        assert isinstance(bad, RedisTransportError)
        assert "maxlen" in str(bad)
        assert good.destination == stream

    def test_senders_are_answered_when_the_flush_task_dies(
        self, stream: str, systems: Systems
    ) -> None:
        """Cancelling the flush task fails the queued sends instead of hanging them."""
        system = systems.start(config(stream), **{SINK: RecordingSink()})
        producer = system["duct.redis/producers"]["main"]
        target = Target("main", {"stream": stream})
        message = OutgoingMessage("orders", b"{}", {})

        async def cancel_flush() -> list[Any]:
            sends = [asyncio.ensure_future(producer.send(target, message))]
            await asyncio.sleep(0)  # let the send queue its XADD
            producer._flusher.cancel()
            return await asyncio.wait_for(
                asyncio.gather(*sends, return_exceptions=True), 5
            )

        [result] = on_loop(system, cancel_flush())

        assert isinstance(result, RedisTransportError)
        assert "cancelled" in str(result)
        again = on_loop(system, producer.send(target, message))
        assert again.destination == stream


class TestGroups:
    def test_each_subscription_gets_its_own_group_named_after_it(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """Two subscriptions make two groups; the default group name is the id."""
        inbox = Inbox()
        subs = {
            "audit": subscription(inbox.handler("audit")),
            "billing": subscription(inbox.handler("billing"), options={"group": "pay"}),
        }
        system = systems.start(config(stream, subs), **{SINK: RecordingSink()})

        system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

        assert inbox.wait_for("audit", 1)
        assert inbox.wait_for("billing", 1)
        groups = sorted(g["name"].decode() for g in raw.xinfo_groups(stream))
        assert groups == ["audit", "pay"]

    def test_entries_left_by_a_dead_consumer_are_claimed_and_acked(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """An entry another consumer read and never acked is claimed once idle."""
        raw.xgroup_create(stream, "claimer", id="0", mkstream=True)
        raw.xadd(stream, {"body": b'{"n": 1}', "content-type": "application/json"})
        raw.xreadgroup("claimer", "dead-consumer", {stream: ">"}, count=10)
        inbox = Inbox()
        subs = {
            "claimer": subscription(
                inbox.handler("claimer"), options={"claim_idle_ms": 50}
            )
        }

        systems.start(config(stream, subs), **{SINK: RecordingSink()})

        assert inbox.wait_for("claimer", 1)
        assert [c.attempt for c in inbox.contexts("claimer")] == [2]
        assert eventually(lambda: pending(raw, stream, "claimer") == 0)

    def test_entry_trimmed_while_pending_is_dropped_not_dead_lettered(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """A held entry that trimming removed is acked away, never handled."""
        raw.xgroup_create(stream, "keeper", id="0", mkstream=True)
        raw.xadd(stream, {"body": b'{"n": 0}'})
        raw.xreadgroup("keeper", "me", {stream: ">"}, count=10)
        raw.xtrim(stream, maxlen=0, approximate=False)
        inbox = Inbox()
        sink = RecordingSink()
        subs = {
            "keeper": subscription(inbox.handler("keeper"), options={"consumer": "me"})
        }
        system = systems.start(config(stream, subs), **{SINK: sink})

        system["duct.messaging/producer"].produce({"n": 1}, topic="orders")

        assert inbox.wait_for("keeper", 1)
        assert inbox.of("keeper") == [{"n": 1}]
        assert sink.letters == []
        assert eventually(lambda: pending(raw, stream, "keeper") == 0)

    def test_released_entry_is_read_again_by_the_same_consumer(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """When the dead-letter sink fails, the entry stays pending and comes back."""
        _, sink, attempts = support.start_flaky(
            systems, lambda s: config(stream, s), subscription, SINK, max_attempts=1
        )

        assert sink.wait_for(1)
        assert sink.failures == 1
        assert attempts == [1, 2]
        assert eventually(lambda: pending(raw, stream, "flaky") == 0)

    @pytest.mark.slow
    def test_entries_held_longer_than_claim_idle_are_handled_once(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """Waiting in our own queue past `claim_idle_ms` does not mean a second call."""
        publisher = systems.start(config(stream), **{SINK: RecordingSink()})
        on_loop(
            publisher,
            publisher["duct.messaging/producer"].aproduce_many(
                [{"n": n} for n in range(40)], topic="orders"
            ),
        )
        calls: list[Any] = []

        def slow(message: Any, ctx: MessageContext) -> None:
            calls.append(message)
            time.sleep(0.1)  # the work itself, not a synchronisation

        inbox = Inbox()
        subs = {
            "busy": subscription(
                inbox.handler("busy", slow),
                concurrency=2,
                options={"claim_idle_ms": 500},
            )
        }
        systems.start(config(stream, subs), **{SINK: RecordingSink()})

        assert inbox.wait_for("busy", 40)
        assert eventually(lambda: pending(raw, stream, "busy") == 0)
        assert len(calls) == 40
        assert sorted(m["n"] for m in calls) == list(range(40))

    def test_an_ordered_lane_keeps_its_entries_from_other_consumers(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """A head backing off past `claim_idle_ms` is kept alive, not claimed away."""
        inbox = Inbox()
        failed: list[int] = []

        def first_fails(message: Any, ctx: MessageContext) -> None:
            if not failed:
                failed.append(1)
                raise RuntimeError("once")

        subs = {
            "kept": subscription(
                inbox.handler("kept", first_fails),
                retry={
                    "max_attempts": 2,
                    "backoff": {"initial_ms": 60000, "max_ms": 60000},
                },
                options={"claim_idle_ms": 200},
            )
        }
        system = systems.start(config(stream, subs), **{SINK: RecordingSink()})
        system["duct.messaging/producer"].produce({"n": 1}, topic="orders")
        assert eventually(lambda: failed == [1])

        # For over a second (six claim_idle_ms) another consumer finds
        # nothing idle enough to claim.
        deadline = time.monotonic() + 1.2
        pause = threading.Event()
        while time.monotonic() < deadline:
            assert (
                raw.xautoclaim(stream, "kept", "thief", 200, "0-0", justid=True) == []
            )
            pause.wait(0.05)

    def test_a_fetched_batch_is_acked_with_one_xack(
        self, stream: str, raw: redis.Redis, systems: Systems
    ) -> None:
        """300 waiting messages are acked in a handful of XACKs, not 300."""
        publisher = systems.start(config(stream), **{SINK: RecordingSink()})
        producer = publisher["duct.messaging/producer"]
        on_loop(
            publisher,
            producer.aproduce_many([{"n": n} for n in range(300)], topic="orders"),
        )
        before = _xack_calls(raw)
        inbox = Inbox()

        systems.start(
            config(stream, {"batch": subscription(inbox.handler("batch"))}),
            **{SINK: RecordingSink()},
        )

        assert inbox.wait_for("batch", 300)
        assert eventually(lambda: pending(raw, stream, "batch") == 0)
        # The count is server-wide: leave room for other suites acking meanwhile.
        assert _xack_calls(raw) - before < 30


def _xack_calls(raw: redis.Redis) -> int:
    stats = raw.info("commandstats")
    return int(stats.get("cmdstat_xack", {}).get("calls", 0))


class TestConfig:
    def test_client_without_url_is_a_config_error(self) -> None:
        """A client with no `url` is reported before anything starts."""
        with pytest.raises(ConfigError, match=r"main\.url: missing"):
            init(config("s", client={"url": None}))

    def test_unreachable_server_fails_init_naming_the_client(self) -> None:
        """A server that does not answer fails init, naming the client."""
        with pytest.raises(InitError) as caught:
            init(config("s", client={"url": "redis://127.0.0.1:1/0"}))

        assert isinstance(caught.value.__cause__, RedisTransportError)
        assert caught.value.__cause__.client == "main"

    def test_import_without_redis_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Importing the transport without redis-py asks for the `redis` extra."""
        with pytest.raises(MissingExtraError, match=r"duct-messaging\[redis\]"):
            support.import_without(
                monkeypatch, "redis.asyncio", "duct_messaging.transports.redis_streams"
            )
