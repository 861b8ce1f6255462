"""Resolving the deferred-delivery options of a produce call."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging.deferred import (
    DeferredNotConfiguredError,
    DeferredOptionError,
    resolve_due,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


class TestUnit:
    def test_no_option_publishes_now(self) -> None:
        """Without any option there is no due time."""
        assert resolve_due(now=NOW) is None

    def test_deliver_at_time_wins_over_the_others(self) -> None:
        """deliver_at_time is used even when the other options are given."""
        at = NOW + timedelta(minutes=5)

        due = resolve_due(
            deliver_at_time=at, deliver_at_ms=NOW_MS + 1000, delay_ms=10, now=NOW
        )

        assert due == at

    def test_deliver_at_ms_wins_over_delay(self) -> None:
        """deliver_at_ms is used before delay_ms."""
        due = resolve_due(deliver_at_ms=NOW_MS + 2500, delay_ms=10, now=NOW)

        assert due == NOW + timedelta(milliseconds=2500)

    def test_delay_counts_from_now(self) -> None:
        """delay_ms accepts ints and floats, in milliseconds."""
        assert resolve_due(delay_ms=1500, now=NOW) == NOW + timedelta(seconds=1.5)
        assert resolve_due(delay_ms=0.5, now=NOW) == NOW + timedelta(microseconds=500)

    def test_due_time_is_utc(self) -> None:
        """An aware time in another zone comes back as the same instant in UTC."""
        zone = timezone(timedelta(hours=2))
        at = datetime(2030, 1, 1, 15, 0, tzinfo=zone)

        due = resolve_due(deliver_at_time=at, now=NOW)

        assert due == at
        assert due is not None
        assert due.tzinfo is UTC

    @pytest.mark.parametrize(
        "options",
        [
            {"deliver_at_time": NOW},
            {"deliver_at_time": NOW - timedelta(days=1)},
            {"deliver_at_ms": NOW_MS},
            {"deliver_at_ms": 0},
            {"delay_ms": 0},
            {"delay_ms": -100},
            {"deliver_at_time": NOW, "delay_ms": 60_000},
        ],
    )
    def test_time_not_in_the_future_publishes_now(
        self, options: dict[str, object]
    ) -> None:
        """A due time equal to now or in the past gives None: publish immediately."""
        assert resolve_due(**options, now=NOW) is None  # type: ignore[arg-type]

    def test_default_now_is_the_current_time(self) -> None:
        """Without `now`, a positive delay is in the future and 0 is not."""
        due = resolve_due(delay_ms=60_000)

        assert due is not None
        assert due > datetime.now(UTC)
        assert resolve_due(delay_ms=0) is None

    def test_naive_datetime_is_an_error(self) -> None:
        """A naive deliver_at_time is rejected, naming the option."""
        naive = datetime(2030, 1, 1, 12, 0)

        with pytest.raises(
            DeferredOptionError, match=r"deliver_at_time=.*naive"
        ) as err:
            resolve_due(deliver_at_time=naive, now=NOW)

        assert err.value.option == "deliver_at_time"
        assert err.value.value == naive
        assert isinstance(err.value, DuctMessagingError)
        assert isinstance(err.value, ValueError)

    @pytest.mark.parametrize(
        ("option", "value"),
        [
            ("deliver_at_time", "2030-01-01T00:00:00Z"),
            ("deliver_at_time", NOW_MS),
            ("deliver_at_ms", 1.5e12),
            ("deliver_at_ms", "1893499200000"),
            ("deliver_at_ms", True),
            ("deliver_at_ms", NOW),
            ("delay_ms", "100"),
            ("delay_ms", False),
            ("delay_ms", timedelta(seconds=1)),
            ("delay_ms", float("nan")),
            ("delay_ms", float("inf")),
            ("delay_ms", 10**20),
            ("deliver_at_ms", 10**20),
        ],
    )
    def test_wrong_type_names_the_option(self, option: str, value: object) -> None:
        """A value of the wrong type (or no finite time) is an error naming it."""
        with pytest.raises(
            DeferredOptionError, match=f"^Deferred-delivery option rejected: {option}="
        ) as err:
            resolve_due(**{option: value}, now=NOW)  # type: ignore[arg-type]

        assert err.value.option == option

    def test_losing_options_are_checked_too(self) -> None:
        """A bad option is reported even when a higher one would win."""
        with pytest.raises(DeferredOptionError, match="delay_ms"):
            resolve_due(deliver_at_time=NOW + timedelta(days=1), delay_ms="soon")  # type: ignore[arg-type]

    def test_naive_now_is_an_error(self) -> None:
        """`now` must be timezone-aware too."""
        with pytest.raises(DeferredOptionError, match="now="):
            resolve_due(delay_ms=1, now=datetime(2030, 1, 1))

    def test_not_configured_error_says_how_to_fix_it(self) -> None:
        """The error names the topic and the component to add."""
        error = DeferredNotConfiguredError("orders")

        assert error.topic == "orders"
        assert isinstance(error, DuctMessagingError)
        assert "'orders'" in str(error)
        assert "duct.messaging/deferred" in str(error)
