"""The RabbitMQ transport, on aio-pika (AMQP 0-9-1).

Wire format: the AMQP body is the encoded message alone; every header is
an AMQP header-table entry, and `message_id` / `content_type` are also set
as message properties so plain clients see them. Messages are persistent.
A UTF-8 message key travels in `x-key`.

Config:

    duct.rabbitmq/clients:
      rabbit-main:
        url: amqp://guest:guest@127.0.0.1:5672/   # the vhost is the URL path
        exchange_type: topic     # default type of the exchanges we declare
        prefetch: 500            # unacknowledged deliveries per subscription
        confirm_window: 1000     # publishes awaiting their confirm, at most
        mandatory: true          # an unroutable publish fails the send

Topology comes from the routing. A target sends to `exchange` (default: the
topic) with `routing_key` (default: the topic); its `exchange_type`
overrides the client default; a `queue` on a target is declared and bound
when first published to, so messages wait for a subscription that has not
started yet. A subscription declares the exchange, its queue and the
binding: the queue is `options.queue`, or the `queue` its client's publish
target names, or else `<exchange>.<subscription id>`, so every
subscription gets its own copy and instances of one subscription share
one queue. Declarations are durable; a declaration that clashes with what
exists (another type, other arguments) fails, nothing is redeclared.

Producing: one confirm channel per client; sends run concurrently up to
`confirm_window`, each returning once the broker confirmed it. Consuming:
one channel per subscription with `prefetch`; finished deliveries are
acked in as few frames as possible (`multiple` covers a run of finished
tags), dead-lettered ones are rejected without requeue (so a queue declared
with `x-dead-letter-exchange` in `options.queue_arguments` hands them to
that exchange, and any other queue drops them), released ones are nacked
back to their queue, and on stop the channel closes, which returns
everything not settled to the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging import envelope
from duct_messaging.messaging._config_check import (
    ANY,
    Choice,
    Field,
    Fields,
    MapOf,
    as_schema,
    boolean,
    integer,
    text,
)
from duct_messaging.messaging.components import producers_spec
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.envelope import decode_headers
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import component
from duct_messaging.transports._shared import (
    clients_spec,
    close_all,
    connect_all,
    consumers_component,
    key_from_headers,
    key_header,
    routed_option,
)
from duct_messaging.transports.base import Delivery, OutgoingMessage, Receipt, Target

try:
    import aio_pika
    import aio_pika.exceptions
    import aiormq.abc
    from pamqp.commands import Basic
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("The RabbitMQ transport", "rabbitmq", "aio-pika") from exc

log = structlog.get_logger(__name__)

TRANSPORT = "rabbitmq"
DEFAULT_EXCHANGE_TYPE = "topic"
DEFAULT_PREFETCH = 500
DEFAULT_CONFIRM_WINDOW = 1000
# Set by quorum queues: how often a message was delivered before.
DELIVERY_COUNT_HEADER = "x-delivery-count"


class RabbitTransportError(DuctMessagingError):
    """Raised when RabbitMQ refused an operation of this transport."""

    def __init__(self, client: str, action: str, reason: str) -> None:
        self.client = client
        self.action = action
        super().__init__(f"RabbitMQ client {client!r} failed to {action}: {reason}")


class UnroutableMessageError(RabbitTransportError):
    """Raised when a mandatory publish reached no queue."""

    def __init__(self, client: str, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            client,
            f"publish to exchange {exchange!r} with routing key {routing_key!r}",
            "no queue is bound for it, so the broker would drop it. Start the "
            "subscription first, name a `queue` on the target, or set "
            "`mandatory: false` on the client to accept the loss",
        )


@dataclass(slots=True)
class RabbitClient:
    """One named RabbitMQ vhost: its URL, defaults and robust connection."""

    name: str
    url: str
    exchange_type: str = DEFAULT_EXCHANGE_TYPE
    prefetch: int = DEFAULT_PREFETCH
    confirm_window: int = DEFAULT_CONFIRM_WINDOW
    mandatory: bool = True
    connection: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> RabbitClient:
        """Build a client (not connected yet) from its config map."""
        return cls(
            name=name,
            url=str(config["url"]),
            exchange_type=str(config.get("exchange_type", DEFAULT_EXCHANGE_TYPE)),
            prefetch=int(config.get("prefetch", DEFAULT_PREFETCH)),
            confirm_window=int(config.get("confirm_window", DEFAULT_CONFIRM_WINDOW)),
            mandatory=bool(config.get("mandatory", True)),
            options=dict(config.get("options") or {}),
        )

    async def connect(self) -> None:
        """Open the robust connection (it reconnects on its own)."""
        try:
            self.connection = await aio_pika.connect_robust(
                self.url,
                client_properties={"connection_name": f"duct-{self.name}"},
                **self.options,
            )
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            raise RabbitTransportError(self.name, "connect", repr(exc)) from exc

    async def aclose(self) -> None:
        """Close the connection and every channel on it."""
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()

    async def declare(
        self,
        exchange: str,
        exchange_type: str,
        queue: str | None = None,
        binding_key: str | None = None,
        queue_arguments: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare `exchange` and, if given, `queue` bound to it by `binding_key`.

        Runs on a channel of its own: a clashing declaration closes the
        channel it was made on, and must not take a working one down.
        """
        try:
            async with self.connection.channel(publisher_confirms=False) as channel:
                if exchange:
                    await channel.declare_exchange(
                        exchange, exchange_type, durable=True
                    )
                if queue is not None:
                    declared = await channel.declare_queue(
                        queue, durable=True, arguments=dict(queue_arguments or {})
                    )
                    if exchange:
                        await declared.bind(exchange, routing_key=binding_key or "")
        except aio_pika.exceptions.AMQPError as exc:
            what = f"exchange {exchange!r}" + (f" and queue {queue!r}" if queue else "")
            raise RabbitTransportError(self.name, f"declare {what}", repr(exc)) from exc


