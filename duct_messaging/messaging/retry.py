"""Retry policy: how often a failing handler is tried, and how long between.

Config (merged defaults -> topic -> subscription, under `retry`):

    retry:
      max_attempts: 3            # tries in all, the first included
      backoff: {initial_ms: 100, multiplier: 2.0, max_ms: 5000, jitter: 0.1}
      non_retriable: [ValueError, my_app.errors:Rejected]

Retries run inside the consumer, before the message is acknowledged. While
a message waits out its back-off, the messages behind it on the same
partition (or, for transports without partitions, the same subscription)
wait too; other partitions keep flowing, and a Kafka consumer keeps polling
(its partition is paused), so a back-off never trips `max.poll.interval.ms`.

How long retries may take: a message is dead-lettered after at most
`max_attempts` handler calls plus `worst_case_backoff_s()` of waiting; with
the defaults that is three calls and at most 0.33 s. A stopping consumer
does not wait out a back-off: the message is left unacknowledged and is
delivered again later, with a fresh count of attempts.
"""

from __future__ import annotations

import builtins
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from duct_messaging.messaging._imports import import_object

# Three tries with 100 ms then 200 ms of back-off ride out a broker or
# database blip without holding a partition for long.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_INITIAL_BACKOFF_S = 0.1
DEFAULT_MULTIPLIER = 2.0
DEFAULT_MAX_BACKOFF_S = 5.0
DEFAULT_JITTER = 0.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Attempts and exponential back-off for one subscription's handler."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    multiplier: float = DEFAULT_MULTIPLIER
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    jitter: float = DEFAULT_JITTER
    non_retriable: tuple[type[BaseException], ...] = ()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RetryPolicy:
        """Build a policy from a merged `retry` config section.

        Keys: `max_attempts`, `backoff: {initial_ms, multiplier, max_ms,
        jitter}`, `non_retriable: [import paths of exception types]`.
        """
        backoff = config.get("backoff") or {}
        kinds = tuple(_exception_type(p) for p in config.get("non_retriable") or ())
        return cls(
            max_attempts=int(config.get("max_attempts", DEFAULT_MAX_ATTEMPTS)),
            initial_backoff_s=float(backoff.get("initial_ms", 100)) / 1000,
            multiplier=float(backoff.get("multiplier", DEFAULT_MULTIPLIER)),
            max_backoff_s=float(backoff.get("max_ms", 5000)) / 1000,
            jitter=float(backoff.get("jitter", DEFAULT_JITTER)),
            non_retriable=kinds,
        )

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Return True if a failure on try `attempt` deserves another try."""
        if attempt >= self.max_attempts:
            return False
        return not isinstance(exc, self.non_retriable)

    def worst_case_backoff_s(self) -> float:
        """Return the longest total back-off before a message is dead-lettered."""
        top = 1 + self.jitter
        return sum(
            min(self.initial_backoff_s * self.multiplier ** (n - 1), self.max_backoff_s)
            * top
            for n in range(1, self.max_attempts)
        )

    def delay(self, attempt: int) -> float:
        """Return the back-off in seconds after failed try `attempt` (1-based)."""
        base = self.initial_backoff_s * self.multiplier ** (attempt - 1)
        base = min(base, self.max_backoff_s)
        if self.jitter:
            base *= 1 + random.uniform(-self.jitter, self.jitter)
        return max(base, 0.0)


def retry_problems(config: Any) -> list[str]:
    """Return the problems of a `retry` config section, each with its path."""
    if config is None:
        return []
    if not isinstance(config, Mapping):
        return [f"expected a mapping, got {type(config).__name__}"]
    problems = []
    attempts = config.get("max_attempts", DEFAULT_MAX_ATTEMPTS)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
        problems.append(f"max_attempts: expected an integer >= 1, got {attempts!r}")
    backoff = config.get("backoff") or {}
    if not isinstance(backoff, Mapping):
        problems.append(f"backoff: expected a mapping, got {type(backoff).__name__}")
        backoff = {}
    for name in ("initial_ms", "multiplier", "max_ms", "jitter"):
        value = backoff.get(name, 0)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            problems.append(f"backoff.{name}: expected a number >= 0, got {value!r}")
    for path in config.get("non_retriable") or ():
        try:
            _exception_type(path)
        except (ImportError, AttributeError, TypeError) as exc:
            problems.append(f"non_retriable: {exc}")
    return problems


def _exception_type(path: str) -> type[BaseException]:
    if "." in path or ":" in path:
        obj = import_object(path)
    else:
        obj = getattr(builtins, path, None)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise TypeError(f"{path!r} is not an exception type")
    return obj
