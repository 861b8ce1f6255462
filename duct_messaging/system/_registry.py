"""The registry that binds component keys to init functions and hooks.

How a key finds its component (the key resolution rule):

1. A key registered with `@component(key)` uses that component. A key
   registered with `register_lazy(key, module)` first imports `module`,
   which is expected to register the key itself.
2. Otherwise a key `pkg.mod/name` imports `pkg.mod`. If the module has a
   callable attribute `name`, init calls it with the value (sync or async).
   If the module imports but has no such attribute, the key is unknown.
3. If `pkg.mod` cannot be found, or the key has no `/`, the key is plain
   data: dependents get its value, refs resolved.
4. Keys in the `duct.` namespace are reserved: they must be registered, or
   they are reported as unknown with the closest registered keys.

Parts of a composite key are resolved one by one; at most one part may
name a component.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

#: A component schema: a JSON-schema dict, or a callable that raises or
#: returns problem strings.
Schema = Mapping[str, Any] | Callable[[Any], Any]


class Component:
    """A component type: an init function plus optional lifecycle hooks.

    Created by `@component(key)`. Calling the object calls the init
    function, so decorated functions stay usable directly. The hook
    decorators (`halt`, `check`, `resolve`, `suspend`, `resume`) return the
    decorated function unchanged.
    """

    def __init__(
        self,
        key: str,
        init_fn: Callable[..., Any],
        *,
        derives_from: Iterable[str] = (),
        schema: Schema | None = None,
    ) -> None:
        self.key = key
        self.init_fn = init_fn
        self.derives_from = tuple(derives_from)
        self.schema = schema
        self.halt_fn: Callable[[Any], Any] | None = None
        self.check_fn: Callable[[Any, Any], Any] | None = None
        self.resolve_fn: Callable[[Any], Any] | None = None
        self.suspend_fn: Callable[[Any], Any] | None = None
        self.resume_fn: Callable[[Any, Any, Any], Any] | None = None
        self.wants_key = _accepts_key(init_fn)

    def __repr__(self) -> str:
        return f"<Component {self.key!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the init function directly."""
        return self.init_fn(*args, **kwargs)

    def halt(self, fn: F) -> F:
        """Register `fn(state)` to release what init returned; may be async."""
        self.halt_fn = fn
        return fn

    def check(self, fn: F) -> F:
        """Register `fn(value, ctx)` to report problems before anything starts.

        `fn` gets the raw value (refs still `Ref`/`RefSet`) and a
        `CheckContext`; it yields or returns problem strings, path inside
        the value first. An exception it raises becomes a problem too.
        """
        self.check_fn = fn
        return fn

    def resolve(self, fn: F) -> F:
        """Register `fn(state)` returning what dependents receive."""
        self.resolve_fn = fn
        return fn

    def suspend(self, fn: F) -> F:
        """Register `fn(state)` to pause the component so resume can reuse it."""
        self.suspend_fn = fn
        return fn

    def resume(self, fn: F) -> F:
        """Register `fn(value, old_value, old_state)` returning the new state.

        Called by `resume` for a suspended component whose key is still in
        the new config; may be async.
        """
        self.resume_fn = fn
        return fn

    def init_kwargs(self, key: str) -> dict[str, Any]:
        """Return the keyword arguments init gets besides the value."""
        return {"key": key} if self.wants_key else {}


