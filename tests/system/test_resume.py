"""Tests for suspend and resume."""

from __future__ import annotations

from typing import Any

import pytest

from duct_messaging.system import (
    HaltError,
    InitError,
    Ref,
    SystemStateError,
    component,
    halt,
    init,
    resume,
    suspend,
)


class Conn:
    """A stand-in for a connection: records its own lifecycle."""

    def __init__(self, value: Any, log: list[str]) -> None:
        self.value = value
        self.log = log
        self.log.append(f"open {value['name']}")


@pytest.fixture
def events() -> list[str]:
    log: list[str] = []

    @component("rs.t/conn")
    def conn(value: Any) -> Conn:
        return Conn(value, log)

    @conn.suspend
    def _pause(state: Conn) -> None:
        log.append(f"suspend {state.value['name']}")

    @conn.halt
    def _close(state: Conn) -> None:
        log.append(f"close {state.value['name']}")

    @component("rs.t/plain")
    def plain(value: Any) -> Conn:
        return Conn(value, log)

    @plain.halt
    def _plain_close(state: Conn) -> None:
        log.append(f"close {state.value['name']}")

    return log


def base() -> dict[str, Any]:
    return {
        "rs.t/conn a": {"name": "a"},
        "rs.t/conn b": {"name": "b", "a": Ref("a")},
        "rs.t/plain p": {"name": "p"},
        "rs.t/conn gone": {"name": "gone"},
    }


class TestSuspendResume:
    def test_resume_keeps_unchanged_and_recreates_changed(
        self, events: list[str]
    ) -> None:
        """Unchanged components keep their identity; changed ones start afresh."""
        system = init(base())
        old_a, old_b = system["rs.t/conn a"], system["rs.t/conn b"]
        suspend(system)
        events.clear()
        changed = base()
        changed["rs.t/conn b"] = {"name": "b", "a": Ref("a"), "size": 2}
        del changed["rs.t/conn gone"]

        new = resume(changed, system)

        assert new["rs.t/conn a"] is old_a
        assert new["rs.t/conn b"] is not old_b
        assert new["rs.t/conn b"].value["size"] == 2
        assert events == ["close gone", "close b", "open b", "open p"]
        assert system.status == "halted"
        halt(new)

    def test_dependents_of_a_recreated_component_are_recreated(
        self, events: list[str]
    ) -> None:
        """A component whose dependency changed identity is not reused."""
        system = init(base())
        old_b = system["rs.t/conn b"]
        suspend(system)
        changed = base()
        changed["rs.t/conn a"] = {"name": "a", "new": True}

        new = resume(changed, system)

        assert new["rs.t/conn b"] is not old_b
        assert new["rs.t/conn b"].value["a"] is new["rs.t/conn a"]
        halt(new)

    def test_suspend_without_hook_halts(self, events: list[str]) -> None:
        """A component with no suspend hook is halted by suspend."""
        system = init(base())
        events.clear()

        suspend(system)

        assert events == ["suspend gone", "close p", "suspend b", "suspend a"]
        assert system.status == "suspended"
        halt(system)
        assert events[-3:] == ["close gone", "close b", "close a"]

    def test_resume_hook_builds_the_new_state(self) -> None:
        """A resume hook gets the new value, the old value and the old state."""
        seen: list[Any] = []

        @component("rs.t/hooked")
        def hooked(value: Any) -> dict[str, Any]:
            return {"v": value}

        @hooked.suspend
        def _pause(state: Any) -> None:
            return None

        @hooked.resume
        def _resume(value: Any, old_value: Any, old_state: Any) -> Any:
            seen.append((value, old_value, old_state))
            return {"v": value, "resumed": True}

        system = init({"rs.t/hooked": 1})
        suspend(system)

        new = resume({"rs.t/hooked": 2}, system)

        assert seen == [(2, 1, {"v": 1})]
        assert new["rs.t/hooked"] == {"v": 2, "resumed": True}
        halt(new)

    def test_resume_needs_a_suspended_system(self, events: list[str]) -> None:
        """Resuming a running system is refused with a hint."""
        system = init(base())

        with pytest.raises(SystemStateError, match=r"suspend\(system\) first"):
            resume(base(), system)
        halt(system)

    def test_failing_resume_halts_everything(self, events: list[str]) -> None:
        """A failure while resuming halts new and kept components."""

        @component("rs.t/fails")
        def fails(value: Any) -> None:
            raise RuntimeError("no")

        system = init(base())
        suspend(system)
        events.clear()
        changed = {**base(), "rs.t/fails": {"b": Ref("b")}}

        with pytest.raises(InitError) as caught:
            resume(changed, system)

        assert caught.value.key == "rs.t/fails"
        assert sorted(events) == sorted(
            ["open p", "close p", "close b", "close a", "close gone"]
        )

    def test_suspend_failures_are_collected(self) -> None:
        """Failing suspend hooks come back in one HaltError."""

        @component("rs.t/bad")
        def bad(value: Any) -> int:
            return 1

        @bad.suspend
        def _pause(state: int) -> None:
            raise OSError("stuck")

        system = init({"rs.t/bad one": {}, "rs.t/bad two": {}})

        with pytest.raises(HaltError, match="Suspend failed for 2") as caught:
            suspend(system)

        assert [key for key, _ in caught.value.failures] == [
            "rs.t/bad two",
            "rs.t/bad one",
        ]
        assert system.status == "suspended"
        halt(system)
