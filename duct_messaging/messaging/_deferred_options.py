"""Deferred-delivery options: when a message is due, and the errors about it.

Kept apart from the scheduler so the producer can resolve options, and say
that no scheduler is wired, without the scheduler's optional dependencies.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging.deadletter import utcnow


class DeferredNotConfiguredError(DuctMessagingError, RuntimeError):
    """Raised when a future delivery is asked for but no scheduler is wired."""

    def __init__(self, topic: str | None = None) -> None:
        self.topic = topic
        what = f"topic {topic!r}" if topic else "a message"
        super().__init__(
            f"Deferred delivery not configured: {what} asked for a future "
            "delivery time, but the producer has no scheduler. Add a "
            "duct.messaging/deferred component and pass it to the producer "
            "(deferred: !ref duct.messaging/deferred), or publish without a "
            "delivery time."
        )


class DeferredOptionError(DuctMessagingError, ValueError):
    """Raised when a deferred-delivery option has the wrong type or value."""

    def __init__(self, option: str, value: Any, expected: str) -> None:
        self.option = option
        self.value = value
        self.expected = expected
        super().__init__(
            f"Deferred-delivery option rejected: {option}={value!r}. "
            f"Expected {expected}."
        )


def resolve_due(
    *,
    deliver_at_time: datetime | None = None,
    deliver_at_ms: int | None = None,
    delay_ms: float | None = None,
    now: datetime | None = None,
) -> datetime | None:
    """Return when a message should be delivered, or None to publish it now.

    The first option given wins: `deliver_at_time` (a timezone-aware
    datetime), then `deliver_at_ms` (epoch milliseconds, an int), then
    `delay_ms` (milliseconds from `now`, int or float). Every option given
    is checked, even one that loses. The result is a UTC datetime only when
    it lies strictly after `now` (default: the current time); a time that
    has passed, or no option at all, gives None.

    Raises:
        DeferredOptionError: an option has the wrong type, a naive datetime,
            or a value that is not a finite time.
    """
    current = aware_datetime(now, "now") if now is not None else utcnow()

    candidates: list[datetime] = []
    if deliver_at_time is not None:
        candidates.append(aware_datetime(deliver_at_time, "deliver_at_time"))
    if deliver_at_ms is not None:
        candidates.append(_from_epoch_ms(deliver_at_ms))
    if delay_ms is not None:
        candidates.append(current + _delay(delay_ms))

    if not candidates:
        return None
    due = candidates[0].astimezone(UTC)
    return due if due > current else None


def aware_datetime(value: Any, option: str) -> datetime:
    """Return `value` if it is a timezone-aware datetime; raise naming `option`."""
    if not isinstance(value, datetime):
        raise DeferredOptionError(option, value, "a timezone-aware datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise DeferredOptionError(
            option,
            value,
            "a timezone-aware datetime (this one is naive; add tzinfo, "
            "e.g. datetime.now(UTC))",
        )
    return value


def _from_epoch_ms(value: Any) -> datetime:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DeferredOptionError("deliver_at_ms", value, "epoch milliseconds (int)")
    try:
        return datetime.fromtimestamp(value / 1000, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise DeferredOptionError(
            "deliver_at_ms", value, f"epoch milliseconds within range ({exc})"
        ) from exc


def _delay(value: Any) -> timedelta:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise DeferredOptionError("delay_ms", value, "milliseconds (int or float)")
    if not math.isfinite(value):
        raise DeferredOptionError("delay_ms", value, "a finite number of milliseconds")
    try:
        return timedelta(milliseconds=value)
    except OverflowError as exc:
        raise DeferredOptionError(
            "delay_ms", value, "milliseconds within range"
        ) from exc
