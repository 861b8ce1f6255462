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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from duct_messaging.errors import DuctMessagingError
from duct_messaging.messaging._config_check import (
    Checked,
    ConfigPath,
    FieldProblem,
    Fields,
    ListOf,
    closest,
    describe,
    integer,
    number,
    text,
)
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

        Raises:
            RetryConfigError: the section is invalid (every problem listed).
        """
        problems = retry_problems(config)
        if problems:
            raise RetryConfigError(problems)
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
    """Return the problems of a `retry` config section, each with its path.

    Every `non_retriable` entry is imported; one that fails is named by its
    index and import path.
    """
    return [str(problem) for problem in RETRY.problems(config)]


class RetryConfigError(DuctMessagingError, ValueError):
    """Raised when a `retry` section is invalid; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"Invalid retry settings:{lines}")


def _exception_type(path: str) -> type[BaseException]:
    if "." in path or ":" in path:
        obj = import_object(path)
    else:
        obj = getattr(builtins, path, None)
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        raise TypeError(f"{path!r} is not an exception type")
    return obj


def _exception_problems(path: str, where: ConfigPath) -> Iterator[FieldProblem]:
    if "." not in path and ":" not in path:
        obj = getattr(builtins, path, None)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            return
        near = closest(path, _BUILTIN_EXCEPTIONS)
        guess = f"did you mean {near!r}? Other" if near else "other"
        yield FieldProblem(
            where,
            f"{path!r} is not a builtin exception; {guess} exceptions need "
            "an import path like 'my_app.errors:Rejected'",
        )
        return
    try:
        obj = import_object(path)
    except (ImportError, AttributeError) as exc:
        yield FieldProblem(where, f"cannot import {path!r}: {exc}")
        return
    except Exception as exc:  # the module itself failed while importing
        yield FieldProblem(
            where, f"cannot import {path!r}: {type(exc).__name__}: {exc}"
        )
        return
    if not (isinstance(obj, type) and issubclass(obj, BaseException)):
        yield FieldProblem(where, f"{path!r} is {describe(obj)}, not an exception type")


_BUILTIN_EXCEPTIONS = [
    name
    for name, obj in vars(builtins).items()
    if isinstance(obj, type) and issubclass(obj, BaseException)
]

BACKOFF = Fields(
    {
        "initial_ms": number(minimum=0),
        "multiplier": number(minimum=0),
        "max_ms": number(minimum=0),
        "jitter": number(minimum=0, maximum=1),
    },
    noun="backoff field",
    expected="a mapping such as {initial_ms: 100, multiplier: 2.0, max_ms: 5000}",
)

#: The `retry` section of a routing (defaults, topics, subscriptions).
RETRY = Fields(
    {
        "max_attempts": integer(minimum=1),
        "backoff": BACKOFF,
        "non_retriable": ListOf(
            Checked(text(), _exception_problems),
            expected="a list of exception types (builtin names or import paths)",
        ),
    },
    noun="retry field",
    expected="a mapping such as {max_attempts: 3}",
)
