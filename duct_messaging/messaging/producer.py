"""The common producer: one produce call, encoded once, fanned out in order.

`Producer.produce` (sync) and `Producer.aproduce` (async) look up the
topic's publish targets, check the message against the topic's canonical
schema, encode it once, add the metadata headers, and send it to each target
in order, awaiting each before the next. If one target fails, the call fails
with `PublishError`, which says which targets were already sent; the caller
retries the whole call. With a deferred-delivery option and a time in the
future, the encoded message and its targets are handed to the scheduler
instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import envelope
from duct_messaging.messaging._deferred_options import (
    resolve_due,
)
from duct_messaging.messaging.codecs import Codec, get_codec
from duct_messaging.messaging.routing import Routing
from duct_messaging.messaging.schemas import Validator
from duct_messaging.messaging.tracing import (
    TraceContext,
    inject,
    opentelemetry_enabled,
    start_span,
)
from duct_messaging.transports.base import (
    OutgoingMessage,
    Receipt,
    Target,
    TransportProducer,
)

log = structlog.get_logger(__name__)


class PublishError(DuctMessagingError):
    """Raised when a target refused a message; earlier targets were sent."""

    def __init__(
        self, topic: str, target: Target, sent: Sequence[Receipt], cause: BaseException
    ) -> None:
        self.topic = topic
        self.target = target
        self.sent = tuple(sent)
        done = ", ".join(f"{r.client}:{r.destination}" for r in self.sent) or "none"
        super().__init__(
            f"Publishing {topic!r} to client {target.client!r} failed: {cause}. "
            f"Already sent to: {done}. Retry the whole produce call."
        )


class UnknownClientError(DuctMessagingError, KeyError):
    """Raised when a target names a client no producer registry serves."""

    def __init__(self, client: str, known: Sequence[str]) -> None:
        self.client = client
        self.known = sorted(known)
        super().__init__(
            f"No producer for client {client!r}. Known clients: "
            f"{', '.join(self.known) or '(none)'}. Add it to a clients registry."
        )

    def __str__(self) -> str:
        return str(self.args[0])


class ProducerLoopError(DuctMessagingError, RuntimeError):
    """Raised when sync `produce` is called on the producer's own event loop."""

    def __init__(self) -> None:
        super().__init__(
            "produce() was called from the event loop the producer runs on, "
            "where it would block forever. Use 'await producer.aproduce(...)'."
        )


@dataclass(frozen=True, slots=True)
class DeferredReceipt:
    """Proof that a message was stored for delivery at `due`."""

    id: str
    topic: str
    due: datetime
    targets: tuple[Target, ...]


async def send_to_targets(
    producers: Mapping[str, TransportProducer],
    message: OutgoingMessage,
    targets: Sequence[Target],
) -> list[Receipt]:
    """Send `message` to each target in order and return one receipt each.

    Raises `PublishError` at the first failing target, carrying the
    receipts of the targets already sent, and `UnknownClientError` when a
    target names a client with no producer (before anything is sent).
    """
    for target in targets:
        if target.client not in producers:
            raise UnknownClientError(target.client, list(producers))
    receipts: list[Receipt] = []
    for target in targets:
        try:
            receipt = await producers[target.client].send(target, message)
        except Exception as exc:
            raise PublishError(message.topic, target, receipts, exc) from exc
        receipts.append(receipt)
    return receipts


async def send_many_to_targets(
    producers: Mapping[str, TransportProducer],
    messages: Sequence[OutgoingMessage],
    targets: Sequence[Target],
) -> list[list[Receipt]]:
    """Send every message to each target in turn; return receipts per target.

    A transport producer with a `send_many` method gets the whole batch in
    one call; others get concurrent `send` calls.
    """
    for target in targets:
        if target.client not in producers:
            raise UnknownClientError(target.client, list(producers))
    done: list[list[Receipt]] = []
    for target in targets:
        producer = producers[target.client]
        try:
            send_many = getattr(producer, "send_many", None)
            if send_many is not None:
                receipts = list(await send_many(target, messages))
            else:
                receipts = list(
                    await asyncio.gather(*(producer.send(target, m) for m in messages))
                )
        except Exception as exc:
            sent = [r for batch in done for r in batch[:1]]
            raise PublishError(messages[0].topic, target, sent, exc) from exc
        done.append(receipts)
    return done


