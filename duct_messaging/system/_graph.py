"""The dependency graph of a config: refs, start order and cycles.

Edges point from a key to the keys it refers to. The start order is a
topological order; among keys that are ready at the same time the one
written first in the config starts first, so equal configs always start
in the same order.
"""

from __future__ import annotations

import difflib
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from duct_messaging.system._keys import (
    Ref,
    RefSet,
    derived_closure,
    iter_refs,
    key_parts,
    normalize_key,
)

ConfigPath = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One config problem: where it is (a config path) and what is wrong."""

    path: ConfigPath
    message: str
    anchor: ConfigPath = ()  # where to point when `path` is empty


@dataclass
class Graph:
    """Keys in config order, their dependencies, and how refs resolved."""

    keys: tuple[str, ...]
    deps: dict[str, tuple[str, ...]]
    refs: dict[str, str] = field(default_factory=dict)
    refsets: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {key: index for index, key in enumerate(self.keys)}

    def index(self, key: str) -> int:
        """Return the position of `key` in the config."""
        return self._index[key]

    def edges(self) -> list[tuple[str, str]]:
        """Return `(key, dependency)` pairs in config order."""
        return [(key, dep) for key in self.keys for dep in self.deps.get(key, ())]

    def dependents(self) -> dict[str, list[str]]:
        """Return key -> keys that depend on it directly."""
        result: dict[str, list[str]] = {key: [] for key in self.keys}
        for key, dep in self.edges():
            result[dep].append(key)
        return result

    def with_dependencies(self, keys: Iterable[str]) -> set[str]:
        """Return `keys` plus everything they depend on, transitively."""
        return _closure(keys, self.deps)

    def with_dependents(self, keys: Iterable[str]) -> set[str]:
        """Return `keys` plus everything that depends on them, transitively."""
        return _closure(keys, self.dependents())

    def order(self, keys: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
        """Return `(start order, keys left over by cycles)` for `keys`.

        Uses Kahn's algorithm with a heap on the config position, so ties
        go to the key written first.
        """
        selected = set(self.keys if keys is None else keys)
        waiting = {
            key: sum(1 for dep in self.deps.get(key, ()) if dep in selected)
            for key in selected
        }
        dependents = self.dependents()
        ready = [self._index[key] for key, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            key = self.keys[heapq.heappop(ready)]
            order.append(key)
            for user in dependents[key]:
                if user in selected:
                    waiting[user] -= 1
                    if waiting[user] == 0:
                        heapq.heappush(ready, self._index[user])
        done = set(order)
        left = sorted((key for key in selected if key not in done), key=self.index)
        return order, left

    def cycles(self, keys: Sequence[str]) -> list[list[str]]:
        """Return the dependency cycles among `keys`, each as a closed path."""
        inside = set(keys)
        state: dict[str, int] = {}  # 1: on the DFS stack, 2: finished
        found: dict[frozenset[str], list[str]] = {}
        for start in keys:
            if start in state:
                continue
            stack: list[tuple[str, list[str]]] = [(start, self._deps_in(start, inside))]
            state[start] = 1
            while stack:
                key, pending = stack[-1]
                if not pending:
                    state[key] = 2
                    stack.pop()
                    continue
                dep = pending.pop(0)
                if state.get(dep) == 1:
                    path = [item for item, _ in stack]
                    cycle = path[path.index(dep) :]
                    found.setdefault(frozenset(cycle), self._rotate(cycle))
                elif dep not in state:
                    state[dep] = 1
                    stack.append((dep, self._deps_in(dep, inside)))
        return sorted(found.values(), key=lambda cycle: self._index[cycle[0]])

    def _deps_in(self, key: str, inside: set[str]) -> list[str]:
        return [dep for dep in self.deps.get(key, ()) if dep in inside]

    def _rotate(self, cycle: list[str]) -> list[str]:
        first = min(range(len(cycle)), key=lambda i: self._index[cycle[i]])
        ring = cycle[first:] + cycle[:first]
        return [*ring, ring[0]]


def _closure(keys: Iterable[str], edges: Mapping[str, Sequence[str]]) -> set[str]:
    seen = set(keys)
    pending = list(seen)
    while pending:
        for nxt in edges.get(pending.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                pending.append(nxt)
    return seen


class KeyIndex:
    """Find the keys of a config that are or derive from a name.

    Keeps an inverted index name -> keys, so a lookup costs the size of
    its answer rather than the size of the config.
    """

    def __init__(
        self, keys: Sequence[str], ancestors: Callable[[str], Iterable[str]]
    ) -> None:
        self.keys = list(keys)
        self._position = {key: index for index, key in enumerate(self.keys)}
        self._by_name: dict[str, set[str]] = {}
        for key in self.keys:
            for name in derived_closure(key, ancestors):
                self._by_name.setdefault(name, set()).add(key)

    def find(self, target: str) -> list[str]:
        """Return matching keys in config order; an exact key wins."""
        target = normalize_key(target)
        if target in self._position:
            return [target]
        parts = key_parts(target)
        if not parts:
            return []
        found = set(self._by_name.get(parts[0], ()))
        for part in parts[1:]:
            found &= self._by_name.get(part, set())
        return sorted(found, key=self._position.__getitem__)


def build_graph(
    values: Mapping[str, Any],
    index: KeyIndex,
    skip: Iterable[str] = (),
) -> tuple[Graph, list[Problem]]:
    """Resolve every ref of `values` and return the graph and ref problems.

    Keys in `skip` (overrides) contribute no dependencies.
    """
    skipped = set(skip)
    refs: dict[str, str] = {}
    refsets: dict[str, tuple[str, ...]] = {}
    deps: dict[str, tuple[str, ...]] = {}
    problems: list[Problem] = []
    for key in index.keys:
        if key in skipped or key not in values:
            deps[key] = ()
            continue
        found: dict[str, None] = {}
        for ref, path in iter_refs(values[key], (key,)):
            matches = index.find(ref.key)
            if isinstance(ref, RefSet):
                refsets[ref.key] = tuple(matches)
                found.update((match, None) for match in matches if match != key)
            elif len(matches) == 1:
                refs[ref.key] = matches[0]
                found[matches[0]] = None
            else:
                problems.append(Problem(path, _ref_problem(ref, matches, index)))
        deps[key] = tuple(found)
    return Graph(tuple(index.keys), deps, refs, refsets), problems


def _ref_problem(ref: Ref, matches: list[str], index: KeyIndex) -> str:
    if matches:
        listed = ", ".join(repr(match) for match in matches)
        return (
            f"!ref {ref.key!r} is ambiguous: {len(matches)} keys derive from it "
            f"({listed}). Refer to one of them by its full key, or use !refset."
        )
    close = difflib.get_close_matches(ref.key, index.keys, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return f"!ref {ref.key!r} matches no key of the config.{hint}"
