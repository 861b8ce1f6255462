"""Start, halt, suspend and resume systems of components.

The lifecycle steps are written once, as generators that yield each call
of a user function (init, halt, suspend, resume hooks). Two drivers run
them: the sync one blocks on awaitables through the system's background
loop, the async one awaits them in the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from duct_messaging.system._errors import (
    ConfigError,
    HaltError,
    InitError,
    SystemStateError,
)
from duct_messaging.system._graph import Graph, KeyIndex
from duct_messaging.system._keys import Ref, RefSet
from duct_messaging.system._loop import LoopThread, as_coroutine
from duct_messaging.system._plan import Plan, make_plan
from duct_messaging.system._registry import Component, ancestors

if TYPE_CHECKING:
    from dependency_injector.containers import DynamicContainer

log = structlog.get_logger(__name__)

R = TypeVar("R")
Status = Literal["running", "suspended", "halting", "halted"]
Failures = list[tuple[str, BaseException]]


@dataclass
class _Call:
    """One call of a user function, yielded by the lifecycle steps."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)


Steps = Generator[_Call, Any, R]


@dataclass
class _Entry:
    """A started key: what init got, what it returned, what dependents get."""

    key: str
    component: Component | None
    value: Any
    state: Any
    resolved: Any
    kept: bool = True  # False once a default suspend halted the state


