"""Tests for init, halt, overrides, async components and their events."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from structlog.testing import capture_logs

from duct_messaging.system import (
    ConfigError,
    HaltError,
    InitError,
    Ref,
    RefSet,
    SystemStateError,
    ahalt,
    ainit,
    component,
    halt,
    init,
    read_config,
)


class Recorder:
    """Register components under a prefix and record every call in order."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.calls: list[tuple[str, str]] = []

    def add(
        self,
        name: str,
        *,
        fail_init: bool = False,
        fail_halt: bool = False,
        is_async: bool = False,
    ) -> str:
        key = f"{self.prefix}/{name}"
        calls = self.calls

        def start(value: Any) -> Any:
            calls.append(("init", name))
            if fail_init:
                raise RuntimeError(f"{name} cannot start")
            return {"name": name, "value": value}

        async def astart(value: Any) -> Any:
            await asyncio.sleep(0)
            return start(value)

        registered = component(key)(astart if is_async else start)

        @registered.halt
        def stop(state: Any) -> None:
            calls.append(("halt", name))
            if fail_halt:
                raise OSError(f"{name} cannot stop")

        return key


@pytest.fixture
def rec() -> Recorder:
    return Recorder("lc.t")


class TestConfigProblems:
    def test_every_problem_is_reported_before_any_init(
        self, rec: Recorder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Refs, cycles, unknown keys, env and check problems come all together."""
        monkeypatch.setenv("LC_T_PORT", "not-a-number")
        a, b, c = rec.add("a"), rec.add("b"), rec.add("c")
        checked = rec.add("checked")
        exploding = rec.add("exploding")

        @component(checked)  # re-register with hooks on the same key
        def checked_init(value: Any) -> Any:
            rec.calls.append(("init", "checked"))
            return value

        @checked_init.check
        def _check(value: Any, ctx: Any) -> Any:
            if "url" not in value:
                yield "url: missing"
            if ctx.deref(value["dep"]) != {"x": 1}:
                yield "dep: wrong target"

        @component(exploding)
        def exploding_init(value: Any) -> Any:
            rec.calls.append(("init", "exploding"))

        @exploding_init.check
        def _explode(value: Any, ctx: Any) -> Any:
            raise LookupError("no idea")

        text = f"""
        {a}: {{dep: !ref zzz/qqq}}
        {b}: {{next: !ref {c}}}
        {c}: {{back: !ref {b}}}
        duct.lct/unknown: {{}}
        app/port: !env [LC_T_PORT, int]
        {checked}: {{dep: !ref app/data}}
        app/data: {{x: 1}}
        {exploding}: {{}}
        """

        with pytest.raises(ConfigError) as caught:
            init(read_config(text.replace("        ", "")))

        assert rec.calls == []
        assert caught.value.problems == [
            "app/port: environment variable LC_T_PORT='not-a-number' is not a "
            "valid int [<string>:6]",
            f"{a}.dep: !ref 'zzz/qqq' matches no key of the config. [<string>:2]",
            "duct.lct/unknown: unknown component key 'duct.lct/unknown'. [<string>:5]",
            f"{checked}: url: missing [<string>:7]",
            f"{exploding}: check raised LookupError: no idea [<string>:9]",
            f"dependency cycle: {b} -> {c} -> {b} [<string>:3]",
        ]
        assert "6 problems found" in str(caught.value)
        assert isinstance(caught.value, ValueError)


class TestInit:
    def test_start_order_follows_dependencies_then_config_order(
        self, rec: Recorder
    ) -> None:
        """Keys start after their dependencies; ties go to the key written first."""
        keys = [rec.add(name) for name in ("a", "b", "c", "d")]
        a, b, c, d = keys
        config = {d: {}, a: {"d": Ref(b)}, b: {}, c: {"a": Ref(a), "d": Ref(d)}}

        system = init(config)

        assert system.started_keys == (d, b, a, c)
        assert [name for _, name in rec.calls] == ["d", "b", "a", "c"]
        assert system[c]["value"]["a"] is system[a]
        halt(system)

    def test_failed_init_halts_started_components_in_reverse(
        self, rec: Recorder
    ) -> None:
        """A failing init halts what started, newest first, and names the key."""
        a, b = rec.add("a"), rec.add("b")
        bad = rec.add("bad", fail_init=True)
        after = rec.add("after")
        config = {a: {}, b: {"a": Ref(a)}, bad: {"b": Ref(b)}, after: {}}

        with pytest.raises(
            InitError, match=r"'lc.t/bad' raised RuntimeError"
        ) as caught:
            init(config)

        assert rec.calls == [
            ("init", "a"),
            ("init", "b"),
            ("init", "bad"),
            ("halt", "b"),
            ("halt", "a"),
        ]
        assert caught.value.key == bad
        assert caught.value.started == (a, b)
        assert after not in caught.value.started
        assert isinstance(caught.value.__cause__, RuntimeError)

    def test_failing_async_init_halts_started_in_reverse(self, rec: Recorder) -> None:
        """An async init failing under sync init rolls back like a sync one."""
        a = rec.add("a", is_async=True)
        b = rec.add("b")
        bad = rec.add("bad", fail_init=True, is_async=True)

        with pytest.raises(InitError) as caught:
            init({a: {}, b: {"a": Ref(a)}, bad: {"b": Ref(b)}})

        assert rec.calls[-3:] == [("init", "bad"), ("halt", "b"), ("halt", "a")]
        assert caught.value.key == bad

    def test_overrides_are_used_as_is(self, rec: Recorder) -> None:
        """An overridden key is never initialised or halted; its refs are not needed."""
        db, api = rec.add("db"), rec.add("api")
        fake = object()
        config = {db: {"needs": Ref("lc.t/absent")}, api: {"db": Ref(db)}}

        system = init(config, overrides={db: fake})
        halt(system)

        assert rec.calls == [("init", "api"), ("halt", "api")]
        assert system.started_keys == ()

    def test_override_for_a_key_outside_the_config(self, rec: Recorder) -> None:
        """Refs may point at a key that only the overrides provide."""
        api = rec.add("api")

        system = init({api: {"clock": Ref("app/clock")}}, overrides={"app/clock": 7})

        assert system[api]["value"] == {"clock": 7}
        assert system["app/clock"] == 7
        halt(system)

    def test_resolve_hook_and_state(self) -> None:
        """Dependents get the resolved value; state() keeps what init returned."""

        @component("lc.t/pool")
        def pool(value: Any) -> dict[str, Any]:
            return {"connection": "conn", "internal": True}

        @pool.resolve
        def _public(state: dict[str, Any]) -> Any:
            return state["connection"]

        system = init({"lc.t/pool": {}, "app/user": {"pool": Ref("lc.t/pool")}})

        assert system["app/user"] == {"pool": "conn"}
        assert system.state("lc.t/pool") == {"connection": "conn", "internal": True}
        halt(system)

    def test_refset_gives_a_mapping_without_the_key_itself(self) -> None:
        """A refset is a dict key -> value in start order, possibly empty."""

        @component("lc.t/producer")
        def producer(value: Any, key: str) -> str:
            return key.split()[-1]

        config = {
            "lc.t/producer one": {},
            "lc.t/producer two": {},
            "app/all": {"producers": RefSet("lc.t/producer"), "none": RefSet("x/y")},
        }

        system = init(config)

        assert system["app/all"] == {
            "producers": {"lc.t/producer one": "one", "lc.t/producer two": "two"},
            "none": {},
        }
        halt(system)


class TestHalt:
    def test_halt_continues_past_failures_and_reports_all(self, rec: Recorder) -> None:
        """Every component is halted in reverse; failures come back together."""
        a = rec.add("a", fail_halt=True)
        b = rec.add("b")
        c = rec.add("c", fail_halt=True)
        system = init({a: {}, b: {}, c: {}})

        with pytest.raises(HaltError) as caught:
            halt(system)

        assert rec.calls[3:] == [("halt", "c"), ("halt", "b"), ("halt", "a")]
        assert [key for key, _ in caught.value.failures] == [c, a]
        assert all(isinstance(exc, OSError) for _, exc in caught.value.failures)
        assert isinstance(caught.value.__cause__, OSError)
        assert "'lc.t/c' (OSError: c cannot stop)" in str(caught.value)

    def test_second_halt_does_nothing(self, rec: Recorder) -> None:
        """Halting a halted system neither calls hooks nor raises."""
        system = init({rec.add("a"): {}})
        halt(system)

        halt(system)

        assert rec.calls == [("init", "a"), ("halt", "a")]
        assert system.status == "halted"
        assert len(system) == 0

    def test_halt_failure_during_rollback_is_reported(self, rec: Recorder) -> None:
        """A halt failing during rollback is listed on the InitError."""
        a = rec.add("a", fail_halt=True)
        bad = rec.add("bad", fail_init=True)

        with pytest.raises(
            InitError, match=r"Halting these failed too: lc\.t/a"
        ) as caught:
            init({a: {}, bad: {"a": Ref(a)}})

        assert [key for key, _ in caught.value.halt_failures] == [a]


class TestAsync:
    def test_async_init_under_sync_init_keeps_tasks_alive(self) -> None:
        """Tasks spawned by an async init keep running until halt, then stop."""
        ticks: list[int] = []
        progressed = threading.Event()
        seen: dict[str, Any] = {}

        @component("lc.t/ticker")
        async def ticker(value: Any) -> asyncio.Task[None]:
            async def tick() -> None:
                while True:
                    ticks.append(len(ticks))
                    if len(ticks) >= 3:
                        progressed.set()
                    await asyncio.sleep(0.001)

            return asyncio.create_task(tick())

        @ticker.halt
        async def _stop(task: asyncio.Task[None]) -> None:
            seen["done_before_halt"] = task.done()
            task.cancel()

        system = init({"lc.t/ticker": {}})
        loop = system.loop

        assert progressed.wait(timeout=5)
        assert loop is not None
        assert loop.is_running()
        halt(system)
        assert seen == {"done_before_halt": False}
        assert loop.is_closed()
        assert system.loop is None

    def test_sync_only_system_needs_no_loop(self, rec: Recorder) -> None:
        """No background loop exists when nothing is async."""
        system = init({rec.add("a"): {}})

        assert system.loop is None
        halt(system)

    async def test_ainit_runs_in_the_callers_loop(self) -> None:
        """ainit awaits async init functions in the running loop; ahalt too."""
        loops: list[Any] = []

        @component("lc.t/aio")
        async def aio(value: Any) -> str:
            loops.append(asyncio.get_running_loop())
            return "up"

        @aio.halt
        async def _down(state: str) -> None:
            loops.append(asyncio.get_running_loop())

        system = await ainit({"lc.t/aio": {}})
        await ahalt(system)

        running = asyncio.get_running_loop()
        assert loops == [running, running]
        assert system.loop is running

    async def test_failing_ainit_rolls_back_in_reverse(self, rec: Recorder) -> None:
        """A failure during ainit halts started ones newest first."""
        a, b = rec.add("a", is_async=True), rec.add("b", is_async=True)
        bad = rec.add("bad", fail_init=True, is_async=True)

        with pytest.raises(InitError):
            await ainit({a: {}, b: {"a": Ref(a)}, bad: {"b": Ref(b)}})

        assert rec.calls == [
            ("init", "a"),
            ("init", "b"),
            ("init", "bad"),
            ("halt", "b"),
            ("halt", "a"),
        ]

    async def test_sync_halt_of_an_ainit_system_inside_its_loop_is_refused(
        self,
    ) -> None:
        """Blocking on the loop that must run the async halt would deadlock."""

        @component("lc.t/aio2")
        async def aio2(value: Any) -> str:
            return "up"

        @aio2.halt
        async def _down(state: str) -> None:
            return None

        system = await ainit({"lc.t/aio2": {}})

        with pytest.raises(SystemStateError, match="ahalt"):
            halt(system)
        await ahalt(system)
        assert system.status == "halted"

    async def test_ahalt_of_a_sync_system_uses_its_loop(self) -> None:
        """ahalt runs async halt hooks on the system's own background loop."""
        loops: list[Any] = []

        @component("lc.t/bg")
        async def bg(value: Any) -> str:
            loops.append(asyncio.get_running_loop())
            return "up"

        @bg.halt
        async def _down(state: str) -> None:
            loops.append(asyncio.get_running_loop())

        system = await asyncio.to_thread(init, {"lc.t/bg": {}})
        await ahalt(system)

        assert loops[0] is loops[1]
        assert loops[0] is not asyncio.get_running_loop()
        assert loops[0].is_closed()


class TestEvents:
    def test_one_event_per_component_started_and_halted(self, rec: Recorder) -> None:
        """component_started/component_halted carry the key and the duration."""
        a, b = rec.add("a"), rec.add("b")

        with capture_logs() as logs:
            halt(init({a: {}, b: {"a": Ref(a)}}))

        events = [(entry["event"], entry.get("key")) for entry in logs]
        assert events == [
            ("component_started", a),
            ("component_started", b),
            ("system_started", None),
            ("component_halted", b),
            ("component_halted", a),
            ("system_halted", None),
        ]
        assert all(isinstance(entry["ms"], float) for entry in logs)


class TestConcurrentAinit:
    async def test_independent_components_start_together(self) -> None:
        """Two components that each wait for the other can only start concurrently."""
        ready = {"a": asyncio.Event(), "b": asyncio.Event()}
        order: list[str] = []

        @component("lc.t/peer")
        async def peer(value: Any, key: str) -> str:
            name = key.split()[-1]
            ready[name].set()
            await asyncio.wait_for(ready[value["other"]].wait(), timeout=5)
            order.append(name)
            return name

        @component("lc.t/after")
        def after(value: Any) -> Any:
            order.append("after")
            return value

        config = {
            "lc.t/peer a": {"other": "b"},
            "lc.t/peer b": {"other": "a"},
            "lc.t/after": {"a": Ref("a"), "b": Ref("b")},
        }

        system = await ainit(config, concurrent=True)

        assert sorted(order[:2]) == ["a", "b"]
        assert order[2] == "after"
        assert system.started_keys == ("lc.t/peer a", "lc.t/peer b", "lc.t/after")
        assert system["lc.t/after"] == {"a": "a", "b": "b"}
        await ahalt(system)

    async def test_a_failure_in_a_wave_halts_everything_started(
        self, rec: Recorder
    ) -> None:
        """Siblings of a failed key finish, then all started keys are halted."""
        a = rec.add("a", is_async=True)
        bad = rec.add("bad", fail_init=True, is_async=True)
        c = rec.add("c", is_async=True)
        later = rec.add("later")

        with pytest.raises(InitError) as caught:
            await ainit({a: {}, bad: {}, c: {}, later: {"a": Ref(a)}}, concurrent=True)

        assert caught.value.key == bad
        assert caught.value.started == (a, c)
        assert sorted(call for call in rec.calls if call[0] == "init") == [
            ("init", "a"),
            ("init", "bad"),
            ("init", "c"),
        ]
        assert rec.calls[-2:] == [("halt", "c"), ("halt", "a")]

    async def test_cancelling_a_concurrent_ainit_halts_what_started(
        self, rec: Recorder
    ) -> None:
        """Cancelling ainit mid-wave halts the started keys and re-raises."""
        a = rec.add("a")
        blocked = asyncio.Event()

        @component("lc.t/slow")
        async def slow(value: Any) -> None:
            blocked.set()
            await asyncio.Event().wait()

        task = asyncio.ensure_future(
            ainit({a: {}, "lc.t/slow": {"a": Ref(a)}}, concurrent=True)
        )
        await asyncio.wait_for(blocked.wait(), timeout=5)
        task.cancel()

        with pytest.raises(asyncio.CancelledError):
            await task
        assert rec.calls == [("init", "a"), ("halt", "a")]


class TestInterruptions:
    def test_keyboard_interrupt_during_init_halts_and_propagates(
        self, rec: Recorder
    ) -> None:
        """A BaseException from init halts what started and is re-raised as is."""
        a = rec.add("a")

        @component("lc.t/interrupt")
        def interrupt(value: Any) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            init({a: {}, "lc.t/interrupt": {"a": Ref(a)}})

        assert rec.calls == [("init", "a"), ("halt", "a")]

    def test_sync_call_from_the_system_loop_is_refused(self) -> None:
        """A sync halt run on the system's own loop fails instead of hanging."""
        outcome: dict[str, Any] = {}

        @component("lc.t/selfie")
        async def selfie(value: Any) -> str:
            return "up"

        @selfie.halt
        async def _down(state: str) -> None:
            return None

        system = init({"lc.t/selfie": {}})
        loop = system.loop
        assert loop is not None

        async def halt_from_inside() -> None:
            try:
                halt(system, keys=["lc.t/selfie"])
            except HaltError as exc:
                outcome["error"] = exc

        asyncio.run_coroutine_threadsafe(halt_from_inside(), loop).result(timeout=5)

        error = outcome["error"]
        assert isinstance(error.failures[0][1], SystemStateError)
        halt(system)
