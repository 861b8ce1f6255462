"""The Kafka producer: sends, and resolves delivery reports in batches.

Imported through `duct_messaging.transports.kafka`, which checks first that
confluent-kafka is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
from confluent_kafka import Producer

from duct_messaging.errors import DuctMessagingError
from duct_messaging.transports.base import OutgoingMessage, Receipt, Target

if TYPE_CHECKING:
    from duct_messaging.transports.kafka import KafkaClient

log = structlog.get_logger(__name__)

TRANSPORT = "kafka"
# How long the producer's poll thread blocks per poll; bounds how long it
# takes to notice a stop request.
PRODUCER_POLL_S = 0.05
# librdkafka signals a full local queue only by raising BufferError; there is
# no event to wait on, so the producer retries after this pause while the
# poll thread drains the queue.
QUEUE_FULL_BACKOFF_S = 0.005


class KafkaTransportError(DuctMessagingError):
    """Raised when the Kafka client reports an error we cannot recover from.

    `action` is what failed ("delivery", "consumer", ...), `client` the
    client name, `topic` the Kafka topic (None if none applies), `reason`
    what librdkafka or the transport said and `fix` what to do about it.
    """

    def __init__(
        self, action: str, client: str, topic: str | None, reason: str, fix: str
    ) -> None:
        self.action = action
        self.client = client
        self.topic = topic
        self.reason = reason
        self.fix = fix
        where = f"client {client!r}" + (f", topic {topic!r}" if topic else "")
        super().__init__(f"Kafka {action} failed: {where}: {reason}. {fix}")


def kafka_reason(err: Any) -> str:
    """Return the readable text of a librdkafka error (or any other)."""
    text = err.str() if hasattr(err, "str") else str(err)
    name = err.name() if hasattr(err, "name") else ""
    return f"{text} ({name})" if name else str(text)


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
        self._handle: Producer | None = Producer(client.producer_config())
        self._reports: list[tuple[Any, Any, Any]] = []
        self._closed = False
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
        if not messages:
            self._check_open(None)
            return []
        batch = _BatchReports(self._loop.create_future(), len(messages))
        try:
            for index, message in enumerate(messages):
                while not self._try_produce(target, message, (batch, index)):  # noqa: ASYNC110
                    await asyncio.sleep(QUEUE_FULL_BACKOFF_S)
        except BaseException:
            batch.future.cancel()
            raise
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

    def _check_open(self, topic: str | None) -> None:
        if self._closed:
            raise self._closed_error(topic)

    def _closed_error(self, topic: str | None) -> KafkaTransportError:
        return KafkaTransportError(
            "send",
            self.client,
            topic,
            "the producer is closed",
            "Send before the system halts (halt the producers after "
            "the consumers and tasks that send).",
        )

    def _try_produce(self, target: Target, message: OutgoingMessage, sink: Any) -> bool:
        partition = target.options.get("partition")
        topic = self.destination(target, message.topic)
        self._check_open(topic)
        try:
            self._producer.produce(
                topic,
                message.body,
                message.key,
                on_delivery=lambda err, msg: self._reports.append((sink, err, msg)),
                headers=list(message.headers.items()),
                partition=-1 if partition is None else int(partition),
            )
        except BufferError:
            return False
        return True

    @property
    def _producer(self) -> Producer:
        handle = self._handle
        if handle is None:
            raise self._closed_error(None)
        return handle

    def flush(self, timeout: float = 10.0) -> int:
        """Wait for outstanding messages; return how many are still queued."""
        if self._handle is None:
            return 0
        remaining: int = self._handle.flush(timeout)
        return remaining

    def close(self, timeout: float = 10.0) -> None:
        """Flush outstanding messages and stop the poll thread.

        Sends still waiting for the broker once `timeout` passed are purged:
        librdkafka reports each as failed, so its caller gets a
        `KafkaTransportError`. Later sends fail at once.
        """
        self._closed = True
        remaining = self.flush(timeout)
        self._stopping.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return
        handle = self._handle
        if handle is not None and remaining:
            handle.purge()
            handle.poll(0)  # serves the purged messages' delivery reports
            self._dispatch()
        # Dropping the last reference destroys the librdkafka handle, which
        # would otherwise keep reconnecting to a broker long gone.
        self._handle = None
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
            return KafkaTransportError(
                "delivery",
                self.client,
                msg.topic() if msg is not None else None,
                kafka_reason(err),
                "Check that the bootstrap servers "
                f"{self._kafka_client.bootstrap_servers} are reachable and "
                "accept writes to the topic, then send again.",
            )
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
