"""Stores other than PostgreSQL, the stored document, and store settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest

from duct_messaging.messaging import _deferred_payload as payload
from duct_messaging.messaging._deferred_store import parse_store, store_problems
from duct_messaging.messaging.deferred import (
    DeferredConfigError,
    DeferredScheduler,
    MemoryStoreRefusedError,
)
from duct_messaging.transports.base import OutgoingMessage, Target
from tests.deferred._support import ListProducer, make_message, pg_conninfo


def soon(seconds: float = 0.2) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


class TestSqliteStore:
    async def test_messages_survive_a_restart(self, tmp_path: Path) -> None:
        """A SQLite file keeps undelivered messages; the next start delivers them."""
        store = {"sqlite": str(tmp_path / "var" / "deferred.sqlite")}
        first = DeferredScheduler({"rec": ListProducer()}, store, poll_interval_s=0.2)
        await first.start()
        message = make_message()
        await first.schedule(message, [Target("rec")], soon(0.5))
        await first.aclose()

        producer = ListProducer()
        second = DeferredScheduler({"rec": producer}, store, poll_interval_s=0.2)
        await second.start()
        try:
            pending = await second.pending()
            [(_, sent, _)] = await producer.wait_for(1)
        finally:
            await second.aclose()

        assert [p.topic for p in pending] == ["orders"]
        assert sent == message

    async def test_default_store_is_a_sqlite_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without `store`, messages go to var/deferred.sqlite under the cwd."""
        monkeypatch.chdir(tmp_path)
        producer = ListProducer()
        scheduler = DeferredScheduler({"rec": producer}, poll_interval_s=0.2)
        await scheduler.start()
        try:
            await scheduler.schedule(make_message(), [Target("rec")], soon())
            await producer.wait_for(1)
        finally:
            await scheduler.aclose()

        assert scheduler.store.kind == "sqlite"
        assert (tmp_path / "var" / "deferred.sqlite").is_file()


class TestMemoryStore:
    def test_memory_store_is_refused_without_the_flag(self) -> None:
        """The error says why a memory store is refused and what to use."""
        with pytest.raises(
            MemoryStoreRefusedError, match="loses every pending message"
        ):
            DeferredScheduler({"rec": ListProducer()}, {"memory": True})

    def test_memory_store_is_refused_from_config(self) -> None:
        """The component's settings refuse it the same way."""
        value = {"producers": {"rec": ListProducer()}, "store": {"memory": True}}

        with pytest.raises(MemoryStoreRefusedError, match="allow_memory_store: true"):
            DeferredScheduler.from_config(value)

    async def test_memory_store_works_when_allowed(self) -> None:
        """With allow_memory_store the scheduler delivers from memory."""
        producer = ListProducer()
        scheduler = DeferredScheduler(
            {"rec": producer}, {"memory": True}, allow_memory_store=True
        )
        await scheduler.start()
        try:
            await scheduler.schedule(make_message(), [Target("rec")], soon())
            assert len(await producer.wait_for(1)) == 1
        finally:
            await scheduler.aclose()


class TestStoredDocument:
    def test_document_round_trips_bytes_headers_and_targets(self) -> None:
        """Body and key bytes, headers and target options come back unchanged."""
        message = OutgoingMessage(
            "orders", bytes(range(256)), {"_apscheduler_json": "x", "a": "b"}, b"\x00k"
        )
        targets = [Target("a", {"kafka_topic": "t", "n": [1, {"x": None}]})]
        item = payload.DeferredMessage.new(message, targets, soon())

        back = payload.decode(payload.encode(item))

        assert back == item

    def test_document_is_plain_json(self) -> None:
        """What is stored is a versioned JSON document, no Python objects."""
        item = payload.DeferredMessage.new(make_message(), [Target("a")], soon())

        document = orjson.loads(payload.encode(item))

        assert document["v"] == payload.VERSION
        assert set(document) == {
            "v", "id", "topic", "body", "key", "headers", "targets", "due",
            "run_at", "attempt", "first_failure_at", "last_error",
        }  # fmt: skip

    def test_unknown_version_is_refused(self) -> None:
        """A document from a newer release is not misread."""
        item = payload.DeferredMessage.new(make_message(), [Target("a")], soon())
        document = orjson.loads(payload.encode(item))
        document["v"] = 99

        with pytest.raises(payload.DeferredPayloadError, match="version 99"):
            payload.decode(orjson.dumps(document).decode())

    @pytest.mark.postgres
    async def test_postgres_row_holds_the_document_as_json(
        self, pg_store: dict[str, Any], pg_database: str
    ) -> None:
        """The schedule row of a message carries our JSON document, not a pickle."""
        scheduler = DeferredScheduler({"rec": ListProducer()}, pg_store)
        await scheduler.start()
        deferred_id = await scheduler.schedule(
            make_message(), [Target("rec")], soon(60)
        )
        await scheduler.aclose()

        async with await psycopg.AsyncConnection.connect(
            pg_conninfo(pg_database)
        ) as conn:
            cursor = await conn.execute(
                f"SELECT kwargs FROM {pg_store['schema']}.schedules WHERE id = %s",
                [deferred_id],
            )
            row = await cursor.fetchone()

        assert row is not None
        kwargs = orjson.loads(row[0])
        assert payload.decode(kwargs["deferred"]).id == deferred_id


class TestStoreSettings:
    def test_postgres_url_gets_the_psycopg_driver(self) -> None:
        """A plain postgresql:// URL is used through psycopg, with default names."""
        spec = parse_store({"url": "postgresql://u:secret@db:5432/app"})

        assert spec.url == "postgresql+psycopg://u:secret@db:5432/app"
        assert (spec.schema, spec.channel) == ("duct_deferred", "duct_deferred")
        assert "secret" not in spec.describe()

    @pytest.mark.parametrize(
        ("store", "problem"),
        [
            ("postgres", "store: expected a mapping"),
            ({}, "store: give exactly one of url, sqlite or memory (found none"),
            ({"url": "x", "sqlite": "y"}, "found url, sqlite"),
            ({"url": "postgresql+asyncpg://db/app"}, "driver 'postgresql+asyncpg'"),
            ({"url": "not a url"}, "store.url: not a database URL"),
            ({"sqlite": ""}, "store.sqlite: expected a file path"),
            ({"sqlite": "x", "schema": "s"}, "store.schema: not a setting"),
            ({"memory": "yes"}, "store.memory: expected true"),
            ({"url": "postgresql://db/a", "channel": "a b"}, "store.channel"),
        ],
    )
    def test_bad_store_settings_are_named(self, store: Any, problem: str) -> None:
        """Each problem starts with the path of the setting at fault."""
        problems = list(store_problems(store))

        assert any(problem in p for p in problems), problems
        with pytest.raises(DeferredConfigError):
            DeferredScheduler({"rec": ListProducer()}, store)
