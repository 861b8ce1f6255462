"""The NATS JetStream transport, on nats-py.

Wire format: the message body is the NATS payload; headers are NATS
headers, plus `Nats-Msg-Id` set from `x-message-id` so JetStream drops a
repeated send of the same message within the stream's duplicate window (a
dead letter, or a replay of one, gets an id of its own: see `publish_id`).
A UTF-8 message key travels in `x-key`.

Config:

    duct.nats/clients:
      nats-main:
        servers: nats://127.0.0.1:4222     # a URL or a list of URLs
        publish_timeout_s: 5
        streams:                           # provisioned at start
          ORDERS:
            subjects: [orders.>]
            storage: file                  # file | memory
            retention: limits              # limits | interest | workqueue
            max_age_s: 86400
            duplicate_window_s: 120

Streams are provisioned explicitly and idempotently: a stream the config
declares is created when missing; an existing one is compared field by
field with what the config states and a difference fails the start
(`StreamConfigMismatchError`). Nothing is ever changed on the server
silently. Fields the config leaves out are not compared.

Targets name the subject with `subject` (default: the topic). A subject no
stream captures fails the send. Subscriptions read the subject of their
client's publish target (or `options.subject`) through a durable pull
consumer named `options.durable` (default: the subscription id, with
characters NATS forbids replaced by `_`) on `options.stream` (default: the
stream that captures the subject). Options `ack_wait_s`, `max_ack_pending`
and `max_deliver` go to the consumer's config when it is created. A source
idle for `consumer_check_s` (default 5) checks that its consumer still
exists and recreates it if someone deleted it.

Producing uses JetStream async publish: concurrent sends pipeline their
publish acks, while each `send` still returns only once the stream stored
the message. Consuming acks each finished message (acks are fire-and-forget
writes that the client coalesces), terminates a dead-lettered one (JetStream
never delivers a terminated message again, whatever `max_deliver` says, and
publishes a `MSG_TERMINATED` advisory for it), naks a released one with the
subscription's retry delay, and on stop naks what it fetched but never
handed out.

Held messages stay ours. A message the source fetched and has not settled
(queued behind others, in a handler, or waiting out a retry back-off) is
kept alive with progress acks (`+WPI`): a timer of the source sends one,
every `ack_wait_s / 4`, for each message held longer than `ack_wait_s / 2`
since it was fetched or last kept alive. JetStream therefore redelivers a
held message only when this process stalls (its event loop blocked for
about `ack_wait_s / 2`) or its connection is down for that long; a crashed
process's messages come again after `ack_wait_s`. A fetch asks for no more
than `max_ack_pending` minus what the source holds, since the server hands
out no more anyway. A durable consumer recreated after someone deleted it
starts at the lowest sequence this source fetched and has not acked or
terminated (released ones included), so nothing it skipped is lost.
"""

from __future__ import annotations

import asyncio
import re
import time
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
    Kind,
    ListOf,
    MapOf,
    OneOf,
    as_schema,
    integer,
    number,
    text,
)
from duct_messaging.messaging.components import producers_spec
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.deadletter import HEADER_PREFIX
from duct_messaging.messaging.retry import RetryPolicy
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import component
from duct_messaging.transports._shared import (
    clients_spec,
    close_all,
    connect_all,
    consumers_component,
    key_from_headers,
    key_header,
)
from duct_messaging.transports.base import Delivery, OutgoingMessage, Receipt, Target

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api
    from nats.js.client import JetStreamContext
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingExtraError("The NATS JetStream transport", "nats", "nats-py") from exc

log = structlog.get_logger(__name__)

