"""The Redis Streams transport, on redis-py's asyncio client.

Wire format: one stream entry per message. Field `body` holds the encoded
message alone; field `key` holds the message key when there is one; every
header is a field of its own under its header name (`x-message-id`,
`x-topic`, `content-type`, `traceparent`, ...). A plain `XRANGE` shows the
metadata as it is; a header may not be named `body` or `key`.

Config:

    duct.redis/clients:
      redis-main:
        url: redis://127.0.0.1:6379/0
        maxlen: 100000          # optional: approximate trimming on every XADD
        claim_idle_ms: 30000    # reclaim entries a dead consumer left pending
        options: {}             # extra keyword arguments for Redis.from_url

Targets name the stream with `stream` (default: the topic) and may set
`maxlen` (approximate, `MAXLEN ~`). Subscriptions read the stream their
client's publish target names (or `options.stream`), in consumer group
`options.group` (default: the subscription id), so every subscription sees
every message and instances of one subscription share the work.

Producing: sends that overlap in time are written in one pipeline, so many
concurrent `send` calls cost one round trip, while each still returns only
once Redis stored its entry.

Consuming: one consumer per source, named `host:pid:slot` (stable for the
life of the process; the slot tells apart instances of one subscription
running in one process). A source first re-reads entries its name still
holds (after a restart in the same process, or a release), then claims
entries other consumers left idle longer than `claim_idle_ms` (XAUTOCLAIM),
then reads new ones. Each fetched batch is acknowledged with one XACK.

Held entries stay ours. Entries a source fetched and has not acknowledged
or released (queued behind others, in a handler, or waiting out a retry
back-off) are never claimed again by that source, and a timer of the
source resets their idle time (`XCLAIM <self> 0 <ids> JUSTID`, which does
not count as a delivery) every `claim_idle_ms / 4` for those held longer
than `claim_idle_ms / 2`. So another consumer claims a held entry only when
this process stalls or loses Redis for about `claim_idle_ms / 2`; claiming
another consumer's entries is a recovery and is logged as a warning.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging._config_check import (
    ANY,
    Field,
    Fields,
    MapOf,
    as_schema,
    integer,
    text,
)
from duct_messaging.messaging.components import producers_spec
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import component
from duct_messaging.transports._shared import (
    clients_spec,
    close_all,
    connect_all,
    consumers_component,
)
from duct_messaging.transports.base import Delivery, OutgoingMessage, Receipt, Target

try:
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError, ResponseError
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("The Redis Streams transport", "redis", "redis") from exc

log = structlog.get_logger(__name__)

TRANSPORT = "redis"
BODY_FIELD = b"body"
KEY_FIELD = b"key"
# An entry pending this long on a consumer that stopped answering is claimed
# by a live one. Longer than any sane handler run, short enough that a crash
# delays those messages by about this much.
DEFAULT_CLAIM_IDLE_MS = 30_000
# How often a source looks for idle entries to claim, at most.
MAX_CLAIM_INTERVAL_S = 5.0
# Most XADDs one pipeline carries; more sends wait for the next round trip.
MAX_PIPELINE = 1000


class RedisTransportError(DuctMessagingError):
    """Raised when Redis refused a command of this transport."""

    def __init__(self, client: str, action: str, reason: str) -> None:
        self.client = client
        self.action = action
        super().__init__(f"Redis client {client!r} failed to {action}: {reason}")


class ReservedFieldError(DuctMessagingError, ValueError):
    """Raised when a header would overwrite the `body` or `key` field."""

    def __init__(self, header: str) -> None:
        self.header = header
        super().__init__(
            f"Header {header!r} clashes with a Redis stream field of the same name. "
            "Rename the header: 'body' and 'key' are reserved on Redis."
        )


@dataclass(slots=True)
class RedisClient:
    """One named Redis server (or database) and its connection pool."""

    name: str
    url: str
    redis: Any
    maxlen: int | None = None
    claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> RedisClient:
        """Build a client (no connection yet) from its config map."""
        url = str(config["url"])
        options = dict(config.get("options") or {})
        maxlen = config.get("maxlen")
        return cls(
            name=name,
            url=url,
            redis=aioredis.Redis.from_url(url, **options),
            maxlen=int(maxlen) if maxlen is not None else None,
            claim_idle_ms=int(config.get("claim_idle_ms", DEFAULT_CLAIM_IDLE_MS)),
        )

    async def connect(self) -> None:
        """Check the server answers (PING); raise `RedisTransportError` if not."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise RedisTransportError(self.name, f"reach {self.url}", str(exc)) from exc

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()