def amqp_message(message: OutgoingMessage) -> Any:
    """Return the persistent AMQP message carrying `message`."""
    headers: dict[str, Any] = {**message.headers, **key_header(message.key)}
    return aio_pika.Message(
        message.body,
        headers=headers,
        message_id=message.headers.get(envelope.MESSAGE_ID),
        content_type=message.headers.get(envelope.CONTENT_TYPE),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


# Most (target, topic) pairs a producer remembers how to publish to; past
# this (targets built per call) it forgets them all and starts again.
MAX_PLANS = 1024


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to publish one topic to one target, worked out once."""

    target: Target  # held so that its id() names it while the plan is cached
    exchange: str
    routing_key: str
    mandatory: bool
    topology: tuple[str, str, str | None, str]


class RabbitProducer:
    """Publishes to exchanges of one RabbitMQ client, with publisher confirms.

    What a target means (exchange, routing key, `mandatory`, the topology
    to declare) is worked out on its first send for a topic and reused.
    """

    transport = TRANSPORT

    def __init__(self, client: RabbitClient) -> None:
        self.client = client.name
        self._rabbit_client = client
        self._channel: Any = None
        self._window = asyncio.Semaphore(client.confirm_window)
        self._exchanges: dict[str, Any] = {}
        self._declared: dict[
            tuple[str, str, str | None, str], asyncio.Future[None]
        ] = {}
        self._plans: dict[tuple[int, str], _Plan] = {}

    async def open(self) -> None:
        """Open the confirm channel."""
        connection = self._rabbit_client.connection
        self._channel = await connection.channel(publisher_confirms=True)

    async def aclose(self) -> None:
        """Close the confirm channel once in-flight publishes are confirmed."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    def destination(self, target: Target, topic: str) -> str:
        """Return the exchange of `target` (`exchange`, else `topic`)."""
        exchange = target.option("exchange")
        return str(topic if exchange is None else exchange)

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Publish `message`; return once the broker confirmed it."""
        plan = self._plans.get((id(target), message.topic))
        if plan is None or plan.target is not target:
            plan = self._plan(target, message.topic)
        exchange, routing_key = plan.exchange, plan.routing_key
        await self._ensure_topology(plan)
        publisher = await self._exchange(exchange)
        async with self._window:
            try:
                result = await publisher.publish(
                    amqp_message(message), routing_key, mandatory=plan.mandatory
                )
            except (
                aio_pika.exceptions.AMQPError,
                aio_pika.exceptions.ChannelInvalidStateError,
            ) as exc:
                if isinstance(exc, aio_pika.exceptions.ChannelNotFoundEntity):
                    # Deleted behind our back: declare it again on the next send.
                    self._forget(exchange)
                raise RabbitTransportError(
                    self.client, f"publish to exchange {exchange!r}", repr(exc)
                ) from exc
        if isinstance(result, aiormq.abc.DeliveredMessage):
            raise UnroutableMessageError(self.client, exchange, routing_key)
        if not isinstance(result, Basic.Ack):
            raise RabbitTransportError(
                self.client,
                f"publish to exchange {exchange!r}",
                f"broker answered {result!r}",
            )
        return Receipt(self.client, TRANSPORT, exchange or routing_key)

    async def send_many(
        self, target: Target, messages: Sequence[OutgoingMessage]
    ) -> list[Receipt]:
        """Publish every message, up to `confirm_window` awaiting confirms.

        Raises the first failure once every publish was confirmed or failed.
        """
        results = await asyncio.gather(
            *(self.send(target, m) for m in messages), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    def _forget(self, exchange: str) -> None:
        self._exchanges.pop(exchange, None)
        for key in [k for k in self._declared if k[0] == exchange]:
            del self._declared[key]

    async def _exchange(self, name: str) -> Any:
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = await self._channel.get_exchange(name, ensure=False)
            self._exchanges[name] = exchange
        return exchange

    def _plan(self, target: Target, topic: str) -> _Plan:
        exchange = self.destination(target, topic)
        routing_key = str(target.option("routing_key") or topic)
        exchange_type = str(
            target.option("exchange_type") or self._rabbit_client.exchange_type
        )
        queue = target.option("queue")
        plan = _Plan(
            target=target,
            exchange=exchange,
            routing_key=routing_key,
            mandatory=bool(target.option("mandatory", self._rabbit_client.mandatory)),
            topology=(exchange, exchange_type, queue, routing_key),
        )
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[(id(target), topic)] = plan
        return plan

    async def _ensure_topology(self, plan: _Plan) -> None:
        key = plan.topology
        declared = self._declared.get(key)
        if declared is None:
            exchange, exchange_type, queue, routing_key = key
            declared = asyncio.get_running_loop().create_future()
            self._declared[key] = declared
            try:
                await self._rabbit_client.declare(
                    exchange, exchange_type, queue, routing_key
                )
            except BaseException as exc:
                del self._declared[key]
                declared.set_exception(exc)
                declared.exception()  # retrieved: waiters get it below
                raise
            declared.set_result(None)
        await declared


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """Where one subscription consumes from: exchange, binding and queue."""

    exchange: str
    exchange_type: str
    binding_key: str
    queue: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    prefetch: int = DEFAULT_PREFETCH


def queue_spec(
    routing: Routing, subscription: Subscription, client: RabbitClient
) -> QueueSpec:
    """Return the topology `subscription` consumes from (see the module docstring)."""
    exchange = routed_option(routing, subscription, "exchange")
    exchange = subscription.topic if exchange is None else str(exchange)
    binding = routed_option(routing, subscription, "routing_key") or subscription.topic
    queue = routed_option(routing, subscription, "queue")
    if queue is None:
        queue = f"{exchange}.{subscription.id}" if exchange else binding
    exchange_type = (
        routed_option(routing, subscription, "exchange_type") or client.exchange_type
    )
    options = subscription.options
    return QueueSpec(
        exchange=exchange,
        exchange_type=str(exchange_type),
        binding_key=str(binding),
        queue=str(queue),
        arguments=dict(options.get("queue_arguments") or {}),
        prefetch=int(options.get("prefetch", client.prefetch)),
    )


class RabbitSource:
    """Feeds one subscription from its queue over a channel of its own."""

    def __init__(
        self, client: RabbitClient, subscription: Subscription, spec: QueueSpec
    ) -> None:
        self.spec = spec
        self.subscription = subscription.id
        self._client = client
        self._channel: Any = None
        self._consumer_tag: str | None = None
        self._queue: Any = None
        self._buffer: asyncio.Queue[Any] = asyncio.Queue()
        # Delivery tags handed to us and not settled yet, per AMQP channel:
        # after a reconnect the robust channel delivers on a new underlying
        # channel whose tags start again at 1.
        self._unsettled: dict[int, set[int]] = {}

    async def start(self) -> None:
        """Declare the topology, set the prefetch and start consuming."""
        spec = self.spec
        await self._client.declare(
            spec.exchange,
            spec.exchange_type,
            spec.queue,
            spec.binding_key,
            spec.arguments,
        )
        self._channel = await self._client.connection.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=spec.prefetch)
        self._queue = await self._channel.get_queue(spec.queue, ensure=False)
        self._consumer_tag = await self._queue.consume(self._on_message)

    async def _on_message(self, message: Any) -> None:
        self._unsettled.setdefault(id(message.channel), set()).add(message.delivery_tag)
        self._buffer.put_nowait(message)

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Return buffered deliveries, waiting up to `timeout` for the first."""
        try:
            first = await asyncio.wait_for(self._buffer.get(), timeout)
        except TimeoutError:
            return []
        messages = [first]
        while len(messages) < max_messages and not self._buffer.empty():
            messages.append(self._buffer.get_nowait())
        return [self._delivery(m) for m in messages]

    def _delivery(self, message: Any) -> Delivery:
        headers = decode_headers(message.headers)
        count = headers.get(DELIVERY_COUNT_HEADER)
        if count is not None and count.isdigit():
            attempt = int(count) + 1
        else:
            attempt = 2 if message.redelivered else 1
        return Delivery(
            body=message.body,
            headers=headers,
            destination=self.spec.queue,
            key=key_from_headers(headers),
            position=message.delivery_tag,
            attempt=attempt,
            handle=message,
        )

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries`, one frame for each run of settled tags.

        A delivery whose channel closed meanwhile cannot be acked; the
        broker has put it back in the queue, so it comes again.
        """
        for channel, by_tag in self._by_channel(deliveries).items():
            unsettled = self._unsettled.get(channel, set())
            try:
                await _ack_runs(by_tag, unsettled)
            except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                self._lost_channel(channel, "ack", exc)
                continue
            unsettled.difference_update(by_tag)

    async def reject(self, deliveries: Sequence[Delivery]) -> None:
        """Reject dead-lettered `deliveries` without requeueing them.

        The broker drops them, or routes them to the queue's dead-letter
        exchange when it has one. As with `ack`, a delivery whose channel
        closed meanwhile comes again.
        """
        for channel, by_tag in self._by_channel(deliveries).items():
            unsettled = self._unsettled.get(channel, set())
            try:
                for message in by_tag.values():
                    await message.reject(requeue=False)
            except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                self._lost_channel(channel, "reject", exc)
                continue
            unsettled.difference_update(by_tag)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Nack `deliveries` back to the queue for delivery again."""
        for channel, by_tag in self._by_channel(deliveries).items():
            unsettled = self._unsettled.get(channel, set())
            try:
                for message in by_tag.values():
                    await message.nack(requeue=True)
            except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
                self._lost_channel(channel, "nack", exc)
                continue
            unsettled.difference_update(by_tag)

    def _by_channel(self, deliveries: Sequence[Delivery]) -> dict[int, dict[int, Any]]:
        grouped: dict[int, dict[int, Any]] = {}
        for delivery in deliveries:
            message = delivery.handle
            grouped.setdefault(id(message.channel), {})[message.delivery_tag] = message
        return grouped

    def _lost_channel(self, channel: int, action: str, exc: BaseException) -> None:
        self._unsettled.pop(channel, None)
        log.warning(
            "rabbitmq_settle_on_closed_channel",
            subscription=self.subscription,
            action=action,
            error=repr(exc),
        )

    async def stop(self) -> None:
        """Cancel the consumer and close the channel; unacked messages requeue."""
        if self._channel is None:
            return
        try:
            if self._consumer_tag is not None:
                await self._queue.cancel(self._consumer_tag)
            await self._channel.close()
        except (aio_pika.exceptions.AMQPError, RuntimeError) as exc:
            # RuntimeError: aiormq's ChannelInvalidStateError, a channel
            # that closed already (the broker or a connection loss did).
            log.warning(
                "rabbitmq_consumer_stop_failed",
                subscription=self.subscription,
                error=repr(exc),
            )
        self._channel = None
        self._unsettled.clear()


async def _ack_runs(by_tag: Mapping[int, Any], unsettled: set[int]) -> None:
    """Ack `by_tag` (tag -> message of one channel) in as few frames as possible.

    Every tag below the lowest one still unsettled outside this batch is
    covered by one `multiple` ack of the highest such tag; the rest are
    acked one by one.
    """
    others = unsettled.difference(by_tag)
    ceiling = min(others) if others else None
    tags = sorted(by_tag)
    covered = [t for t in tags if ceiling is None or t < ceiling]
    if covered:
        await by_tag[covered[-1]].ack(multiple=True)
    for tag in tags[len(covered) :]:
        await by_tag[tag].ack()


def make_runtime(
    clients: Mapping[str, RabbitClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from RabbitMQ queues."""

    def make_source(subscription: Subscription) -> RabbitSource:
        client = clients[subscription.client]
        return RabbitSource(
            client, subscription, queue_spec(routing, subscription, client)
        )

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


CLIENTS = clients_spec(
    Fields(
        {
            "url": Field(
                text(), required=True, hint="e.g. amqp://guest:guest@127.0.0.1:5672/"
            ),
            "exchange_type": Choice(*(kind.value for kind in aio_pika.ExchangeType)),
            "prefetch": integer(minimum=0),
            "confirm_window": integer(minimum=1),
            "mandatory": boolean(),
            "options": MapOf(
                ANY, expected="a mapping of keyword arguments for connect_robust"
            ),
        },
        noun="RabbitMQ client setting",
        nullable=False,
    )
)


@component("duct.rabbitmq/clients", schema=as_schema(CLIENTS))
async def clients(value: Mapping[str, Any]) -> dict[str, RabbitClient]:
    """Connect one `RabbitClient` per name."""
    registry = {
        name: RabbitClient.from_config(name, config) for name, config in value.items()
    }
    await connect_all(registry)
    return registry


@clients.halt
async def _halt_clients(registry: Mapping[str, RabbitClient]) -> None:
    await close_all(registry)


@component("duct.rabbitmq/producers", schema=as_schema(producers_spec(TRANSPORT)))
async def producers(value: Mapping[str, Any]) -> dict[str, RabbitProducer]:
    """Return one producer (with its confirm channel) per client, by name."""
    registry = {
        name: RabbitProducer(client) for name, client in value["clients"].items()
    }
    for producer in registry.values():
        await producer.open()
    return registry


@producers.halt
async def _halt_producers(registry: Mapping[str, RabbitProducer]) -> None:
    await asyncio.gather(
        *(p.aclose() for p in registry.values()), return_exceptions=True
    )


consumers = consumers_component(TRANSPORT, make_runtime)