TRANSPORT = "nats"
MSG_ID_HEADER = "Nats-Msg-Id"
# Set on dead letters sent as messages, and on their replays.
DEAD_LETTER_ID_HEADER = HEADER_PREFIX + "id"
REPLAYED_FROM_HEADER = "x-replayed-from"
DEFAULT_PUBLISH_TIMEOUT_S = 5.0
DEFAULT_ACK_WAIT_S = 30.0
DEFAULT_MAX_ACK_PENDING = 1000
# After this long without messages a source checks that its durable consumer
# still exists: pulls from a deleted consumer just time out, silently.
DEFAULT_CONSUMER_CHECK_S = 5.0
# The shortest pull a fetch makes: a round trip to the server.
MIN_FETCH_TIMEOUT_S = 0.005
# YAML field -> nats-py StreamConfig field.
STREAM_FIELDS = {
    "subjects": "subjects",
    "storage": "storage",
    "retention": "retention",
    "discard": "discard",
    "max_age_s": "max_age",
    "max_msgs": "max_msgs",
    "max_bytes": "max_bytes",
    "max_msg_size": "max_msg_size",
    "max_msgs_per_subject": "max_msgs_per_subject",
    "duplicate_window_s": "duplicate_window",
    "replicas": "num_replicas",
    "description": "description",
}
_ENUM_FIELDS = {
    "storage": api.StorageType,
    "retention": api.RetentionPolicy,
    "discard": api.DiscardPolicy,
}
_NAME_FORBIDDEN = re.compile(r"[^A-Za-z0-9_-]")


class NatsTransportError(DuctMessagingError):
    """Raised when NATS or JetStream refused an operation of this transport."""

    def __init__(self, client: str, action: str, reason: str) -> None:
        self.client = client
        self.action = action
        super().__init__(f"NATS client {client!r} failed to {action}: {reason}")


class StreamConfigMismatchError(DuctMessagingError, ValueError):
    """Raised when an existing stream differs from the config that declares it."""

    def __init__(self, client: str, stream: str, differences: Sequence[str]) -> None:
        self.client = client
        self.stream = stream
        self.differences = tuple(differences)
        diff = "; ".join(self.differences)
        super().__init__(
            f"JetStream stream {stream!r} (client {client!r}) exists with a different "
            f"config: {diff}. Change the config to match, or update the stream "
            "deliberately (nats stream edit); it is never changed silently."
        )


class ConsumerConfigMismatchError(DuctMessagingError, ValueError):
    """Raised when an existing durable consumer reads something else."""

    def __init__(self, stream: str, durable: str, differences: Sequence[str]) -> None:
        self.stream = stream
        self.durable = durable
        self.differences = tuple(differences)
        diff = "; ".join(self.differences)
        super().__init__(
            f"Durable consumer {durable!r} on stream {stream!r} exists with a "
            f"different config: {diff}. Give the subscription another `durable` "
            "name, or delete the old consumer."
        )


@dataclass(slots=True)
class NatsClient:
    """One named NATS connection with its JetStream context and streams."""

    name: str
    servers: list[str]
    streams: dict[str, dict[str, Any]]
    publish_timeout_s: float = DEFAULT_PUBLISH_TIMEOUT_S
    connection: Any = None
    js: Any = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any]) -> NatsClient:
        """Build a client (not connected yet) from its config map."""
        servers = config["servers"]
        return cls(
            name=name,
            servers=[servers] if isinstance(servers, str) else list(servers),
            streams={
                str(k): dict(v or {}) for k, v in (config.get("streams") or {}).items()
            },
            publish_timeout_s=float(
                config.get("publish_timeout_s", DEFAULT_PUBLISH_TIMEOUT_S)
            ),
            options=dict(config.get("options") or {}),
        )

    async def connect(self) -> None:
        """Connect, then provision every declared stream."""
        try:
            self.connection = await nats.connect(
                servers=self.servers,
                name=f"duct-{self.name}",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                **self.options,
            )
        except (nats.errors.Error, OSError) as exc:
            raise NatsTransportError(
                self.name, f"connect to {self.servers}", str(exc)
            ) from exc
        self.js = self.connection.jetstream()
        for stream, spec in self.streams.items():
            await provision_stream(self, stream, spec)

    async def aclose(self) -> None:
        """Flush pending writes (acks included) and close the connection."""
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()


