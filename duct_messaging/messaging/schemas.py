"""Message schemas, compiled once at init and checked per message.

A schema spec comes in one of three notations:

1. The vector form, e.g. `[map, {closed: true}, [id, uuid], [amount, double]]`
   (see `_schema_vector` for every type). It compiles to plain closures.
2. JSON Schema: a mapping with `$schema` or `type` (or `$ref`, `anyOf`,
   `oneOf`, `allOf`, `enum`, `const`). Needs the `jsonschema` extra.
3. A pydantic model by import path, `my_app.schemas:OrderCreated` or
   `my_app.schemas.OrderCreated` (or the class itself). Needs `pydantic`.

`compile_schema` returns a `Validator`. Its `validate` returns None for a
valid message and raises `SchemaValidationError` listing every failing field
otherwise. Malformed specs raise `SchemaConfigError` at compile time, naming
the config path and the place inside the spec.

Validation looks at plain data, as it travels: mappings, lists, strings and
numbers. A `uuid` or `inst` field accepts its string form or the Python
object. A dataclass message is not a map to the vector or JSON Schema forms.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from duct_messaging.messaging._schema_errors import (
    SchemaConfigError,
    SchemaError,
    SchemaValidationError,
)
from duct_messaging.messaging._schema_json import (
    JsonSchemaCheck,
    looks_like_json_schema,
)
from duct_messaging.messaging._schema_pydantic import (
    PydanticCheck,
    is_import_path,
    load_model,
)
from duct_messaging.messaging._schema_vector import compile_vector, is_type_name

__all__ = [
    "SchemaConfigError",
    "SchemaError",
    "SchemaValidationError",
    "Validator",
    "compile_schema",
]


@runtime_checkable
class Validator(Protocol):
    """A compiled schema."""

    def validate(self, message: Any) -> None:
        """Return if `message` matches; raise `SchemaValidationError` if not."""
        ...


class _CompiledValidator:
    """Shared shape of the built-in validators: a fast verdict, then details."""

    notation = ""

    def __init__(self, path: str) -> None:
        self.path = path

    def is_valid(self, message: Any) -> bool:
        """Return True if `message` matches the schema."""
        raise NotImplementedError

    def errors(self, message: Any) -> list[tuple[str, str]]:
        """Return every (field path, reason) that fails; empty if valid."""
        raise NotImplementedError

    def validate(self, message: Any) -> None:
        """Return if `message` matches; raise `SchemaValidationError` if not."""
        if self.is_valid(message):
            return
        errors = self.errors(message) or [("", "does not match the schema")]
        raise SchemaValidationError(self.path, errors)

    def __repr__(self) -> str:
        return f"<{self.notation} schema {self.path}>"


class _VectorValidator(_CompiledValidator):
    notation = "vector"

    def __init__(self, spec: Any, path: str) -> None:
        super().__init__(path)
        node = compile_vector(spec, path)
        self._check = node.check
        self._explain = node.explain

    def is_valid(self, message: Any) -> bool:
        """Return True if `message` matches the schema."""
        return self._check(message)

    def errors(self, message: Any) -> list[tuple[str, str]]:
        """Return every (field path, reason) that fails; empty if valid."""
        found: list[tuple[str, str]] = []
        self._explain(message, "", found)
        return found

    def validate(self, message: Any) -> None:
        """Return if `message` matches; raise `SchemaValidationError` if not."""
        if self._check(message):
            return
        raise SchemaValidationError(self.path, self.errors(message))


class _JsonSchemaValidator(_CompiledValidator):
    notation = "json-schema"

    def __init__(self, spec: Mapping[str, Any], path: str) -> None:
        super().__init__(path)
        self._schema = JsonSchemaCheck(spec, path)
        self._is_valid = self._schema.is_valid

    def is_valid(self, message: Any) -> bool:
        """Return True if `message` matches the schema."""
        return self._is_valid(message)

    def errors(self, message: Any) -> list[tuple[str, str]]:
        """Return every (field path, reason) that fails; empty if valid."""
        return [] if self._is_valid(message) else self._schema.explain(message)

    def validate(self, message: Any) -> None:
        """Return if `message` matches; raise `SchemaValidationError` if not."""
        if self._is_valid(message):
            return
        errors = self._schema.explain(message) or [("", "does not match the schema")]
        raise SchemaValidationError(self.path, errors)


class _PydanticValidator(_CompiledValidator):
    notation = "pydantic"

    def __init__(self, model: Any, path: str) -> None:
        super().__init__(path)
        self._model = PydanticCheck(model, path)
        self.model = model

    def is_valid(self, message: Any) -> bool:
        """Return True if the model accepts `message`."""
        return self._model.is_valid(message)

    def errors(self, message: Any) -> list[tuple[str, str]]:
        """Return every (field path, reason) that fails; empty if valid."""
        return self._model.explain(message)

    def validate(self, message: Any) -> None:
        """Return if the model accepts `message`; else raise `SchemaValidationError`."""
        errors = self._model.explain(message)
        if errors:
            raise SchemaValidationError(self.path, errors)


def compile_schema(spec: Any, *, path: str) -> Validator:
    """Compile a schema spec once into a `Validator`.

    `path` is where the spec sits in the config (for example
    `duct.messaging/routing.topics.order-created.schema.canonical`); every
    error names it. An object that already has a `validate` method is
    returned unchanged, so callers may pass ready validators.

    Raises:
        SchemaConfigError: the spec is malformed or in no known notation.
        MissingExtraError: the notation needs an extra that is not installed.
    """
    if isinstance(spec, str):
        if is_type_name(spec):
            return _VectorValidator(spec, path)
        if is_import_path(spec):
            return _PydanticValidator(load_model(spec, path), path)
        reason = f"{spec!r} is neither a type name nor an import path"
        raise SchemaConfigError(path, reason, show_forms=True)

    if isinstance(spec, list | tuple):
        return _VectorValidator(spec, path)

    if isinstance(spec, Mapping):
        if looks_like_json_schema(spec):
            return _JsonSchemaValidator(spec, path)
        keys = ", ".join(repr(k) for k in list(spec)[:5]) or "no keys"
        reason = f"a mapping without $schema or type ({keys})"
        raise SchemaConfigError(path, reason, show_forms=True)

    if isinstance(spec, type):
        return _PydanticValidator(spec, path)

    if callable(getattr(spec, "validate", None)):
        validator: Validator = spec
        return validator

    reason = f"unsupported schema spec of type {type(spec).__name__}"
    raise SchemaConfigError(path, reason, show_forms=True)
