"""The value of a `duct.messaging/deferred` key: its settings and checks.

`settings_problems` runs on the raw config before anything starts (refs
are still `Ref` objects and are not looked into); `DeferredSettings.parse`
runs at init on the resolved value and raises with the same messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging import _deferred_store as stores
from duct_messaging.messaging._config_check import closest
from duct_messaging.system import Ref, RefSet

_SETTINGS = (
    "producers",
    "store",
    "allow_memory_store",
    "concurrency",
    "lease_s",
    "poll_interval_s",
    "grace_s",
    "halt_timeout_s",
    "delivery",
    "deadletter",
)
_DELIVERY_SETTINGS = ("max_attempts", "backoff_s", "backoff_max_s")

#: Each retry waits this many times longer than the one before, up to
#: `backoff_max_s`: a broker that is down for minutes is not hammered, one
#: that blinked is retried within a second.
BACKOFF_FACTOR = 2.0


class DeferredConfigError(DuctMessagingError, ValueError):
    """Raised when deferred-delivery settings are invalid; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"Invalid deferred-delivery settings:{lines}")


class MemoryStoreRefusedError(DuctMessagingError, ValueError):
    """Raised when an in-memory store is configured without opting in."""

    def __init__(self) -> None:
        super().__init__(
            "Deferred-delivery store refused: memory. An in-memory store loses "
            "every pending message when the process stops and cannot be shared "
            "between instances. Use store.url (PostgreSQL) or store.sqlite, or "
            "set allow_memory_store: true where losing them is fine (tests)."
        )


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How often, and how far apart, a failed delivery is tried again.

    Attempt `n` (counting the first as 1) that fails waits
    `min(backoff_max_s, backoff_s * 2**(n-1))` before attempt `n+1`; after
    `max_attempts` failures the message is dead-lettered.
    """

    max_attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Return how long to wait after failed attempt `attempt`."""
        delay = self.backoff_s * BACKOFF_FACTOR ** max(attempt - 1, 0)
        return float(min(self.backoff_max_s, delay))


@dataclass(frozen=True, slots=True)
class DeferredSettings:
    """Parsed deferred-delivery settings (see the component docs for each)."""

    store: stores.StoreSpec
    producers: Any = None
    allow_memory_store: bool = False
    concurrency: int = 100
    lease_s: float = 15.0
    poll_interval_s: float = 1.0
    grace_s: float | None = None
    halt_timeout_s: float = 10.0
    delivery: DeliveryPolicy = field(default_factory=DeliveryPolicy)
    deadletter: Any = None

    @classmethod
    def parse(cls, value: Mapping[str, Any]) -> DeferredSettings:
        """Return the settings of a resolved config value.

        Raises `DeferredConfigError` listing every problem, and
        `MemoryStoreRefusedError` for a memory store without
        `allow_memory_store: true`.
        """
        if not isinstance(value, Mapping):
            raise DeferredConfigError([_NOT_A_MAPPING])
        problems = [p for p in settings_problems(value) if not _is_memory_refusal(p)]
        if problems:
            raise DeferredConfigError(problems)

        spec = stores.parse_store(value.get("store"))
        allow_memory = bool(value.get("allow_memory_store", False))
        if spec.kind == "memory" and not allow_memory:
            raise MemoryStoreRefusedError()

        delivery = value.get("delivery") or {}
        defaults = cls(store=spec)
        policy = defaults.delivery
        return cls(
            store=spec,
            producers=value.get("producers"),
            allow_memory_store=allow_memory,
            concurrency=int(value.get("concurrency", defaults.concurrency)),
            lease_s=float(value.get("lease_s", defaults.lease_s)),
            poll_interval_s=float(
                value.get("poll_interval_s", defaults.poll_interval_s)
            ),
            grace_s=_optional_float(value.get("grace_s")),
            halt_timeout_s=float(value.get("halt_timeout_s", defaults.halt_timeout_s)),
            delivery=DeliveryPolicy(
                max_attempts=int(delivery.get("max_attempts", policy.max_attempts)),
                backoff_s=float(delivery.get("backoff_s", policy.backoff_s)),
                backoff_max_s=float(
                    delivery.get("backoff_max_s", policy.backoff_max_s)
                ),
            ),
            deadletter=value.get("deadletter"),
        )


