"""Per-component validation that runs before anything starts.

A component type can declare a `schema` (a JSON-schema dict checked with
`jsonschema`, or a callable that raises on an invalid value) and a `check`
hook yielding problem strings. Both see the raw value: refs are still
`Ref`/`RefSet` objects. A JSON schema skips values that are refs, since
what they resolve to is not known yet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from duct_messaging.errors import MissingExtraError
from duct_messaging.system._graph import ConfigPath, KeyIndex, Problem
from duct_messaging.system._keys import Ref, RefSet, format_path
from duct_messaging.system._registry import Component


class CheckContext:
    """What a `check` hook may look at besides the value of its key.

    Attributes:
        key: the concrete key being checked.
        config: the whole raw config (refs unresolved).
    """

    def __init__(self, key: str, config: Mapping[str, Any], index: KeyIndex) -> None:
        self.key = key
        self.config = config
        self._index = index

    def __repr__(self) -> str:
        return f"CheckContext(key={self.key!r})"

    def deref(self, ref: Ref | RefSet | str) -> Any:
        """Return the raw config value a ref points to.

        A `Ref` (or a key string) gives the value of the one key it selects,
        or None when it selects none or several (reported separately). A
        `RefSet` gives a dict of key -> raw value, without this key.
        """
        if isinstance(ref, RefSet):
            return {
                key: self.config.get(key)
                for key in self._index.find(ref.key)
                if key != self.key
            }
        target = ref.key if isinstance(ref, Ref) else ref
        matches = self._index.find(target)
        return self.config.get(matches[0]) if len(matches) == 1 else None


def component_problems(
    key: str,
    component: Component,
    value: Any,
    context: CheckContext,
) -> list[Problem]:
    """Return the schema and check-hook problems of one key."""
    problems: list[Problem] = []
    if component.schema is not None:
        problems.extend(
            Problem((key, *path), message)
            for path, message in schema_problems(component.schema, value)
        )
    if component.check_fn is not None:
        problems.extend(
            Problem((key,), message)
            for message in _run_check(component.check_fn, value, context)
        )
    return problems


def _run_check(
    check: Callable[[Any, CheckContext], Any], value: Any, context: CheckContext
) -> list[str]:
    try:
        found = check(value, context)
        if found is None:
            return []
        if isinstance(found, str):
            return [found]
        return [str(problem) for problem in found]
    except Exception as exc:
        return [f"check raised {type(exc).__name__}: {exc}"]


def schema_problems(
    schema: Mapping[str, Any] | Callable[[Any], Any], value: Any
) -> list[tuple[ConfigPath, str]]:
    """Return `(path inside value, message)` pairs for a schema violation."""
    if callable(schema):
        return _callable_problems(schema, value)
    try:
        import jsonschema
    except ImportError as exc:
        raise MissingExtraError(
            "A component JSON schema", "jsonschema", "jsonschema"
        ) from exc

    validator_class = jsonschema.validators.validator_for(schema)
    validator = validator_class(schema)
    problems: list[tuple[ConfigPath, str]] = []
    for error in validator.iter_errors(value):
        path = tuple(error.absolute_path)
        if not _passes_ref(value, path):
            problems.append((path, error.message))
    problems.sort(key=lambda item: format_path(item[0]))
    return problems


def _passes_ref(value: Any, path: Iterable[Any]) -> bool:
    """Tell whether `path` inside `value` is or runs through a ref."""
    current = value
    for part in (None, *path):
        if isinstance(current, Ref | RefSet):
            return True
        if part is None:
            continue
        try:
            current = current[part]
        except (KeyError, IndexError, TypeError):
            return False
    return isinstance(current, Ref | RefSet)


def _callable_problems(
    schema: Callable[[Any], Any], value: Any
) -> list[tuple[ConfigPath, str]]:
    try:
        schema(value)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            # pydantic-style errors carry a location per failure.
            try:
                return [
                    (tuple(item.get("loc", ())), str(item.get("msg", item)))
                    for item in errors()
                ]
            except Exception:
                pass
        return [((), f"{type(exc).__name__}: {exc}")]
    return []
