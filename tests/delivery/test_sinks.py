"""Dead-letter sinks: files, PostgreSQL, producer, hybrid, and their checks."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from duct_messaging import halt, init
from duct_messaging.messaging._deadletter_files import JsonLinesStore
from duct_messaging.messaging._deadletter_postgres import PostgresStore
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterStatus,
    dead_letter_id,
)
from duct_messaging.messaging.deadletter_sinks import HybridSink, ProducerSink
from duct_messaging.system import ConfigError, InitError, Ref
from duct_messaging.transports.memory import MemoryBroker, MemoryProducer

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def letter(**fields: Any) -> DeadLetter:
    values: dict[str, Any] = {
        "body": b'{"n": 1}',
        "headers": {"x-message-id": "m-1", "content-type": "application/json"},
        "topic": "orders",
        "subscription": "orders-worker",
        "client": "kafka-primary",
        "source": "kafka",
        "destination": "core.orders",
        "attempts": 3,
        "status": DeadLetterStatus.ELIGIBLE,
        "error_type": "builtins.RuntimeError",
        "error_message": "boom",
        "error_traceback": "Traceback...\nRuntimeError: boom\n",
        "first_failure_at": T0,
        "last_failure_at": T0 + timedelta(seconds=1),
        "partition": 2,
        "position": 41,
        "key": b"\xffkey",
        "id": "dl-1",
    }
    values.update(fields)
    return DeadLetter(**values)


class TestDeadLetter:
    def test_record_round_trip_keeps_binary_body_and_key(self) -> None:
        """A dead letter survives `to_record`/`from_record`, binary parts included."""
        original = letter(body=b"\xff\x00raw")

        again = DeadLetter.from_record(original.to_record())

        assert again == original

    def test_id_is_stable_for_one_delivery(self) -> None:
        """The same delivery gets the same id; another position gets another."""
        one = dead_letter_id("sub", "c", "t", 0, 7, "m")

        assert one == dead_letter_id("sub", "c", "t", 0, 7, "m")
        assert one != dead_letter_id("sub", "c", "t", 0, 8, "m")
        assert dead_letter_id("sub", "c", "t", None, None, None) != dead_letter_id(
            "sub", "c", "t", None, None, None
        )


class TestJsonLinesStore:
    async def test_round_trip_and_filters(self, tmp_path: Path) -> None:
        """Written dead letters read back whole, filtered by topic, status and id."""
        store = JsonLinesStore(tmp_path / "dl")
        first = letter()
        poison = letter(id="p-1", status=DeadLetterStatus.POISON, topic="other/topic")

        await store.write(first)
        await store.write(poison)

        assert await store.read() == [first, poison]
        assert await store.read(topic="orders") == [first]
        assert await store.read(status=DeadLetterStatus.POISON) == [poison]
        assert await store.read(ids=["p-1"]) == [poison]
        assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == [
            "orders.jsonl",
            "other_topic.jsonl",
        ]

    async def test_same_id_is_kept_once_across_writers(self, tmp_path: Path) -> None:
        """Two stores on one directory writing one id keep a single copy."""
        one, two = JsonLinesStore(tmp_path), JsonLinesStore(tmp_path)

        await one.write(letter())
        await one.write(letter())
        await two.write(letter(attempts=9))

        [kept] = await JsonLinesStore(tmp_path).read()
        assert kept.attempts == 3

    async def test_mark_changes_status_and_counts_known_ids(
        self, tmp_path: Path
    ) -> None:
        """Marking appends a status line; unknown ids are not counted."""
        store = JsonLinesStore(tmp_path)
        await store.write(letter())

        count = await store.mark([letter().id, "nope"], DeadLetterStatus.REPLAYED)

        assert count == 1
        [marked] = await store.read()
        assert marked.status is DeadLetterStatus.REPLAYED

    async def test_torn_last_line_is_skipped(self, tmp_path: Path) -> None:
        """A line cut short by a crash does not hide the others."""
        store = JsonLinesStore(tmp_path)
        await store.write(letter())
        with (tmp_path / "orders.jsonl").open("a") as file:
            file.write('{"kind": "dead_letter", "id": "x", "bo')

        assert [dl.id for dl in await store.read()] == [letter().id]


@pytest.mark.postgres
class TestPostgresStore:
    async def test_creates_its_table_and_reads_back(self, pg_conninfo: str) -> None:
        """The table is created if missing; every field reads back."""
        table = f"dl_{uuid.uuid4().hex[:8]}"
        store = PostgresStore(pg_conninfo, table=table)
        await store.open()
        try:
            first = letter()
            poison = letter(id="p-1", status=DeadLetterStatus.POISON, position="3-0")

            await store.write(first)
            await store.write(first)
            await store.write(poison)

            assert await store.read() == [first, poison]
            assert await store.read(status=DeadLetterStatus.POISON) == [poison]
            assert await store.read(topic="none") == []
            assert await store.mark(["p-1", "nope"], DeadLetterStatus.REPLAYED) == 1
            [marked] = await store.read(ids=["p-1"])
            assert marked.status is DeadLetterStatus.REPLAYED
        finally:
            await store.close()

    async def test_a_broken_connection_fails_one_call_then_reconnects(
        self, pg_conninfo: str
    ) -> None:
        """After the server dropped the connection, the next call connects again."""
        app = f"dlq-{uuid.uuid4().hex[:8]}"
        store = PostgresStore(
            f"{pg_conninfo}?application_name={app}", table="dl_reconnect"
        )
        await store.open()
        try:
            async with await psycopg.AsyncConnection.connect(
                pg_conninfo, autocommit=True
            ) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s",
                    [app],
                )

            with pytest.raises(psycopg.OperationalError):
                await store.write(letter())
            await store.write(letter())

            assert [dl.id for dl in await store.read()] == [letter().id]
        finally:
            await store.close()

    def test_component_starts_from_config(self, pg_conninfo: str) -> None:
        """`duct.deadletter/postgres` opens the store on the system's loop."""
        table = f"ops.dl_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_conninfo, autocommit=True) as conn:
            conn.execute("CREATE SCHEMA IF NOT EXISTS ops")
        system = init(
            {"duct.deadletter/postgres": {"conninfo": pg_conninfo, "table": table}}
        )
        try:
            store = system["duct.deadletter/postgres"]
            assert system.loop is not None
            asyncio.run_coroutine_threadsafe(store.write(letter()), system.loop).result(
                10
            )
        finally:
            halt(system)
        with psycopg.connect(pg_conninfo) as conn:
            [(count,)] = conn.execute(f"SELECT count(*) FROM {table}").fetchall()
        assert count == 1