_NOT_A_MAPPING = "expected a mapping of deferred-delivery settings"
_MEMORY_REFUSAL = (
    "store.memory: an in-memory store loses every pending message when the "
    "process stops; use store.url or store.sqlite, or set "
    "allow_memory_store: true (tests only)"
)


def _is_memory_refusal(problem: str) -> bool:
    return problem == _MEMORY_REFUSAL


def settings_problems(value: Any) -> Iterator[str]:
    """Yield every problem of a raw `duct.messaging/deferred` value."""
    if not isinstance(value, Mapping):
        yield _NOT_A_MAPPING
        return

    for name in sorted(set(value) - set(_SETTINGS), key=str):
        yield f"{name}: unknown setting; {_known(name, _SETTINGS)}"
    if "producers" not in value:
        yield "producers: missing; use !ref duct.messaging/producers"

    store = value.get("store")
    if not _is_ref(store):
        yield from stores.store_problems(store)
        memory = isinstance(store, Mapping) and store.get("memory") is True
        if memory and value.get("allow_memory_store") is not True:
            yield _MEMORY_REFUSAL

    yield from _bool_problems(value, "allow_memory_store")
    yield from _number_problems(value, "concurrency", minimum=1, integer=True)
    yield from _number_problems(value, "lease_s", minimum=0.5)
    yield from _number_problems(value, "poll_interval_s", minimum=0.01)
    yield from _number_problems(value, "halt_timeout_s", minimum=0)
    if value.get("grace_s") is not None:
        yield from _number_problems(value, "grace_s", minimum=0)
    yield from _delivery_problems(value.get("delivery"))
    yield from _deadletter_problems(value.get("deadletter"))

    lease, poll = value.get("lease_s"), value.get("poll_interval_s")
    if _is_number(lease) and _is_number(poll) and poll >= lease:
        yield (
            f"poll_interval_s: {poll} is not shorter than lease_s ({lease}); "
            "an instance must look for orphaned messages more often than "
            "leases expire"
        )


def _delivery_problems(delivery: Any) -> Iterator[str]:
    if delivery is None or _is_ref(delivery):
        return
    if not isinstance(delivery, Mapping):
        yield "delivery: expected a mapping with max_attempts, backoff_s, backoff_max_s"
        return
    for name in sorted(set(delivery) - set(_DELIVERY_SETTINGS), key=str):
        yield f"delivery.{name}: unknown setting; {_known(name, _DELIVERY_SETTINGS)}"
    yield from _number_problems(delivery, "max_attempts", "delivery.", 1, True)
    yield from _number_problems(delivery, "backoff_s", "delivery.", 0)
    yield from _number_problems(delivery, "backoff_max_s", "delivery.", 0)
    low, high = delivery.get("backoff_s"), delivery.get("backoff_max_s")
    if _is_number(low) and _is_number(high) and high < low:
        yield f"delivery.backoff_max_s: {high} is below backoff_s ({low})"


def _known(name: Any, known: tuple[str, ...]) -> str:
    near = closest(name, known)
    guess = f"did you mean {near!r}? " if near else ""
    return f"{guess}known: {', '.join(known)}"


def _deadletter_problems(sink: Any) -> Iterator[str]:
    if sink is None or _is_ref(sink):
        return
    if not callable(getattr(sink, "write", None)):
        yield (
            "deadletter: expected a dead-letter sink (an object with an async "
            f"write method, usually a !ref), got {type(sink).__name__}"
        )


def _number_problems(
    value: Mapping[str, Any],
    name: str,
    prefix: str = "",
    minimum: float = 0,
    integer: bool = False,
) -> Iterator[str]:
    if name not in value or _is_ref(value[name]):
        return
    number = value[name]
    kind = "an integer" if integer else "a number"
    if not _is_number(number) or (integer and not isinstance(number, int)):
        yield f"{prefix}{name}: expected {kind}, got {number!r}"
    elif not math.isfinite(number) or number < minimum:
        yield f"{prefix}{name}: expected {kind} >= {minimum}, got {number!r}"


def _bool_problems(value: Mapping[str, Any], name: str) -> Iterator[str]:
    if name in value and not isinstance(value[name], bool):
        yield f"{name}: expected true or false, got {value[name]!r}"


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_ref(value: Any) -> bool:
    # Refs are resolved by the system, which checks what they point to.
    return isinstance(value, Ref | RefSet)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)