def stream_config(name: str, spec: Mapping[str, Any]) -> Any:
    """Return the nats-py `StreamConfig` the YAML `spec` of stream `name` states."""
    fields: dict[str, Any] = {}
    for key, value in spec.items():
        target = STREAM_FIELDS[key]
        kind = _ENUM_FIELDS.get(key)
        fields[target] = kind(value) if kind is not None else value
    return api.StreamConfig(name=name, **fields)


def stream_differences(spec: Mapping[str, Any], actual: Any) -> list[str]:
    """Return `field: wanted X, server has Y` for every field `spec` states."""
    out = []
    for key, wanted in spec.items():
        have = getattr(actual, STREAM_FIELDS[key], None)
        if _normalised(key, wanted) != _normalised(key, have):
            out.append(f"{key}: config says {wanted!r}, server has {_plain(have)!r}")
    return out


def _normalised(key: str, value: Any) -> Any:
    value = _plain(value)
    if key == "subjects":
        return sorted(value or [])
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


async def provision_stream(
    client: NatsClient, name: str, spec: Mapping[str, Any]
) -> None:
    """Create stream `name` if missing; fail if it exists with another config."""
    js = client.js
    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        try:
            await js.add_stream(stream_config(name, spec))
            log.info("nats_stream_created", client=client.name, stream=name)
            return
        except nats.js.errors.BadRequestError:
            # Someone created it meanwhile: compare with what they made.
            info = await js.stream_info(name)
    except nats.errors.Error as exc:
        raise NatsTransportError(
            client.name, f"look up stream {name}", str(exc)
        ) from exc
    differences = stream_differences(spec, info.config)
    if differences:
        raise StreamConfigMismatchError(client.name, name, differences)


def durable_name(subscription_id: str) -> str:
    """Return a durable consumer name NATS accepts for `subscription_id`."""
    return _NAME_FORBIDDEN.sub("_", subscription_id)


def publish_id(headers: Mapping[str, str]) -> str | None:
    """Return the JetStream de-duplication id for a message with `headers`.

    It names one intent to publish: the original produce (its message id),
    a dead letter of it (the dead letter's id) or a replay of that dead
    letter. All three keep the original `x-message-id`, and would otherwise
    be dropped as duplicates when they land in the original's stream.
    """
    dead_letter = headers.get(DEAD_LETTER_ID_HEADER)
    if dead_letter:
        return f"dead-letter-{dead_letter}"
    replayed = headers.get(REPLAYED_FROM_HEADER)
    if replayed:
        return f"replay-{replayed}"
    return headers.get(envelope.MESSAGE_ID)


def nats_headers(message: OutgoingMessage) -> dict[str, str]:
    """Return the NATS headers of `message`: ours, the key, and `Nats-Msg-Id`."""
    headers = {**message.headers, **key_header(message.key)}
    message_id = publish_id(message.headers)
    if message_id:
        headers[MSG_ID_HEADER] = message_id
    return headers


