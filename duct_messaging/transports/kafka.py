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

    All calls on the librdkafka consumer run on one dedicated thread, so its
    rebalance callbacks run there too and may touch the offset bookkeeping
    without locks.
    """

    def __init__(
        self,
        client: KafkaClient,
        subscription: Subscription,
        topic: str,
        *,
        commit_interval_s: float = COMMIT_INTERVAL_S,
    ) -> None:
        options = dict(subscription.options)
        self.group_id = str(options.pop("group_id", None) or subscription.id)
        self.partitions = options.pop("partitions", None)
        options.pop("kafka_topic", None)
        self.topic = topic
        self.subscription = subscription.id
        self._client = client
        self._config = client.consumer_config(self.group_id, options)
        self._commit_interval_s = commit_interval_s
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"duct-kafka-{subscription.id}"
        )
        self._consumer: Any = None
        self._offsets: dict[int, _PartitionOffsets] = {}
        # Bumped per partition on revocation: acks of deliveries fetched
        # before that belong to an old assignment and are ignored.
        self._generations: dict[int, int] = {}
        self._last_commit = time.monotonic()
        self._seek: dict[int, int] = {}

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
        if time.monotonic() - self._last_commit >= self._commit_interval_s:
            self._commit(asynchronous=True)
        messages = self._consumer.consume(max_messages, timeout)
        out = []
        offsets = self._offsets
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() in (
                    KafkaError._PARTITION_EOF,
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                ):
                    continue
                if not err.retriable() and err.fatal():
                    raise KafkaTransportError(f"consumer failed: {err}")
                log.warning(
                    "kafka_consumer_error",
                    subscription=self.subscription,
                    error=str(err),
                )
                continue
            partition, offset = msg.partition(), msg.offset()
            book = offsets.get(partition)
            if book is None:
                book = offsets[partition] = _PartitionOffsets()
            book.pending.add(offset)
            book.high = max(book.high, offset)
            out.append(
                Delivery(
                    body=msg.value() or b"",
                    headers=decode_headers(msg.headers()),
                    destination=msg.topic(),
                    key=msg.key(),
                    partition=partition,
                    position=offset,
                    handle=self._generations.get(partition, 0),
                )
            )
        return out

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark `deliveries` finished; their offsets become committable."""
        await self._call(self._ack, deliveries)

    def _ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            if not self._is_current(delivery):
                continue  # its partition was revoked meanwhile
            book = self._offsets.get(delivery.partition or 0)
            if book is not None:
                book.pending.discard(int(delivery.position))  # type: ignore[arg-type]

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Rewind to the earliest released offset of each partition."""
        await self._call(self._release, deliveries)

    def _release(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.partition is None or not self._is_current(delivery):
                continue
            offset = int(delivery.position)  # type: ignore[arg-type]
            current = self._seek.get(delivery.partition)
            self._seek[delivery.partition] = (
                offset if current is None else min(current, offset)
            )

    def _apply_seeks(self) -> None:
        for partition, offset in self._seek.items():
            book = self._offsets.get(partition)
            if book is None:
                continue
            book.pending = {o for o in book.pending if o < offset}
            book.high = offset - 1
            try:
                self._consumer.seek(TopicPartition(self.topic, partition, offset))
            except KafkaException as exc:
                log.warning("kafka_seek_failed", partition=partition, error=str(exc))
        self._seek.clear()

    async def stop(self) -> None:
        """Commit what finished, leave the group and close."""
        try:
            await self._call(self._stop)
        finally:
            self._executor.shutdown(wait=True)

    def _stop(self) -> None:
        if self._consumer is None:
            return
        self._commit(asynchronous=False)
        self._consumer.close()
        self._consumer = None

    def committed_offsets(self) -> dict[int, int]:
        """Return the offsets committed so far, per partition (for reports)."""
        return {p: b.committed for p, b in self._offsets.items()}

    def _commit(
        self, *, asynchronous: bool, partitions: Sequence[int] | None = None
    ) -> None:
        self._last_commit = time.monotonic()
        offsets = []
        for partition, book in self._offsets.items():
            if partitions is not None and partition not in partitions:
                continue
            offset = book.committable()
            if offset > book.committed and offset > 0:
                offsets.append(TopicPartition(self.topic, partition, offset))
                book.committed = offset
        if not offsets:
            return
        try:
            self._consumer.commit(offsets=offsets, asynchronous=asynchronous)
        except KafkaException as exc:
            log.warning(
                "kafka_commit_failed", subscription=self.subscription, error=str(exc)
            )

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        log.debug(
            "kafka_partitions_assigned",
            subscription=self.subscription,
            partitions=[p.partition for p in partitions],
        )

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        revoked = [p.partition for p in partitions]
        self._commit(asynchronous=False, partitions=revoked)
        for partition in revoked:
            self._offsets.pop(partition, None)
            self._seek.pop(partition, None)
            self._generations[partition] = self._generations.get(partition, 0) + 1
        log.debug(
            "kafka_partitions_revoked",
            subscription=self.subscription,
            partitions=revoked,
        )

    def _is_current(self, delivery: Delivery) -> bool:
        partition = delivery.partition or 0
        return bool(delivery.handle == self._generations.get(partition, 0))

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)


def make_runtime(
    clients: Mapping[str, KafkaClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    commit_interval_s: float = COMMIT_INTERVAL_S,
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from Kafka clusters."""

    def make_source(subscription: Subscription) -> KafkaSource:
        topic = routing.consumer_destination(subscription, "kafka_topic")
        return KafkaSource(
            clients[subscription.client],
            subscription,
            topic,
            commit_interval_s=commit_interval_s,
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
    """Start the subscriptions whose `source` is `kafka` (or `sources`)."""
    settings = consumer_settings(value)
    if "commit_interval_s" in value:
        settings["commit_interval_s"] = float(value["commit_interval_s"])
    runtime = make_runtime(value["clients"], value["routing"], **settings)
    await runtime.start()
    return runtime


@consumers.halt
async def _halt_consumers(runtime: ConsumerRuntime) -> None:
    await runtime.stop()


@consumers.check
def _check_consumers(value: Any, ctx: CheckContext) -> Iterator[str]:
    yield from consumers_problems(value, ctx, TRANSPORT)
