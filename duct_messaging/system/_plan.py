"""Check a whole config and work out what to start, before starting it.

`make_plan` binds every key to its component, resolves refs, orders the
keys, runs schemas and check hooks, and raises one `ConfigError` carrying
every problem it found. Nothing is started here, and no init function is
called; modules named by keys are imported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from duct_messaging.system._errors import ConfigError
from duct_messaging.system._graph import Graph, KeyIndex, Problem, build_graph
from duct_messaging.system._keys import format_path, key_parts, normalize_key
from duct_messaging.system._registry import Component, ancestors, bind
from duct_messaging.system._validate import CheckContext, component_problems
from duct_messaging.system._yaml import Config


@dataclass
class Plan:
    """A checked config: what starts, in which order, with which component.

    Attributes:
        config: the raw config.
        graph: every key (config order, then extra override keys) and the
            keys each depends on.
        order: the keys `init` starts, in start order (overrides excluded).
        components: key -> its component, or None for a plain data key.
        overrides: key -> ready object used as-is.
    """

    config: Mapping[str, Any]
    graph: Graph
    order: list[str]
    components: dict[str, Component | None]
    overrides: dict[str, Any] = field(default_factory=dict)

    def edges(self) -> list[tuple[str, str]]:
        """Return `(key, dependency)` pairs among the keys to start."""
        started = set(self.order)
        return [
            (key, dep)
            for key in self.order
            for dep in self.graph.deps.get(key, ())
            if dep in started or dep in self.overrides
        ]


def make_plan(
    config: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    checks: bool = True,
) -> Plan:
    """Return the plan for starting `keys` (default: all) of `config`.

    Raises:
        ConfigError: with every problem found, each with its location.
    """
    plan, problems = collect_problems(config, keys, overrides, checks=checks)
    if problems:
        raise ConfigError(problems)
    return plan


def check_config(
    config: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[str]:
    """Return every problem of `config` (empty when it is good).

    Runs what `init` runs before starting anything, imports the modules
    keys name and calls check hooks, but starts nothing.
    """
    return collect_problems(config, keys, overrides)[1]


def collect_problems(
    config: Mapping[str, Any],
    keys: Iterable[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    checks: bool = True,
) -> tuple[Plan, list[str]]:
    """Return the plan and the formatted problems (the plan is partial if any)."""
    ready = {normalize_key(key): value for key, value in (overrides or {}).items()}
    config_keys = [key for key in config if isinstance(key, str)]
    all_keys = config_keys + [key for key in ready if key not in config]
    problems: list[Problem] = []

    components, bind_problems = _bind_all(config_keys, ready)
    index = KeyIndex(all_keys, ancestors)
    graph, ref_problems = build_graph(config, index, skip=ready)
    selected, select_problems = _select(keys, graph, index)
    problems.extend(select_problems)
    order, left = graph.order(key for key in selected if key not in ready)

    for key in config_keys:
        if key not in selected or key in ready:
            continue
        problems.extend(bind_problems.get(key, ()))
        problems.extend(p for p in ref_problems if p.path[0] == key)
        registered = components.get(key)
        if checks and registered is not None:
            context = CheckContext(key, config, index)
            problems.extend(component_problems(key, registered, config[key], context))
    for cycle in graph.cycles(left):
        text = "dependency cycle: " + " -> ".join(cycle)
        problems.append(Problem((), text, anchor=(cycle[0],)))

    texts = _load_problems(config, selected)
    texts.extend(_format(problem, config) for problem in problems)
    plan = Plan(config, graph, order, components, ready)
    return plan, texts


def _bind_all(
    keys: Iterable[str], ready: Mapping[str, Any]
) -> tuple[dict[str, Component | None], dict[str, list[Problem]]]:
    components: dict[str, Component | None] = {}
    problems: dict[str, list[Problem]] = {}
    for key in keys:
        if key in ready:
            components[key] = None
            continue
        found: list[Component] = []
        for part in key_parts(key):
            binding = bind(part)
            if binding.problem is not None:
                message = binding.problem
                if part != key:
                    message = f"part {part!r}: {message}"
                problems.setdefault(key, []).append(Problem((key,), message))
            elif binding.component is not None:
                found.append(binding.component)
        if len(found) > 1:
            names = ", ".join(repr(item.key) for item in found)
            problems.setdefault(key, []).append(
                Problem(
                    (key,),
                    f"the key names {len(found)} component types ({names}); "
                    "a composite key may name one type, the other parts are names",
                )
            )
        components[key] = found[0] if found else None
    return components, problems


def _select(
    keys: Iterable[str] | None, graph: Graph, index: KeyIndex
) -> tuple[set[str], list[Problem]]:
    if keys is None:
        return set(graph.keys), []
    wanted: list[str] = []
    problems: list[Problem] = []
    for key in keys:
        matches = index.find(key)
        if not matches:
            problems.append(Problem((), f"keys: {key!r} matches no key of the config"))
        wanted.extend(matches)
    return graph.with_dependencies(wanted), problems


def _load_problems(config: Mapping[str, Any], selected: set[str]) -> list[str]:
    if not isinstance(config, Config):
        return []
    return [
        text
        for text, key in zip(config.problems, config.problem_keys, strict=True)
        if key is None or key in selected
    ]


def _format(problem: Problem, config: Mapping[str, Any]) -> str:
    place = format_path(problem.path)
    text = f"{place}: {problem.message}" if place else problem.message
    path = problem.path or problem.anchor
    where = config.locate(path) if isinstance(config, Config) and path else None
    return f"{text} [{where}]" if where else text