class NatsProducer:
    """Publishes messages to JetStream through one NATS connection."""

    transport = TRANSPORT

    def __init__(self, client: NatsClient) -> None:
        self.client = client.name
        self._nats_client = client
        self._first = asyncio.Lock()
        self._async_ready = False

    def destination(self, target: Target, topic: str) -> str:
        """Return the subject of `target` (`subject`, else `topic`)."""
        return str(target.option("subject") or topic)

    async def send(self, target: Target, message: OutgoingMessage) -> Receipt:
        """Publish `message`; return once its stream stored it."""
        subject = self.destination(target, message.topic)
        headers = nats_headers(message)
        try:
            if self._async_ready:
                ack = await self._publish(subject, message.body, headers)
            else:
                # The first async publish sets up the reply inbox; two racing
                # first publishes would each set one up and lose a reply.
                async with self._first:
                    ack = await self._publish(subject, message.body, headers)
                    self._async_ready = True
        except nats.js.errors.NoStreamResponseError as exc:
            raise NatsTransportError(
                self.client,
                f"publish to {subject}",
                "no JetStream stream captures this subject; declare one under "
                "the client's `streams`",
            ) from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise NatsTransportError(
                self.client, f"publish to {subject}", repr(exc)
            ) from exc
        return Receipt(self.client, TRANSPORT, subject, None, int(ack.seq))

    async def send_many(
        self, target: Target, messages: Sequence[OutgoingMessage]
    ) -> list[Receipt]:
        """Publish every message, then wait until the stream stored them all.

        The publishes go out back to back and their acks are awaited
        together. Raises the first failure once every ack or error is in.
        """
        if not messages:
            return []
        receipts: list[Receipt] = []
        rest = messages
        if not self._async_ready:
            receipts.append(await self.send(target, messages[0]))
            rest = messages[1:]
        subject = self.destination(target, messages[0].topic)
        timeout = self._nats_client.publish_timeout_s
        futures = []
        try:
            for message in rest:
                futures.append(
                    await self._nats_client.js.publish_async(
                        subject,
                        message.body,
                        headers=nats_headers(message),
                    )
                )
            acks = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            for future in futures:
                future.cancel()
            raise NatsTransportError(
                self.client, f"publish to {subject}", repr(exc)
            ) from exc
        receipts.extend(
            Receipt(self.client, TRANSPORT, subject, None, int(ack.seq)) for ack in acks
        )
        return receipts

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> Any:
        js = self._nats_client.js
        timeout = self._nats_client.publish_timeout_s
        # No `wait_stall`: with it, every publish pays for a task and a timer.
        # A stall (more than 4,000 acks outstanding) waits for acks instead.
        future = await js.publish_async(subject, body, headers=headers)
        return await asyncio.wait_for(future, timeout)


