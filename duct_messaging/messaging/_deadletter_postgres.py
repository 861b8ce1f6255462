"""A dead-letter store in a PostgreSQL table, through async psycopg.

The table (default `duct_dead_letters`, optionally schema-qualified) is
created if missing when the component starts. One connection serves the
store; a broken connection is dropped and the next call connects again, so
a database restart costs the writes made while it was down (those messages
stay unacknowledged and are delivered again), nothing more. Writing an id
that is already stored changes nothing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import structlog

from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging._config_check import ANY, Field, Fields, as_schema, text
from duct_messaging.messaging.deadletter import DeadLetter, DeadLetterStatus
from duct_messaging.messaging.deadletter_sinks import STORE_TYPE
from duct_messaging.system import CheckContext, component

try:
    import psycopg
    from psycopg import sql
    from psycopg.types.json import Jsonb
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError(
        "The PostgreSQL dead-letter store", "postgres", "psycopg"
    ) from exc

log = structlog.get_logger(__name__)

DEFAULT_TABLE = "duct_dead_letters"
CONNECT_TIMEOUT_S = 10
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_COLUMNS = (
    "id",
    "status",
    "topic",
    "subscription",
    "client",
    "source",
    "destination",
    "partition",
    "position",
    "attempts",
    "error_type",
    "error_message",
    "error_traceback",
    "first_failure_at",
    "last_failure_at",
    "body",
    "headers",
    "message_key",
)
_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
    "id" text PRIMARY KEY,
    "status" text NOT NULL,
    "topic" text NOT NULL,
    "subscription" text NOT NULL,
    "client" text NOT NULL,
    "source" text NOT NULL,
    "destination" text NOT NULL,
    "partition" integer,
    "position" text,
    "attempts" integer NOT NULL,
    "error_type" text NOT NULL,
    "error_message" text NOT NULL,
    "error_traceback" text NOT NULL,
    "first_failure_at" timestamptz NOT NULL,
    "last_failure_at" timestamptz NOT NULL,
    "body" bytea NOT NULL,
    "headers" jsonb NOT NULL,
    "message_key" bytea,
    "created_at" timestamptz NOT NULL DEFAULT now(),
    "updated_at" timestamptz NOT NULL DEFAULT now()
)
"""
_INDEX = 'CREATE INDEX IF NOT EXISTS {index} ON {table} ("topic", "status")'


def table_problems(table: Any) -> list[str]:
    """Return the problems of a `table` setting (`name` or `schema.name`)."""
    if not isinstance(table, str) or not all(
        _IDENTIFIER.match(part) for part in table.split(".")
    ):
        return [
            f"table: expected a name like 'dead_letters' or 'ops.dead_letters', "
            f"got {table!r}"
        ]
    if table.count(".") > 1:
        return [f"table: at most one schema prefix, got {table!r}"]
    return []


