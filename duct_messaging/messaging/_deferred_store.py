"""Where deferred messages live: PostgreSQL, a SQLite file, or memory.

PostgreSQL is the store several app instances share: APScheduler's
SQLAlchemy data store over psycopg keeps the messages, and its psycopg
event broker (LISTEN/NOTIFY) wakes every instance when one of them adds a
message. A SQLite file serves one instance (the embedded default). Memory
loses everything when the process stops and is only for tests.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
from apscheduler import ConflictPolicy, Event, Job, JobAdded, Schedule, ScheduleAdded
from apscheduler.abc import DataStore, EventBroker
from apscheduler.datastores.memory import MemoryDataStore
from apscheduler.datastores.sqlalchemy import SQLAlchemyDataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.eventbrokers.psycopg import PsycopgEventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.date import DateTrigger
from sqlalchemy import Engine, create_engine, exists
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from duct_messaging.messaging import _deferred_payload as payload
from duct_messaging.transports.base import Target

#: The APScheduler tasks deferred messages run as: `TASK_ID/0` ... `TASK_ID/n`.
TASK_ID = "duct.messaging/deferred"

#: Messages are spread over this many tasks. APScheduler locks and updates
#: its task row on every job it hands out and releases (a running-job
#: counter), so one task would make every delivery of every instance wait
#: for the same row lock.
TASK_SHARDS = 16


def task_ids() -> list[str]:
    """Return the ids of every task deferred messages run as."""
    return [f"{TASK_ID}/{shard}" for shard in range(TASK_SHARDS)]


def task_for(deferred_id: str) -> str:
    """Return the task a message runs as (stable for its retries)."""
    shard = int(hashlib.blake2b(deferred_id.encode(), digest_size=2).hexdigest(), 16)
    return f"{TASK_ID}/{shard % TASK_SHARDS}"


def is_deferred_task(task_id: str) -> bool:
    """Return whether `task_id` is one of the deferred-delivery tasks."""
    return task_id.startswith(f"{TASK_ID}/")


#: The keyword argument of the task that carries the stored document.
DOCUMENT_ARG = "deferred"

#: APScheduler logs through this logger. It logs an INFO line per job, so
#: it starts at WARNING; lower it to debug the scheduler itself.
APSCHEDULER_LOG = logging.getLogger("duct_messaging.deferred.apscheduler")
if APSCHEDULER_LOG.level == logging.NOTSET:
    APSCHEDULER_LOG.setLevel(logging.WARNING)

DEFAULT_SQLITE_PATH = "var/deferred.sqlite"
DEFAULT_PG_SCHEMA = "duct_deferred"

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")
_PG_DRIVERS = ("postgresql", "postgresql+psycopg", "postgres")


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """A parsed `store` setting.

    `kind` is `postgresql`, `sqlite` or `memory`. For PostgreSQL, `url` is
    the SQLAlchemy URL (always `postgresql+psycopg`), `schema` the database
    schema holding the tables, and `channel` the NOTIFY channel; both
    default to `duct_deferred` so two apps sharing a database but not a
    store pick distinct names.
    """

    kind: str
    url: str | None = None
    schema: str | None = None
    channel: str | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        problems = list(_spec_problems(self))
        if problems:
            # Imported here: the settings module imports this one.
            from duct_messaging.messaging._deferred_config import DeferredConfigError

            raise DeferredConfigError(problems)

    @property
    def shared(self) -> bool:
        """Return whether several instances may share this store."""
        return self.kind == "postgresql"

    def describe(self) -> str:
        """Return the store for humans, with any password hidden."""
        if self.kind == "postgresql":
            url = make_url(_given(self.url)).render_as_string(hide_password=True)
            return f"{url} (schema {self.schema})"
        if self.kind == "sqlite":
            return f"sqlite file {self.path}"
        return "memory"


_KINDS = ("postgresql", "sqlite", "memory")


def _spec_problems(spec: StoreSpec) -> Iterator[str]:
    if spec.kind not in _KINDS:
        yield f"store: {spec.kind!r} is not a store kind (one of {', '.join(_KINDS)})"
    elif spec.kind == "postgresql":
        for name in ("url", "schema", "channel"):
            if not getattr(spec, name):
                yield f"store.{name}: missing for a PostgreSQL store"
    elif spec.kind == "sqlite" and not spec.path:
        yield "store.sqlite: missing the SQLite file path"


def _given(value: str | None) -> str:
    # `StoreSpec.__post_init__` made sure the field a store kind needs is set.
    return value or ""


def parse_store(value: Any) -> StoreSpec:
    """Return the `StoreSpec` for a `store` setting; see `store_problems`.

    `None` selects the embedded default, a SQLite file at
    `var/deferred.sqlite`. Raises `ValueError` listing the problems.
    """
    problems = list(store_problems(value))
    if problems:
        raise ValueError("; ".join(problems))

    if value is None:
        return StoreSpec("sqlite", path=DEFAULT_SQLITE_PATH)
    if "memory" in value:
        return StoreSpec("memory")
    if "sqlite" in value:
        return StoreSpec("sqlite", path=str(value["sqlite"]))

    url = make_url(value["url"]).set(drivername="postgresql+psycopg")
    schema = value.get("schema") or DEFAULT_PG_SCHEMA
    channel = value.get("channel") or schema
    return StoreSpec(
        "postgresql",
        url=url.render_as_string(hide_password=False),
        schema=schema,
        channel=channel,
    )


def store_problems(value: Any, path: str = "store") -> Iterator[str]:
    """Yield the problems of a `store` setting, each starting with its path."""
    if value is None:
        return
    if not isinstance(value, Mapping):
        yield f"{path}: expected a mapping with one of url, sqlite or memory"
        return

    kinds = [name for name in ("url", "sqlite", "memory") if name in value]
    if len(kinds) != 1:
        found = ", ".join(kinds) or "none of them"
        yield f"{path}: give exactly one of url, sqlite or memory (found {found})"
        return
    known = {"url": {"url", "schema", "channel"}, "sqlite": {"sqlite"}}
    allowed = known.get(kinds[0], {"memory"})
    for name in sorted(set(value) - allowed):
        yield f"{path}.{name}: not a setting of a {kinds[0]} store"

    if "memory" in value and value["memory"] is not True:
        yield f"{path}.memory: expected true"
    if "sqlite" in value and not _nonempty_str(value["sqlite"]):
        yield f"{path}.sqlite: expected a file path"
    if "url" in value:
        yield from _url_problems(value["url"], f"{path}.url")
    for name in ("schema", "channel"):
        if name in value and not (
            isinstance(value[name], str) and _IDENTIFIER.fullmatch(value[name])
        ):
            yield (
                f"{path}.{name}: expected a lowercase SQL identifier "
                f"(letters, digits, _), got {value[name]!r}"
            )


def _url_problems(url: Any, path: str) -> Iterator[str]:
    if not _nonempty_str(url):
        yield f"{path}: expected a postgresql+psycopg:// URL"
        return
    try:
        parsed = make_url(url)
    except ArgumentError:
        yield f"{path}: not a database URL: {url!r}"
        return
    if parsed.drivername not in _PG_DRIVERS:
        yield (
            f"{path}: the shared store needs PostgreSQL through psycopg "
            f"(postgresql+psycopg://...), got driver {parsed.drivername!r}"
        )


def _nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


class SharedEventBroker(PsycopgEventBroker):
    """The psycopg event broker, sending other instances only what they act on.

    APScheduler publishes five events per message (schedule added and
    updated, job added, acquired and released), and the stock broker sends
    each through NOTIFY to every instance, which decodes it and wakes up.
    Only two matter elsewhere: a new schedule may be due before the time
    another instance sleeps until, and a new job is work any instance may
    take. The rest stay in this process.
    """

    async def publish(self, event: Event) -> None:
        """NOTIFY every instance of `event`, or only this one."""
        if isinstance(event, _SHARED_EVENTS):
            await super().publish(event)
        else:
            await self.publish_local(event)


_SHARED_EVENTS = (ScheduleAdded, JobAdded)


@dataclass(slots=True)
class OpenedStore:
    """The data store and event broker for a spec, plus the engine behind them."""

    data_store: DataStore
    event_broker: EventBroker
    engine: Engine | AsyncEngine | None = None


def open_store(spec: StoreSpec, stack: AsyncExitStack) -> OpenedStore:
    """Build the data store and event broker for `spec`; nothing connects yet.

    The engine is disposed when `stack` closes. Data are serialized as
    JSON, never pickled: what is stored is data, readable by any version.
    """
    if spec.kind == "memory":
        return OpenedStore(MemoryDataStore(), LocalEventBroker())

    engine: Engine | AsyncEngine
    broker: EventBroker
    if spec.kind == "sqlite":
        path = _given(spec.path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One pooled connection: the store runs the sync sqlite3 driver in
        # worker threads, and two connections writing at once fail with
        # "database is locked" (seen with APScheduler 4.0.0a6).
        engine = create_engine(
            URL.create("sqlite", database=path),
            pool_size=1,
            max_overflow=0,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        stack.callback(engine.dispose)
        broker = LocalEventBroker()
    else:
        engine = create_async_engine(_given(spec.url))
        stack.push_async_callback(engine.dispose)
        broker = SharedEventBroker(libpq_conninfo(spec), channel=_given(spec.channel))

    store = SQLAlchemyDataStore(engine, schema=spec.schema, serializer=JSONSerializer())
    return OpenedStore(store, broker, engine)


def libpq_conninfo(spec: StoreSpec) -> str:
    """Return the libpq connection string psycopg uses for `spec`."""
    url = make_url(_given(spec.url)).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


@asynccontextmanager
async def schema_lock(spec: StoreSpec) -> AsyncIterator[None]:
    """Hold a PostgreSQL advisory lock while the store creates its tables.

    Two instances creating the schema at the same moment can fail on
    `CREATE TYPE` (the enum types of APScheduler's tables), so creation is
    serialised per schema. Does nothing for stores that are not shared.
    """
    if not spec.shared:
        yield
        return

    key = _lock_key(f"duct_deferred_schema:{spec.schema}")
    conn = await psycopg.AsyncConnection.connect(libpq_conninfo(spec), autocommit=True)
    try:
        await conn.execute("SELECT pg_advisory_lock(%s)", [key])
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await conn.close()


def _lock_key(name: str) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def add_message(
    store: DataStore,
    item: payload.DeferredMessage,
    schedule_id: str,
    document: str,
    conflict: ConflictPolicy,
) -> None:
    """Store `document` (the encoding of `item`) to run at `item.run_at`.

    `conflict` says what happens when `schedule_id` is already stored.
    """
    trigger = DateTrigger(item.run_at)
    options: dict[str, Any] = {
        "kwargs": {DOCUMENT_ARG: document},
        # Never let APScheduler skip a late job: lateness is ours to
        # judge (grace_s), and a skipped job would vanish without trace.
        "misfire_grace_time": None,
        "job_executor": "async",
        "job_result_expiration_time": 0,
    }
    schedule = Schedule(
        id=schedule_id, task_id=task_for(item.id), trigger=trigger, **options
    )
    schedule.next_fire_time = trigger.next()
    await store.add_schedule(schedule, conflict)


async def sweep_finished(store: DataStore) -> None:
    """Delete schedules that fired and have no job left.

    APScheduler's own `cleanup()` would do this too, but it also releases
    jobs whose lease expired as "abandoned", which deletes them: a message
    whose instance died mid-delivery would be lost instead of re-delivered.
    So the scheduler runs with clean-up off and this sweep instead.
    """
    if isinstance(store, MemoryDataStore):
        # In memory nobody else can hold a lease, so cleanup() is safe.
        await store.cleanup()
        return
    if not isinstance(store, SQLAlchemyDataStore):
        return

    tables = store.get_table_definitions().tables
    prefix = f"{store.schema}." if store.schema else ""
    schedules = tables[f"{prefix}schedules"]
    jobs = tables[f"{prefix}jobs"]
    statement = schedules.delete().where(
        schedules.c.next_fire_time.is_(None),
        schedules.c.acquired_by.is_(None),
        ~exists().where(jobs.c.schedule_id == schedules.c.id),
    )
    engine = store.engine_or_url
    if isinstance(engine, AsyncEngine):
        async with engine.begin() as conn:
            await conn.execute(statement)
    elif isinstance(engine, Engine):
        sync_engine = engine

        def run() -> None:
            with sync_engine.begin() as conn:
                conn.execute(statement)

        await anyio.to_thread.run_sync(run)


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A deferred message not delivered yet, as `deferred list` shows it.

    `state` is `scheduled` (its time has not come), `due` (its time came and
    an instance will deliver it) or `delivering` (an instance holds it).
    """

    id: str
    topic: str
    targets: tuple[Target, ...]
    due: datetime
    attempt: int
    state: str


async def read_pending(store: DataStore) -> list[PendingMessage]:
    """Return the messages of a started `store` not delivered yet, by due time."""
    found: dict[tuple[str, int], PendingMessage] = {}
    for schedule in await store.get_schedules():
        if is_deferred_task(schedule.task_id) and schedule.next_fire_time is not None:
            item = _pending(schedule, "scheduled")
            if item is not None:
                found[(item.id, item.attempt)] = item
    for job in await store.get_jobs():
        if is_deferred_task(job.task_id):
            state = "delivering" if job.acquired_by else "due"
            item = _pending(job, state)
            if item is not None:
                found[(item.id, item.attempt)] = item
    return sorted(found.values(), key=lambda item: (item.due, item.id))


def _pending(entry: Schedule | Job, state: str) -> PendingMessage | None:
    document = entry.kwargs.get(DOCUMENT_ARG)
    if not isinstance(document, str):
        return None
    try:
        stored = payload.decode(document)
    except payload.DeferredPayloadError:
        return None
    return PendingMessage(
        id=stored.id,
        topic=stored.message.topic,
        targets=stored.targets,
        due=stored.run_at,
        attempt=stored.attempt,
        state=state,
    )


async def list_pending(spec: StoreSpec) -> list[PendingMessage]:
    """Open the store of `spec` (without delivering anything) and list it."""
    async with AsyncExitStack() as stack:
        opened = open_store(spec, stack)
        broker = LocalEventBroker()
        await broker.start(stack, APSCHEDULER_LOG)
        async with schema_lock(spec):
            await opened.data_store.start(stack, broker, APSCHEDULER_LOG)
        return await read_pending(opened.data_store)
