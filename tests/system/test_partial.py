"""Tests for partial systems: starting and halting subsets of keys."""

from __future__ import annotations

from typing import Any

import pytest

from duct_messaging.system import ConfigError, Ref, component, halt, init


@pytest.fixture
def calls() -> list[tuple[str, str]]:
    log: list[tuple[str, str]] = []

    @component("pt.t/node")
    def node(value: Any, key: str) -> str:
        log.append(("init", key))
        return key

    @node.halt
    def _stop(state: str) -> None:
        log.append(("halt", state))

    return log


def config() -> dict[str, Any]:
    """db <- repo <- api; db <- worker; cache alone."""
    return {
        "pt.t/node db": {},
        "pt.t/node repo": {"db": Ref("db")},
        "pt.t/node cache": {},
        "pt.t/node api": {"repo": Ref("repo")},
        "pt.t/node worker": {"db": Ref("db")},
    }


class TestPartialInit:
    def test_keys_start_with_their_dependencies_only(
        self, calls: list[tuple[str, str]]
    ) -> None:
        """init(keys=...) starts those keys and what they need, nothing else."""
        system = init(config(), keys=["api"])

        assert system.started_keys == (
            "pt.t/node db",
            "pt.t/node repo",
            "pt.t/node api",
        )
        halt(system)

    def test_unknown_key_in_keys_is_a_config_error(
        self, calls: list[tuple[str, str]]
    ) -> None:
        """A requested key missing from the config is reported before starting."""
        with pytest.raises(ConfigError, match="'nope' matches no key"):
            init(config(), keys=["nope"])

        assert calls == []

    def test_problems_of_unselected_keys_do_not_block(
        self, calls: list[tuple[str, str]]
    ) -> None:
        """A broken key outside the selection does not stop a partial init."""
        broken = {**config(), "pt.t/node broken": {"x": Ref("missing/key")}}

        system = init(broken, keys=["cache"])

        assert system.started_keys == ("pt.t/node cache",)
        halt(system)


class TestPartialHalt:
    def test_halting_a_key_stops_its_dependents_first(
        self, calls: list[tuple[str, str]]
    ) -> None:
        """halt(keys=[db]) stops everything using db, dependents first."""
        system = init(config())
        calls.clear()

        halt(system, keys=["db"])

        assert calls == [
            ("halt", "pt.t/node worker"),
            ("halt", "pt.t/node api"),
            ("halt", "pt.t/node repo"),
            ("halt", "pt.t/node db"),
        ]
        assert system.started_keys == ("pt.t/node cache",)
        assert system.status == "running"

    def test_full_halt_after_partial_halt_stops_the_rest(
        self, calls: list[tuple[str, str]]
    ) -> None:
        """The remaining keys are halted later, each exactly once."""
        system = init(config())
        halt(system, keys=["api"])
        calls.clear()

        halt(system)

        assert calls == [
            ("halt", "pt.t/node worker"),
            ("halt", "pt.t/node cache"),
            ("halt", "pt.t/node repo"),
            ("halt", "pt.t/node db"),
        ]
        assert system.status == "halted"