class TestProducerSink:
    async def test_publishes_to_topic_dl_on_the_client_it_came_from(self) -> None:
        """Body and key stay; failure details travel in `x-dead-letter-*` headers."""
        brokers = {name: MemoryBroker(name) for name in ("kafka-primary", "kafka-data")}
        sink = ProducerSink({n: MemoryProducer(n, b) for n, b in brokers.items()})

        await sink.write(letter(client="kafka-data"))

        [published] = brokers["kafka-data"].take("orders.dl", "probe", 10)
        assert brokers["kafka-primary"].messages("orders.dl") == []
        assert published.body == b'{"n": 1}'
        assert published.key == b"\xffkey"
        assert published.headers["x-message-id"] == "m-1"
        assert published.headers["x-dead-letter-subscription"] == "orders-worker"
        assert published.headers["x-dead-letter-attempts"] == "3"
        assert published.headers["x-dead-letter-partition"] == "2"
        assert published.headers["x-dead-letter-error-message"] == "boom"

    async def test_subscription_config_picks_the_topic_and_client(self) -> None:
        """A subscription's `deadletter` section overrides the sink's defaults."""
        brokers = {name: MemoryBroker(name) for name in ("kafka-primary", "ops")}
        sink = ProducerSink(
            {n: MemoryProducer(n, b) for n, b in brokers.items()}, topic="dl.{topic}"
        )

        await sink.write(letter())
        await sink.write(
            letter(id="2", config={"client": "ops", "topic": "{destination}.failed"})
        )

        assert len(brokers["kafka-primary"].messages("dl.orders")) == 1
        assert len(brokers["ops"].messages("core.orders.failed")) == 1


class TestHybridSink:
    async def test_storage_is_written_before_a_failing_publish(
        self, tmp_path: Path
    ) -> None:
        """The stored copy exists even when publishing fails; the write still fails."""
        store = JsonLinesStore(tmp_path)
        sink = HybridSink(store, ProducerSink({}))

        with pytest.raises(KeyError, match="kafka-primary"):
            await sink.write(letter())

        assert [dl.id for dl in await sink.read()] == [letter().id]
        assert await sink.mark([letter().id], DeadLetterStatus.REPLAYED) == 1


class TestChecks:
    def test_sink_configs_are_checked_before_anything_starts(self) -> None:
        """Every sink problem is reported at once."""
        config = {
            "duct.deadletter/storage": {},
            "duct.deadletter/postgres": {"table": "bad name"},
            "duct.deadletter/producer": {"topic": "{nope}.dl"},
            "duct.deadletter/hybrid": {"storage": Ref("duct.deadletter/storage")},
        }

        with pytest.raises(ConfigError) as caught:
            init(config)

        text = "\n".join(caught.value.problems)
        assert "directory: missing" in text
        assert "conninfo: missing" in text
        assert "table: expected a name" in text
        assert "producers: missing" in text
        assert "'{nope}.dl' is not a valid template" in text
        assert "producer: missing" in text

    def test_producer_sink_refuses_an_unknown_client(self) -> None:
        """A configured client without a producer fails init, naming the known ones."""
        config = {
            "duct.memory/clients": {"mem": {}},
            "duct.memory/producers": {"clients": Ref("duct.memory/clients")},
            "duct.messaging/producers": [Ref("duct.memory/producers")],
            "duct.deadletter/producer": {
                "producers": Ref("duct.messaging/producers"),
                "client": "ops",
            },
        }

        with pytest.raises(InitError, match=r"duct\.deadletter/producer") as caught:
            init(config)

        assert "Known clients: mem" in str(caught.value.__cause__)
