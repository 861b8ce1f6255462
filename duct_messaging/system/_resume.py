"""Suspend a system, and resume it with a new config reusing what did not change.

`suspend` runs each component's suspend hook in reverse start order; a
component without one is halted. `resume` then walks the keys of the new
config in start order:

- a kept component (its suspend hook ran) of the same type with a resume
  hook: the hook builds the new state from the new value and the old one;
- a kept component, or a plain data key, whose value after ref resolution
  equals the old one: reused as is (same object);
- anything else: the old state is halted if it is still alive, and the
  key starts afresh.

Keys missing from the new config are halted first, in reverse start order.
Values compare structurally for plain data (dicts, lists, strings,
numbers...) and by identity for any other object, so a component whose
dependency was re-created is re-created too.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import structlog

from duct_messaging.system._errors import InitError, SystemStateError
from duct_messaging.system._plan import make_plan
from duct_messaging.system._registry import Component
from duct_messaging.system._system import (
    Failures,
    Steps,
    System,
    _adrive,
    _Call,
    _check_sync_halt,
    _drive,
    _elapsed_ms,
    _Entry,
    _halt_steps,
    _raise_failures,
    _start_steps,
)

log = structlog.get_logger(__name__)

_PLAIN = (str, int, float, bool, bytes, type(None), Decimal, dt.date, dt.time)


def same_value(old: Any, new: Any) -> bool:
    """Tell whether two resolved config values count as unchanged."""
    if old is new:
        return True
    if type(old) is not type(new):
        return False
    if isinstance(old, dict):
        return old.keys() == new.keys() and all(
            same_value(old[key], new[key]) for key in old
        )
    if isinstance(old, list | tuple):
        return len(old) == len(new) and all(
            same_value(a, b) for a, b in zip(old, new, strict=True)
        )
    if isinstance(old, _PLAIN):
        return bool(old == new)
    return False


def _warn(failures: Failures) -> None:
    for key, exc in failures:
        log.warning(
            "component_halt_failed",
            key=key,
            error=repr(exc),
            next="resume goes on; release this resource by hand",
        )


def _suspend_steps(system: System) -> Steps[Failures]:
    failures: Failures = []
    for key in reversed(system._entries):
        entry = system._entries[key]
        component = entry.component
        if component is None:
            continue
        hook = component.suspend_fn
        if hook is None:
            entry.kept = False
            hook = component.halt_fn
        if hook is None:
            continue
        try:
            yield _Call(hook, (entry.state,))
        except Exception as exc:
            failures.append((key, exc))
    system._status = "suspended"
    return failures


def suspend(system: System) -> None:
    """Suspend a running system so that `resume` can reuse its components.

    Each component's suspend hook runs in reverse start order; components
    without one are halted. Suspending twice does nothing.

    Raises:
        HaltError: carrying every hook that failed; the rest is suspended.
    """
    if system._status != "running":
        return
    _check_sync_halt(system)
    _raise_failures(_drive(system, _suspend_steps(system)), "suspend")


async def asuspend(system: System) -> None:
    """Suspend a system like `suspend`, awaiting async hooks in this loop."""
    if system._status != "running":
        return
    _raise_failures(await _adrive(system, _suspend_steps(system)), "suspend")


def _resume_key(
    old: System, new: System, key: str, value: Any, component: Component | None
) -> Steps[tuple[_Entry, bool]]:
    previous = old._entries.get(key)
    reusable = (
        previous is not None and previous.kept and previous.component is component
    )
    if reusable and component is not None and component.resume_fn is not None:
        assert previous is not None
        state = yield _Call(
            component.resume_fn, (value, previous.value, previous.state)
        )
        del old._entries[key]
        resolved = (
            state if component.resolve_fn is None else component.resolve_fn(state)
        )
        return _Entry(key, component, value, state, resolved), True
    if reusable and previous is not None and same_value(previous.value, value):
        del old._entries[key]
        return _Entry(key, component, value, previous.state, previous.resolved), True

    if previous is not None:
        _warn((yield from _halt_steps(old, [key])))
    entry = yield from _start_steps(new, key, value, component)
    return entry, False


def _resume_steps(old: System, new: System) -> Steps[System]:
    started = time.perf_counter()
    plan = new.plan
    wanted = set(plan.order)
    _warn(
        (
            yield from _halt_steps(
                old, [k for k in reversed(old._entries) if k not in wanted]
            )
        )
    )

    reused = 0
    for key in plan.order:
        try:
            value = new._resolve(plan.config[key], key)
            entry, kept = yield from _resume_key(
                old, new, key, value, plan.components[key]
            )
        except Exception as exc:
            done = list(new._entries)
            failures = yield from _halt_steps(new, reversed(done))
            failures += yield from _halt_steps(old, reversed(list(old._entries)))
            raise InitError(key, exc, done, failures) from exc
        except BaseException:
            yield from _halt_steps(new, reversed(list(new._entries)))
            yield from _halt_steps(old, reversed(list(old._entries)))
            raise
        new._entries[key] = entry
        reused += kept
    log.info(
        "system_resumed",
        components=len(plan.order),
        reused=reused,
        ms=_elapsed_ms(started),
    )
    return new


def _successor(
    config: Mapping[str, Any],
    system: System,
    keys: Iterable[str] | None,
    overrides: Mapping[str, Any] | None,
) -> System:
    if system.status != "suspended":
        hint = (
            "Call suspend(system) first."
            if system.status == "running"
            else "Start a new system with init()."
        )
        raise SystemStateError("resume", system.status, hint)
    new = System(make_plan(config, keys, overrides), loop=system._loop)
    new._thread = system._take_thread()
    system._status = "halted"
    return new


def resume(
    config: Mapping[str, Any],
    system: System,
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> System:
    """Return a new system for `config`, reusing unchanged suspended components.

    The suspended `system` is consumed: afterwards it counts as halted and
    its background loop belongs to the new system.

    Raises:
        ConfigError: the new config has problems; `system` stays suspended.
        SystemStateError: `system` is not suspended.
        InitError: a component failed to resume or start; everything
            started or kept so far was halted.
    """
    _check_sync_halt(system)
    new = _successor(config, system, keys, overrides)
    try:
        return _drive(new, _resume_steps(system, new))
    except BaseException:
        thread = new._take_thread()
        if thread is not None:
            thread.stop()
        raise


async def aresume(
    config: Mapping[str, Any],
    system: System,
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> System:
    """Resume like `resume`, awaiting async hooks in the caller's loop."""
    new = _successor(config, system, keys, overrides)
    return await _adrive(new, _resume_steps(system, new))
