"""The message pipeline of one subscription: decode, check, trace, handle.

`Pipeline.open` turns a delivery into a `Job` (or, for poison, a dead
letter); each `attempt_*` call runs the handler once and says what comes
next: done, a back-off before the next attempt, or the dead letter to
write. The worker (`_consumer_worker`) decides when attempts run.

Tracing: the handler runs under a child of the message's `traceparent` (a
new root without one). With OpenTelemetry enabled, each attempt instead
runs inside a `process <topic>` consumer span whose parent is the
message's trace, and `MessageContext.trace` is that span's context. The
span is opened where the handler runs (a worker thread for a `def`
handler), because OpenTelemetry keeps the current span in a context
variable of the running thread.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import envelope
from duct_messaging.messaging.codecs import Codec, get_codec
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    dead_letter_id,
    error_details,
    utcnow,
)
from duct_messaging.messaging.retry import RetryPolicy
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.messaging.schemas import SchemaValidationError, Validator
from duct_messaging.messaging.tracing import (
    TraceContext,
    bind_trace,
    extract,
    opentelemetry_enabled,
    start_span,
    unbind_trace,
)
from duct_messaging.transports.base import Delivery

log = structlog.get_logger(__name__)


class Poison(DuctMessagingError):
    """A message that can never be handled: undecodable or schema-invalid."""


# Dead letters record the error type by its path; keep the public one.
Poison.__module__ = "duct_messaging.messaging.consumer"


@dataclass(slots=True)
class MessageContext:
    """What a handler may know about the message it handles.

    A handler that declares a second parameter receives this object.
    """

    headers: dict[str, str]
    topic: str
    subscription: str
    client: str
    source: str
    destination: str
    partition: int | None
    position: int | str | None
    attempt: int
    trace: TraceContext
    key: bytes | None = None

    @property
    def message_id(self) -> str | None:
        """Return the producer-assigned message id, if the message has one."""
        return self.headers.get(envelope.MESSAGE_ID)


@dataclass(slots=True)
class Job:
    """One delivery being handled: its decoded arguments and retry state."""

    delivery: Delivery
    args: tuple[Any, ...]
    ctx: MessageContext
    attempts: int = 0
    first_failure: datetime | None = None


# What one handler attempt says: None (done), a back-off in seconds before
# the next attempt, or the dead letter to write.
Step = DeadLetter | float | None


def wants_context(handler: Callable[..., Any]) -> bool:
    """Return True if `handler` takes a second (context) argument."""
    try:
        params = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in positional)


def _is_async(handler: Callable[..., Any]) -> bool:
    call = getattr(handler, "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class Pipeline:
    """Decode, check, trace and handle one subscription's deliveries.

    Everything that can be decided once (codec, schema, handler shape, retry
    policy) is decided here at construction, not per message. `open` turns a
    delivery into a `Job` (or a poison dead letter); each `attempt_*` call
    runs the handler once and says what comes next.
    """

    def __init__(
        self,
        subscription: Subscription,
        routing: Routing,
        sink: DeadLetterSink,
    ) -> None:
        self.subscription = subscription
        self.sink = sink
        self.policy = RetryPolicy.from_config(subscription.retry)
        self.handler = subscription.handler
        self.is_async = _is_async(self.handler)
        self.with_context = wants_context(self.handler)
        self.validator: Validator | None = routing.subscription_validators.get(
            subscription.id
        )
        self._default_codec: Codec = get_codec(subscription.codec)
        self._codecs: dict[str, Codec] = {}
        self._span_name = f"process {subscription.topic}"
        options = subscription.options
        group = options.get("group_id") or options.get("group") or subscription.id
        self._span_attributes: dict[str, Any] = {
            "messaging.destination.name": subscription.topic,
            "messaging.consumer.group.name": str(group),
        }

    def _codec(self, headers: dict[str, str]) -> Codec:
        content_type = headers.get(envelope.CONTENT_TYPE)
        if not content_type or content_type == self._default_codec.content_type:
            return self._default_codec
        codec = self._codecs.get(content_type)
        if codec is None:
            codec = self._codecs[content_type] = get_codec(content_type)
        return codec

    def prepare(self, delivery: Delivery) -> tuple[Any, MessageContext]:
        """Return the decoded message and its context; raise `Poison` if unusable."""
        sub = self.subscription
        try:
            message = self._codec(delivery.headers).decode(delivery.body)
        except Exception as exc:  # any codec failure means the bytes are unusable
            raise Poison(
                f"Subscription {sub.id!r} (topic {sub.topic!r}) cannot decode "
                f"message: {exc}"
            ) from exc
        if self.validator is not None:
            try:
                self.validator.validate(message)
            except SchemaValidationError as exc:
                raise Poison(str(exc)) from exc
            except Exception as exc:  # a validator that breaks on this message
                raise Poison(
                    f"Subscription {sub.id!r} (topic {sub.topic!r}) cannot check "
                    f"message against its schema: {type(exc).__name__}: {exc}"
                ) from exc
        incoming = extract(delivery.headers)
        trace = incoming.child() if incoming else TraceContext.new_root()
        ctx = MessageContext(
            headers=delivery.headers,
            topic=sub.topic,
            subscription=sub.id,
            client=sub.client,
            source=sub.source,
            destination=delivery.destination,
            partition=delivery.partition,
            position=delivery.position,
            attempt=delivery.attempt,
            trace=trace,
            key=delivery.key,
        )
        return message, ctx

    def open(self, delivery: Delivery) -> Job | DeadLetter:
        """Return the job for `delivery`, or its poison dead letter."""
        try:
            message, ctx = self.prepare(delivery)
        except Poison as exc:
            # One attempt: the decode (or schema check) that failed.
            now = utcnow()
            return self.dead_letter(delivery, exc, 1, DeadLetterStatus.POISON, now)
        args = (message, ctx) if self.with_context else (message,)
        return Job(delivery, args, ctx)

    def attempt_sync(self, job: Job) -> Step:
        """Call the synchronous handler once for `job`; see `Step`.

        Call it in the thread that runs the handler: a span opened here is
        current only in that thread.
        """
        if opentelemetry_enabled():
            return self._attempt_sync_in_span(job)
        return self._attempt_sync_plain(job)

    def sync_attempt(self) -> Callable[[Job], Step]:
        """Return what `attempt_sync` would run now, for a run of many attempts.

        The worker asks once per run of work, so checking whether spans are
        on costs nothing per message on its hot path.
        """
        if opentelemetry_enabled():
            return self._attempt_sync_in_span
        return self._attempt_sync_plain

    def _attempt_sync_plain(self, job: Job) -> Step:
        job.attempts += 1
        job.ctx.attempt = job.delivery.attempt + job.attempts - 1
        token = bind_trace(job.ctx.trace)
        try:
            self.handler(*job.args)
        except Exception as exc:
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    async def attempt_async(self, job: Job) -> Step:
        """Await the async handler once for `job`; see `Step`."""
        if opentelemetry_enabled():
            return await self._attempt_async_in_span(job)
        self._count(job)
        token = bind_trace(job.ctx.trace)
        try:
            await self.handler(*job.args)
        except Exception as exc:
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    def _attempt_sync_in_span(self, job: Job) -> Step:
        self._count(job)
        # The span's parent is the message's trace alone (none: a new root),
        # never a trace that happens to be bound in the worker's context.
        parent = extract(job.delivery.headers)
        token = bind_trace(parent)
        try:
            with start_span(
                self._span_name, "consumer", parent, self._attributes(job)
            ) as span:
                job.ctx.trace = span
                self.handler(*job.args)
        except Exception as exc:  # raised inside the span, so it is recorded
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    async def _attempt_async_in_span(self, job: Job) -> Step:
        self._count(job)
        parent = extract(job.delivery.headers)
        token = bind_trace(parent)
        try:
            with start_span(
                self._span_name, "consumer", parent, self._attributes(job)
            ) as span:
                job.ctx.trace = span
                await self.handler(*job.args)
        except Exception as exc:
            return self._failed(job, exc)
        finally:
            unbind_trace(token)
        return None

    def _attributes(self, job: Job) -> dict[str, Any]:
        message_id = job.ctx.message_id
        if message_id is None:
            return self._span_attributes
        return {**self._span_attributes, "messaging.message.id": message_id}

    def _count(self, job: Job) -> None:
        job.attempts += 1
        job.ctx.attempt = job.delivery.attempt + job.attempts - 1

    def _failed(self, job: Job, exc: Exception) -> Step:
        job.first_failure = job.first_failure or utcnow()
        if not self.policy.should_retry(exc, job.attempts):
            return self.dead_letter(
                job.delivery,
                exc,
                job.attempts,
                DeadLetterStatus.ELIGIBLE,
                job.first_failure,
            )
        delay = self.policy.delay(job.attempts)
        log.warning(
            "handler_failed_retrying",
            subscription=job.ctx.subscription,
            topic=job.ctx.topic,
            message_id=job.ctx.message_id,
            attempt=job.attempts,
            max_attempts=self.policy.max_attempts,
            delay_s=round(delay, 3),
            error=repr(exc),
        )
        return delay

    def dead_letter(
        self,
        delivery: Delivery,
        exc: BaseException,
        attempts: int,
        status: DeadLetterStatus,
        first_failure: datetime,
    ) -> DeadLetter:
        """Build the dead letter for `delivery`, which failed with `exc`."""
        kind, text, trace = error_details(exc)
        sub = self.subscription
        headers = dict(delivery.headers)
        return DeadLetter(
            body=delivery.body,
            headers=headers,
            topic=sub.topic,
            subscription=sub.id,
            client=sub.client,
            source=sub.source,
            destination=delivery.destination,
            attempts=attempts,
            status=status,
            error_type=kind,
            error_message=text,
            error_traceback=trace,
            first_failure_at=first_failure,
            last_failure_at=utcnow(),
            partition=delivery.partition,
            position=delivery.position,
            id=dead_letter_id(
                sub.id,
                sub.client,
                delivery.destination,
                delivery.partition,
                delivery.position,
                headers.get(envelope.MESSAGE_ID),
            ),
            config=sub.deadletter,
            key=delivery.key,
        )
