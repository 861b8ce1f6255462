"""Helpers for the Redis, NATS and RabbitMQ transport tests."""

from __future__ import annotations

import asyncio
import importlib
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any

import pytest

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.system import Ref, System
from tests.contract.conftest import RecordingSink

WAIT_S = 30.0
# How often `eventually` looks at broker state nobody notifies us about.
POLL_S = 0.02


def system_config(
    transport: str,
    client: Mapping[str, Any],
    *,
    topic: str,
    target: Mapping[str, Any],
    subscriptions: Mapping[str, Any] | None,
    sink: str,
) -> dict[str, Any]:
    """Return a system with one `transport` client `main` publishing `topic`.

    `client` holds the client's settings, `target` the options of the one
    publish target, and `sink` the key of the consumers' dead-letter sink.
    """
    clients, producers = f"duct.{transport}/clients", f"duct.{transport}/producers"
    return {
        clients: {"main": dict(client)},
        producers: {"clients": Ref(clients)},
        "duct.messaging/producers": [Ref(producers)],
        "duct.messaging/routing": {
            "topics": {topic: {}},
            "publish": {topic: {"targets": [{"client": "main", **target}]}},
            "subscriptions": dict(subscriptions or {}),
        },
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        f"duct.{transport}/consumers": {
            "clients": Ref(clients),
            "routing": Ref("duct.messaging/routing"),
            "deadletter": Ref(sink),
        },
        sink: {},
    }


def url_client_config(
    transport: str, url: str, destination: str, *, sink: str
) -> Callable[..., dict[str, Any]]:
    """Return `config(name, subscriptions=None, *, client=None, target=None)`.

    It builds a system with one `transport` client `main` on `url` publishing
    topic `orders` to the target whose `destination` option is `name`.
    """

    def config(
        name: str,
        subscriptions: Mapping[str, Any] | None = None,
        *,
        client: Mapping[str, Any] | None = None,
        target: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        return system_config(
            transport,
            {"url": url, **(client or {})},
            topic="orders",
            target={destination: name, **(target or {})},
            subscriptions=subscriptions,
            sink=sink,
        )

    return config


def import_without(monkeypatch: pytest.MonkeyPatch, missing: str, module: str) -> None:
    """Import `module` afresh as if the package `missing` were not installed."""
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, module)
    importlib.import_module(module)


def subscription(source: str, handler: Any, **extra: Any) -> dict[str, Any]:
    """Return a subscription of client `main` of `source` to topic `orders`."""
    return {
        "topic": "orders",
        "source": source,
        "client": "main",
        "handler": handler,
        **extra,
    }


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


def start_flaky(
    systems: Systems,
    build: Callable[[dict[str, Any]], Mapping[str, Any]],
    subscribe: Callable[..., dict[str, Any]],
    sink_key: str,
    **retry: Any,
) -> tuple[System, FailingOnceSink, list[int]]:
    """Start subscription `flaky`, whose handler always fails, and send it one message.

    `build(subscriptions)` returns the system config, `subscribe(handler, **extra)`
    a subscription; the dead-letter sink under `sink_key` fails its first write.
    Returns the system, the sink and the attempts the handler saw.
    """
    attempts: list[int] = []

    def broken(message: Any, ctx: MessageContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("always")

    sink = FailingOnceSink()
    subs = {"flaky": subscribe(broken, retry=retry)}
    system = systems.start(build(subs), **{sink_key: sink})
    system["duct.messaging/producer"].produce({"n": 1}, topic="orders")
    return system, sink, attempts
