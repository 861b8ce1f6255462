"""The Kafka transport, on confluent-kafka (librdkafka).

Clients are named clusters, each with its own `bootstrap.servers` and any
librdkafka setting passed through (config keys are snake_case in YAML and
become librdkafka's dotted names: `bootstrap_servers` -> `bootstrap.servers`).
Optional `producer:` and `consumer:` maps hold settings for one role only.

Producing: one librdkafka producer per client, polled by a background
thread that resolves delivery reports on the event loop in batches.
Consuming: one librdkafka consumer per subscription, driven from a single
worker thread; batches of up to `batch_size` cross to the event loop. Offsets
are committed exactly for finished messages, per partition, never past an
unfinished one: periodically, on partition revocation and on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging.components import consumer_settings, consumers_problems
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.envelope import decode_headers
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import CheckContext, component
from duct_messaging.transports.base import Delivery, OutgoingMessage, Receipt, Target

try:
    from confluent_kafka import (
        Consumer,
        KafkaError,
        KafkaException,
        Producer,
        TopicPartition,
    )
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        NewTopic,
    )
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("The Kafka transport", "kafka", "confluent-kafka") from exc

log = structlog.get_logger(__name__)

TRANSPORT = "kafka"
# How often finished offsets are committed while consuming. Committing per
# message costs a broker round trip each; this bounds re-delivery after a
# crash to about one interval of work.
COMMIT_INTERVAL_S = 1.0
# How long the producer's poll thread blocks per poll; bounds how long it
# takes to notice a stop request.
PRODUCER_POLL_S = 0.05
# librdkafka signals a full local queue only by raising BufferError; there is
# no event to wait on, so the producer retries after this pause while the
# poll thread drains the queue.
QUEUE_FULL_BACKOFF_S = 0.005
# Poll on our own after this long without a call from the runtime (capped
# at a quarter of `max.poll.interval.ms`), so slow handlers keep the group.
KEEPALIVE_AFTER_S = 1.0
# How long each keep-alive poll blocks; bounds how late a call is served.
KEEPALIVE_POLL_S = 0.05
KEEPALIVE_BATCH = 500
# How long a revocation waits for running deliveries of the revoked
# partitions (capped at half of `max.poll.interval.ms`, the rebalance limit).
REVOKE_TIMEOUT_S = 10.0
KAFKA_CONSUMER_SETTINGS = ("commit_interval_s", "keepalive_after_s", "revoke_timeout_s")
CLIENT_ROLE_KEYS = ("producer", "consumer", "admin", "topics")
CONSUMER_DEFAULTS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 5,
}


class KafkaTransportError(DuctMessagingError):
    """Raised when the Kafka client reports an error we cannot recover from."""


def librdkafka_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return librdkafka settings from snake_case config keys.

    librdkafka property names never contain underscores, so every `_`
    becomes `.`; dotted keys pass through unchanged.
    """
    return {str(k).replace("_", "."): v for k, v in settings.items()}