def entry_fields(message: OutgoingMessage) -> dict[bytes, bytes]:
    """Return the stream entry fields of `message` (see the module docstring)."""
    fields = {BODY_FIELD: message.body}
    if message.key is not None:
        fields[KEY_FIELD] = message.key
    for name, value in message.headers.items():
        raw = name.encode()
        if raw in fields or raw in (BODY_FIELD, KEY_FIELD):
            raise ReservedFieldError(name)
        fields[raw] = value.encode()
    return fields


def delivery_from_entry(
    stream: str, entry_id: bytes, fields: Mapping[bytes, bytes], attempt: int = 1
) -> Delivery:
    """Return the delivery for one stream entry read from `stream`."""
    headers = {
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
        for k, v in fields.items()
        if k not in (BODY_FIELD, KEY_FIELD)
    }
    return Delivery(
        body=fields.get(BODY_FIELD, b""),
        headers=headers,
        destination=stream,
        key=fields.get(KEY_FIELD),
        position=entry_id.decode(),
        attempt=attempt,
    )


@dataclass(slots=True)
class _PendingAdds:
    """XADDs of one `send` or `send_many` call, answered by one future."""

    stream: str
    entries: list[dict[bytes, bytes]]
    maxlen: int | None
    future: asyncio.Future[list[bytes]]


