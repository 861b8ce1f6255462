"""Errors shared by every schema notation; re-exported by `schemas`."""

from __future__ import annotations

from collections.abc import Iterable

from duct_messaging.errors import DuctMessagingError

ACCEPTED_FORMS = (
    "Use a vector schema such as [map, {closed: true}, [id, uuid]], "
    "a JSON Schema mapping (with $schema or type), "
    "or a pydantic model import path such as 'my_app.schemas:OrderCreated'"
)


def at(path: str, sub_path: str) -> str:
    """Return config `path` followed by `sub_path`, a path inside the spec."""
    if not sub_path:
        return path
    if sub_path.startswith("[") or not path:
        return f"{path}{sub_path}"
    return f"{path}.{sub_path}"


class SchemaError(DuctMessagingError):
    """Root of the errors about schemas: malformed specs and invalid messages."""


class SchemaConfigError(SchemaError, ValueError):
    """Raised when a schema spec cannot be compiled.

    `path` is the config path of the spec, `sub_path` the place inside the
    spec that is wrong ("" for the spec as a whole), `reason` what is wrong.
    """

    def __init__(
        self, path: str, reason: str, sub_path: str = "", *, show_forms: bool = False
    ) -> None:
        self.path = path
        self.sub_path = sub_path
        self.reason = reason
        hint = f" {ACCEPTED_FORMS}." if show_forms else ""
        super().__init__(f"Invalid schema at {at(path, sub_path)}: {reason}.{hint}")


class SchemaValidationError(SchemaError, ValueError):
    """Raised when a message does not match its schema.

    `errors` lists every failing field as (field path, reason); the field
    path reads like `items[2].id` and is "" for the message as a whole.
    `schema_path` is the config path of the schema that was checked.
    """

    def __init__(self, schema_path: str, errors: Iterable[tuple[str, str]]) -> None:
        self.schema_path = schema_path
        self.errors = list(errors)
        listed = "; ".join(f"{p or '(message)'}: {r}" for p, r in self.errors)
        count = len(self.errors)
        noun = "problem" if count == 1 else "problems"
        super().__init__(
            f"Message does not match schema {schema_path} ({count} {noun}): {listed}. "
            "Fix the message or the schema."
        )


def show(value: object) -> str:
    """Describe `value` briefly for an error message, without dumping payloads."""
    if value is None:
        return "null"
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= 40 else f"{value[:37]}..."
        return repr(text)
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list | tuple):
        return "a list"
    kind = type(value)
    return f"a {kind.__module__}.{kind.__qualname__}"


def show_spec(value: object) -> str:
    """Show part of a schema spec in a config error (specs hold no payloads)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