class PostgresStore:
    """Dead letters in one PostgreSQL table; see the module docstring.

    Bound to the event loop that opened it: call it from that loop only.
    """

    def __init__(self, conninfo: str, *, table: str = DEFAULT_TABLE) -> None:
        self.conninfo = conninfo
        self.table = table
        parts = table.split(".")
        self._table = sql.Identifier(*parts)
        self._index = sql.Identifier(f"{parts[-1]}_topic_status_idx")
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<PostgresStore table={self.table}>"

    async def open(self) -> None:
        """Connect and create the table if it does not exist."""
        async with self._lock:
            conn = await self._connection()
            try:
                await conn.execute(sql.SQL(_DDL).format(table=self._table))
                await conn.execute(
                    sql.SQL(_INDEX).format(index=self._index, table=self._table)
                )
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
                pass  # another process created it at the same moment

    async def close(self) -> None:
        """Close the connection; a later call connects again."""
        async with self._lock:
            if self._conn is not None:
                await self._conn.close()
                self._conn = None

    async def write(self, dead_letter: DeadLetter) -> None:
        """Insert `dead_letter` (nothing happens if its id is stored)."""
        record = dead_letter.to_record()
        values = [
            dead_letter.id,
            str(dead_letter.status),
            dead_letter.topic,
            dead_letter.subscription,
            dead_letter.client,
            dead_letter.source,
            dead_letter.destination,
            dead_letter.partition,
            None if dead_letter.position is None else str(dead_letter.position),
            dead_letter.attempts,
            dead_letter.error_type,
            dead_letter.error_message,
            dead_letter.error_traceback,
            dead_letter.first_failure_at,
            dead_letter.last_failure_at,
            dead_letter.body,
            Jsonb(record["headers"]),
            dead_letter.key,
        ]
        query = sql.SQL(
            "INSERT INTO {table} ({columns}) VALUES ({values}) "
            'ON CONFLICT ("id") DO NOTHING'
        ).format(
            table=self._table,
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS),
            values=sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)),
        )
        await self._execute(query, values)

    async def read(
        self,
        *,
        topic: str | None = None,
        status: DeadLetterStatus | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[DeadLetter]:
        """Return the dead letters matching every given filter, oldest first."""
        where: list[sql.Composable] = []
        params: list[Any] = []
        if topic is not None:
            where.append(sql.SQL('"topic" = %s'))
            params.append(topic)
        if status is not None:
            where.append(sql.SQL('"status" = %s'))
            params.append(str(status))
        if ids is not None:
            where.append(sql.SQL('"id" = ANY(%s)'))
            params.append(list(ids))
        query = sql.SQL("SELECT {columns} FROM {table}{where} ORDER BY {order}").format(
            columns=sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS),
            table=self._table,
            where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where)
            if where
            else sql.SQL(""),
            order=sql.SQL('"last_failure_at", "id"'),
        )
        rows = await self._fetch(query, params)
        return [_dead_letter(dict(zip(_COLUMNS, row, strict=True))) for row in rows]

    async def mark(self, ids: Sequence[str], status: DeadLetterStatus) -> int:
        """Set the status of the dead letters `ids`; return how many exist."""
        query = sql.SQL(
            'UPDATE {table} SET "status" = %s, "updated_at" = now() '
            'WHERE "id" = ANY(%s)'
        ).format(table=self._table)
        return await self._execute(query, [str(status), list(ids)])

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        return self._conn

    async def _execute(self, query: sql.Composed, params: Sequence[Any]) -> int:
        async with self._lock:
            conn = await self._connection()
            try:
                cursor = await conn.execute(query, params)
            except psycopg.OperationalError:
                await self._drop(conn)
                raise
            count: int = cursor.rowcount
            return max(count, 0)

    async def _fetch(
        self, query: sql.Composed, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        async with self._lock:
            conn = await self._connection()
            try:
                cursor = await conn.execute(query, params)
                rows: list[tuple[Any, ...]] = await cursor.fetchall()
                return rows
            except psycopg.OperationalError:
                await self._drop(conn)
                raise

    async def _drop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = None
        try:
            await conn.close()
        except psycopg.Error:
            log.debug("dead_letter_store_close_failed", table=self.table)


def _dead_letter(row: dict[str, Any]) -> DeadLetter:
    position = row["position"]
    if isinstance(position, str) and position.lstrip("-").isdigit():
        position = int(position)
    return DeadLetter(
        id=row["id"],
        status=DeadLetterStatus(row["status"]),
        topic=row["topic"],
        subscription=row["subscription"],
        client=row["client"],
        source=row["source"],
        destination=row["destination"],
        partition=row["partition"],
        position=position,
        attempts=row["attempts"],
        error_type=row["error_type"],
        error_message=row["error_message"],
        error_traceback=row["error_traceback"],
        first_failure_at=row["first_failure_at"],
        last_failure_at=row["last_failure_at"],
        body=bytes(row["body"]),
        headers=dict(row["headers"] or {}),
        key=None if row["message_key"] is None else bytes(row["message_key"]),
    )


SETTINGS = Fields(
    {
        "conninfo": Field(
            text(),
            required=True,
            hint="e.g. 'postgresql://postgres@127.0.0.1:5432/app'",
        ),
        "table": ANY,  # checked by the hook: see `table_problems`
    },
    nullable=False,
)


@component(
    "duct.deadletter/postgres", derives_from=STORE_TYPE, schema=as_schema(SETTINGS)
)
async def postgres(value: Mapping[str, Any]) -> PostgresStore:
    """Return a started PostgreSQL dead-letter store.

    Value: `conninfo` (a libpq connection string or URL) and optional
    `table` (default `duct_dead_letters`), created if missing.
    """
    store = PostgresStore(
        str(value["conninfo"]), table=str(value.get("table") or DEFAULT_TABLE)
    )
    await store.open()
    return store


@postgres.halt
async def _halt_postgres(store: PostgresStore) -> None:
    await store.close()


@postgres.check
def _check_postgres(value: Any, ctx: CheckContext) -> Iterator[str]:
    # The schema reports the shape and `conninfo`.
    if isinstance(value, Mapping) and value.get("table") is not None:
        yield from table_problems(value["table"])
