"""The multi-transport example: one produce, copies on Kafka, Redis and NATS."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from duct_messaging.testing.tansu import TansuBroker

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "multi_transport" / "config.yaml"
# A database of its own, so a person running the example meanwhile on db 0
# does not share its consumer groups with the test.
REDIS_URL = "redis://127.0.0.1:6379/4"
NATS_URL = "nats://127.0.0.1:4222"
STREAM = "example.orders.created"
NATS_STREAM = "DUCT_EXAMPLE_ORDERS"


async def _forget_example_state() -> None:
    import nats
    import nats.js.errors
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.delete(STREAM)
    finally:
        await client.aclose()
    connection = await nats.connect(NATS_URL)
    try:
        await connection.jetstream().delete_stream(NATS_STREAM)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await connection.close()


@pytest.fixture
def clean_servers() -> Iterator[None]:
    """Start without the example's stream and NATS stream; remove them after."""
    asyncio.run(_forget_example_state())
    yield
    asyncio.run(_forget_example_state())


@pytest.mark.slow
@pytest.mark.usefixtures("clean_servers")
def test_one_produce_call_reaches_kafka_redis_and_nats() -> None:
    """Each order, published once, lands on three transports; every copy is handled."""
    with TansuBroker() as kafka:
        result = subprocess.run(
            [sys.executable, "-m", "duct_messaging.cli", "run", str(CONFIG)],
            env={
                **os.environ,
                "KAFKA_BOOTSTRAP_1": kafka.bootstrap_servers,
                "REDIS_URL": REDIS_URL,
                "NATS_URL": NATS_URL,
                "ORDERS_COUNT": "3",
            },
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )

    assert result.returncode == 0, result.stderr[-3000:]
    published = re.findall(
        r"published order (\S+) -> kafka:kafka-primary@\d+, "
        r"redis:redis-main@[\d-]+, nats:nats-main@\d+",
        result.stdout,
    )
    assert len(published) == 3
    for subscription, source, client in [
        ("orders-kafka", "kafka", "kafka-primary"),
        ("orders-redis", "redis", "redis-main"),
        ("orders-nats", "nats", "nats-main"),
    ]:
        handled = re.findall(
            rf"\[{subscription}\] order (\S+) via {source} client {client} ",
            result.stdout,
        )
        assert sorted(handled) == sorted(published), subscription