class NatsSource:
    """Feeds one subscription from a durable JetStream pull consumer."""

    def __init__(
        self, client: NatsClient, subscription: Subscription, subject: str
    ) -> None:
        options = subscription.options
        self.subject = subject
        self.subscription = subscription.id
        self.stream = str(options["stream"]) if options.get("stream") else None
        self.durable = str(options.get("durable") or durable_name(subscription.id))
        self.ack_wait_s = float(options.get("ack_wait_s", DEFAULT_ACK_WAIT_S))
        self.max_ack_pending = int(
            options.get("max_ack_pending", DEFAULT_MAX_ACK_PENDING)
        )
        self.max_deliver = int(options.get("max_deliver", -1))
        self.consumer_check_s = float(
            options.get("consumer_check_s", DEFAULT_CONSUMER_CHECK_S)
        )
        self._next_check = 0.0
        self._acked_seq = 0
        # Fetched and not acked or terminated, by stream sequence; released
        # ones stay until they come again and are settled.
        self._unsettled: set[int] = set()
        # Fetched and not settled or released, by id(msg): [msg, last touched].
        self._held: dict[int, list[Any]] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._client = client
        self._policy = RetryPolicy.from_config(subscription.retry)
        self._sub: Any = None

    async def start(self) -> None:
        """Find the stream, create or check the durable consumer, bind to it."""
        js = self._client.js
        try:
            if self.stream is None:
                self.stream = await js.find_stream_name_by_subject(self.subject)
            await self._ensure_consumer()
            self._sub = await js.pull_subscribe_bind(
                durable=self.durable, stream=self.stream
            )
        except nats.js.errors.NotFoundError as exc:
            raise NatsTransportError(
                self._client.name,
                f"subscribe to {self.subject}",
                "no JetStream stream captures this subject; declare one under "
                "the client's `streams`",
            ) from exc
        self._keeper = asyncio.get_running_loop().create_task(
            self._keep_alive(), name=f"duct-nats-keepalive-{self.subscription}"
        )

    async def _keep_alive(self) -> None:
        """Send progress acks for messages held longer than half of `ack_wait_s`."""
        interval = max(self.ack_wait_s / 4, 0.01)
        stale_after = self.ack_wait_s / 2
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            stale = [h for h in self._held.values() if now - h[1] >= stale_after]
            try:
                for held in stale:
                    await held[0].in_progress()
                    held[1] = now
            except nats.errors.Error as exc:
                log.warning(
                    "nats_keep_alive_failed",
                    subscription=self.subscription,
                    count=len(stale),
                    error=repr(exc),
                )

    async def _ensure_consumer(self, start_seq: int | None = None) -> None:
        js = self._client.js
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            config = api.ConsumerConfig(
                name=self.durable,
                durable_name=self.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL
                if start_seq is None
                else api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_seq,
                filter_subject=self.subject,
                ack_wait=self.ack_wait_s,
                max_ack_pending=self.max_ack_pending,
                max_deliver=self.max_deliver,
            )
            await js.add_consumer(self.stream, config)
            return
        differences = []
        if info.config.filter_subject != self.subject:
            differences.append(
                f"filter_subject: wanted {self.subject!r}, server has "
                f"{info.config.filter_subject!r}"
            )
        ack_policy = _plain(info.config.ack_policy)
        if ack_policy != "explicit":
            differences.append(
                f"ack_policy: wanted 'explicit', server has {ack_policy!r}"
            )
        if differences:
            raise ConsumerConfigMismatchError(
                str(self.stream), self.durable, differences
            )

    async def fetch(self, max_messages: int, timeout: float) -> Sequence[Delivery]:
        """Pull up to `max_messages`, waiting at most `timeout` seconds.

        A `timeout` of 0 (a back-off ending now) still waits a moment for
        the server: nats-py refuses a fetch without one.
        """
        timeout = max(timeout, MIN_FETCH_TIMEOUT_S)
        if self.max_ack_pending > 0:
            room = self.max_ack_pending - len(self._held)
            max_messages = max(min(max_messages, room), 1)
        try:
            messages = await self._sub.fetch(max_messages, timeout=timeout)
        except TimeoutError:  # nats-py raises its own subclass or asyncio's
            await self._check_consumer()
            return []
        now = time.monotonic()
        self._next_check = now + self.consumer_check_s
        out = []
        for msg in messages:
            headers = dict(msg.headers or {})
            metadata = msg.metadata
            self._held[id(msg)] = [msg, now]
            self._unsettled.add(int(metadata.sequence.stream))
            out.append(
                Delivery(
                    body=msg.data,
                    headers=headers,
                    destination=msg.subject,
                    key=key_from_headers(headers),
                    position=int(metadata.sequence.stream),
                    attempt=int(metadata.num_delivered),
                    handle=msg,
                )
            )
        return out

    async def _check_consumer(self) -> None:
        """Recreate the durable consumer if it was deleted while we were idle."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.consumer_check_s
        try:
            info = await self._client.js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            resume = self._resume_seq()
            log.warning(
                "nats_consumer_recreated",
                subscription=self.subscription,
                stream=self.stream,
                durable=self.durable,
                start_seq=resume,
            )
            await self._ensure_consumer(resume)
            return
        # Released messages another instance settled meanwhile: forget them.
        floor = int(info.ack_floor.stream_seq or 0)
        self._unsettled = {seq for seq in self._unsettled if seq > floor}

    def _resume_seq(self) -> int | None:
        """Return where a recreated consumer starts: nothing unsettled is skipped.

        That is the lowest sequence fetched and not acked or terminated
        (released, backing off or in a handler), else the one after the
        highest acked; None (the stream start) when nothing was fetched.
        """
        if self._unsettled:
            return min(self._unsettled)
        return self._acked_seq + 1 if self._acked_seq else None

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge `deliveries`; the writes go out together."""
        for delivery in deliveries:
            await delivery.handle.ack()
            self._settled(delivery)

    async def reject(self, deliveries: Sequence[Delivery]) -> None:
        """Terminate dead-lettered `deliveries`: JetStream never redelivers them."""
        for delivery in deliveries:
            await delivery.handle.term()
            self._settled(delivery)

    def _settled(self, delivery: Delivery) -> None:
        seq = int(delivery.position)  # type: ignore[arg-type]
        self._held.pop(id(delivery.handle), None)
        self._unsettled.discard(seq)
        self._acked_seq = max(self._acked_seq, seq)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Nak `deliveries` so they come back after the retry back-off."""
        for delivery in deliveries:
            self._held.pop(id(delivery.handle), None)
            await delivery.handle.nak(delay=self._policy.delay(delivery.attempt))

    async def stop(self) -> None:
        """Nak what was pulled but never fetched, unsubscribe and flush.

        Messages still held (a handler abandoned at the drain deadline) are
        no longer kept alive: they come again after `ack_wait_s`.
        """
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        self._held.clear()
        if self._sub is None:
            return
        for msg in _buffered(self._sub):
            if msg.reply and not JetStreamContext.is_status_msg(msg):
                await msg.nak()
        try:
            await self._sub.unsubscribe()
            await self._client.connection.flush()
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning(
                "nats_unsubscribe_failed",
                subscription=self.subscription,
                error=repr(exc),
            )
        self._sub = None


def _buffered(pull_subscription: Any) -> list[Any]:
    """Take the messages a pull subscription received after a fetch gave up.

    A fetch that times out may leave messages the server sent late in the
    subscription's queue. nats-py has no public call for them, so this
    reaches into its queue; if that changes, they are redelivered after
    `ack_wait_s` instead.
    """
    queue = getattr(getattr(pull_subscription, "_sub", None), "_pending_queue", None)
    out = []
    while queue is not None and not queue.empty():
        out.append(queue.get_nowait())
    return out


def make_runtime(
    clients: Mapping[str, NatsClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from JetStream."""

    def make_source(subscription: Subscription) -> NatsSource:
        subject = routing.consumer_destination(subscription, "subject")
        return NatsSource(clients[subscription.client], subscription, subject)

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