class System(Mapping[str, Any]):
    """A started system: a read-only mapping of key -> resolved value.

    The mapping holds the overrides and the running components, in start
    order; halted keys leave it. `state(key)` gives what init returned
    (before `.resolve`). Use `halt`/`ahalt` to stop it.
    """

    def __init__(self, plan: Plan, loop: asyncio.AbstractEventLoop | None) -> None:
        self._plan = plan
        self._graph: Graph = plan.graph
        self._overrides = dict(plan.overrides)
        self._entries: dict[str, _Entry] = {}
        self._status: Status = "running"
        self._thread: LoopThread | None = None
        self._loop = loop
        # Set while a whole-system halt runs; later halt calls wait on it.
        self._halting: concurrent.futures.Future[None] | None = None

    def __getitem__(self, key: str) -> Any:
        entry = self._entries.get(key)
        if entry is not None:
            return entry.resolved
        return self._overrides[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._overrides
        yield from self._entries

    def __len__(self) -> int:
        return len(self._overrides) + len(self._entries)

    def __repr__(self) -> str:
        return f"<System {self._status} keys={list(self._entries)}>"

    @property
    def started_keys(self) -> tuple[str, ...]:
        """Return the keys started by us and still running, in start order."""
        return tuple(self._entries)

    @property
    def status(self) -> Status:
        """Return "running", "suspended", "halting" or "halted"."""
        return self._status

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """Return the loop async components run on, or None if none was needed.

        After `init` that is the system's background loop (created on the
        first awaitable, stopped by `halt`); after `ainit` the caller's loop.
        """
        if self._thread is not None:
            return self._thread.loop
        return self._loop

    @property
    def plan(self) -> Plan:
        """Return the checked plan this system was started from."""
        return self._plan

    def state(self, key: str) -> Any:
        """Return what the init function of `key` returned (or its override)."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry.state
        return self._overrides[key]

    def container(self) -> DynamicContainer:
        """Return a dependency-injector container exposing the components.

        Raises:
            MissingExtraError: dependency-injector is not installed.
        """
        from duct_messaging.system._di import build_container

        return build_container(self)

    def _resolve(self, value: Any, key: str) -> Any:
        if isinstance(value, Ref):
            return self[self._graph.refs[value.key]]
        if isinstance(value, RefSet):
            members = set(self._graph.refsets.get(value.key, ()))
            members.discard(key)
            return {name: self[name] for name in self if name in members}
        if isinstance(value, dict):
            return {name: self._resolve(item, key) for name, item in value.items()}
        if isinstance(value, list):
            return [self._resolve(item, key) for item in value]
        if isinstance(value, tuple):
            return tuple(self._resolve(item, key) for item in value)
        return value

    def _halt_order(self, keys: Iterable[str] | None) -> list[str]:
        if keys is None:
            return list(reversed(self._entries))
        index = KeyIndex(self._graph.keys, ancestors)
        wanted: list[str] = []
        for key in keys:
            matches = index.find(key)
            if not matches:
                raise ConfigError([f"keys: {key!r} matches no key of the system"])
            wanted.extend(matches)
        stopping = self._graph.with_dependents(wanted)
        return [key for key in reversed(self._entries) if key in stopping]

    def _call_blocking(self, call: _Call) -> Any:
        result = call.fn(*call.args, **call.kwargs)
        if not inspect.isawaitable(result):
            return result
        if self._thread is None and self._loop is None:
            self._thread = LoopThread()
        if self._thread is not None:
            if self._thread.in_loop_thread():
                # Blocking the loop on work scheduled on that same loop would
                # hang forever (test_sync_call_from_the_system_loop_is_refused).
                if inspect.iscoroutine(result):
                    result.close()
                raise SystemStateError(
                    "block on an async hook from the system's own loop",
                    "running it",
                    "Call the async twin (ahalt, asuspend, aresume) there.",
                )
            return self._thread.run(result)
        return self._block_on_foreign_loop(result)

    def _block_on_foreign_loop(self, awaitable: Any) -> Any:
        loop = self._loop
        assert loop is not None
        if _running_loop() is loop or loop.is_closed() or not loop.is_running():
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise SystemStateError(
                "run an async hook synchronously",
                "owned by an event loop that cannot serve this call",
                "Use the async twin (ahalt, asuspend, aresume) inside that loop.",
            )
        return asyncio.run_coroutine_threadsafe(as_coroutine(awaitable), loop).result()

    async def _call_async(self, call: _Call) -> Any:
        result = call.fn(*call.args, **call.kwargs)
        if not inspect.isawaitable(result):
            return result
        running = asyncio.get_running_loop()
        if self._thread is not None:
            target = self._thread.loop
        elif self._loop is None or self._loop is running:
            return await result
        else:
            target = self._loop
        future = asyncio.run_coroutine_threadsafe(as_coroutine(result), target)
        return await asyncio.wrap_future(future)

    def _take_thread(self) -> LoopThread | None:
        thread, self._thread = self._thread, None
        return thread


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _drive(system: System, steps: Steps[R]) -> R:
    """Run lifecycle steps synchronously."""
    try:
        call = next(steps)
        while True:
            try:
                result = system._call_blocking(call)
            except BaseException as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(result)
    except StopIteration as stop:
        value: R = stop.value
        return value


async def _adrive(system: System, steps: Steps[R]) -> R:
    """Run lifecycle steps in the caller's event loop."""
    try:
        call = next(steps)
        while True:
            try:
                result = await system._call_async(call)
            except BaseException as exc:
                call = steps.throw(exc)
            else:
                call = steps.send(result)
    except StopIteration as stop:
        value: R = stop.value
        return value


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _start_steps(
    system: System, key: str, value: Any, component: Component | None
) -> Steps[_Entry]:
    started = time.perf_counter()
    if component is None:
        state = value
    else:
        init_call = _Call(component.init_fn, (value,), component.init_kwargs(key))
        state = yield init_call
    resolved = state
    if component is not None and component.resolve_fn is not None:
        try:
            resolved = component.resolve_fn(state)
        except BaseException as exc:
            # The state was started but never recorded: halt it here, or
            # nothing ever would.
            yield from _halt_unrecorded(key, component, state, exc)
            raise
    log.debug("component_started", key=key, ms=_elapsed_ms(started))
    return _Entry(key, component, value, state, resolved)


def _halt_unrecorded(
    key: str, component: Component, state: Any, cause: BaseException
) -> Steps[None]:
    if component.halt_fn is None:
        return
    try:
        yield _Call(component.halt_fn, (state,))
    except Exception as exc:
        cause.add_note(
            f"Halting {key} after its resolve hook failed also failed: {exc!r}"
        )
        log.warning("component_halt_failed", key=key, error=repr(exc))
    else:
        log.debug("component_halted", key=key, reason="resolve_failed")


def _halt_steps(system: System, keys: Iterable[str]) -> Steps[Failures]:
    failures: Failures = []
    for key in keys:
        position = list(system._entries).index(key) if key in system._entries else -1
        entry = system._entries.pop(key, None)
        if entry is None:
            continue  # halted meanwhile by another call
        started = time.perf_counter()
        component = entry.component
        if entry.kept and component is not None and component.halt_fn is not None:
            try:
                yield _Call(component.halt_fn, (entry.state,))
            except Exception as exc:
                failures.append((key, exc))
                continue
            except BaseException:
                # Interrupted (cancelled): keep the entry, so that a later
                # halt still finds it.
                _put_back(system, position, entry)
                raise
        log.debug("component_halted", key=key, ms=_elapsed_ms(started))
    return failures


def _put_back(system: System, position: int, entry: _Entry) -> None:
    items = list(system._entries.items())
    items.insert(position, (entry.key, entry))
    system._entries.clear()
    system._entries.update(items)


def _init_steps(system: System) -> Steps[System]:
    started = time.perf_counter()
    plan = system._plan
    for key in plan.order:
        component = plan.components[key]
        try:
            value = system._resolve(plan.config[key], key)
            entry = yield from _start_steps(system, key, value, component)
        except Exception as exc:
            done = list(system._entries)
            failures = yield from _halt_steps(system, reversed(done))
            raise InitError(key, exc, done, failures) from exc
        except BaseException:
            yield from _halt_steps(system, reversed(list(system._entries)))
            raise
        system._entries[key] = entry
    log.info("system_started", components=len(plan.order), ms=_elapsed_ms(started))
    return system


def init(
    config: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> System:
    """Check `config`, then start its components in dependency order.

    `keys` limits the start to those keys (or every key deriving from a
    type name) and their dependencies. `overrides` maps keys to ready
    objects that are used as-is: never initialised, checked or halted.
    Async init functions run on a background loop owned by the system.

    Raises:
        ConfigError: the config has problems; nothing was started.
        InitError: a component failed; those started before it were halted.
    """
    system = System(make_plan(config, keys, overrides), loop=None)
    try:
        return _drive(system, _init_steps(system))
    except BaseException:
        thread = system._take_thread()
        if thread is not None:
            thread.stop()
        raise


async def ainit(
    config: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    concurrent: bool = False,
) -> System:
    """Start a system like `init`, awaiting async init functions in this loop.

    By default components start one at a time in dependency order. With
    `concurrent=True` they start in waves: every key whose dependencies
    are all up starts at once, and the next wave waits for the whole
    wave. If any key of a wave fails, the others of that wave still
    finish, then everything started is halted in reverse and `InitError`
    names the first failed key (config order). Halt with `ahalt` from the
    same loop.
    """
    system = System(make_plan(config, keys, overrides), asyncio.get_running_loop())
    if not concurrent:
        return await _adrive(system, _init_steps(system))
    return await _init_in_waves(system)


def _waves(plan: Plan) -> list[list[str]]:
    level: dict[str, int] = {}
    for key in plan.order:
        deps = [level[dep] for dep in plan.graph.deps.get(key, ()) if dep in level]
        level[key] = 1 + max(deps, default=-1)
    waves: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for key in plan.order:
        waves[level[key]].append(key)
    return waves


async def _astart(system: System, key: str) -> _Entry:
    plan = system._plan
    value = system._resolve(plan.config[key], key)
    steps = _start_steps(system, key, value, plan.components[key])
    return await _adrive(system, steps)


async def _init_in_waves(system: System) -> System:
    started = time.perf_counter()
    for wave in _waves(system._plan):
        tasks = [asyncio.ensure_future(_astart(system, key)) for key in wave]
        interrupted: BaseException | None = None
        try:
            await asyncio.wait(tasks)
        except BaseException as exc:
            # Cancelled from outside: stop the wave, but keep what started
            # so that it is halted below.
            interrupted = exc
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        failed: list[tuple[str, BaseException]] = []
        for key, task in zip(wave, tasks, strict=True):
            if task.cancelled():
                failed.append((key, asyncio.CancelledError()))
            elif (error := task.exception()) is not None:
                failed.append((key, error))
            else:
                system._entries[key] = task.result()
        if interrupted is not None:
            await _rollback_and_raise(system, wave[0], interrupted)
        if failed:
            await _rollback_and_raise(system, *failed[0])
    count = len(system._entries)
    log.info("system_started", components=count, ms=_elapsed_ms(started))
    return system


async def _rollback_and_raise(system: System, key: str, exc: BaseException) -> None:
    done = list(system._entries)
    failures = await _adrive(system, _halt_steps(system, reversed(done)))
    if isinstance(exc, Exception):
        raise InitError(key, exc, done, failures) from exc
    raise exc


def _check_sync_halt(system: System) -> None:
    if system._thread is not None or system._loop is None:
        return
    if _running_loop() is not system._loop:
        return
    if any(
        entry.component is not None
        and entry.kept
        and entry.component.halt_fn is not None
        and inspect.iscoroutinefunction(entry.component.halt_fn)
        for entry in system._entries.values()
    ):
        raise SystemStateError(
            "halt synchronously",
            "running async components in the current event loop",
            "Use `await ahalt(system)`.",
        )


def halt(system: System, keys: Iterable[str] | None = None) -> None:
    """Halt components in reverse start order; a second call does nothing.

    With `keys`, halt those keys and every key depending on them
    (dependents first); the rest keeps running. A failing halt does not
    stop the others.

    Raises:
        HaltError: carrying every `(key, exception)` that failed.
    """
    if system._status == "halted":
        return
    if system._halting is not None:
        if _running_loop() is not None:
            raise SystemStateError(
                "halt synchronously",
                "being halted by a call in progress",
                "Use `await ahalt(system)`, which waits for that halt.",
            )
        system._halting.result()
        return
    _check_sync_halt(system)
    started = time.perf_counter()
    order = system._halt_order(keys)
    if keys is not None:
        _raise_failures(_drive(system, _halt_steps(system, order)), "halt")
        return
    with _halting(system):
        failures = _drive(system, _halt_steps(system, order))
        thread = system._take_thread()
        if thread is not None:
            thread.stop()
    log.info("system_halted", components=len(order), ms=_elapsed_ms(started))
    _raise_failures(failures, "halt")


async def ahalt(system: System, keys: Iterable[str] | None = None) -> None:
    """Halt a system like `halt`, awaiting async halt functions in this loop."""
    if system._status == "halted":
        return
    if system._halting is not None:
        # Another call is halting the whole system: wait for it to finish.
        await asyncio.shield(asyncio.wrap_future(system._halting))
        return
    started = time.perf_counter()
    order = system._halt_order(keys)
    if keys is not None:
        _raise_failures(await _adrive(system, _halt_steps(system, order)), "halt")
        return
    with _halting(system):
        failures = await _adrive(system, _halt_steps(system, order))
        thread = system._take_thread()
        if thread is not None:
            await asyncio.to_thread(thread.stop)
    log.info("system_halted", components=len(order), ms=_elapsed_ms(started))
    _raise_failures(failures, "halt")


@contextmanager
def _halting(system: System) -> Iterator[None]:
    """Mark a whole-system halt in progress; restore the status if interrupted."""
    previous = system._status
    done: concurrent.futures.Future[None] = concurrent.futures.Future()
    system._status = "halting"
    system._halting = done
    try:
        yield
    except BaseException:
        system._status = previous
        raise
    else:
        system._status = "halted"
    finally:
        system._halting = None
        done.set_result(None)


def _raise_failures(failures: Failures, action: str) -> None:
    if failures:
        raise HaltError(failures, action) from failures[0][1]
