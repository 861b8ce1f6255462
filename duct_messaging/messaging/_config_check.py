"""Declarative checks for the config values of built-in components.

A *kind* says what one value must be: `text()`, `integer(minimum=1)`,
`ListOf(...)`, `Fields({...})` for a mapping with named fields, `RefTo(...)`
for a value that must be a `!ref`, and so on. `kind.problems(value)` returns
every `FieldProblem` at once, each with its path inside the value and a
message that says what was expected, what was found and, for a misspelt
field name, which known name is closest.

Refs are still `Ref`/`RefSet` objects when a config is checked; any kind
accepts them, since what they resolve to is not known yet (the system
checks the referenced key itself). Where a ref is expected, `RefTo` also
accepts any value that is not plain YAML data: a ready object a Python
config passes in its place.

`as_schema(kind)` turns a kind into a component schema: the system places
each problem at its own config path, and so at its own YAML line.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from duct_messaging.errors import DuctMessagingError
from duct_messaging.system import Ref, RefSet

ConfigPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One thing wrong with a config value: where it is and what is wrong."""

    path: ConfigPath
    message: str

    def __str__(self) -> str:
        place = format_path(self.path)
        return f"{place}: {self.message}" if place else self.message


class ConfigFieldError(DuctMessagingError, ValueError):
    """Raised by a component schema when its value has the wrong shape.

    `problems` holds every `FieldProblem`. `errors()` gives them as
    `{"loc": path, "msg": message}` items: the form the system's schema
    check reads to report each problem at its own config path.
    """

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        self.problems = list(problems)
        lines = "".join(f"\n  - {problem}" for problem in self.problems)
        super().__init__(f"Invalid config value ({len(self.problems)}):{lines}")

    def errors(self) -> list[dict[str, Any]]:
        """Return each problem as a `{"loc", "msg"}` item."""
        return [{"loc": p.path, "msg": p.message} for p in self.problems]


def format_path(path: Iterable[str | int]) -> str:
    """Return a readable path inside a value: `topics.orders.retry[0]`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def describe(value: Any) -> str:
    """Describe a found value briefly, the way YAML would show it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else f"{value[:57]}...")
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def closest(name: Any, known: Iterable[str]) -> str | None:
    """Return the known name `name` most likely misspells, if any is close."""
    if not isinstance(name, str):
        return None
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return found[0] if found else None


def is_ref(value: Any) -> bool:
    """Tell whether `value` is an unresolved `!ref` or `!refset`."""
    return isinstance(value, Ref | RefSet)


def is_plain(value: Any) -> bool:
    """Tell whether `value` is YAML data only: no ref, no Python object."""
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, Mapping):
        return all(is_plain(item) for item in value.values())
    if isinstance(value, list | tuple):
        return all(is_plain(item) for item in value)
    return False


class Kind:
    """What one config value must be.

    Subclasses implement `_check` for a value that is neither a ref nor
    null. `expected` reads as the end of "expected ...", e.g. "an integer
    >= 1". A nullable kind accepts null (the code treats it as "not set").
    """

    expected = "a value"
    #: How a list of such values reads ("strings"); default: `expected`
    #: without its article.
    plural: str | None = None
    nullable = False
    #: The container type a value of this kind has, if any (see `OneOf`).
    shape: type | tuple[type, ...] | None = None

    def problems(self, value: Any, path: ConfigPath = ()) -> list[FieldProblem]:
        """Return every problem of `value`; empty when it is fine."""
        return list(self.check(value, path))

    def check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        """Yield the problems of `value`, found at `path`."""
        if is_ref(value):
            return
        if value is None:
            if not self.nullable:
                yield self.wrong(value, path)
            return
        yield from self._check(value, path)

    def wrong(self, value: Any, path: ConfigPath, hint: str = "") -> FieldProblem:
        """Return the "expected X, got Y" problem for `value`."""
        suffix = f"; {hint}" if hint else ""
        return FieldProblem(
            path, f"expected {self.expected}, got {describe(value)}{suffix}"
        )

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        raise NotImplementedError


