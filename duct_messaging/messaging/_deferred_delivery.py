"""Delivering a due deferred message: send it, retry it, or dead-letter it.

APScheduler runs one job per due message, and every job calls
`Courier.run_job` with the stored document. The courier sends the message
through the transport producers. A failed send is stored again as the next
attempt, after the policy's backoff, for the targets not reached yet; when
the attempts run out, or the message is later than `grace_s`, it becomes a
dead letter. Nothing leaves the store silently: a dead-letter sink that
fails keeps the message stored for another try, a document that cannot be
read is dead-lettered as poison, and a job cancelled while the scheduler
stops puts its message back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid5

import anyio
import structlog
from apscheduler import ConflictPolicy, current_job
from apscheduler.abc import DataStore

from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._deferred_config import DeliveryPolicy
from duct_messaging.messaging._deferred_payload import (
    DeferredMessage,
    DeferredPayloadError,
    StoredError,
    decode,
    encode,
)
from duct_messaging.messaging.deadletter import (
    DeadLetter,
    DeadLetterSink,
    DeadLetterStatus,
    error_details,
    utcnow,
)
from duct_messaging.transports.base import (
    OutgoingMessage,
    Receipt,
    Target,
    TransportProducer,
)

log = structlog.get_logger(__name__)

#: Sends one message to its targets in order; `send_to_targets` by default.
Deliver = Callable[
    [Mapping[str, TransportProducer], OutgoingMessage, Sequence[Target]],
    Awaitable[Sequence[Receipt]],
]

#: How long a cancelled delivery may take to put its message back in the
#: store while the scheduler stops.
_REQUEUE_TIMEOUT_S = 5.0

_DEAD_LETTER_IDS = UUID("5d1f0c8e-3b6a-4f7e-9a51-2c64d8e0b7a3")


class Courier:
    """Delivers the due messages of one instance, one job at a time each.

    `run_job` is the function of every deferred-delivery task. Once
    `closing` is set, a job that starts puts its message back instead of
    delivering it. `idle` is set whenever no delivery is running.
    """

    def __init__(
        self,
        store: DataStore,
        producers: Mapping[str, TransportProducer],
        *,
        deliver: Deliver,
        policy: DeliveryPolicy,
        deadletter: DeadLetterSink,
        grace_s: float | None,
    ) -> None:
        self.store = store
        self.producers = producers
        self.deliver = deliver
        self.policy = policy
        self.deadletter = deadletter
        self.grace_s = grace_s
        self.closing = False
        self.idle = asyncio.Event()
        self.idle.set()
        self._inflight = 0

    async def run_job(self, deferred: str) -> None:
        """Deliver the message stored as `deferred` (the job's argument).

        A job cancelled mid-delivery stores its message again before the
        cancellation goes on.
        """
        job_id: UUID = current_job.get().id
        try:
            item = decode(deferred)
        except DeferredPayloadError as exc:
            await self._dead_letter_unreadable(deferred, exc)
            return
        if self.closing:
            await self._put_back(item, job_id)
            return

        self._inflight += 1
        self.idle.clear()
        try:
            await self._attempt(item)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._put_back(item, job_id)
            raise
        finally:
            self._inflight -= 1
            if not self._inflight:
                self.idle.set()

    async def _attempt(self, item: DeferredMessage) -> None:
        policy = self.policy
        if item.attempt > policy.max_attempts and item.last_error is not None:
            # An earlier dead-letter write failed; try only that again.
            await self._dead_letter(item, item.last_error, policy.max_attempts)
            return

        late_s = (utcnow() - item.run_at).total_seconds()
        if self.grace_s is not None and late_s > self.grace_s:
            # The public module defines the error (dead letters record its
            # import path) and imports this one, hence the late import.
            from duct_messaging.messaging.deferred import DeliveryWindowMissedError

            missed = DeliveryWindowMissedError(
                item.id, item.run_at, late_s, self.grace_s
            )
            await self._dead_letter(item, _stored(missed), item.attempt - 1)
            return

        try:
            receipts = await self.deliver(self.producers, item.message, item.targets)
        except Exception as exc:
            await self._failed(item, exc)
            return

        log.debug(
            "deferred_delivered",
            **_about(item),
            attempt=item.attempt,
            late_s=round(late_s, 4),
            receipts=len(receipts),
        )

    async def _failed(self, item: DeferredMessage, exc: Exception) -> None:
        # A PublishError says which targets were sent; retry only the rest.
        sent = getattr(exc, "sent", None)
        remaining = item.targets
        if isinstance(sent, tuple | list) and len(sent) < len(item.targets):
            remaining = item.targets[len(sent) :]
        # Record the broker's own error rather than its PublishError wrapper.
        cause = exc.__cause__ if sent is not None and exc.__cause__ else exc
        error = _stored(cause)

        if item.attempt >= self.policy.max_attempts:
            await self._dead_letter(
                replace(item, targets=remaining), error, item.attempt
            )
            return

        delay_s = self.policy.delay_s(item.attempt)
        retry = item.next_attempt(
            utcnow() + timedelta(seconds=delay_s), remaining, error
        )
        await self._store_again(retry, f"{item.id}.{retry.attempt}")
        log.warning(
            "deferred_delivery_retry",
            **_about(item),
            attempt=item.attempt,
            max_attempts=self.policy.max_attempts,
            delay_s=delay_s,
            error=error.message,
            error_type=error.type,
        )

    async def _dead_letter(
        self, item: DeferredMessage, error: StoredError, attempts: int
    ) -> None:
        letter = self._letter(item, error, attempts, DeadLetterStatus.ELIGIBLE)
        try:
            await self.deadletter.write(letter)
        except Exception as exc:
            await self._park(item, error, exc)
            return

        log.error(
            "deferred_dead_lettered",
            **_about(item),
            attempts=attempts,
            error_type=error.type,
            error=error.message,
        )

    async def _park(
        self, item: DeferredMessage, error: StoredError, exc: Exception
    ) -> None:
        # The sink failed: keep the message stored and try the sink again
        # later, rather than losing it.
        delay_s = self.policy.backoff_max_s
        parked = replace(
            item,
            attempt=max(item.attempt, self.policy.max_attempts) + 1,
            run_at=utcnow() + timedelta(seconds=delay_s),
            first_failure_at=item.first_failure_at or error.at,
            last_error=error,
        )
        await self._store_again(parked, f"{item.id}.{parked.attempt}")
        log.error(
            "deferred_dead_letter_failed",
            deferred_id=item.id,
            topic=item.message.topic,
            error=repr(exc),
            retry_in_s=delay_s,
        )

    async def _put_back(self, item: DeferredMessage, job_id: UUID) -> None:
        with anyio.move_on_after(_REQUEUE_TIMEOUT_S) as scope:
            await self._store_again(item, f"{item.id}.{item.attempt}.{job_id.hex}")
        if scope.cancelled_caught:
            # The job stays leased; another instance re-runs it once the
            # lease expires, unless the release below still reaches the store.
            log.error("deferred_put_back_failed", deferred_id=item.id)
            return
        log.debug("deferred_put_back", deferred_id=item.id, attempt=item.attempt)

    async def _dead_letter_unreadable(
        self, document: str, exc: DeferredPayloadError
    ) -> None:
        error = _stored(exc)
        # No message can be read from the document: a stand-in carrying its
        # text as the body makes it a dead letter like any other.
        raw = OutgoingMessage(topic="", body=document.encode(), headers={})
        stand_in = DeferredMessage.new(raw, (), error.at)
        letter = self._letter(stand_in, error, 0, DeadLetterStatus.POISON)
        await self.deadletter.write(letter)
        log.error("deferred_unreadable", error=error.message)

    async def _store_again(self, item: DeferredMessage, schedule_id: str) -> None:
        # Retries and put-backs use ids derived from the job, so storing the
        # same one twice (a job re-run after its lease expired) is harmless.
        await stores.add_message(
            self.store, item, schedule_id, encode(item), ConflictPolicy.do_nothing
        )

    def _letter(
        self,
        item: DeferredMessage,
        error: StoredError,
        attempts: int,
        status: DeadLetterStatus,
    ) -> DeadLetter:
        target = item.targets[0] if item.targets else None
        return DeadLetter(
            body=item.message.body,
            headers=dict(item.message.headers),
            topic=item.message.topic,
            subscription="",
            client=target.client if target else "",
            source="deferred",
            destination=self._destination(target, item.message.topic),
            attempts=attempts,
            status=status,
            error_type=error.type,
            error_message=error.message,
            error_traceback=error.traceback,
            first_failure_at=item.first_failure_at or error.at,
            last_failure_at=error.at,
            key=item.message.key,
            # One id per deferred message: a store keeps it once even when
            # the write is repeated (a sink timeout, a job run twice).
            id=uuid5(_DEAD_LETTER_IDS, item.id).hex,
        )

    def _destination(self, target: Target | None, topic: str) -> str:
        producer = self.producers.get(target.client) if target else None
        if target is None or producer is None:
            return ""
        try:
            return producer.destination(target, topic)
        except Exception:
            return ""


def _about(item: DeferredMessage) -> dict[str, Any]:
    """Return the log fields that name `item` and the message it carries."""
    return {
        "deferred_id": item.id,
        "topic": item.message.topic,
        "message_id": item.message.headers.get("x-message-id"),
    }


def _stored(exc: BaseException) -> StoredError:
    kind, text, trace = error_details(exc)
    return StoredError(type=kind, message=text, traceback=trace, at=utcnow())
