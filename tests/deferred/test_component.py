"""The `duct.messaging/deferred` component inside a system, and its CLI."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from duct_messaging.cli import main
from duct_messaging.messaging.deferred import (
    DeferredNotConfiguredError,
    DeferredScheduler,
)
from duct_messaging.messaging.producer import DeferredReceipt
from duct_messaging.system import ConfigError, check_config, halt, init, read_config
from duct_messaging.transports.base import Target
from tests.deferred._support import ListProducer, make_message, wait_until

pytestmark = pytest.mark.postgres

SYSTEM = """
duct.memory/clients:
  primary: {{}}
duct.memory/producers:
  clients: !ref duct.memory/clients
duct.messaging/producers:
  - !ref duct.memory/producers
duct.messaging/routing:
  topics:
    order-created: {{}}
  publish:
    order-created:
      targets:
        - client: primary
          destination: {destination}
duct.messaging/deferred:
  producers: !ref duct.messaging/producers
  store: {store}
  lease_s: 5
  poll_interval_s: 0.2
duct.messaging/producer:
  routing: !ref duct.messaging/routing
  producers: !ref duct.messaging/producers
  deferred: !ref duct.messaging/deferred
"""


def system_config(store: dict[str, Any], destination: str) -> Any:
    return read_config(SYSTEM.format(store=json.dumps(store), destination=destination))


class TestInSystem:
    async def test_producer_defers_through_the_component(
        self, pg_store: dict[str, Any]
    ) -> None:
        """`produce(..., delay_ms=...)` stores the message; the broker gets it later."""
        destination = f"orders-{uuid.uuid4().hex[:8]}"
        system = init(system_config(pg_store, destination))
        try:
            scheduler = system["duct.messaging/deferred"]
            producer = system["duct.messaging/producer"]
            broker = system["duct.memory/clients"]["primary"]

            receipt = producer.produce(
                {"id": "o-1"}, topic="order-created", delay_ms=300
            )
            stored = broker.messages(destination)

            async def delivered() -> bool:
                return len(broker.messages(destination)) == 1

            await wait_until(delivered, within_s=10)
        finally:
            halt(system)

        assert isinstance(scheduler, DeferredScheduler)
        assert scheduler.state == "closed"
        assert isinstance(receipt, DeferredReceipt)
        assert receipt.targets == (Target("primary", {"destination": destination}),)
        assert stored == []
        assert json.loads(broker.messages(destination)[0]) == {"id": "o-1"}

    async def test_past_delivery_time_publishes_at_once(
        self, pg_store: dict[str, Any]
    ) -> None:
        """A delivery time that has passed is published by the call itself."""
        destination = f"orders-{uuid.uuid4().hex[:8]}"
        system = init(system_config(pg_store, destination))
        try:
            producer = system["duct.messaging/producer"]
            broker = system["duct.memory/clients"]["primary"]
            past = datetime.now(UTC) - timedelta(seconds=1)

            receipts = producer.produce(
                {"id": "o-2"}, topic="order-created", deliver_at_time=past
            )

            assert [r.client for r in receipts] == ["primary"]
            assert len(broker.messages(destination)) == 1
        finally:
            halt(system)

    def test_producer_without_scheduler_refuses_future_delivery(self) -> None:
        """No scheduler wired + a future time is an error, never an immediate send."""
        text = SYSTEM.format(store="{}", destination="d").split(
            "duct.messaging/deferred:"
        )[0]
        text += (
            "duct.messaging/producer:\n"
            "  routing: !ref duct.messaging/routing\n"
            "  producers: !ref duct.messaging/producers\n"
        )
        system = init(read_config(text))
        try:
            producer = system["duct.messaging/producer"]

            with pytest.raises(DeferredNotConfiguredError, match="'order-created'"):
                producer.produce({"id": 1}, topic="order-created", delay_ms=60_000)

            assert system["duct.memory/clients"]["primary"].messages("d") == []
        finally:
            halt(system)


class TestConfigCheck:
    def test_memory_store_is_refused_before_anything_starts(self) -> None:
        """A memory store without the flag is a config problem, with its path."""
        config = system_config({"memory": True}, "d")

        problems = check_config(config)

        assert any(
            "duct.messaging/deferred" in p and "store.memory" in p and "loses" in p
            for p in problems
        ), problems
        with pytest.raises(ConfigError, match="allow_memory_store"):
            init(config)

    def test_every_problem_is_reported_at_once(self) -> None:
        """Bad settings are all listed, each with its path inside the value."""
        config = read_config(
            """
duct.messaging/deferred:
  producers: {}
  store: {url: "mysql://db/app", schema: "Bad-Name"}
  concurrency: 0
  lease_s: 1
  poll_interval_s: 2
  delivery: {max_attempts: 0, backoff_s: 5, backoff_max_s: 1, jitter: true}
  retry: 3
"""
        )

        problems = "\n".join(check_config(config))

        for expected in (
            "store.url: the shared store needs PostgreSQL through psycopg",
            "store.schema: expected a lowercase SQL identifier",
            "concurrency: expected an integer >= 1",
            "poll_interval_s: 2 is not shorter than lease_s",
            "delivery.max_attempts: expected an integer >= 1",
            "delivery.backoff_max_s: 1 is below backoff_s",
            "delivery.jitter: unknown setting",
            "retry: unknown setting",
        ):
            assert expected in problems


class TestListCommand:
    async def test_list_shows_pending_messages(
        self,
        pg_store: dict[str, Any],
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """`deferred list` prints id, topic, targets and due time of each message."""
        scheduler = DeferredScheduler({"rec": ListProducer()}, pg_store)
        await scheduler.start()
        due = datetime(2099, 1, 2, 3, 4, 5, tzinfo=UTC)
        target = Target("rec", {"kafka_topic": "core.orders"})
        first = await scheduler.schedule(make_message("order-created"), [target], due)
        second = await scheduler.schedule(
            make_message("payment"), [Target("rec")], due + timedelta(hours=1)
        )
        await scheduler.aclose()
        capsys.readouterr()
        config = tmp_path / "system.yaml"
        config.write_text(
            "duct.messaging/deferred:\n"
            "  producers: !ref duct.messaging/producers\n"
            f"  store: !profile {{test: {json.dumps(pg_store)}, prod: {{sqlite: x}}}}\n"
        )

        code = await _run_cli(["deferred", "list", str(config), "--profile", "test"])

        out = capsys.readouterr().out.splitlines()
        assert code == 0
        assert out[0].split() == [
            "ID",
            "TOPIC",
            "TARGETS",
            "DUE",
            "(UTC)",
            "ATTEMPT",
            "STATE",
        ]
        assert out[1].split() == [
            first,
            "order-created",
            "rec(kafka_topic=core.orders)",
            "2099-01-02T03:04:05.000000Z",
            "1",
            "scheduled",
        ]
        assert out[2].split()[:3] == [second, "payment", "rec"]
        assert out[3] == "2 pending messages"

    async def test_list_refuses_a_memory_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A memory store lives in its process only; the command says so."""
        config = tmp_path / "system.yaml"
        config.write_text(
            "duct.messaging/deferred:\n  producers: {}\n  store: {memory: true}\n"
        )

        code = await _run_cli(["deferred", "list", str(config)])

        assert code == 2
        assert "can only be read by its own process" in capsys.readouterr().err


async def _run_cli(argv: list[str]) -> int:
    # The command runs its own event loop, so it runs off this one.
    import asyncio

    return await asyncio.to_thread(main, argv)
