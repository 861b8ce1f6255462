"""Dead letters: what a failed message becomes, and where it is written.

A dead letter keeps everything needed to understand and replay a message
that could not be handled: the original body and headers, where it came
from (topic, subscription, client), how often it was tried, and the last
error with its traceback. `status` is `eligible` (may be replayed) or
`poison` (could not be decoded or failed its schema; never replayed).

Sinks implement `DeadLetterSink`. The consumer runtime acknowledges a message
only after `write` returned; a sink that raises leaves the message
unacknowledged so the broker delivers it again.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import structlog

log = structlog.get_logger(__name__)


class DeadLetterStatus(StrEnum):
    """Whether a dead letter may be sent back to its topic."""

    ELIGIBLE = "eligible"
    POISON = "poison"
    REPLAYED = "replayed"


@dataclass(slots=True)
class DeadLetter:
    """A message that could not be handled, with the story of its failure."""

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

    @property
    def message_id(self) -> str | None:
        """Return the message id header of the original message, if any."""
        return self.headers.get("x-message-id")

    def to_record(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (body as text when it is UTF-8)."""
        record = asdict(self)
        record.pop("config")
        try:
            record["body"] = self.body.decode("utf-8")
            record["body_encoding"] = "utf-8"
        except UnicodeDecodeError:
            record["body"] = self.body.hex()
            record["body_encoding"] = "hex"
        record["status"] = str(self.status)
        record["first_failure_at"] = self.first_failure_at.isoformat()
        record["last_failure_at"] = self.last_failure_at.isoformat()
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> DeadLetter:
        """Rebuild a dead letter from the output of `to_record`."""
        data = dict(record)
        encoding = data.pop("body_encoding", "utf-8")
        body = data["body"]
        data["body"] = bytes.fromhex(body) if encoding == "hex" else body.encode()
        data["status"] = DeadLetterStatus(data["status"])
        for name in ("first_failure_at", "last_failure_at"):
            data[name] = datetime.fromisoformat(data[name])
        return cls(**data)


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
            status=str(dead_letter.status),
            attempts=dead_letter.attempts,
            error_type=dead_letter.error_type,
            error=dead_letter.error_message,
        )