class RedisProducer:
    """Appends messages to streams of one Redis client.

    XADDs issued while a pipeline is in flight are written together in the
    next one (group commit); each call still returns only after its own
    entries exist.
    """

    transport = TRANSPORT

    def __init__(self, client: RedisClient) -> None:
        self.client = client.name
        self._redis_client = client
        self._queue: list[_PendingAdds] = []
        self._flusher: asyncio.Task[None] | None = None

    def destination(self, target: Target, topic: str) -> str:
        """Return the stream of `target` (`stream`, else `topic`)."""
        return str(target.option("stream") or topic)

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Append `message` to the target's stream; return its entry id."""
        stream = self.destination(target, message.topic)
        [entry_id] = await self._enqueue(stream, target, [entry_fields(message)])
        return Receipt(self.client, TRANSPORT, stream, None, entry_id.decode())

    async def send_many(
        self, target: Target, messages: Sequence[OutgoingMessage]
    ) -> list[Receipt]:
        """Append every message to the target's stream, in order.

        Raises `RedisTransportError` naming the first failed XADD, once
        every XADD of the batch was answered.
        """
        if not messages:
            return []
        stream = self.destination(target, messages[0].topic)
        entries = [entry_fields(m) for m in messages]
        ids = await self._enqueue(stream, target, entries)
        return [Receipt(self.client, TRANSPORT, stream, None, i.decode()) for i in ids]

    def _enqueue(
        self, stream: str, target: Target, entries: list[dict[bytes, bytes]]
    ) -> asyncio.Future[list[bytes]]:
        wanted = target.option("maxlen", self._redis_client.maxlen)
        maxlen = _maxlen(wanted)
        if maxlen is not None and maxlen < 0:
            raise RedisTransportError(
                self.client,
                f"XADD to {stream}",
                f"maxlen must be a whole number >= 0, got {wanted!r}",
            )
        future: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
        adds = _PendingAdds(stream, entries, maxlen or None, future)
        self._queue.append(adds)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
            self._flusher.add_done_callback(self._flush_ended)
        return future

    def _flush_ended(self, task: asyncio.Task[None]) -> None:
        """Fail what a dead flush task left queued, and log why it died.

        A task cancelled before its first step never ran `_flush`, so its
        own clean-up did not run either.
        """
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("redis_flush_failed", client=self.client, error=repr(error))
        if self._flusher is task and self._queue:
            queued, self._queue = self._queue, []
            self._fail(queued, error or asyncio.CancelledError())

    def _fail(self, calls: Sequence[_PendingAdds], exc: BaseException) -> None:
        reason = (
            "the send was cancelled: the producer is shutting down"
            if isinstance(exc, asyncio.CancelledError)
            else repr(exc)
        )
        for adds in calls:
            if not adds.future.done():
                adds.future.set_exception(
                    RedisTransportError(self.client, f"XADD to {adds.stream}", reason)
                )

    async def aclose(self) -> None:
        """Wait until every queued XADD was written (or failed)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        """Write queued XADDs, one pipeline at a time, until the queue is empty.

        Whatever ends this task early (a bug, a cancellation) fails every
        call it took and every call still queued before it propagates, so
        no `send` waits forever.
        """
        calls: list[_PendingAdds] = []
        try:
            while self._queue:
                calls = self._take()
                pipe = self._redis_client.redis.pipeline(transaction=False)
                for adds in calls:
                    for fields in adds.entries:
                        pipe.xadd(
                            adds.stream, fields, maxlen=adds.maxlen, approximate=True
                        )
                try:
                    results = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError) as exc:
                    results = [exc] * sum(len(adds.entries) for adds in calls)
                for adds in calls:
                    answered, results = (
                        results[: len(adds.entries)],
                        results[len(adds.entries) :],
                    )
                    self._answer(adds, answered)
                calls = []
        except BaseException as exc:
            queued, self._queue = self._queue, []
            self._fail([*calls, *queued], exc)
            raise

    def _take(self) -> list[_PendingAdds]:
        """Take queued calls worth up to `MAX_PIPELINE` XADDs (at least one)."""
        taken, size = 0, 0
        while taken < len(self._queue) and (
            taken == 0 or size + len(self._queue[taken].entries) <= MAX_PIPELINE
        ):
            size += len(self._queue[taken].entries)
            taken += 1
        calls, self._queue = self._queue[:taken], self._queue[taken:]
        return [adds for adds in calls if not adds.future.done()]

    def _answer(self, adds: _PendingAdds, results: list[Any]) -> None:
        if adds.future.done():
            return
        for result in results:
            if isinstance(result, BaseException):
                error = RedisTransportError(
                    self.client, f"XADD to {adds.stream}", str(result)
                )
                adds.future.set_exception(error)
                return
        adds.future.set_result(results)


class _ConsumerSlots:
    """Hands out the lowest free slot per consumer group in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._taken: dict[tuple[str, str, str], set[int]] = {}

    def take(self, group: tuple[str, str, str]) -> int:
        with self._lock:
            taken = self._taken.setdefault(group, set())
            slot = next(i for i in range(len(taken) + 1) if i not in taken)
            taken.add(slot)
            return slot

    def give_back(self, group: tuple[str, str, str], slot: int) -> None:
        with self._lock:
            self._taken.get(group, set()).discard(slot)


_SLOTS = _ConsumerSlots()


@dataclass(slots=True)
class _ReadState:
    """Where the next fetch reads from."""

    replay_from: str | None = "0"
    claim_cursor: str = "0-0"
    next_claim_at: float = 0.0
    # Entry id -> when it was fetched or last kept alive (monotonic).
    held: dict[str, float] = field(default_factory=dict)


