"""How each transport takes part in the contract suite.

A kit knows how to configure N clusters of its transport inside one test
namespace, which target and subscription options point at them, and how
to remove what a test left on a shared server. It also lists the promises
its transport cannot keep, each with the reason the suite prints when it
skips that case.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duct_messaging.testing.tansu import TansuBroker
from duct_messaging.transports.memory import MemoryBroker, MemoryClients
from tests.conftest import kafka_client

REDIS_URL = "redis://127.0.0.1:6379"
# Databases the suite writes to, one per simulated Redis cluster; db 0 is
# left to applications and other suites.
REDIS_DBS = (1, 2, 3)
NATS_URL = "nats://127.0.0.1:4222"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/"

# Promises a transport may be unable to keep; a kit lists them in `lacks`.
LATE_SUBSCRIBER = "late_subscriber"


def namespace() -> str:
    """Return a fresh name prefix for one test's topics, streams and queues."""
    return "c" + uuid.uuid4().hex[:10]


@dataclass
class Kit:
    """One transport in the contract suite.

    `clients` and the option methods get the test namespace `ns` and the
    client name, so every name a kit derives is unique to one test.
    """

    name: str
    lacks: dict[str, str] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return self.name

    def client_names(self, count: int) -> list[str]:
        return [f"{self.name}-{chr(ord('a') + i)}" for i in range(count)]

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        raise NotImplementedError

    def subscription_options(
        self, ns: str, client: str, topic: str, sub_id: str
    ) -> dict[str, Any]:
        return {}

    def consumers_settings(self) -> dict[str, Any]:
        return {}

    def overrides(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {}

    def cleanup(self, ns: str) -> None:
        """Remove what tests of namespace `ns` left on shared servers."""


class MemoryKit(Kit):
    """In-memory clusters, shared by every system a test starts."""

    def __init__(self) -> None:
        super().__init__("memory")
        self._shared: dict[str, MemoryClients] = {}

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {name: {} for name in names}

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        return {"destination": f"{ns}.{topic}"}

    def overrides(self, ns: str, names: list[str]) -> dict[str, Any]:
        # Systems of one test stand for processes sharing one broker.
        shared = self._shared.setdefault(ns, MemoryClients())
        for name in names:
            shared.setdefault(name, MemoryBroker(name))
        return {"duct.memory/clients": shared}

    def cleanup(self, ns: str) -> None:
        self._shared.pop(ns, None)


class KafkaKit(Kit):
    """The session's tansu brokers, one per cluster, two partitions a topic."""

    def __init__(self, brokers: list[TansuBroker]) -> None:
        super().__init__("kafka")
        self._brokers = brokers

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {
            name: kafka_client(
                self._brokers[i % len(self._brokers)], topics={"partitions": 2}
            )
            for i, name in enumerate(names)
        }

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        return {"kafka_topic": f"{ns}.{topic}"}

    def subscription_options(
        self, ns: str, client: str, topic: str, sub_id: str
    ) -> dict[str, Any]:
        return {"group_id": f"{ns}.{sub_id}"}


class RedisKit(Kit):
    """One Redis server; each simulated cluster is a database of its own."""

    def __init__(self) -> None:
        super().__init__("redis")

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {
            name: {"url": f"{REDIS_URL}/{REDIS_DBS[i % len(REDIS_DBS)]}"}
            for i, name in enumerate(names)
        }

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        return {"stream": f"{ns}.{topic}"}

    def cleanup(self, ns: str) -> None:
        asyncio.run(_redis_cleanup(ns))


async def _redis_cleanup(ns: str) -> None:
    import redis.asyncio as aioredis

    for db in REDIS_DBS:
        client = aioredis.Redis.from_url(f"{REDIS_URL}/{db}")
        try:
            keys = [k async for k in client.scan_iter(match=f"{ns}.*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


class NatsKit(Kit):
    """One NATS server; each cluster owns a stream over its own subjects."""

    def __init__(self) -> None:
        super().__init__("nats")

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {
            name: {
                "servers": NATS_URL,
                "streams": {
                    _stream(ns, name): {
                        "subjects": [f"{ns}.{name}.>"],
                        "storage": "memory",
                    }
                },
            }
            for name in names
        }

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        return {"subject": f"{ns}.{client}.{topic}"}

    def consumers_settings(self) -> dict[str, Any]:
        return {}

    def cleanup(self, ns: str) -> None:
        asyncio.run(_nats_cleanup(ns))


def _stream(ns: str, client: str) -> str:
    return f"{ns}_{client}".upper()


async def _nats_cleanup(ns: str) -> None:
    import nats

    connection = await nats.connect(NATS_URL)
    try:
        js = connection.jetstream()
        names = await js.streams_info()
        for info in names:
            if info.config.name.startswith(ns.upper()):
                await js.delete_stream(info.config.name)
    finally:
        await connection.close()


class RabbitKit(Kit):
    """One RabbitMQ vhost; each cluster publishes to exchanges of its own."""

    def __init__(self) -> None:
        super().__init__(
            "rabbitmq",
            lacks={
                LATE_SUBSCRIBER: (
                    "a queue exists only once a subscription (or a target naming "
                    "a queue) declared it; the broker drops what was published "
                    "before, and a mandatory publish fails instead"
                )
            },
        )
        self._names: dict[str, set[tuple[str, str]]] = {}

    def clients(self, ns: str, names: list[str]) -> dict[str, Any]:
        return {name: {"url": RABBITMQ_URL} for name in names}

    def target(self, ns: str, client: str, topic: str) -> dict[str, Any]:
        self._names.setdefault(ns, set()).add((f"{ns}.{client}.{topic}", ""))
        return {"exchange": f"{ns}.{client}.{topic}"}

    def subscription_options(
        self, ns: str, client: str, topic: str, sub_id: str
    ) -> dict[str, Any]:
        self._names.setdefault(ns, set()).add((f"{ns}.{client}.{topic}", sub_id))
        return {}

    def cleanup(self, ns: str) -> None:
        asyncio.run(_rabbit_cleanup(self._names.pop(ns, set())))


async def _rabbit_cleanup(names: set[tuple[str, str]]) -> None:
    import aio_pika

    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        for exchange, sub_id in sorted(names):
            if sub_id:
                await channel.queue_delete(f"{exchange}.{sub_id}")
            else:
                await channel.exchange_delete(exchange)
    finally:
        await connection.close()


KitFactory = Callable[[], Kit]
