"""The Kafka consumer source: fetching, offset bookkeeping and rebalances.

Imported through `duct_messaging.transports.kafka`, which checks first that
confluent-kafka is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from duct_messaging.messaging.envelope import decode_headers
from duct_messaging.messaging.routing import Subscription
from duct_messaging.transports._kafka_producer import KafkaTransportError, kafka_reason
from duct_messaging.transports.base import Delivery

if TYPE_CHECKING:
    from duct_messaging.transports.kafka import KafkaClient

log = structlog.get_logger(__name__)

# How often finished offsets are committed while consuming. Committing per
# message costs a broker round trip each; this bounds re-delivery after a
# crash to about one interval of work.
COMMIT_INTERVAL_S = 1.0
# Poll on our own after this long without a call from the runtime (capped
# at a quarter of `max.poll.interval.ms`), so slow handlers keep the group.
KEEPALIVE_AFTER_S = 1.0
# How long each keep-alive poll blocks; bounds how late a call is served.
KEEPALIVE_POLL_S = 0.05
KEEPALIVE_BATCH = 500
# How long a revocation waits for running deliveries of the revoked
# partitions (capped at half of `max.poll.interval.ms`, the rebalance limit).
REVOKE_TIMEOUT_S = 10.0


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
            raise KafkaTransportError(
                "consumer",
                self._client.name,
                self.topic,
                f"subscription {self.subscription!r} (group {self.group_id!r}) "
                f"hit a fatal error: {kafka_reason(err)}",
                "The consumer cannot go on: check the broker logs and the "
                "client's consumer settings, then restart the consumers.",
            )
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
            # Never block the event loop here: once `_stop` ran, the single
            # worker has nothing left; if it was interrupted, the worker
            # finishes in the background.
            self._executor.shutdown(wait=False)

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
