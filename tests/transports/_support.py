"""Helpers for the Redis, NATS and RabbitMQ transport tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

from duct_messaging import halt, init
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.system import System
from tests.contract.conftest import RecordingSink

WAIT_S = 30.0
# How often `eventually` looks at broker state nobody notifies us about.
POLL_S = 0.02


def eventually(check: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    """Return True once `check()` holds, False if it still fails at the timeout."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not check():
        if time.monotonic() >= deadline:
            return False
        pause.wait(POLL_S)
    return True


class Systems:
    """Starts systems for one test and halts the ones still running after it."""

    def __init__(self) -> None:
        self.running: list[System] = []

    def start(self, config: Mapping[str, Any], **overrides: Any) -> System:
        system = init(config, overrides=overrides or None)
        self.running.append(system)
        return system

    def stop(self, system: System) -> None:
        self.running.remove(system)
        halt(system)

    def halt_all(self) -> None:
        for system in reversed(self.running):
            halt(system)
        self.running.clear()


def running_systems() -> Iterator[Systems]:
    """Yield a `Systems` and halt what is still running afterwards (fixture body)."""
    started = Systems()
    yield started
    started.halt_all()


def on_loop(system: System, coro: Coroutine[Any, Any, Any]) -> Any:
    """Run `coro` on `system`'s loop and return its result."""
    assert system.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, system.loop).result(WAIT_S)


class FailingOnceSink(RecordingSink):
    """A dead-letter sink whose first write fails, as if its storage blinked."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def write(self, dead_letter: DeadLetter) -> None:
        if not self.failures:
            self.failures += 1
            raise OSError("dead-letter storage down")
        await super().write(dead_letter)
