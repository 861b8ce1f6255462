"""Header names and helpers for the metadata that travels beside a message.

The wire body is the codec's encoding of the message alone, so any plain
client can read it. Everything else is a string header.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from random import getrandbits

MESSAGE_ID = "x-message-id"
TOPIC = "x-topic"
PRODUCED_AT = "x-produced-at"
CONTENT_TYPE = "content-type"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
ATTEMPT = "x-attempt"

# Headers the producer writes itself; callers may not set them.
RESERVED = frozenset({MESSAGE_ID, TOPIC, PRODUCED_AT, CONTENT_TYPE})


def new_message_id() -> str:
    """Return a fresh, unique message id: 128 random bits as 32 hex digits.

    `random` is reseeded in forked children, and this runs once per message,
    where `uuid.uuid4()` costs several times more.
    """
    return f"{getrandbits(128):032x}"


def produced_at() -> str:
    """Return the current UTC time as an ISO-8601 string."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def decode_headers(pairs: object) -> dict[str, str]:
    """Return headers as a `str -> str` dict from a transport's representation.

    Accepts a mapping or a list of `(name, value)` pairs, values as bytes or
    str; a later duplicate wins, a `None` value becomes an empty string.
    """
    if not pairs:
        return {}
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    try:
        return {name: value.decode() for name, value in items}  # type: ignore[attr-defined]
    except (AttributeError, UnicodeDecodeError):
        pass
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    out: dict[str, str] = {}
    for name, value in items:  # type: ignore[attr-defined]
        if isinstance(value, bytes | bytearray):
            out[str(name)] = bytes(value).decode("utf-8", "replace")
        else:
            out[str(name)] = "" if value is None else str(value)
    return out
