"""The vector schema notation, compiled once into plain closures.

A schema is a type name (`uuid`) or a list `[type, {props}?, args...]`:

    [map, {closed: true}, [id, uuid], [note, {optional: true}, string]]
    [vector, {min: 1}, [map, [sku, string], [qty, [int, {min: 1}]]]]
    [maybe, inst]   [enum, small, large]   [or, int, string]

Compilation turns every node into two closures. `check` answers valid or
not as fast as it can: no paths, no messages, no allocation. `explain` runs
only after `check` said no, and walks the whole message to collect every
failing field with its path. Valid messages, the common case, pay only for
`check`.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from duct_messaging.messaging._paths import join_index, join_key
from duct_messaging.messaging._schema_errors import SchemaConfigError, show, show_spec

Errors = list[tuple[str, str]]
Check = Callable[[Any], bool]
Explain = Callable[[Any, str, Errors], None]

_MISSING: Any = object()

# Props any node may carry for documentation; they do not affect validation.
_DOC_PROPS = frozenset({"title", "description", "doc", "example", "examples"})

_UUID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


@dataclass(frozen=True, slots=True)
class Node:
    """A compiled schema node: a fast yes/no check and a full explanation."""

    check: Check
    explain: Explain


def compile_vector(spec: Any, path: str) -> Node:
    """Compile a vector-notation `spec`; `path` names it in config errors."""
    return _Compiler(path).node(spec, "")


def is_type_name(text: str) -> bool:
    """Return True if `text` names a vector-notation type."""
    return _type_name(text) in _BUILDERS


def _type_name(text: str) -> str:
    # EDN habits carry over: `:map` reads the same as `map`.
    return text[1:] if text.startswith(":") else text


@dataclass(slots=True)
class _Args:
    """One `[type, {props}?, args...]` node being compiled."""

    name: str
    sub: str
    props: Mapping[str, Any]
    args: Sequence[Any]
    first_arg: int

    def arg_sub(self, index: int) -> str:
        return join_index(self.sub, self.first_arg + index)

    @property
    def props_sub(self) -> str:
        return join_index(self.sub, 1)


class _Compiler:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, sub: str, reason: str) -> NoReturn:
        raise SchemaConfigError(self.path, reason, sub)

    def node(self, spec: Any, sub: str) -> Node:
        node = self._split(spec, sub)
        builder = _BUILDERS.get(node.name)
        if builder is None:
            where = join_index(sub, 0) if isinstance(spec, list | tuple) else sub
            known = ", ".join(sorted(_BUILDERS))
            self.fail(where, f"unknown type {node.name!r}; known types: {known}")
        return builder(self, node)

    def _split(self, spec: Any, sub: str) -> _Args:
        if isinstance(spec, str):
            return _Args(_type_name(spec), sub, {}, (), 1)

        if not isinstance(spec, list | tuple):
            self.fail(
                sub,
                f"expected a type name or a [type, ...] list, got {show_spec(spec)}",
            )
        if not spec:
            self.fail(sub, "empty list; expected [type, ...]")
        head = spec[0]
        if not isinstance(head, str):
            self.fail(
                join_index(sub, 0), f"expected a type name, got {show_spec(head)}"
            )

        if len(spec) > 1 and isinstance(spec[1], Mapping):
            return _Args(_type_name(head), sub, spec[1], spec[2:], 2)
        return _Args(_type_name(head), sub, {}, spec[1:], 1)

    def props(
        self, node: _Args, allowed: Mapping[str, type | tuple[type, ...]]
    ) -> None:
        """Refuse props the type does not know or of the wrong kind."""
        for key, value in node.props.items():
            sub = join_key(node.props_sub, key)
            if key in _DOC_PROPS:
                continue
            kind = allowed.get(_type_name(key)) if isinstance(key, str) else None
            if kind is None:
                names = ", ".join(sorted(allowed)) or "none besides documentation"
                self.fail(
                    sub, f"unknown property {key!r} for {node.name}; known: {names}"
                )
            if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
                self.fail(sub, f"expected {_kind_name(kind)}, got {show_spec(value)}")

    def arity(self, node: _Args, low: int, high: int | None = None) -> None:
        count = len(node.args)
        if count < low or (high is not None and count > high):
            if high == low:
                want = f"exactly {low}"
            elif high is None:
                want = f"at least {low}"
            else:
                want = f"{low} to {high}"
            self.fail(node.sub, f"{node.name} takes {want} argument(s), got {count}")

    def children(self, node: _Args) -> list[Node]:
        return [self.node(arg, node.arg_sub(i)) for i, arg in enumerate(node.args)]


def _prop(node: _Args, key: str, default: Any = None) -> Any:
    for name, value in node.props.items():
        if isinstance(name, str) and _type_name(name) == key:
            return value
    return default


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", _NUMBER: "a number"}
    return names.get(kind, "a value of another type")


def _leaf(check: Check, reason: Callable[[Any], str]) -> Node:
    def explain(value: Any, path: str, errors: Errors) -> None:
        if not check(value):
            errors.append((path, reason(value)))

    return Node(check, explain)


def _expected(what: str) -> Callable[[Any], str]:
    return lambda value: f"expected {what}, got {show(value)}"


# --- scalars --------------------------------------------------------------

_NUMBER = (int, float)


def _bounds(c: _Compiler, node: _Args) -> tuple[Any, Any]:
    c.props(node, {"min": _NUMBER, "max": _NUMBER})
    c.arity(node, 0, 0)
    return _prop(node, "min"), _prop(node, "max")


def _ranged(base: Check, what: str, low: Any, high: Any, size: bool) -> Node:
    """Wrap `base` with min/max bounds on the value (or its length)."""
    if low is None and high is None:
        return _leaf(base, _expected(what))

    lo = float("-inf") if low is None else low
    hi = float("inf") if high is None else high
    unit = "length" if size else "value"

    if size:

        def check(value: Any) -> bool:
            return base(value) and lo <= len(value) <= hi
    else:

        def check(value: Any) -> bool:
            return base(value) and lo <= value <= hi

    def reason(value: Any) -> str:
        if not base(value):
            return f"expected {what}, got {show(value)}"
        measured = len(value) if size else value
        if measured < lo:
            return f"expected {unit} at least {low}, got {measured}"
        return f"expected {unit} at most {high}, got {measured}"

    return _leaf(check, reason)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, int))


def _is_double(value: Any) -> bool:
    kind = type(value)
    if kind is float or kind is int:
        return True
    return kind is not bool and isinstance(value, _NUMBER)


def _is_bool(value: Any) -> bool:
    return value is True or value is False


def _is_uuid(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) == 36 and _UUID.fullmatch(value) is not None
    return isinstance(value, uuid.UUID)


def _as_datetime(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _is_inst(value: Any) -> bool:
    parsed = _as_datetime(value)
    return parsed is not None and parsed.utcoffset() is not None


def _inst_reason(value: Any) -> str:
    if _as_datetime(value) is not None:
        return f"datetime {show(value)} has no timezone offset"
    return f"expected an ISO-8601 datetime with a timezone offset, got {show(value)}"


def _string(c: _Compiler, node: _Args) -> Node:
    low, high = _bounds(c, node)
    return _ranged(_is_str, "a string", low, high, size=True)


def _int(c: _Compiler, node: _Args) -> Node:
    low, high = _bounds(c, node)
    return _ranged(_is_int, "an integer", low, high, size=False)


def _double(c: _Compiler, node: _Args) -> Node:
    low, high = _bounds(c, node)
    return _ranged(_is_double, "a number", low, high, size=False)


def _simple(
    check: Check, reason: Callable[[Any], str]
) -> Callable[[_Compiler, _Args], Node]:
    def build(c: _Compiler, node: _Args) -> Node:
        c.props(node, {})
        c.arity(node, 0, 0)
        return _leaf(check, reason)

    return build


def _any(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 0, 0)

    def explain(value: Any, path: str, errors: Errors) -> None:
        return None

    return Node(lambda value: True, explain)


# --- containers -----------------------------------------------------------


def _map(c: _Compiler, node: _Args) -> Node:
    c.props(node, {"closed": bool})
    closed = bool(_prop(node, "closed", False))
    entries = [_entry(c, node, i, spec) for i, spec in enumerate(node.args)]

    seen: dict[Any, str] = {}
    for i, (key, _, _) in enumerate(entries):
        if key in seen:
            c.fail(node.arg_sub(i), f"key {key!r} is declared twice")
        seen[key] = node.arg_sub(i)

    required = tuple((k, n.check) for k, n, optional in entries if not optional)
    optional = tuple((k, n.check) for k, n, opt in entries if opt)
    keys = frozenset(seen)
    check = _map_check(required, optional, closed)

    def explain(value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, dict):
            errors.append((path, f"expected a map, got {show(value)}"))
            return

        for key, child, is_optional in entries:
            item = value.get(key, _MISSING)
            if item is not _MISSING:
                child.explain(item, join_key(path, key), errors)
            elif not is_optional:
                errors.append((join_key(path, key), "missing required key"))

        if closed:
            for key in value:
                if key not in keys:
                    errors.append(
                        (join_key(path, key), "unexpected key; the map is closed")
                    )

    return Node(check, explain)


def _map_check(
    required: tuple[tuple[Any, Check], ...],
    optional: tuple[tuple[Any, Check], ...],
    closed: bool,
) -> Check:
    count = len(required)

    if closed and not optional:
        # All keys present and the sizes equal means no extra keys, without
        # walking the message's keys (see test_closed_map_rejects_extra_keys).
        def check_exact(value: Any) -> bool:
            if not isinstance(value, dict) or len(value) != count:
                return False
            for key, child in required:
                item = value.get(key, _MISSING)
                if item is _MISSING or not child(item):
                    return False
            return True

        return check_exact

    def check(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        for key, child in required:
            item = value.get(key, _MISSING)
            if item is _MISSING or not child(item):
                return False
        present = count
        for key, child in optional:
            item = value.get(key, _MISSING)
            if item is not _MISSING:
                if not child(item):
                    return False
                present += 1
        return not closed or len(value) == present

    return check


def _entry(c: _Compiler, node: _Args, index: int, spec: Any) -> tuple[Any, Node, bool]:
    sub = node.arg_sub(index)
    if not isinstance(spec, list | tuple) or len(spec) not in (2, 3):
        shape = "[key, type] or [key, {props}, type]"
        c.fail(sub, f"expected a map entry {shape}, got {show_spec(spec)}")

    key = spec[0]
    if not isinstance(key, str | int) or isinstance(key, bool):
        c.fail(join_index(sub, 0), f"expected a string key, got {show_spec(key)}")

    optional = False
    if len(spec) == 3:
        props = spec[1]
        if not isinstance(props, Mapping):
            c.fail(
                join_index(sub, 1), f"expected entry properties, got {show_spec(props)}"
            )
        entry = _Args("map entry", sub, props, (), 2)
        c.props(entry, {"optional": bool})
        optional = bool(_prop(entry, "optional", False))

    child = c.node(spec[-1], join_index(sub, len(spec) - 1))
    return key, child, optional


def _vector(c: _Compiler, node: _Args) -> Node:
    c.props(node, {"min": int, "max": int})
    c.arity(node, 1, 1)
    (item,) = c.children(node)
    item_check, item_explain = item.check, item.explain

    def items_check(value: Any) -> bool:
        if not isinstance(value, list | tuple):
            return False
        return all(map(item_check, value))

    low, high = _prop(node, "min"), _prop(node, "max")
    shape = _ranged(items_check, "a list", low, high, size=True)

    def explain(value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, list | tuple):
            errors.append((path, f"expected a list, got {show(value)}"))
            return

        size = len(value)
        if low is not None and size < low:
            errors.append((path, f"expected length at least {low}, got {size}"))
        if high is not None and size > high:
            errors.append((path, f"expected length at most {high}, got {size}"))
        for i, element in enumerate(value):
            item_explain(element, join_index(path, i), errors)

    return Node(shape.check, explain)


def _tuple(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 1)
    items = c.children(node)
    checks = tuple(item.check for item in items)
    size = len(items)

    def check(value: Any) -> bool:
        if not isinstance(value, list | tuple) or len(value) != size:
            return False
        for item_check, element in zip(checks, value, strict=True):
            if not item_check(element):
                return False
        return True

    def explain(value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, list | tuple):
            errors.append((path, f"expected a list of {size} items, got {show(value)}"))
            return
        if len(value) != size:
            errors.append((path, f"expected {size} items, got {len(value)}"))
        for i, (item, element) in enumerate(zip(items, value, strict=False)):
            item.explain(element, join_index(path, i), errors)

    return Node(check, explain)


def _map_of(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 2, 2)
    key_node, value_node = c.children(node)
    key_check, value_check = key_node.check, value_node.check

    def check(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        for key, item in value.items():
            if not key_check(key) or not value_check(item):
                return False
        return True

    def explain(value: Any, path: str, errors: Errors) -> None:
        if not isinstance(value, dict):
            errors.append((path, f"expected a map, got {show(value)}"))
            return
        for key, item in value.items():
            item_path = join_key(path, key)
            if not key_check(key):
                errors.append(
                    (item_path, f"invalid key: {_first_reason(key_node, key)}")
                )
            value_node.explain(item, item_path, errors)

    return Node(check, explain)


def _maybe(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 1, 1)
    (inner,) = c.children(node)
    inner_check, inner_explain = inner.check, inner.explain

    def check(value: Any) -> bool:
        return value is None or inner_check(value)

    def explain(value: Any, path: str, errors: Errors) -> None:
        if value is not None:
            inner_explain(value, path, errors)

    return Node(check, explain)


def _enum(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 1)
    for i, member in enumerate(node.args):
        if not isinstance(member, str | int | float) or member is None:
            c.fail(
                node.arg_sub(i),
                f"enum members must be scalars, got {show_spec(member)}",
            )

    # True == 1 in Python; keep booleans and numbers apart.
    flags = frozenset(m for m in node.args if isinstance(m, bool))
    others = frozenset(m for m in node.args if not isinstance(m, bool))
    listed = ", ".join(repr(m) for m in node.args)

    def check(value: Any) -> bool:
        if value is True or value is False:
            return value in flags
        try:
            return value in others
        except TypeError:  # unhashable, so not a member
            return False

    return _leaf(check, _expected(f"one of {listed}"))


def _or(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 1)
    options = c.children(node)
    checks = tuple(option.check for option in options)

    def check(value: Any) -> bool:
        # A plain loop: any() over a generator costs a frame on the hot path.
        for option_check in checks:  # noqa: SIM110
            if option_check(value):
                return True
        return False

    def explain(value: Any, path: str, errors: Errors) -> None:
        if check(value):
            return
        tried = "; ".join(
            f"option {i + 1}: {_first_reason(option, value)}"
            for i, option in enumerate(options)
        )
        errors.append((path, f"matches none of the options ({tried})"))

    return Node(check, explain)


def _and(c: _Compiler, node: _Args) -> Node:
    c.props(node, {})
    c.arity(node, 1)
    parts = c.children(node)
    checks = tuple(part.check for part in parts)

    def check(value: Any) -> bool:
        for part_check in checks:  # noqa: SIM110 (see _or)
            if not part_check(value):
                return False
        return True

    def explain(value: Any, path: str, errors: Errors) -> None:
        for part in parts:
            part.explain(value, path, errors)

    return Node(check, explain)


def _first_reason(node: Node, value: Any) -> str:
    errors: Errors = []
    node.explain(value, "", errors)
    if not errors:
        return "invalid"
    path, reason = errors[0]
    return f"{path}: {reason}" if path else reason


_Builder = Callable[[_Compiler, _Args], Node]

_BUILDERS: dict[str, _Builder] = {
    "string": _string,
    "keyword": _string,
    "int": _int,
    "double": _double,
    "float": _double,
    "number": _double,
    "boolean": _simple(_is_bool, _expected("true or false")),
    "bool": _simple(_is_bool, _expected("true or false")),
    "uuid": _simple(_is_uuid, _expected("a UUID")),
    "inst": _simple(_is_inst, _inst_reason),
    "nil": _simple(lambda value: value is None, _expected("null")),
    "some": _simple(lambda value: value is not None, _expected("a value")),
    "any": _any,
    "map": _map,
    "map-of": _map_of,
    "vector": _vector,
    "list": _vector,
    "sequential": _vector,
    "tuple": _tuple,
    "maybe": _maybe,
    "enum": _enum,
    "or": _or,
    "and": _and,
}
