"""Halting a component whose resolve hook failed, concurrent and cancelled halts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from duct_messaging.system import InitError, ahalt, ainit, component, halt, init


def _register(prefix: str, halted: list[str], *, fail_resolve: bool = False) -> str:
    key = f"{prefix}/thing"

    @component(key)
    def start(value: Any) -> dict[str, Any]:
        return {"value": value}

    @start.halt
    def stop(state: Any) -> None:
        halted.append(key)

    if fail_resolve:

        @start.resolve
        def resolve(state: Any) -> Any:
            raise RuntimeError("resolve is broken")

    return key


def test_a_component_whose_resolve_fails_is_halted() -> None:
    halted: list[str] = []
    key = _register("race.resolve", halted, fail_resolve=True)
    with pytest.raises(InitError) as caught:
        init({key: 1})
    assert caught.value.key == key
    assert halted == [key]


async def test_a_component_whose_resolve_fails_is_halted_concurrent_init() -> None:
    halted: list[str] = []
    key = _register("race.aresolve", halted, fail_resolve=True)
    with pytest.raises(InitError):
        await ainit({key: 1}, concurrent=True)
    assert halted == [key]


def _register_slow(prefix: str, halted: list[str], gate: asyncio.Event) -> str:
    key = f"{prefix}/slow"

    @component(key)
    def start(value: Any) -> dict[str, Any]:
        return {"value": value}

    @start.halt
    async def stop(state: Any) -> None:
        halted.append("begin")
        await gate.wait()
        halted.append("end")

    return key


async def test_two_concurrent_ahalts_halt_once_and_both_return() -> None:
    halted: list[str] = []
    gate = asyncio.Event()
    key = _register_slow("race.twice", halted, gate)
    system = await ainit({key: 1})
    first = asyncio.ensure_future(ahalt(system))
    second = asyncio.ensure_future(ahalt(system))
    await asyncio.sleep(0)
    assert halted == ["begin"]
    assert not second.done()  # it waits for the halt in progress
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert halted == ["begin", "end"]
    assert system.status == "halted"


async def test_a_cancelled_ahalt_keeps_the_component_for_a_later_halt() -> None:
    halted: list[str] = []
    gate = asyncio.Event()
    key = _register_slow("race.cancel", halted, gate)
    system = await ainit({key: 1})
    first = asyncio.ensure_future(ahalt(system))
    await asyncio.sleep(0)
    assert halted == ["begin"]
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert key in system.started_keys
    assert system.status == "running"
    gate.set()
    await asyncio.wait_for(ahalt(system), 5)
    assert halted == ["begin", "begin", "end"]
    assert system.status == "halted"
    halt(system)  # already halted: nothing to do
