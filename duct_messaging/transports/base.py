"""The small protocols every transport implements.

A transport contributes three things: a *clients* registry (one named client
per cluster), *producers* that send one encoded message to one target, and
*consumer sources* that hand batches of deliveries to the shared consumer
runtime and acknowledge them afterwards. Everything else (routing, codecs,
schemas, retries, dead letters, tracing) lives in `duct_messaging.messaging`
and is the same for every broker.

Batches cross between a client's own threads and the event loop; single
messages never do, because one crossing per message caps throughput at a
few thousand messages per second.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class Target:
    """One place a produce call sends to: a client (cluster) plus its options.

    `options` holds the per-target overrides from the routing, such as
    `kafka_topic`, `stream`, `subject`, `exchange` or `routing_key`.
    """

    client: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def option(self, name: str, default: Any = None) -> Any:
        """Return the target option `name`, or `default` when it is not set."""
        return self.options.get(name, default)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """An encoded message ready for a transport: body, headers and key.

    `topic` is the logical routing topic; a transport derives its own
    destination (Kafka topic, stream, subject, exchange) from it and the
    target's options.
    """

    topic: str
    body: bytes
    headers: Mapping[str, str]
    key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Receipt:
    """Proof that one target accepted a message.

    `position` is the broker's own name for where the message landed: a
    Kafka offset, a Redis stream id, a JetStream sequence.
    """

    client: str
    transport: str
    destination: str
    partition: int | None = None
    position: int | str | None = None


@dataclass(slots=True)
class Delivery:
    """One message handed from a consumer source to the runtime.

    `attempt` counts deliveries of this message as far as the transport
    knows (1 for the first); `handle` is the transport's own object needed
    to acknowledge it.
    """

    body: bytes
    headers: dict[str, str]
    destination: str
    key: bytes | None = None
    partition: int | None = None
    position: int | str | None = None
    attempt: int = 1
    handle: Any = None


@runtime_checkable
class TransportProducer(Protocol):
    """Sends encoded messages to targets on one client (cluster)."""

    transport: str
    client: str

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Send `message` to `target` and return once the broker accepted it."""
        ...

    def destination(self, target: Target, topic: str) -> str:
        """Return the broker destination `target` resolves to for `topic`."""
        ...


class ConsumerSource(Protocol):
    """Feeds one subscription's deliveries to the runtime, and acks them.

    These four methods are required. The runtime also looks for optional
    ones by attribute and uses them when present (the protocols in
    `duct_messaging.messaging.consumer` spell them out):

    - `async release(deliveries)`: hand deliveries back unsettled, so they
      come again (a halt, a failed dead-letter write, an interrupted
      back-off). Without it they come again once the broker notices.
    - `async reject(deliveries)`: settle deliveries whose dead letter was
      durably written, instead of `ack`. They are never delivered to this
      subscription again, and the broker may route them on (RabbitMQ
      dead-letter exchange; NATS terminates them).
    - `claim(delivery) -> bool` and `finish(delivery, *, finished)`: called
      around every handler attempt, from worker threads, so they must be
      thread-safe and quick. `claim` returning False drops a delivery the
      source withdrew (a revoked Kafka partition); `finish(finished=True)`
      is the acknowledgement, and `ack` is not called for it. With
      `reject`, a dead delivery ends with `finished=False` and is rejected.
    - `async pause(partitions)` / `async resume(partitions)`: stop and
      restart fetching partitions while a delivery of each waits out a
      retry back-off.
    """

    async def start(self) -> None:
        """Connect and subscribe; return once deliveries can be fetched."""
        ...

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Return up to `max_messages` deliveries, waiting at most `timeout` s."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Mark `deliveries` as done: they will not be delivered again."""
        ...

    async def stop(self) -> None:
        """Stop intake, make acknowledgements durable and disconnect."""
        ...


class SourceFactory(Protocol):
    """Builds the consumer source for one subscription of a transport."""

    def __call__(self, subscription: Any) -> ConsumerSource: ...