class _Anything(Kind):
    expected = "any value"
    nullable = True

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        return iter(())


#: Any value at all: free-form data the code passes on as it is.
ANY: Kind = _Anything()


class Scalar(Kind):
    """A single value that `accepts` approves of."""

    def __init__(
        self,
        expected: str,
        accepts: Callable[[Any], bool],
        *,
        nullable: bool = False,
        hint: str = "",
        plural: str | None = None,
    ) -> None:
        self.expected = expected
        self.accepts = accepts
        self.nullable = nullable
        self.hint = hint
        self.plural = plural

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if not self.accepts(value):
            yield self.wrong(value, path, self.hint)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def text(*, nonempty: bool = True, nullable: bool = False, hint: str = "") -> Scalar:
    """Return the kind of a string (non-empty unless told otherwise)."""
    if nonempty:
        return Scalar(
            "a non-empty string",
            lambda v: isinstance(v, str) and bool(v),
            nullable=nullable,
            hint=hint,
            plural="strings",
        )
    return Scalar(
        "a string",
        lambda v: isinstance(v, str),
        nullable=nullable,
        hint=hint,
        plural="strings",
    )


def integer(*, minimum: int | None = None, nullable: bool = False) -> Scalar:
    """Return the kind of an integer, at least `minimum` when given."""
    expected = "an integer" if minimum is None else f"an integer >= {minimum}"
    return Scalar(
        expected,
        lambda v: (
            isinstance(v, int)
            and not isinstance(v, bool)
            and (minimum is None or v >= minimum)
        ),
        nullable=nullable,
    )


def number(
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    nullable: bool = False,
) -> Scalar:
    """Return the kind of an integer or float within the given bounds."""
    if minimum is not None and maximum is not None:
        expected = f"a number from {minimum} to {maximum}"
    elif minimum is not None:
        expected = f"a number >= {minimum}"
    else:
        expected = "a number"
    return Scalar(
        expected,
        lambda v: (
            _is_number(v)
            and (minimum is None or v >= minimum)
            and (maximum is None or v <= maximum)
        ),
        nullable=nullable,
    )


def boolean(*, nullable: bool = False) -> Scalar:
    """Return the kind of `true` / `false`."""
    return Scalar("true or false", lambda v: isinstance(v, bool), nullable=nullable)


def scalar(what: str = "a string, number or boolean") -> Scalar:
    """Return the kind of any single string, number or boolean."""
    return Scalar(what, lambda v: isinstance(v, str | int | float | bool))


class Choice(Kind):
    """One of a fixed set of values."""

    def __init__(self, *choices: Any, nullable: bool = False) -> None:
        self.choices = choices
        self.nullable = nullable
        self.expected = "one of " + ", ".join(str(c) for c in choices)

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if value in self.choices:
            return
        names = [c for c in self.choices if isinstance(c, str)]
        near = closest(value, names)
        yield self.wrong(value, path, f"did you mean {near!r}?" if near else "")


class Template(Kind):
    """A `str.format` template that may use only the given placeholders."""

    def __init__(self, *placeholders: str) -> None:
        self.placeholders = placeholders
        self.expected = f"a name or a template using {self._listed()}"

    def _listed(self) -> str:
        names = ["{" + name + "}" for name in self.placeholders]
        return ", ".join(names[:-1]) + f" or {names[-1]}" if names else "nothing"

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if not isinstance(value, str) or not value:
            yield self.wrong(value, path)
            return
        try:
            value.format(**dict.fromkeys(self.placeholders, "x"))
        except KeyError as exc:
            name = str(exc.args[0])
            near = closest(name, self.placeholders)
            tip = f"did you mean {{{near}}}?" if near else f"use {self._listed()}"
            reason = f"unknown placeholder {{{name}}}; {tip}"
        except (IndexError, ValueError, AttributeError) as exc:
            reason = f"{exc}; use {self._listed()}"
        else:
            return
        yield FieldProblem(path, f"{value!r} is not a valid template: {reason}")