def _accepts_key(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "key" in parameters


_components: dict[str, Component] = {}
_lazy: dict[str, str] = {}
_by_function: dict[Callable[..., Any], Component] = {}


def component(
    key: str,
    *,
    derives_from: str | Iterable[str] = (),
    schema: Schema | None = None,
) -> Callable[[Callable[..., Any]], Component]:
    """Register the decorated function as the init function of `key`.

    `derives_from` names types this one derives from, so `!ref`/`!refset`
    of those types find keys of this type. `schema` validates the raw
    value before anything starts. Registering a key again replaces it.
    """
    parents = (derives_from,) if isinstance(derives_from, str) else derives_from

    def decorate(fn: Callable[..., Any]) -> Component:
        registered = Component(key, fn, derives_from=parents, schema=schema)
        _components[key] = registered
        _lazy.pop(key, None)
        return registered

    return decorate


def register_lazy(key: str, module_name: str) -> None:
    """Import `module_name` on demand when a config uses `key`.

    The module must register `key` with `@component` when imported.
    """
    if key not in _components:
        _lazy[key] = module_name


@dataclass(frozen=True)
class Binding:
    """How one key part resolved: a component, plain data, or a problem."""

    component: Component | None = None
    problem: str | None = None


def bind(part: str) -> Binding:
    """Resolve one key part following the key resolution rule."""
    if part not in _components and part in _lazy:
        try:
            importlib.import_module(_lazy[part])
        except Exception as exc:
            return Binding(problem=f"importing {_lazy[part]!r} failed: {exc!r}")
        if part not in _components:
            return Binding(problem=f"module {_lazy[part]!r} did not register it")
    if part in _components:
        return Binding(_components[part])

    namespace, slash, name = part.partition("/")
    reserved = namespace == "duct" or namespace.startswith("duct.")
    if not slash or not name:
        return _unknown(part) if reserved else Binding()
    try:
        module = importlib.import_module(namespace)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing != namespace and not namespace.startswith(missing + "."):
            return Binding(problem=f"importing {namespace!r} failed: {exc}")
        return _unknown(part) if reserved else Binding()
    except Exception as exc:
        return Binding(problem=f"importing {namespace!r} failed: {exc!r}")

    if part in _components:
        return Binding(_components[part])
    if reserved:
        return _unknown(part)
    target = getattr(module, name, None)
    if isinstance(target, Component):
        return Binding(target)
    if callable(target):
        return Binding(_function_component(part, target))
    public = [
        attr
        for attr in dir(module)
        if not attr.startswith("_") and callable(getattr(module, attr))
    ]
    reason = (
        f"module {namespace!r} imports but has no callable {name!r}; a key "
        "naming an importable module must name a callable in it (plain data "
        "needs a namespace that is not a module)"
    )
    return _unknown(part, candidates=public, prefix=f"{namespace}/", reason=reason)


def _function_component(key: str, fn: Callable[..., Any]) -> Component:
    found = _by_function.get(fn)
    if found is None:
        found = _by_function[fn] = Component(key, fn)
    return found


def _unknown(
    part: str,
    candidates: Iterable[str] = (),
    prefix: str = "",
    reason: str = "",
) -> Binding:
    names = [*_components, *_lazy, *(prefix + name for name in candidates)]
    close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    detail = f": {reason}" if reason else ""
    return Binding(problem=f"unknown component key {part!r}{detail}.{hint}")


def ancestors(part: str) -> set[str]:
    """Return every type `part` derives from through `derives_from`."""
    found: set[str] = set()
    pending = [part]
    while pending:
        registered = _components.get(pending.pop())
        if registered is None:
            continue
        for parent in registered.derives_from:
            if parent not in found:
                found.add(parent)
                pending.append(parent)
    return found


def registered_keys() -> list[str]:
    """Return every registered or lazily registered key, sorted."""
    return sorted({*_components, *_lazy})


@contextmanager
def isolated_registry() -> Iterator[None]:
    """Restore the registry as it was when the block exits (for tests)."""
    components, lazy, by_function = (
        dict(_components),
        dict(_lazy),
        dict(_by_function),
    )
    try:
        yield
    finally:
        # A lazily declared key's module registers it once, on first import;
        # dropping that registration would leave the key unknown for good.
        loaded = {k: v for k, v in _components.items() if k in lazy}
        _components.clear()
        _components.update(components)
        _components.update(loaded)
        _lazy.clear()
        _lazy.update(lazy)
        _by_function.clear()
        _by_function.update(by_function)
