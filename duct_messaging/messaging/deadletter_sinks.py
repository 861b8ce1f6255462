"""Dead-letter sinks as components: logger, storage, producer and hybrid.

A consumers component names its sink with `deadletter: !ref <key>`:

    duct.deadletter/storage:              # JSON lines, one file per topic
      directory: var/dead-letters         # relative to the working directory
    duct.deadletter/postgres:             # or a PostgreSQL table
      conninfo: postgresql://postgres@127.0.0.1:5432/app
      table: duct_dead_letters            # created if missing
    duct.deadletter/producer:             # publish to `<topic>.dl`
      producers: !ref duct.messaging/producers
      # client: kafka-ops                 # default: the client it came from
      # topic: "{topic}.dl"               # {topic}, {destination}, {subscription}
    duct.deadletter/hybrid:               # storage first, then producer
      storage: !ref duct.deadletter/storage
      producer: !ref duct.deadletter/producer
    duct.deadletter/logger: {}            # log only; nothing to replay

    duct.kafka/consumers:
      clients: !ref duct.kafka/clients
      routing: !ref duct.messaging/routing
      deadletter: !ref duct.deadletter/hybrid

A subscription's merged `deadletter` routing section (defaults, then
topic, then subscription) can choose, for the producer sink, another
`topic` template or `client`, e.g. `deadletter: {topic: orders.failed}`.

`duct.deadletter/storage` and `duct.deadletter/postgres` derive from
`duct.deadletter/store`: they keep what they wrote, and `duct-messaging
dlq` lists and replays from every key of that type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from duct_messaging.messaging._config_check import (
    Field,
    Fields,
    RefTo,
    Template,
    as_schema,
    boolean,
    text,
)
from duct_messaging.messaging._deadletter_files import JsonLinesStore
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    DeadLetterStore,
    LoggerSink,
    dead_letter_headers,
)
from duct_messaging.messaging.producer import send_to_targets
from duct_messaging.system import component
from duct_messaging.transports.base import OutgoingMessage, Target, TransportProducer

# The type every replayable store derives from.
STORE_TYPE = "duct.deadletter/store"
DEFAULT_TOPIC_TEMPLATE = "{topic}.dl"

__all__ = [
    "DEFAULT_TOPIC_TEMPLATE",
    "STORE_TYPE",
    "HybridSink",
    "JsonLinesStore",
    "LoggerSink",
    "ProducerSink",
]


#: A dead-letter topic: a name, or a template over these placeholders.
TOPIC_TEMPLATE = Template("topic", "destination", "subscription")


class ProducerSink:
    """Publishes each dead letter as a message to a dead-letter topic.

    The body is the original body, the key the original key; the headers
    are the original headers plus the `x-dead-letter-*` ones describing the
    failure. The topic is the subscription's `deadletter.topic`, else this
    sink's `topic` template (default `<topic>.dl`). The client is the
    subscription's `deadletter.client`, else this sink's `client`, else the
    client the message was consumed from: the dead letter lands on the
    cluster it came from. `write` returns once the broker accepted it.

    The destination must exist or be created on first write (Kafka and tansu
    auto-create topics by default).
    """

    def __init__(
        self,
        producers: Mapping[str, TransportProducer],
        *,
        client: str | None = None,
        topic: str = DEFAULT_TOPIC_TEMPLATE,
    ) -> None:
        self.producers = producers
        self.client = client
        self.topic = topic

    def route(self, dead_letter: DeadLetter) -> tuple[str, str]:
        """Return the (client, topic) `dead_letter` is published to."""
        config = dead_letter.config
        client = str(config.get("client") or self.client or dead_letter.client)
        template = str(config.get("topic") or self.topic)
        topic = template.format(
            topic=dead_letter.topic,
            destination=dead_letter.destination,
            subscription=dead_letter.subscription,
        )
        return client, topic

    async def write(self, dead_letter: DeadLetter) -> None:
        """Publish `dead_letter`; raise if the broker did not accept it."""
        client, topic = self.route(dead_letter)
        headers = {**dead_letter.headers, **dead_letter_headers(dead_letter)}
        message = OutgoingMessage(topic, dead_letter.body, headers, dead_letter.key)
        await send_to_targets(self.producers, message, [Target(client)])


class HybridSink:
    """Writes each dead letter to a storage sink, then to a producer sink.

    The storage write comes first, so a dead letter is kept even when its
    publication fails; the failure still fails the write, so the message is
    delivered again and both are tried again (the store keeps one copy).
    Listing and marking go to the storage.
    """

    def __init__(self, storage: DeadLetterSink, producer: DeadLetterSink) -> None:
        self.storage = storage
        self.producer = producer

    async def write(self, dead_letter: DeadLetter) -> None:
        """Write to the storage, then publish."""
        await self.storage.write(dead_letter)
        await self.producer.write(dead_letter)

    async def read(
        self,
        *,
        topic: str | None = None,
        status: DeadLetterStatus | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[DeadLetter]:
        """Return what the storage holds (empty if it keeps nothing)."""
        if not isinstance(self.storage, DeadLetterStore):
            return []
        return await self.storage.read(topic=topic, status=status, ids=ids)

    async def mark(self, ids: Sequence[str], status: DeadLetterStatus) -> int:
        """Mark dead letters in the storage."""
        if not isinstance(self.storage, DeadLetterStore):
            return 0
        return await self.storage.mark(ids, status)


LOGGER = Fields({}, noun="setting", hint="The logger sink takes no settings: write {}")


@component("duct.deadletter/logger", schema=as_schema(LOGGER))
def logger(value: Any) -> LoggerSink:
    """Return a sink that logs each dead letter as an ERROR event."""
    return LoggerSink()


STORAGE = Fields(
    {
        "directory": Field(
            text(),
            required=True,
            hint="the folder that holds one JSON-lines file per topic",
        ),
        "fsync": boolean(),
    },
    nullable=False,
)


@component(
    "duct.deadletter/storage", derives_from=STORE_TYPE, schema=as_schema(STORAGE)
)
def storage(value: Mapping[str, Any]) -> JsonLinesStore:
    """Return a JSON-lines store in `directory` (created if missing).

    Value: `directory`, optional `fsync` (default true: each write is on
    disk before the message is acknowledged).
    """
    return JsonLinesStore(
        Path(value["directory"]), fsync=bool(value.get("fsync", True))
    )


PRODUCER = Fields(
    {
        "producers": Field(
            RefTo("duct.messaging/producers"),
            required=True,
            hint="use !ref duct.messaging/producers",
        ),
        "client": text(),
        "topic": TOPIC_TEMPLATE,
    },
    nullable=False,
)


@component("duct.deadletter/producer", schema=as_schema(PRODUCER))
def producer(value: Mapping[str, Any]) -> ProducerSink:
    """Return a sink publishing dead letters; see `ProducerSink`.

    Value: `producers` (`!ref duct.messaging/producers`), optional `client`
    and `topic` (template, default `{topic}.dl`).
    """
    registry = value["producers"]
    client = value.get("client")
    if client is not None and client not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise ValueError(
            f"duct.deadletter/producer client {client!r} has no producer. "
            f"Known clients: {known}"
        )
    return ProducerSink(
        registry,
        client=None if client is None else str(client),
        topic=str(value.get("topic") or DEFAULT_TOPIC_TEMPLATE),
    )


_SINK = "a dead-letter sink (duct.deadletter/*)"
HYBRID = Fields(
    {
        "storage": Field(
            RefTo("duct.deadletter/storage", what=_SINK),
            required=True,
            hint="a !ref to a dead-letter sink, e.g. !ref duct.deadletter/storage",
        ),
        "producer": Field(
            RefTo("duct.deadletter/producer", what=_SINK),
            required=True,
            hint="a !ref to a dead-letter sink, e.g. !ref duct.deadletter/producer",
        ),
    },
    nullable=False,
)


@component("duct.deadletter/hybrid", schema=as_schema(HYBRID))
def hybrid(value: Mapping[str, Any]) -> HybridSink:
    """Return a sink writing to `storage`, then to `producer`."""
    return HybridSink(value["storage"], value["producer"])