class RefTo(Kind):
    """A `!ref` to another key (`example` names a typical one).

    A plain string is taken for a key written without its tag, and the fix
    says to add `!ref`. Objects from a Python config pass as they are.
    """

    nullable = True

    def __init__(self, example: str, what: str | None = None) -> None:
        self.example = example
        self.what = what or example
        self.expected = f"a !ref to {self.what}"

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if not is_plain(value):
            return
        if isinstance(value, str) and value:
            key = value if "/" in value else self.example
            yield FieldProblem(
                path,
                f"expected {self.expected}, got the plain string {value!r}; "
                f"write `!ref {key}`",
            )
            return
        yield self.wrong(value, path, f"write e.g. `!ref {self.example}`")


@dataclass(frozen=True, slots=True)
class Field:
    """A named field of a `Fields` mapping.

    `required` fields must be present and not null; `hint` says what to
    write when one is missing.
    """

    kind: Kind
    required: bool = False
    hint: str = ""


class Fields(Kind):
    """A mapping with named fields; any other field is a problem.

    With `extra`, fields not named are allowed and must be of that kind
    (pass-through settings or free metadata); one whose name is within
    `typo_cutoff` (a difflib ratio) of a known field is still refused as a
    likely misspelling. `noun` names a field in messages ("field", "stream
    field", "target option"); `hint` ends the message about an unknown one.
    """

    shape = Mapping

    def __init__(
        self,
        fields: Mapping[str, Field | Kind],
        *,
        extra: Kind | None = None,
        typo_cutoff: float = 1.0,
        noun: str = "field",
        hint: str = "",
        nullable: bool = True,
        expected: str | None = None,
    ) -> None:
        self.fields = {
            name: spec if isinstance(spec, Field) else Field(spec)
            for name, spec in fields.items()
        }
        self.extra = extra
        self.typo_cutoff = typo_cutoff
        self.noun = noun
        self.hint = hint
        self.nullable = nullable
        required = [name for name, spec in self.fields.items() if spec.required]
        self.expected = expected or (
            f"a mapping with {', '.join(required)}" if required else "a mapping"
        )

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if not isinstance(value, Mapping):
            yield self.wrong(value, path)
            return
        unknown = {
            str(name): list(self._unknown(name, value[name], (*path, str(name))))
            for name in value
            if name not in self.fields
        }
        for name, spec in self.fields.items():
            if value.get(name) is None and spec.required:
                # A misspelt name is reported once, as the unknown field
                # that says "did you mean" this one.
                near = closest(name, unknown)
                if near is None or not unknown[near]:
                    yield self._missing(name, spec, near, path)
            elif name in value:
                yield from spec.kind.check(value[name], (*path, name))
        for problems in unknown.values():
            yield from problems

    def _missing(
        self, name: str, spec: Field, near: str | None, path: ConfigPath
    ) -> FieldProblem:
        hint = f" ({spec.hint})" if spec.hint else ""
        if near is not None:
            hint += f"; is {near!r} a misspelling of it?"
        return FieldProblem((*path, name), f"missing{hint}")

    def _unknown(
        self, name: Any, item: Any, where: ConfigPath
    ) -> Iterator[FieldProblem]:
        near = closest(name, self.fields)
        if self.extra is not None:
            typo = near is not None and _ratio(name, near) >= self.typo_cutoff
            if typo:
                message = f"unknown {self.noun}; did you mean {near!r}?"
                yield FieldProblem(where, self._with_hint(message))
                return
            for problem in self.extra.check(item, where):
                tip = f"; or did you mean {near!r}?" if near else ""
                yield FieldProblem(problem.path, problem.message + tip)
            return
        if near:
            message = f"unknown {self.noun}; did you mean {near!r}?"
        elif self.fields:
            message = f"unknown {self.noun}; expected one of " + ", ".join(
                sorted(self.fields)
            )
        else:
            message = f"unknown {self.noun}"
        yield FieldProblem(where, self._with_hint(message))

    def _with_hint(self, message: str) -> str:
        if not self.hint:
            return message
        return f"{message}{' ' if message.endswith('?') else '. '}{self.hint}"


def _ratio(name: Any, known: str) -> float:
    return difflib.SequenceMatcher(None, str(name), known).ratio()


