"""Property tests: start and halt order on random dependency graphs."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duct_messaging.system import ConfigError, Ref, RefSet, component, halt, init

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

Graph = tuple[list[str], dict[str, set[str]]]


@st.composite
def acyclic_graphs(draw: st.DrawFn) -> Graph:
    """Keys in a random config order, each referring only to earlier-ranked keys."""
    size = draw(st.integers(min_value=1, max_value=14))
    ranked = [f"pp.t/node n{index}" for index in range(size)]
    deps: dict[str, set[str]] = {}
    for rank, key in enumerate(ranked):
        chosen = draw(st.sets(st.integers(0, max(rank - 1, 0)), max_size=rank))
        deps[key] = {ranked[index] for index in chosen if index < rank}
    order = draw(st.permutations(ranked))
    return list(order), deps


@st.composite
def cyclic_graphs(draw: st.DrawFn) -> tuple[list[str], dict[str, set[str]], list[str]]:
    """An acyclic graph plus one cycle through 1 to 4 of its keys."""
    order, deps = draw(acyclic_graphs())
    length = draw(st.integers(min_value=1, max_value=min(4, len(order))))
    ring = draw(st.permutations(order))[:length]
    for index, key in enumerate(ring):
        deps[key] = {*deps[key], ring[(index + 1) % length]}
    return order, deps, ring


def to_config(order: list[str], deps: dict[str, set[str]], refset: bool) -> Any:
    config: dict[str, Any] = {}
    for key in order:
        refs = [Ref(dep.split()[-1]) for dep in sorted(deps[key])]
        config[key] = {"deps": refs, "peers": RefSet("pp.t/none") if refset else None}
    return config


@pytest.fixture
def calls() -> list[tuple[str, str]]:
    log: list[tuple[str, str]] = []

    @component("pp.t/node")
    def node(value: Any, key: str) -> str:
        log.append(("init", key))
        return key

    @node.halt
    def _stop(state: str) -> None:
        log.append(("halt", state))

    return log


class TestOrderProperties:
    @SETTINGS
    @given(graph=acyclic_graphs(), refset=st.booleans())
    def test_dependencies_start_first_and_halt_last(
        self, calls: list[tuple[str, str]], graph: Graph, refset: bool
    ) -> None:
        """Every key starts after all its dependencies and halts before them."""
        order, deps = graph
        calls.clear()

        system = init(to_config(order, deps, refset))
        started = list(system.started_keys)
        halt(system)

        inits = [key for action, key in calls if action == "init"]
        halts = [key for action, key in calls if action == "halt"]
        assert inits == started
        assert sorted(inits) == sorted(order)
        assert halts == list(reversed(inits))
        for key, needed in deps.items():
            for dep in needed:
                assert inits.index(dep) < inits.index(key)
                assert halts.index(key) < halts.index(dep)

    @SETTINGS
    @given(graph=acyclic_graphs())
    def test_equal_configs_start_in_equal_order(
        self, calls: list[tuple[str, str]], graph: Graph
    ) -> None:
        """The start order is a function of the config alone."""
        order, deps = graph

        first = init(to_config(order, deps, False))
        second = init(to_config(order, deps, False))
        halt(first)
        halt(second)

        assert first.started_keys == second.started_keys

    @SETTINGS
    @given(graph=cyclic_graphs())
    def test_cycles_are_rejected_before_any_init(
        self,
        calls: list[tuple[str, str]],
        graph: tuple[list[str], dict[str, set[str]], list[str]],
    ) -> None:
        """A config with a cycle raises ConfigError naming it; nothing starts."""
        order, deps, ring = graph
        calls.clear()

        with pytest.raises(ConfigError) as caught:
            init(to_config(order, deps, False))

        assert calls == []
        cycles = [p for p in caught.value.problems if "dependency cycle" in p]
        assert cycles
        named = set().union(*(set(p.split(": ", 1)[1].split(" -> ")) for p in cycles))
        assert set(ring) & named
