"""What a deferred message looks like in the store: a versioned JSON document.

The scheduler's own serializer sees one string per message, never a
Python object or a nested mapping, so nothing in a message (a header that
happens to be named like the serializer's magic key, say) can make the
store load code. The document holds only data: the encoded body and key
(base64), the headers, the topic, the resolved targets (client and
options), the due time and the attempt count. A deploy of new code reads
documents written by the old one as long as `VERSION` is unchanged.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import orjson

from duct_messaging.errors import DuctMessagingError
from duct_messaging.transports.base import OutgoingMessage, Target

#: Bump when the document changes incompatibly, and keep reading the old one.
VERSION = 1


class DeferredPayloadError(DuctMessagingError, ValueError):
    """Raised when a message cannot be stored, or a stored one cannot be read."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"Deferred message rejected: {what}. {reason}")


@dataclass(frozen=True, slots=True)
class StoredError:
    """The last delivery failure, kept as text so it survives a restart."""

    type: str
    message: str
    traceback: str
    at: datetime


@dataclass(frozen=True, slots=True)
class DeferredMessage:
    """One deferred message as stored: data only.

    `id` names the deferred delivery (returned by `schedule`); `due` is the
    time the caller asked for, `run_at` the time this attempt is due (later
    than `due` for retries). `targets` are the ones still to send to: after
    a partial failure only the remaining ones are retried.
    """

    id: str
    message: OutgoingMessage
    targets: tuple[Target, ...]
    due: datetime
    run_at: datetime
    attempt: int = 1
    first_failure_at: datetime | None = None
    last_error: StoredError | None = None

    @classmethod
    def new(
        cls, message: OutgoingMessage, targets: Sequence[Target], due: datetime
    ) -> DeferredMessage:
        """Return a first attempt of `message` to `targets` at `due`."""
        return cls(
            id=uuid.uuid4().hex,
            message=message,
            targets=tuple(targets),
            due=due,
            run_at=due,
        )

    def next_attempt(
        self,
        run_at: datetime,
        targets: Sequence[Target],
        error: StoredError,
    ) -> DeferredMessage:
        """Return the retry of this message at `run_at` after `error`."""
        return replace(
            self,
            targets=tuple(targets),
            run_at=run_at,
            attempt=self.attempt + 1,
            first_failure_at=self.first_failure_at or error.at,
            last_error=error,
        )


def encode(deferred: DeferredMessage) -> str:
    """Return the JSON document stored for `deferred`.

    Raises `DeferredPayloadError` when a target option is not plain data
    (strings, numbers, booleans, null, lists and string-keyed maps).
    """
    targets = []
    for index, target in enumerate(deferred.targets):
        _check_data(target.options, f"targets[{index}].options ({target.client})")
        targets.append({"client": target.client, "options": dict(target.options)})

    message = deferred.message
    document: dict[str, Any] = {
        "v": VERSION,
        "id": deferred.id,
        "topic": message.topic,
        "body": _b64(message.body),
        "key": None if message.key is None else _b64(message.key),
        "headers": dict(message.headers),
        "targets": targets,
        "due": deferred.due.isoformat(),
        "run_at": deferred.run_at.isoformat(),
        "attempt": deferred.attempt,
        "first_failure_at": _iso(deferred.first_failure_at),
        "last_error": _error_doc(deferred.last_error),
    }
    return orjson.dumps(document).decode()


def decode(text: str) -> DeferredMessage:
    """Return the message stored as `text`.

    Raises `DeferredPayloadError` for a document this code cannot read (a
    newer version, or not one of ours).
    """
    try:
        doc = orjson.loads(text)
        version = doc["v"]
    except (orjson.JSONDecodeError, TypeError, KeyError) as exc:
        raise DeferredPayloadError("stored document", f"Not readable: {exc}") from exc
    if version != VERSION:
        raise DeferredPayloadError(
            f"stored document {doc.get('id')!r}",
            f"It has version {version!r}; this code reads version {VERSION}.",
        )

    try:
        key = doc["key"]
        message = OutgoingMessage(
            topic=doc["topic"],
            body=base64.b64decode(doc["body"]),
            headers=dict(doc["headers"]),
            key=None if key is None else base64.b64decode(key),
        )
        return DeferredMessage(
            id=doc["id"],
            message=message,
            targets=tuple(
                Target(item["client"], dict(item["options"])) for item in doc["targets"]
            ),
            due=datetime.fromisoformat(doc["due"]),
            run_at=datetime.fromisoformat(doc["run_at"]),
            attempt=int(doc["attempt"]),
            first_failure_at=_from_iso(doc["first_failure_at"]),
            last_error=_error_from_doc(doc["last_error"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DeferredPayloadError(
            f"stored document {doc.get('id')!r}", f"A field is missing or wrong: {exc}"
        ) from exc


def _check_data(value: Any, where: str) -> None:
    try:
        orjson.dumps(value)
    except TypeError as exc:
        raise DeferredPayloadError(
            where,
            f"Only plain data can be stored for later delivery: {exc}.",
        ) from exc


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _from_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _error_doc(error: StoredError | None) -> dict[str, str] | None:
    if error is None:
        return None
    return {
        "type": error.type,
        "message": error.message,
        "traceback": error.traceback,
        "at": error.at.isoformat(),
    }


def _error_from_doc(doc: Mapping[str, str] | None) -> StoredError | None:
    if doc is None:
        return None
    return StoredError(
        type=doc["type"],
        message=doc["message"],
        traceback=doc["traceback"],
        at=datetime.fromisoformat(doc["at"]),
    )