class MapOf(Kind):
    """A mapping of free names, each to a value of one kind."""

    shape = Mapping

    def __init__(
        self,
        item: Kind,
        *,
        expected: str = "a mapping",
        nonempty: bool = False,
        nullable: bool = True,
    ) -> None:
        self.item = item
        self.expected = expected
        self.nonempty = nonempty
        self.nullable = nullable

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if not isinstance(value, Mapping) or (self.nonempty and not value):
            yield self.wrong(value, path)
            return
        for name, item in value.items():
            yield from self.item.check(item, (*path, str(name)))


class ListOf(Kind):
    """A list whose items are each of one kind."""

    shape = (list, tuple)

    def __init__(
        self,
        item: Kind,
        *,
        expected: str | None = None,
        nonempty: bool = False,
        nullable: bool = True,
    ) -> None:
        self.item = item
        self.nonempty = nonempty
        self.nullable = nullable
        items = item.plural or _without_article(item.expected)
        self.expected = expected or (
            f"a {'non-empty ' if nonempty else ''}list of {items}"
        )

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        if isinstance(value, str):
            yield self.wrong(value, path, f"write [{value}] for a list of one")
            return
        if not isinstance(value, list | tuple) or (self.nonempty and not value):
            yield self.wrong(value, path)
            return
        for index, item in enumerate(value):
            yield from self.item.check(item, (*path, index))


def _without_article(expected: str) -> str:
    for article in ("a ", "an "):
        if expected.startswith(article):
            return expected[len(article) :]
    return expected


class OneOf(Kind):
    """One of several kinds, told apart by their container shape.

    A value whose shape matches one of `kinds` is checked as that kind, so
    its problems point inside it. Any other value is checked as
    `otherwise` when given, else reported as not `expected`.
    """

    def __init__(
        self,
        *kinds: Kind,
        expected: str,
        otherwise: Kind | None = None,
        nullable: bool = False,
    ) -> None:
        self.kinds = kinds
        self.expected = expected
        self.otherwise = otherwise
        self.nullable = nullable

    def _check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        for kind in self.kinds:
            if kind.shape is not None and isinstance(value, kind.shape):
                yield from kind.check(value, path)
                return
        for kind in self.kinds:
            if kind.shape is None and not kind.problems(value, path):
                return
        if self.otherwise is not None:
            yield from self.otherwise.check(value, path)
        else:
            yield self.wrong(value, path)


class DataOnly(Kind):
    """A kind applied to plain YAML data only.

    A value holding Python objects (a ready-made registry from a Python
    config, say) passes as it is.
    """

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self.expected = kind.expected
        self.nullable = kind.nullable
        self.shape = kind.shape

    def check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        """Yield the kind's problems when `value` is plain data."""
        if is_plain(value):
            yield from self.kind.check(value, path)


class Checked(Kind):
    """A kind plus a further check, run once the value has the right shape.

    `then(value, path)` yields more problems (e.g. an import that fails,
    or one field that needs another).
    """

    def __init__(
        self,
        kind: Kind,
        then: Callable[[Any, ConfigPath], Iterable[FieldProblem]],
    ) -> None:
        self.kind = kind
        self.then = then
        self.expected = kind.expected
        self.nullable = kind.nullable
        self.shape = kind.shape

    def check(self, value: Any, path: ConfigPath) -> Iterator[FieldProblem]:
        """Yield the kind's problems, then the further ones if it had none here."""
        found = list(self.kind.check(value, path))
        yield from found
        if value is None or is_ref(value) or any(p.path == path for p in found):
            return
        yield from self.then(value, path)


def as_schema(kind: Kind) -> Callable[[Any], None]:
    """Return a component schema that checks a raw value against `kind`.

    The schema raises `ConfigFieldError` with every problem; the system
    reports each at its own path inside the key (and its YAML line).
    """

    def schema(value: Any) -> None:
        problems = kind.problems(value)
        if problems:
            raise ConfigFieldError(problems)

    schema.__doc__ = f"Check a value: expected {kind.expected}."
    return schema