class RedisSource:
    """Feeds one subscription from a Redis stream consumer group."""

    def __init__(
        self, client: RedisClient, subscription: Subscription, stream: str
    ) -> None:
        options = subscription.options
        self.stream = stream
        self.group = str(options.get("group") or subscription.id)
        self.subscription = subscription.id
        self.claim_idle_ms = int(options.get("claim_idle_ms", client.claim_idle_ms))
        self.start_id = str(options.get("start_id", "0"))
        self.consumer = str(options.get("consumer") or "")
        self._client = client
        self._redis = client.redis
        self._slot_key = (client.url, stream, self.group)
        self._slot: int | None = None
        self._state = _ReadState()
        self._claim_interval_s = min(
            max(self.claim_idle_ms / 2000, 0.05), MAX_CLAIM_INTERVAL_S
        )
        self._keeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Create the group (and stream) if missing and pick a consumer name."""
        if not self.consumer:
            self._slot = _SLOTS.take(self._slot_key)
            self.consumer = f"{socket.gethostname()}:{os.getpid()}:{self._slot}"
        await self._ensure_group()
        self._state.next_claim_at = time.monotonic() + self._claim_interval_s
        self._keeper = asyncio.get_running_loop().create_task(
            self._keep_alive(), name=f"duct-redis-keepalive-{self.subscription}"
        )

    async def _keep_alive(self) -> None:
        """Reset the idle time of entries held longer than half of `claim_idle_ms`."""
        interval = max(self.claim_idle_ms / 4000, 0.01)
        stale_after = self.claim_idle_ms / 2000
        held = self._state.held
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stale = [i for i, touched in held.items() if now - touched >= stale_after]
            try:
                for start in range(0, len(stale), MAX_PIPELINE):
                    chunk = stale[start : start + MAX_PIPELINE]
                    await self._redis.xclaim(
                        self.stream, self.group, self.consumer, 0, chunk, justid=True
                    )
                    for entry_id in chunk:
                        if entry_id in held:
                            held[entry_id] = now
            except (RedisError, OSError) as exc:
                log.warning(
                    "redis_keep_alive_failed",
                    subscription=self.subscription,
                    stream=self.stream,
                    count=len(stale),
                    error=repr(exc),
                )

    async def _ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(
                self.stream, self.group, id=self.start_id, mkstream=True
            )
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise RedisTransportError(
                    self._client.name, "create consumer group", str(exc)
                ) from exc

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Return held entries first, then idle claimed ones, then new ones."""
        try:
            batch = await self._fetch(max_messages, timeout)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group was deleted under us: start over.
            log.warning("redis_group_recreated", stream=self.stream, group=self.group)
            await self._ensure_group()
            self._state.replay_from = "0"
            return []
        now = time.monotonic()
        self._state.held.update((str(d.position), now) for d in batch)
        return batch

    async def _fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        state = self._state
        while state.replay_from is not None:
            batch, dropped = await self._read(state.replay_from, max_messages, None)
            if not batch and not dropped:
                state.replay_from = None
                break
            if batch:
                state.replay_from = str(batch[-1].position)
            # Entries the runtime still holds are ours already: skip them.
            again = [d for d in batch if d.position not in state.held]
            if again:
                return await self._with_attempts(again)
        if time.monotonic() >= state.next_claim_at:
            state.next_claim_at = time.monotonic() + self._claim_interval_s
            claimed = await self._claim(max_messages)
            if claimed:
                return await self._with_attempts(claimed)
        fresh, _ = await self._read(">", max_messages, max(int(timeout * 1000), 1))
        return fresh

    async def _read(
        self, from_id: str, count: int, block_ms: int | None
    ) -> tuple[list[Delivery], int]:
        """Return the deliveries read, and how many trimmed entries were dropped."""
        reply = await self._redis.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: from_id},
            count=count,
            block=block_ms,
        )
        out: list[Delivery] = []
        gone: list[bytes] = []
        for _stream, entries in _stream_entries(reply):
            for entry_id, fields in entries:
                if not fields:  # trimmed away while pending
                    gone.append(entry_id)
                    continue
                out.append(delivery_from_entry(self.stream, entry_id, fields))
        if gone:
            await self._redis.xack(self.stream, self.group, *gone)
        return out, len(gone)

    async def _claim(self, count: int) -> list[Delivery]:
        reply = await self._redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            self.claim_idle_ms,
            self._state.claim_cursor,
            count=count,
        )
        cursor, entries = reply[0], reply[1]
        self._state.claim_cursor = (
            cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        )
        # XAUTOCLAIM returns this consumer's own idle entries too: the ones
        # it still holds are in hand already, not lost.
        held = self._state.held
        claimed = [
            delivery_from_entry(self.stream, entry_id, fields)
            for entry_id, fields in entries
            if fields and _text(entry_id) not in held
        ]
        if claimed:
            log.warning(
                "redis_entries_claimed",
                subscription=self.subscription,
                stream=self.stream,
                consumer=self.consumer,
                count=len(claimed),
                reason=f"pending and idle for over {self.claim_idle_ms} ms: "
                "a consumer stopped or stalled",
            )
        return claimed

    async def _with_attempts(self, batch: list[Delivery]) -> list[Delivery]:
        """Fill in delivery counts for entries that were delivered before."""
        pending = await self._redis.xpending_range(
            self.stream,
            self.group,
            min=batch[0].position,
            max=batch[-1].position,
            count=len(batch) * 2,
            consumername=self.consumer,
        )
        counts = {_text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        for delivery in batch:
            delivery.attempt = counts.get(str(delivery.position), delivery.attempt)
        return batch

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries` with one XACK."""
        if not deliveries:
            return
        ids = [str(d.position) for d in deliveries]
        await self._redis.xack(self.stream, self.group, *ids)
        held = self._state.held
        for entry_id in ids:
            held.pop(entry_id, None)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Leave `deliveries` pending; the next fetch reads them again."""
        held = self._state.held
        for delivery in deliveries:
            held.pop(str(delivery.position), None)
        self._state.replay_from = "0"

    async def stop(self) -> None:
        """Forget this consumer in the group if it holds nothing, and free its slot.

        Entries it still holds stay pending under its name: the same process
        re-reads them on its next start, other processes claim them once
        they are idle for `claim_idle_ms` (they are no longer kept alive).
        """
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        self._state.held.clear()
        try:
            pending = await self._redis.xpending_range(
                self.stream, self.group, "-", "+", 1, consumername=self.consumer
            )
            if not pending:
                await self._redis.xgroup_delconsumer(
                    self.stream, self.group, self.consumer
                )
        except (RedisError, OSError) as exc:
            log.warning(
                "redis_consumer_cleanup_failed", stream=self.stream, error=str(exc)
            )
        finally:
            if self._slot is not None:
                _SLOTS.give_back(self._slot_key, self._slot)
                self._slot = None


def _stream_entries(reply: Any) -> Iterator[tuple[Any, list[Any]]]:
    """Yield (stream, entries) from an XREADGROUP reply in either RESP shape."""
    if not reply:
        return
    if isinstance(reply, Mapping):
        yield from reply.items()
        return
    yield from reply


def _maxlen(value: Any) -> int | None:
    """Return a target's `maxlen` as a number, or -1 when it is not one."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def make_runtime(
    clients: Mapping[str, RedisClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from Redis streams."""

    def make_source(subscription: Subscription) -> RedisSource:
        stream = routing.consumer_destination(subscription, "stream")
        return RedisSource(clients[subscription.client], subscription, stream)

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


CLIENTS = clients_spec(
    Fields(
        {
            "url": Field(text(), required=True, hint="e.g. redis://127.0.0.1:6379/0"),
            "maxlen": integer(minimum=0, nullable=True),
            "claim_idle_ms": integer(minimum=0),
            "options": MapOf(
                ANY, expected="a mapping of keyword arguments for Redis.from_url"
            ),
        },
        noun="Redis client setting",
        nullable=False,
    )
)


@component("duct.redis/clients", schema=as_schema(CLIENTS))
async def clients(value: Mapping[str, Any]) -> dict[str, RedisClient]:
    """Return one `RedisClient` per named server, each checked with a PING."""
    registry = {
        name: RedisClient.from_config(name, config) for name, config in value.items()
    }
    await connect_all(registry)
    return registry


@clients.halt
async def _halt_clients(registry: Mapping[str, RedisClient]) -> None:
    await close_all(registry)


@component("duct.redis/producers", schema=as_schema(producers_spec(TRANSPORT)))
def producers(value: Mapping[str, Any]) -> dict[str, RedisProducer]:
    """Return one producer per Redis client, by client name."""
    return {name: RedisProducer(client) for name, client in value["clients"].items()}


@producers.halt
async def _halt_producers(registry: Mapping[str, RedisProducer]) -> None:
    await asyncio.gather(*(p.aclose() for p in registry.values()))


consumers = consumers_component(TRANSPORT, make_runtime)