class Producer:
    """Publishes messages by topic to the targets the routing lists.

    Bound to the event loop it was created on: `aproduce` must run there;
    `produce` may be called from any other thread and blocks until every
    target accepted the message.
    """

    def __init__(
        self,
        routing: Routing,
        producers: Mapping[str, TransportProducer],
        deferred: Any = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.routing = routing
        self.producers = dict(producers)
        self.deferred = deferred
        self._loop = loop or asyncio.get_running_loop()
        self._codecs: dict[str, Codec] = {}
        self._validators: dict[str, Validator | None] = {}
        for name, topic in routing.topics.items():
            self._codecs[name] = get_codec(topic.codec)
            self._validators[name] = routing.validators.get(name)

    def produce(self, message: Any, *, topic: str, **options: Any) -> Any:
        """Publish `message` synchronously; see `aproduce` for the options.

        Must not be called from the producer's own event loop (it would
        block it); raises `ProducerLoopError` there.
        """
        if _running_loop() is self._loop:
            raise ProducerLoopError()
        future = asyncio.run_coroutine_threadsafe(
            self.aproduce(message, topic=topic, **options), self._loop
        )
        return future.result()

    async def aproduce(
        self,
        message: Any,
        *,
        topic: str,
        key: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        targets: Sequence[Target | Mapping[str, Any]] | None = None,
        deliver_at_time: datetime | None = None,
        deliver_at_ms: int | None = None,
        delay_ms: int | float | None = None,
    ) -> list[Receipt] | DeferredReceipt:
        """Publish `message` to `topic`'s targets (or `targets`), in order.

        Returns one `Receipt` per target, or a `DeferredReceipt` when a
        deferred-delivery option puts the due time in the future. Raises
        `SchemaValidationError` before anything is sent when the message does
        not match the topic's canonical schema, `PublishError` when a target
        fails, and `DeferredNotConfiguredError` when a future delivery is
        asked for but no scheduler is wired.
        """
        resolved = self._targets(topic, targets)
        validator = self._validators.get(topic)
        if validator is not None:
            validator.validate(message)
        if opentelemetry_enabled():
            attributes = {"messaging.destination.name": topic}
            with start_span(f"publish {topic}", "producer", None, attributes) as span:
                outgoing = self._encode(message, topic, key, headers, span)
                return await self._send_or_defer(
                    outgoing, resolved, deliver_at_time, deliver_at_ms, delay_ms
                )
        outgoing = self._encode(message, topic, key, headers)
        return await self._send_or_defer(
            outgoing, resolved, deliver_at_time, deliver_at_ms, delay_ms
        )

    async def _send_or_defer(
        self,
        outgoing: OutgoingMessage,
        resolved: tuple[Target, ...],
        deliver_at_time: datetime | None,
        deliver_at_ms: int | None,
        delay_ms: int | float | None,
    ) -> list[Receipt] | DeferredReceipt:
        if (
            deliver_at_time is not None
            or deliver_at_ms is not None
            or delay_ms is not None
        ):
            due = resolve_due(
                deliver_at_time=deliver_at_time,
                deliver_at_ms=deliver_at_ms,
                delay_ms=delay_ms,
            )
            if due is not None:
                return await self._defer(outgoing, resolved, due)
        return await send_to_targets(self.producers, outgoing, resolved)

    async def aproduce_many(
        self,
        messages: Sequence[Any],
        *,
        topic: str,
        keys: Sequence[str | bytes | None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[list[Receipt]]:
        """Publish a batch of messages to `topic`'s targets, target by target.

        Every message is checked and encoded before anything is sent. Then
        the whole batch goes to the first target, and only when the broker
        accepted all of it, to the next one. Returns, per message, one
        receipt per target. Raises `PublishError` like `aproduce`; its
        `sent` then holds the receipts of the targets that took the whole
        batch. Deferred delivery is not offered here: use `aproduce`.
        """
        if keys is not None and len(keys) != len(messages):
            raise ValueError(f"got {len(keys)} keys for {len(messages)} messages")
        targets = self.routing.targets(topic)
        validator = self._validators.get(topic)
        if validator is not None:
            for message in messages:
                validator.validate(message)
        encoded = [
            self._encode(m, topic, keys[i] if keys else None, headers)
            for i, m in enumerate(messages)
        ]
        per_target = await send_many_to_targets(self.producers, encoded, targets)
        return [list(receipts) for receipts in zip(*per_target, strict=True)]

    async def send_encoded(
        self, message: OutgoingMessage, targets: Sequence[Target] | None = None
    ) -> list[Receipt]:
        """Send an already encoded message (replay, deferred delivery)."""
        resolved = (
            tuple(targets)
            if targets is not None
            else self.routing.targets(message.topic)
        )
        return await send_to_targets(self.producers, message, resolved)

    def _targets(
        self, topic: str, targets: Sequence[Target | Mapping[str, Any]] | None
    ) -> tuple[Target, ...]:
        if targets is None:
            return self.routing.targets(topic)
        out = []
        for target in targets:
            if isinstance(target, Target):
                out.append(target)
            else:
                options = {
                    k: v for k, v in target.items() if k not in ("client", "producer")
                }
                out.append(Target(target.get("client") or target["producer"], options))
        return tuple(out)

    def _encode(
        self,
        message: Any,
        topic: str,
        key: str | bytes | None,
        headers: Mapping[str, str] | None,
        trace: TraceContext | None = None,
    ) -> OutgoingMessage:
        codec = self._codecs.get(topic)
        if codec is None:
            codec = self._codecs[topic] = get_codec("json")
        out: dict[str, str] = {}
        if headers:
            out.update((k, v) for k, v in headers.items() if k not in envelope.RESERVED)
        out[envelope.MESSAGE_ID] = envelope.new_message_id()
        out[envelope.TOPIC] = topic
        out[envelope.PRODUCED_AT] = envelope.produced_at()
        out[envelope.CONTENT_TYPE] = codec.content_type
        if trace is None:
            inject(out)
        else:
            out[envelope.TRACEPARENT] = trace.traceparent
            if trace.tracestate:
                out[envelope.TRACESTATE] = trace.tracestate
        raw_key = key.encode() if isinstance(key, str) else key
        return OutgoingMessage(topic, codec.encode(message), out, raw_key)

    async def _defer(
        self, message: OutgoingMessage, targets: tuple[Target, ...], due: datetime
    ) -> DeferredReceipt:
        if self.deferred is None:
            from duct_messaging.messaging._deferred_options import (
                DeferredNotConfiguredError,
            )

            raise DeferredNotConfiguredError(message.topic)
        deferred_id = await self.deferred.schedule(message, targets, due)
        return DeferredReceipt(str(deferred_id), message.topic, due, targets)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def merge_registries(
    registries: Sequence[Mapping[str, TransportProducer]]
    | Mapping[str, TransportProducer],
) -> dict[str, TransportProducer]:
    """Return one client -> producer mapping from several transport registries.

    Raises `DuplicateClientError` when two registries serve the same client
    name, since a target could then not say which one it means.
    """
    if isinstance(registries, Mapping):
        registries = [registries]
    merged: dict[str, TransportProducer] = {}
    for registry in registries:
        for client, producer in registry.items():
            if client in merged:
                raise DuplicateClientError(
                    client, merged[client].transport, producer.transport
                )
            merged[client] = producer
    return merged


class DuplicateClientError(DuctMessagingError, ValueError):
    """Raised when two transports register a client under the same name."""

    def __init__(self, client: str, first: str, second: str) -> None:
        self.client = client
        super().__init__(
            f"Client name {client!r} is served by both {first!r} and {second!r}. "
            "Give each cluster a distinct client name."
        )
