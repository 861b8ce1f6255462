"""Errors raised by the component system.

Each error builds its message from its fields, so handlers read attributes
(`problems`, `key`, `failures`) instead of parsing text.
"""

from __future__ import annotations

from collections.abc import Sequence

from duct_messaging.errors import DuctMessagingError


class ConfigError(DuctMessagingError, ValueError):
    """Raised when a config has problems; carries all of them at once.

    `problems` holds one readable line per problem, each starting with the
    config path it concerns (and ending with its file and line when known).
    Nothing has been started when this is raised.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(
            f"Invalid config: {count} {noun} found. "
            f"Fix them before starting the system:{lines}"
        )


class InitError(DuctMessagingError):
    """Raised when a component fails to start; the cause is chained.

    Components started before it have been halted in reverse order when this
    is raised. `started` lists them in start order; `halt_failures` holds any
    `(key, exception)` pairs from halting them.
    """

    def __init__(
        self,
        key: str,
        cause: BaseException,
        started: Sequence[str] = (),
        halt_failures: Sequence[tuple[str, BaseException]] = (),
    ) -> None:
        self.key = key
        self.started = tuple(started)
        self.halt_failures = tuple(halt_failures)
        halted = ", ".join(self.started) if self.started else "none"
        message = (
            f"Init failed: component {key!r} raised "
            f"{type(cause).__name__}: {cause}. "
            f"Components started before it were halted in reverse order: {halted}."
        )
        if self.halt_failures:
            failed = ", ".join(key for key, _ in self.halt_failures)
            message += f" Halting these failed too: {failed}."
        super().__init__(message)


class HaltError(DuctMessagingError):
    """Raised after a halt (or suspend) that had failing components.

    Every other component was still halted. `failures` holds the
    `(key, exception)` pairs in the order they happened; the first one is
    chained as the cause.
    """

    def __init__(
        self,
        failures: Sequence[tuple[str, BaseException]],
        action: str = "halt",
    ) -> None:
        self.failures = tuple(failures)
        self.action = action
        details = "; ".join(
            f"{key!r} ({type(exc).__name__}: {exc})" for key, exc in self.failures
        )
        super().__init__(
            f"{action.capitalize()} failed for {len(self.failures)} "
            f"component(s): {details}. The other components were processed; "
            "release these resources by hand if they matter."
        )


class SystemStateError(DuctMessagingError, RuntimeError):
    """Raised when a lifecycle call does not fit the state of the system."""

    def __init__(self, action: str, state: str, hint: str) -> None:
        self.action = action
        self.state = state
        super().__init__(f"Cannot {action}: the system is {state}. {hint}")
