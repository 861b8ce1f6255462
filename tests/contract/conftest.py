"""Fixtures of the contract suite: one kit per transport, and a test world.

`kit` is parametrised over every transport; `kit_pair` over pairs of
different transports (each transport with the next one in KIT_ORDER). Each
param carries its transport's marker, so `-m redis` selects the Redis runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from duct_messaging import halt, init
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetter
from duct_messaging.system import Ref, System
from tests.contract.kits import (
    KafkaKit,
    Kit,
    MemoryKit,
    NatsKit,
    RabbitKit,
    RedisKit,
    namespace,
)

KIT_ORDER = ("memory", "kafka", "redis", "nats", "rabbitmq")
MARKS = {
    "kafka": pytest.mark.kafka,
    "redis": pytest.mark.redis,
    "nats": pytest.mark.nats,
    "rabbitmq": pytest.mark.rabbitmq,
}
WAIT_S = 30.0
SINK_KEY = "contract.test/sink"
TOPIC = "orders"


def _param(*names: str) -> Any:
    marks = [MARKS[n] for n in names if n in MARKS]
    return pytest.param(names, marks=marks, id="+".join(names))


def _make_kit(name: str, request: pytest.FixtureRequest) -> Kit:
    if name == "memory":
        return MemoryKit()
    if name == "kafka":
        return KafkaKit(request.getfixturevalue("kafka_brokers"))
    if name == "redis":
        return RedisKit()
    if name == "nats":
        return NatsKit()
    return RabbitKit()


@pytest.fixture(params=[_param(n) for n in KIT_ORDER])
def kit(request: pytest.FixtureRequest) -> Kit:
    """Each transport in turn."""
    return _make_kit(request.param[0], request)


@pytest.fixture(
    params=[
        _param(n, KIT_ORDER[(i + 1) % len(KIT_ORDER)]) for i, n in enumerate(KIT_ORDER)
    ]
)
def kit_pair(request: pytest.FixtureRequest) -> tuple[Kit, Kit]:
    """Two different transports."""
    first, second = request.param
    return _make_kit(first, request), _make_kit(second, request)


def require(kit: Kit, promise: str) -> None:
    """Skip the running case, with the kit's reason, if `kit` lacks `promise`."""
    reason = kit.lacks.get(promise)
    if reason is not None:
        pytest.skip(f"{kit.name} does not promise {promise}: {reason}")


class Inbox:
    """What handlers received, by subscription; tests wait on it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, MessageContext]] = []
        self._changed = threading.Condition()

    def handler(
        self, name: str, hook: Callable[[Any, MessageContext], None] | None = None
    ) -> Callable[[Any, MessageContext], None]:
        """Return a handler recording into this inbox under `name`.

        `hook` runs first; if it raises, nothing is recorded.
        """

        def handle(message: Any, ctx: MessageContext) -> None:
            if hook is not None:
                hook(message, ctx)
            with self._changed:
                self.items.append((name, message, ctx))
                self._changed.notify_all()

        return handle

    def of(self, name: str) -> list[Any]:
        with self._changed:
            return [m for n, m, _ in self.items if n == name]

    def contexts(self, name: str) -> list[MessageContext]:
        with self._changed:
            return [c for n, _, c in self.items if n == name]

    def wait_until(self, check: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(check, timeout)

    def wait_for(self, name: str, count: int, timeout: float = WAIT_S) -> bool:
        return self.wait_until(lambda: len(self.of_unlocked(name)) >= count, timeout)

    def of_unlocked(self, name: str) -> list[Any]:
        return [m for n, m, _ in self.items if n == name]


class RecordingSink:
    """A dead-letter sink that keeps what it was given."""

    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []
        self._changed = threading.Condition()

    async def write(self, dead_letter: DeadLetter) -> None:
        with self._changed:
            self.letters.append(dead_letter)
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: len(self.letters) >= count, timeout)


@dataclass
class World:
    """The clusters, systems and names of one contract test."""

    ns: str
    used: dict[str, tuple[Kit, list[str]]] = field(default_factory=dict)
    systems: list[System] = field(default_factory=list)
    sink: RecordingSink = field(default_factory=RecordingSink)

    def use(self, kit: Kit, count: int = 1) -> list[str]:
        """Add `count` clusters of `kit`'s transport; return their client names."""
        names = kit.client_names(count)
        self.used[kit.name] = (kit, names)
        return names

    def target(self, kit: Kit, client: str, topic: str = TOPIC) -> dict[str, Any]:
        return {"client": client, **kit.target(self.ns, client, topic)}

    def subscription(
        self,
        kit: Kit,
        client: str,
        handler: Any,
        sub_id: str,
        topic: str = TOPIC,
        **fields: Any,
    ) -> tuple[str, dict[str, Any]]:
        options = kit.subscription_options(self.ns, client, topic, sub_id)
        options.update(fields.pop("options", {}))
        spec = {
            "topic": topic,
            "source": kit.source,
            "client": client,
            "handler": handler,
            "options": options,
            **fields,
        }
        return sub_id, spec

    def routing(
        self,
        targets: list[dict[str, Any]],
        subscriptions: list[tuple[str, dict[str, Any]]],
        topic: str = TOPIC,
    ) -> dict[str, Any]:
        return {
            "topics": {topic: {}},
            "publish": {topic: {"targets": targets}},
            "subscriptions": dict(subscriptions),
        }

    def config(
        self,
        routing: Mapping[str, Any],
        *,
        consumers: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return a system config with every used transport, producer and consumers."""
        config: dict[str, Any] = {
            "duct.messaging/routing": dict(routing),
            "duct.messaging/producers": [],
            "duct.messaging/producer": {
                "routing": Ref("duct.messaging/routing"),
                "producers": Ref("duct.messaging/producers"),
            },
            SINK_KEY: {},
        }
        for name, (kit, clients) in self.used.items():
            config[f"duct.{name}/clients"] = kit.clients(self.ns, clients)
            config[f"duct.{name}/producers"] = {"clients": Ref(f"duct.{name}/clients")}
            config["duct.messaging/producers"].append(Ref(f"duct.{name}/producers"))
            if consumers:
                config[f"duct.{name}/consumers"] = {
                    "clients": Ref(f"duct.{name}/clients"),
                    "routing": Ref("duct.messaging/routing"),
                    "deadletter": Ref(SINK_KEY),
                    **kit.consumers_settings(),
                }
        config.update(extra or {})
        return config

    def start(
        self,
        routing: Mapping[str, Any],
        *,
        consumers: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> System:
        """Init a system of the used transports; halted at teardown if still up."""
        overrides: dict[str, Any] = {SINK_KEY: self.sink}
        for kit, clients in self.used.values():
            overrides.update(kit.overrides(self.ns, clients))
        system = init(
            self.config(routing, consumers=consumers, extra=extra), overrides=overrides
        )
        self.systems.append(system)
        return system

    def stop(self, system: System) -> None:
        """Halt `system`."""
        self.systems.remove(system)
        halt(system)


def run_on(system: System, coro: Any) -> Any:
    """Run `coro` on `system`'s event loop and return its result."""
    assert system.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, system.loop).result(WAIT_S)


@pytest.fixture
def world() -> Iterator[World]:
    """A fresh namespace; halts leftover systems and cleans shared servers after."""
    state = World(namespace())
    yield state
    for system in reversed(state.systems):
        # A failed test may leave a broken system; keep cleaning up.
        with contextlib.suppress(Exception):
            halt(system)
    for kit, _ in state.used.values():
        kit.cleanup(state.ns)
