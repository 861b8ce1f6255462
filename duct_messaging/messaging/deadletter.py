"""Dead letters: what a failed message becomes, and where it is written.

A dead letter keeps everything needed to understand and replay a message
that could not be handled: the original body, headers and key, where it
came from (topic, subscription, client, broker destination and position),
how often it was tried, when it first and last failed, and the last error
with its traceback. `status` is `eligible` (may be replayed), `poison`
(could not be decoded or failed its schema; never replayed) or `replayed`.

Sinks implement `DeadLetterSink`. The consumer runtime acknowledges a message
only after `write` returned; a sink that raises leaves the message
unacknowledged so the broker delivers it again. Sinks that keep what they
wrote (the file and PostgreSQL storage) also implement `DeadLetterStore`,
which is what replay reads from.

A dead letter written by the consumer runtime has an id derived from where
the message sat (subscription, client, destination, partition, position and
message id), so writing the same failed delivery twice, after a crash or a
sink failure, stores it once.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import structlog

log = structlog.get_logger(__name__)

# Header names a dead letter carries when it is published as a message.
HEADER_PREFIX = "x-dead-letter-"
# Kafka and most brokers cap a message's size; a long traceback is cut to
# this many characters in headers (storage keeps the whole text).
HEADER_TRACEBACK_CHARS = 8000
# Namespace of the deterministic ids of dead letters written by consumers.
_ID_NAMESPACE = uuid.UUID("0b8f3c52-6f1e-4f55-a1f4-7c2d2e0d8a41")


class DeadLetterStatus(StrEnum):
    """Whether a dead letter may be sent back to its topic."""

    ELIGIBLE = "eligible"
    POISON = "poison"
    REPLAYED = "replayed"


@dataclass(slots=True)
class DeadLetter:
    """A message that could not be handled, with the story of its failure.

    `config` is the subscription's merged `deadletter` section (defaults,
    then topic, then subscription); sinks read their per-subscription
    choices from it, such as the dead-letter `topic` or `client`. It is not
    stored.
    """

    body: bytes
    headers: dict[str, str]
    topic: str
    subscription: str
    client: str
    source: str
    destination: str
    attempts: int
    status: DeadLetterStatus
    error_type: str
    error_message: str
    error_traceback: str
    first_failure_at: datetime
    last_failure_at: datetime
    partition: int | None = None
    position: int | str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    config: Mapping[str, Any] = field(default_factory=dict)
    key: bytes | None = None

    @property
    def message_id(self) -> str | None:
        """Return the message id header of the original message, if any."""
        return self.headers.get("x-message-id")

    def to_record(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (body and key as text when UTF-8)."""
        record = asdict(self)
        record.pop("config")
        record["body"], record["body_encoding"] = _text(self.body)
        if self.key is not None:
            record["key"], record["key_encoding"] = _text(self.key)
        record["status"] = str(self.status)
        record["first_failure_at"] = self.first_failure_at.isoformat()
        record["last_failure_at"] = self.last_failure_at.isoformat()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DeadLetter:
        """Rebuild a dead letter from the output of `to_record`.

        Keys the dataclass does not know (added by a store) are ignored.
        """
        data = {k: v for k, v in record.items() if k in _FIELDS}
        data["body"] = _bytes(record["body"], record.get("body_encoding", "utf-8"))
        if record.get("key") is not None:
            data["key"] = _bytes(record["key"], record.get("key_encoding", "utf-8"))
        data["status"] = DeadLetterStatus(record["status"])
        for name in ("first_failure_at", "last_failure_at"):
            value = record[name]
            data[name] = (
                value if isinstance(value, datetime) else datetime.fromisoformat(value)
            )
        return cls(**data)


_FIELDS = frozenset(DeadLetter.__dataclass_fields__) - {"config"}


def _text(raw: bytes) -> tuple[str, str]:
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.hex(), "hex"


def _bytes(text: str, encoding: str) -> bytes:
    return bytes.fromhex(text) if encoding == "hex" else text.encode("utf-8")


def dead_letter_id(
    subscription: str,
    client: str,
    destination: str,
    partition: int | None,
    position: int | str | None,
    message_id: str | None,
) -> str:
    """Return the id of a consumer's dead letter for one delivery.

    Equal for the same delivery seen twice, so a store keeps it once. When
    the transport gives no position the id is random.
    """
    if position is None:
        return uuid.uuid4().hex
    name = "\x1f".join(
        [
            subscription,
            client,
            destination,
            str(partition),
            str(position),
            message_id or "",
        ]
    )
    return uuid.uuid5(_ID_NAMESPACE, name).hex


def dead_letter_headers(dead_letter: DeadLetter) -> dict[str, str]:
    """Return the `x-dead-letter-*` headers describing `dead_letter`.

    Used when a dead letter travels as a message (the producer sink): the
    body stays the original body, these headers say what went wrong.
    """
    values: dict[str, Any] = {
        "id": dead_letter.id,
        "status": dead_letter.status,
        "topic": dead_letter.topic,
        "subscription": dead_letter.subscription,
        "client": dead_letter.client,
        "source": dead_letter.source,
        "destination": dead_letter.destination,
        "partition": dead_letter.partition,
        "position": dead_letter.position,
        "attempts": dead_letter.attempts,
        "error-type": dead_letter.error_type,
        "error-message": dead_letter.error_message,
        "error-traceback": dead_letter.error_traceback[-HEADER_TRACEBACK_CHARS:],
        "first-failure-at": dead_letter.first_failure_at.isoformat(),
        "last-failure-at": dead_letter.last_failure_at.isoformat(),
    }
    return {HEADER_PREFIX + k: str(v) for k, v in values.items() if v is not None}


def error_details(exc: BaseException) -> tuple[str, str, str]:
    """Return the type name, message and formatted traceback of `exc`."""
    kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
    text = "".join(traceback.format_exception(exc))
    return kind, str(exc), text


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


class DeadLetterSink(Protocol):
    """Durably records dead letters."""

    async def write(self, dead_letter: DeadLetter) -> None:
        """Write `dead_letter`; return only once it is durable, else raise."""
        ...


@runtime_checkable
class DeadLetterStore(Protocol):
    """A sink that keeps what it wrote, so dead letters can be listed and replayed.

    Writing a dead letter whose id is already stored changes nothing.
    """

    async def write(self, dead_letter: DeadLetter) -> None:
        """Write `dead_letter`; return only once it is durable, else raise."""
        ...

    async def read(
        self,
        *,
        topic: str | None = None,
        status: DeadLetterStatus | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[DeadLetter]:
        """Return the stored dead letters matching every given filter, oldest first."""
        ...

    async def mark(self, ids: Sequence[str], status: DeadLetterStatus) -> int:
        """Set the status of the dead letters `ids`; return how many exist."""
        ...


class LoggerSink:
    """Writes each dead letter as one structlog ERROR event.

    Nothing is stored, so nothing can be replayed: use it where losing the
    message is acceptable, or next to a storage sink.
    """

    async def write(self, dead_letter: DeadLetter) -> None:
        """Log `dead_letter` with its origin and error."""
        log.error(
            "dead_letter",
            topic=dead_letter.topic,
            subscription=dead_letter.subscription,
            client=dead_letter.client,
            message_id=dead_letter.message_id,
            dead_letter_id=dead_letter.id,
            status=str(dead_letter.status),
            attempts=dead_letter.attempts,
            error_type=dead_letter.error_type,
            error=dead_letter.error_message,
        )