@dataclass(slots=True)
class KafkaClient:
    """One named Kafka cluster: its common and per-role settings."""

    name: str
    settings: dict[str, Any]
    producer_settings: dict[str, Any] = field(default_factory=dict)
    consumer_settings: dict[str, Any] = field(default_factory=dict)
    topics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any] | None) -> KafkaClient:
        """Build a client from its config map (see the module docstring)."""
        config = dict(config or {})
        role = {k: config.pop(k, None) or {} for k in CLIENT_ROLE_KEYS}
        return cls(
            name=name,
            settings=librdkafka_settings(config),
            producer_settings=librdkafka_settings(role["producer"]),
            consumer_settings=librdkafka_settings(role["consumer"]),
            topics=dict(role["topics"]),
        )

    @property
    def bootstrap_servers(self) -> str:
        """Return the cluster's bootstrap servers."""
        return str(self.settings.get("bootstrap.servers", ""))

    def producer_config(self) -> dict[str, Any]:
        """Return the librdkafka config for this cluster's producer."""
        return {**self.settings, **self.producer_settings}

    def consumer_config(
        self, group_id: str, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the librdkafka config for one consumer of `group_id`."""
        return {
            **CONSUMER_DEFAULTS,
            **self.settings,
            **self.consumer_settings,
            **librdkafka_settings(extra),
            "group.id": group_id,
        }

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create `topic` if it does not exist (an existing one is left as is)."""
        admin = AdminClient(self.settings)
        count = partitions or int(self.topics.get("partitions", 1))
        futures = admin.create_topics([NewTopic(topic, count, 1)], request_timeout=10)
        for future in futures.values():
            try:
                future.result(timeout=10)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise


def clients_problems(value: Any) -> list[str]:
    """Return the problems of a Kafka clients config, each with its path."""
    if not isinstance(value, Mapping) or not value:
        return ["expected a mapping of client name -> settings"]
    problems = []
    for name, config in value.items():
        if not isinstance(config, Mapping):
            problems.append(f"{name}: expected a mapping of settings")
        elif not (config.get("bootstrap_servers") or config.get("bootstrap.servers")):
            problems.append(f"{name}.bootstrap_servers: missing")
    return problems


class KafkaProducer:
    """Sends messages to one Kafka cluster and awaits their delivery reports.

    Delivery reports are collected by a poll thread and resolved on the
    event loop once per poll, not once per message.
    """

    transport = TRANSPORT

    def __init__(self, client: KafkaClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client.name
        self._kafka_client = client
        self._loop = loop
        self._producer = Producer(client.producer_config())
        self._reports: list[tuple[Any, Any, Any]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._poll_loop,
            name=f"duct-kafka-producer-{client.name}",
            daemon=True,
        )
        self._thread.start()

    def destination(self, target: Target, topic: str) -> str:
        """Return the Kafka topic of `target` (`kafka_topic`, else `topic`)."""
        return str(target.option("kafka_topic") or topic)

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Produce `message` and return once the broker acknowledged it."""
        receipt: Receipt = await self._enqueue(target, message)
        return receipt

    async def send_many(
        self, target: Target, messages: Sequence[OutgoingMessage]
    ) -> list[Receipt]:
        """Produce every message, then wait for all their delivery reports.

        One future covers the whole batch; it fails with the first delivery
        error once every report is in.
        """
        batch = _BatchReports(self._loop.create_future(), len(messages))
        if not messages:
            return []
        for index, message in enumerate(messages):
            while not self._try_produce(target, message, (batch, index)):  # noqa: ASYNC110
                await asyncio.sleep(QUEUE_FULL_BACKOFF_S)
        return await batch.future

    def _enqueue(self, target: Target, message: OutgoingMessage) -> Any:
        future: asyncio.Future[Receipt] = self._loop.create_future()
        if self._try_produce(target, message, future):
            return future
        return self._enqueue_later(target, message, future)

    async def _enqueue_later(
        self, target: Target, message: OutgoingMessage, future: asyncio.Future[Receipt]
    ) -> Receipt:
        while not self._try_produce(target, message, future):  # noqa: ASYNC110
            await asyncio.sleep(QUEUE_FULL_BACKOFF_S)
        return await future

    def _try_produce(
        self, target: Target, message: OutgoingMessage, future: Any
    ) -> bool:
        partition = target.options.get("partition")
        try:
            self._producer.produce(
                target.options.get("kafka_topic") or message.topic,
                message.body,
                message.key,
                on_delivery=lambda err, msg: self._reports.append((future, err, msg)),
                headers=list(message.headers.items()),
                partition=-1 if partition is None else int(partition),
            )
        except BufferError:
            return False
        return True

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for outstanding messages; return how many are still queued."""
        remaining: int = self._producer.flush(timeout)
        return remaining

    def close(self, timeout: float = 10.0) -> None:
        """Flush outstanding messages and stop the poll thread."""
        remaining = self.flush(timeout)
        self._stopping.set()
        self._thread.join(timeout)
        if remaining:
            log.warning(
                "kafka_producer_closed_with_queued",
                client=self.client,
                queued=remaining,
            )

    def _poll_loop(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(PRODUCER_POLL_S)
            self._dispatch()
        self._producer.poll(0)
        self._dispatch()

    def _dispatch(self) -> None:
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        # A closed loop means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._resolve, reports)

    def _resolve(self, reports: list[tuple[Any, Any, Any]]) -> None:
        for sink, err, msg in reports:
            if isinstance(sink, tuple):
                batch, index = sink
                batch.record(index, self._receipt(err, msg))
                continue
            if sink.done():
                continue
            receipt = self._receipt(err, msg)
            if isinstance(receipt, Exception):
                sink.set_exception(receipt)
            else:
                sink.set_result(receipt)

    def _receipt(self, err: Any, msg: Any) -> Receipt | Exception:
        if err is not None:
            return KafkaTransportError(f"delivery failed: {err}")
        return Receipt(
            self.client, TRANSPORT, msg.topic(), msg.partition(), msg.offset()
        )


class _BatchReports:
    """Collects the delivery reports of one `send_many` call into one future."""

    __slots__ = ("error", "future", "receipts", "remaining")

    def __init__(self, future: asyncio.Future[list[Receipt]], size: int) -> None:
        self.future = future
        self.receipts: list[Receipt | None] = [None] * size
        self.remaining = size
        self.error: Exception | None = None

    def record(self, index: int, outcome: Receipt | Exception) -> None:
        if isinstance(outcome, Exception):
            self.error = self.error or outcome
        else:
            self.receipts[index] = outcome
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            if self.error is not None:
                self.future.set_exception(self.error)
            else:
                self.future.set_result(self.receipts)  # type: ignore[arg-type]


@dataclass(slots=True)
class _PartitionOffsets:
    """Finished-offset bookkeeping for one assigned partition."""

    pending: set[int] = field(default_factory=set)
    high: int = -1
    committed: int = -1

    def committable(self) -> int:
        """Return the offset to commit: the first unfinished one."""
        return min(self.pending) if self.pending else self.high + 1


class KafkaSource:
    """Feeds one subscription from a Kafka consumer group.

    Every call on the librdkafka consumer runs on one dedicated thread, so
    rebalance callbacks run there too. The offset bookkeeping is shared with
    the runtime's worker threads (`claim`, `finish`, `ack`, `release`) under
    one lock.

    Commits: each fetched offset is pending until its delivery finished
    (handled, or dead-lettered durably). The committed offset of a partition
    is its first pending offset, or one past the highest fetched when none
    is pending, so a commit never passes an unfinished message. Commits go
    out every `commit_interval_s`, on revocation and on stop.

    Keep-alive: librdkafka drops a consumer that does not poll for
    `max.poll.interval.ms`. When no call reaches the source for
    `keepalive_after_s` (a slow handler, a long run of work), the source
    pauses its partitions and polls on its own thread until the next call,
    committing what finished meanwhile; it then resumes them where their
    deliveries stopped. Handlers may therefore run longer than
    `max.poll.interval.ms` without losing the partitions.

    Rebalance: on revocation, deliveries of the revoked partitions not yet
    started are dropped by `claim`, running ones get up to
    `revoke_timeout_s` to finish, then what finished is committed and the
    partition's bookkeeping is forgotten; a late ack is ignored. Deliveries
    fetched during the same poll as a revocation of their partition are
    dropped and the partition rewinds to its committed offset.
    """

    def __init__(
        self,
        client: KafkaClient,
        subscription: Subscription,
        topic: str,
        *,
        commit_interval_s: float = COMMIT_INTERVAL_S,
        keepalive_after_s: float | None = None,
        revoke_timeout_s: float | None = None,
    ) -> None:
        options = dict(subscription.options)
        self.group_id = str(options.pop("group_id", None) or subscription.id)
        self.partitions = options.pop("partitions", None)
        options.pop("kafka_topic", None)
        self.topic = topic
        self.subscription = subscription.id
        self._client = client
        self._config = client.consumer_config(self.group_id, options)
        max_poll_s = float(self._config.get("max.poll.interval.ms", 300_000)) / 1000
        self._commit_interval_s = commit_interval_s
        self._keepalive_after_s = (
            keepalive_after_s
            if keepalive_after_s is not None
            else min(KEEPALIVE_AFTER_S, max_poll_s / 4)
        )
        self._revoke_timeout_s = (
            revoke_timeout_s
            if revoke_timeout_s is not None
            else min(REVOKE_TIMEOUT_S, max_poll_s / 2)
        )
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"duct-kafka-{subscription.id}"
        )
        self._consumer: Any = None
        # A plain lock: claim/finish take it once per message.
        self._lock = threading.Lock()
        # Signalled when a claim ends while a revocation waits.
        self._settled = threading.Condition(self._lock)
        self._offsets: dict[int, _PartitionOffsets] = {}
        # Bumped per partition on revocation: deliveries fetched before
        # belong to an old assignment; their claims fail and acks are ignored.
        self._generations: dict[int, int] = {}
        # Running deliveries by (partition, generation).
        self._claims: dict[tuple[int, int], int] = {}
        # Partitions whose revocation waits for running deliveries.
        self._revoking: dict[int, int] = {}
        self._assigned: set[int] = set()
        # Partitions assigned since the consumer thread last set their pause
        # state: librdkafka keeps a partition paused across a revocation and
        # a new assignment, so each new assignment is resumed (or, during a
        # keep-alive, paused) explicitly.
        self._fresh: set[int] = set()
        self._paused: set[int] = set()
        self._seek: dict[int, int] = {}
        self._buffer: list[Delivery] = []
        self._last_commit = time.monotonic()
        # Set while a call waits for the consumer thread: the keep-alive
        # poll must hand the thread back.
        self._wake = threading.Event()
        self._calls = 0
        self._closing = False

    async def start(self) -> None:
        """Create the topic if needed, then join the group."""
        await self._call(self._start)

    def _start(self) -> None:
        if self._client.topics.get("auto_create", True):
            self._client.ensure_topic(self.topic, self.partitions)
        self._consumer = Consumer(self._config, logger=None)
        self._consumer.subscribe(
            [self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Commit what finished if due, then fetch up to `max_messages`."""
        deliveries: list[Delivery] = await self._call(
            self._fetch, max_messages, timeout
        )
        return deliveries

    def _fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        self._apply_seeks()
        self._maybe_commit()
        if self._buffer:
            out = self._buffer[:max_messages]
            del self._buffer[:max_messages]
            return out
        self._resume_fresh()
        before = dict(self._generations)
        messages = self._consumer.consume(max_messages, timeout)
        return self._deliveries(messages, before)

    def _resume_fresh(self) -> None:
        with self._lock:
            fresh = sorted(self._fresh & self._assigned)
            self._fresh.clear()
        if fresh:
            self._consumer.resume([TopicPartition(self.topic, p) for p in fresh])

    def _deliveries(
        self, messages: list[Any], before: dict[int, int]
    ) -> list[Delivery]:
        out: list[Delivery] = []
        stale: set[int] = set()
        with self._lock:
            generations = self._generations
            offsets = self._offsets
            for msg in messages:
                err = msg.error()
                if err is not None:
                    self._consumer_error(err)
                    continue
                partition, offset = msg.partition(), msg.offset()
                generation = generations.get(partition, 0)
                if generation != before.get(partition, 0):
                    stale.add(partition)  # fetched across a revocation
                    continue
                book = offsets.get(partition)
                if book is None:
                    book = offsets[partition] = _PartitionOffsets()
                book.pending.add(offset)
                if offset > book.high:
                    book.high = offset
                out.append(
                    Delivery(
                        body=msg.value() or b"",
                        headers=decode_headers(msg.headers()),
                        destination=msg.topic(),
                        key=msg.key(),
                        partition=partition,
                        position=offset,
                        handle=generation,
                    )
                )
        for partition in stale:
            self._rewind_to_committed(partition)
        return out

    def _consumer_error(self, err: Any) -> None:
        if err.code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
            return
        if not err.retriable() and err.fatal():
            raise KafkaTransportError(f"consumer failed: {err}")
        log.warning(
            "kafka_consumer_error", subscription=self.subscription, error=str(err)
        )

    def _rewind_to_committed(self, partition: int) -> None:
        if partition not in self._assigned:
            return
        try:
            [tp] = self._consumer.committed(
                [TopicPartition(self.topic, partition)], timeout=10
            )
        except KafkaException as exc:
            log.warning("kafka_rewind_failed", partition=partition, error=str(exc))
            return
        if tp.offset >= 0:
            with self._lock:
                self._seek[partition] = tp.offset

    def claim(self, delivery: Delivery) -> bool:
        """Return False if `delivery`'s partition was revoked since it was fetched."""
        partition = delivery.partition or 0
        with self._lock:
            generation = self._generations.get(partition, 0)
            if delivery.handle != generation or partition not in self._offsets:
                return False
            key = (partition, generation)
            self._claims[key] = self._claims.get(key, 0) + 1
            return True

    def finish(self, delivery: Delivery, *, finished: bool) -> None:
        """End a claim; a finished delivery's offset becomes committable at once."""
        partition = delivery.partition or 0
        handle = delivery.handle
        with self._lock:
            key = (partition, handle)
            count = self._claims.get(key, 0)
            if count > 1:
                self._claims[key] = count - 1
            elif count == 1:
                del self._claims[key]
            if finished and (
                handle == self._generations.get(partition, 0)
                or handle == self._revoking.get(partition)
            ):
                book = self._offsets.get(partition)
                if book is not None:
                    book.pending.discard(delivery.position)
            if self._revoking:
                self._settled.notify_all()

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark `deliveries` finished; their offsets become committable."""
        with self._lock:
            for delivery in deliveries:
                self._mark_finished(delivery)

    def _mark_finished(self, delivery: Delivery) -> None:
        if not self._is_current(delivery):
            return  # its partition was revoked meanwhile
        book = self._offsets.get(delivery.partition or 0)
        if book is not None:
            book.pending.discard(int(delivery.position))  # type: ignore[arg-type]

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Rewind each partition to its earliest released offset (on next fetch)."""
        with self._lock:
            for delivery in deliveries:
                if delivery.partition is None or not self._is_current(delivery):
                    continue
                offset = int(delivery.position)  # type: ignore[arg-type]
                current = self._seek.get(delivery.partition)
                self._seek[delivery.partition] = (
                    offset if current is None else min(current, offset)
                )

    def _apply_seeks(self) -> None:
        with self._lock:
            seeks, self._seek = self._seek, {}
        for partition, offset in seeks.items():
            try:
                self._consumer.seek(TopicPartition(self.topic, partition, offset))
            except KafkaException as exc:
                # The offsets stay pending, so nothing is committed past
                # them; the seek is tried again on the next fetch.
                log.warning("kafka_seek_failed", partition=partition, error=str(exc))
                with self._lock:
                    self._seek.setdefault(partition, offset)
                continue
            with self._lock:
                book = self._offsets.get(partition)
                if book is not None:
                    book.pending = {o for o in book.pending if o < offset}
                    book.high = offset - 1
                self._buffer = [
                    d
                    for d in self._buffer
                    if d.partition != partition or int(d.position) < offset  # type: ignore[arg-type]
                ]

    async def pause(self, partitions: Sequence[int]) -> None:
        """Stop fetching `partitions` (a delivery of each waits out a back-off)."""
        await self._call(self._pause, partitions)

    def _pause(self, partitions: Sequence[int]) -> None:
        with self._lock:
            chosen = [p for p in partitions if p in self._assigned]
            self._paused.update(chosen)
        if chosen:
            self._consumer.pause([TopicPartition(self.topic, p) for p in chosen])

    async def resume(self, partitions: Sequence[int]) -> None:
        """Fetch `partitions` again, from where their deliveries stopped."""
        await self._call(self._resume, partitions)

    def _resume(self, partitions: Sequence[int]) -> None:
        with self._lock:
            chosen = [p for p in partitions if p in self._paused]
            self._paused.difference_update(chosen)
            chosen = [p for p in chosen if p in self._assigned]
        if chosen:
            self._consumer.resume([TopicPartition(self.topic, p) for p in chosen])

    async def stop(self) -> None:
        """Commit what finished, leave the group and close."""
        self._closing = True
        self._wake.set()
        try:
            await self._call(self._stop)
        finally:
            self._executor.shutdown(wait=True)

    def _stop(self) -> None:
        if self._consumer is None:
            return
        self._commit(asynchronous=False, force=True)
        self._consumer.close()
        self._consumer = None

    def committed_offsets(self) -> dict[int, int]:
        """Return the offsets committed so far, per partition (for reports)."""
        with self._lock:
            return {p: b.committed for p, b in self._offsets.items()}

    def _maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit >= self._commit_interval_s:
            self._commit(asynchronous=True)

    def _commit(
        self,
        *,
        asynchronous: bool,
        partitions: Sequence[int] | None = None,
        force: bool = False,
    ) -> None:
        self._last_commit = time.monotonic()
        with self._lock:
            offsets = self._committable(partitions, force=force)
        self._send_commit(offsets, asynchronous=asynchronous)

    def _committable(
        self, partitions: Sequence[int] | None, *, force: bool
    ) -> list[Any]:
        offsets = []
        for partition, book in self._offsets.items():
            if partitions is not None and partition not in partitions:
                continue
            offset = book.committable()
            if offset > 0 and (offset > book.committed or force):
                offsets.append(TopicPartition(self.topic, partition, offset))
                book.committed = offset
        return offsets

    def _send_commit(self, offsets: list[Any], *, asynchronous: bool) -> None:
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            log.warning(
                "kafka_commit_failed", subscription=self.subscription, error=str(exc)
            )
            with self._lock:  # let the next commit try these offsets again
                for tp in offsets:
                    book = self._offsets.get(tp.partition)
                    if book is not None and book.committed == tp.offset:
                        book.committed = -1

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        assigned = [p.partition for p in partitions]
        with self._lock:
            for partition in assigned:
                self._assigned.add(partition)
                self._fresh.add(partition)
                self._offsets.setdefault(partition, _PartitionOffsets())
        log.debug(
            "kafka_partitions_assigned",
            subscription=self.subscription,
            partitions=assigned,
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = [p.partition for p in partitions]
        with self._lock:
            for partition in revoked:
                generation = self._generations.get(partition, 0)
                self._revoking[partition] = generation
                self._generations[partition] = generation + 1
            if not self._closing and not self._settled.wait_for(
                lambda: (
                    not any(self._claims.get((p, self._revoking[p])) for p in revoked)
                ),
                self._revoke_timeout_s,
            ):
                log.warning(
                    "kafka_revoke_timed_out",
                    subscription=self.subscription,
                    partitions=revoked,
                    timeout_s=self._revoke_timeout_s,
                    next="their unfinished deliveries are delivered again",
                )
            offsets = self._committable(revoked, force=not self._closing)
            for partition in revoked:
                self._offsets.pop(partition, None)
                self._seek.pop(partition, None)
                self._claims.pop((partition, self._revoking.pop(partition)), None)
                self._assigned.discard(partition)
                self._fresh.discard(partition)
                self._paused.discard(partition)
            self._buffer = [d for d in self._buffer if d.partition not in revoked]
        self._send_commit(offsets, asynchronous=False)
        log.debug(
            "kafka_partitions_revoked",
            subscription=self.subscription,
            partitions=revoked,
        )

    def _is_current(self, delivery: Delivery) -> bool:
        partition = delivery.partition or 0
        handle = delivery.handle
        return bool(
            handle == self._generations.get(partition, 0)
            or handle == self._revoking.get(partition)
        )

    def _keepalive(self) -> None:
        """Poll with every partition paused until the next call arrives."""
        if self._wake.wait(self._keepalive_after_s) or self._consumer is None:
            return
        consumer = self._consumer
        log.debug("kafka_keepalive_polling", subscription=self.subscription)
        held: set[int] = set()
        with self._lock:
            self._fresh.clear()
            fresh = self._assigned - self._paused
        try:
            while not self._wake.is_set():
                if fresh:
                    consumer.pause([TopicPartition(self.topic, p) for p in fresh])
                    held |= fresh
                before = dict(self._generations)
                messages = consumer.consume(KEEPALIVE_BATCH, KEEPALIVE_POLL_S)
                if messages:
                    self._buffer.extend(self._deliveries(messages, before))
                self._maybe_commit()
                with self._lock:
                    fresh = (self._fresh & self._assigned) - self._paused
                    self._fresh.clear()
        except Exception as exc:
            log.warning(
                "kafka_keepalive_failed",
                subscription=self.subscription,
                error=repr(exc),
            )
        finally:
            with self._lock:
                back = sorted((held & self._assigned) - self._paused)
            if back:
                consumer.resume([TopicPartition(self.topic, p) for p in back])

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        self._calls += 1
        self._wake.set()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._calls -= 1
            if self._calls == 0 and not self._closing and self._consumer is not None:
                self._wake.clear()
                with contextlib.suppress(RuntimeError):  # executor shut down
                    loop.run_in_executor(self._executor, self._keepalive)


def make_runtime(
    clients: Mapping[str, KafkaClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    commit_interval_s: float = COMMIT_INTERVAL_S,
    keepalive_after_s: float | None = None,
    revoke_timeout_s: float | None = None,
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from Kafka clusters.

    `settings` go to `ConsumerRuntime` (`sink`, `batch_size`,
    `drain_timeout_s`, `start_timeout_s`); the others tune `KafkaSource`.
    """

    def make_source(subscription: Subscription) -> KafkaSource:
        topic = routing.consumer_destination(subscription, "kafka_topic")
        return KafkaSource(
            clients[subscription.client],
            subscription,
            topic,
            commit_interval_s=commit_interval_s,
            keepalive_after_s=keepalive_after_s,
            revoke_timeout_s=revoke_timeout_s,
        )

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


@component("duct.kafka/clients")
def clients(value: Mapping[str, Any]) -> dict[str, KafkaClient]:
    """Return one `KafkaClient` per named cluster."""
    return {
        name: KafkaClient.from_config(name, config) for name, config in value.items()
    }


@clients.check
def _check_clients(value: Any, ctx: CheckContext) -> list[str]:
    return clients_problems(value)


@component("duct.kafka/producers")
async def producers(value: Mapping[str, Any]) -> dict[str, KafkaProducer]:
    """Return one producer per Kafka cluster, by client name."""
    loop = asyncio.get_running_loop()
    return {
        name: KafkaProducer(client, loop) for name, client in value["clients"].items()
    }


@producers.halt
async def _halt_producers(registry: Mapping[str, KafkaProducer]) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(loop.run_in_executor(None, p.close) for p in registry.values())
    )


@component("duct.kafka/consumers")
async def consumers(value: Mapping[str, Any]) -> ConsumerRuntime:
    """Start the subscriptions whose `source` is `kafka` (or `sources`).

    Value: `clients`, `routing`, optional `deadletter` (a sink, e.g.
    `!ref duct.deadletter/storage`; logged by default), `batch_size`,
    `drain_timeout_s` (how long halt lets running handlers finish),
    `start_timeout_s`, `commit_interval_s`, `keepalive_after_s`,
    `revoke_timeout_s` (see `KafkaSource`) and `sources`.
    """
    settings = consumer_settings(value)
    for name in KAFKA_CONSUMER_SETTINGS:
        if value.get(name) is not None:
            settings[name] = float(value[name])
    runtime = make_runtime(value["clients"], value["routing"], **settings)
    await runtime.start()
    return runtime


@consumers.halt
async def _halt_consumers(runtime: ConsumerRuntime) -> None:
    await runtime.stop()


@consumers.check
def _check_consumers(value: Any, ctx: CheckContext) -> Iterator[str]:
    yield from consumers_problems(value, ctx, TRANSPORT)