_SUBJECTS = ListOf(text(), nonempty=True, nullable=False)
_LIMIT = integer(minimum=-1)  # -1: no limit
# One kind per field of STREAM_FIELDS.
STREAM_SPEC: dict[str, Field | Kind] = {
    "subjects": Field(_SUBJECTS, required=True, hint="e.g. [orders.>]"),
    "storage": Choice(*(kind.value for kind in api.StorageType)),
    "retention": Choice(*(kind.value for kind in api.RetentionPolicy)),
    "discard": Choice(*(kind.value for kind in api.DiscardPolicy)),
    "max_age_s": number(minimum=0),
    "max_msgs": _LIMIT,
    "max_bytes": _LIMIT,
    "max_msg_size": _LIMIT,
    "max_msgs_per_subject": _LIMIT,
    "duplicate_window_s": number(minimum=0),
    "replicas": integer(minimum=1),
    "description": text(nonempty=False),
}
CLIENTS = clients_spec(
    Fields(
        {
            "servers": Field(
                OneOf(
                    ListOf(text(), nonempty=True),
                    text(),
                    expected="a server URL or a list of them",
                ),
                required=True,
                hint="e.g. nats://127.0.0.1:4222",
            ),
            "publish_timeout_s": number(minimum=0),
            "streams": MapOf(
                Fields(STREAM_SPEC, noun="stream field", nullable=False),
                expected="a mapping of stream name -> config",
            ),
            "options": MapOf(
                ANY, expected="a mapping of keyword arguments for nats.connect"
            ),
        },
        noun="NATS client setting",
        nullable=False,
    )
)


@component("duct.nats/clients", schema=as_schema(CLIENTS))
async def clients(value: Mapping[str, Any]) -> dict[str, NatsClient]:
    """Connect one `NatsClient` per name and provision the declared streams."""
    registry = {
        name: NatsClient.from_config(name, config) for name, config in value.items()
    }
    await connect_all(registry)
    return registry


@clients.halt
async def _halt_clients(registry: Mapping[str, NatsClient]) -> None:
    await close_all(registry)


@component("duct.nats/producers", schema=as_schema(producers_spec(TRANSPORT)))
def producers(value: Mapping[str, Any]) -> dict[str, NatsProducer]:
    """Return one producer per NATS client, by client name."""
    return {name: NatsProducer(client) for name, client in value["clients"].items()}


consumers = consumers_component(TRANSPORT, make_runtime)
