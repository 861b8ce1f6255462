"""JSON Schema validation: fastjsonschema for speed, jsonschema for the errors.

`jsonschema` (extra `jsonschema`) is required: it checks the schema itself
and, when a message fails, lists every failing field. `fastjsonschema`, when
installed, answers valid-or-not for schemas it reads the same way as
`jsonschema`; a schema with keywords newer than draft 7 is left to
`jsonschema` alone. Formats (`uuid`, `date-time`, ...) are asserted, not
just annotations.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging._paths import join_index, join_key
from duct_messaging.messaging._schema_errors import SchemaConfigError

Errors = list[tuple[str, str]]

JSON_SCHEMA_KEYS = frozenset(
    {"$schema", "type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const"}
)

# Keywords whose meaning fastjsonschema (draft 4 to 7) does not share with
# draft 2020-12; schemas using them skip the fast path.
_NEWER_KEYWORDS = frozenset(
    {
        "prefixItems",
        "unevaluatedItems",
        "unevaluatedProperties",
        "dependentRequired",
        "dependentSchemas",
        "minContains",
        "maxContains",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "$recursiveRef",
        "$recursiveAnchor",
        "$vocabulary",
    }
)


def looks_like_json_schema(spec: Mapping[Any, Any]) -> bool:
    """Return True if the mapping `spec` reads as a JSON Schema."""
    return any(key in spec for key in JSON_SCHEMA_KEYS)


class JsonSchemaCheck:
    """A compiled JSON Schema: `is_valid` fast, `explain` complete."""

    def __init__(self, spec: Mapping[str, Any], path: str) -> None:
        try:
            import jsonschema
            from jsonschema import validators
        except ImportError as exc:
            raise MissingExtraError(
                "JSON Schema validation", "jsonschema", "jsonschema"
            ) from exc

        cls = validators.validator_for(spec, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(spec)
        except jsonschema.SchemaError as exc:
            sub = _path(exc.absolute_path)
            raise SchemaConfigError(
                path, f"not a valid JSON Schema: {exc.message}", sub
            ) from exc

        self._validator = cls(spec, format_checker=_format_checker())
        self._fast = _fast_validator(spec)
        self.is_valid: Callable[[Any], bool] = (
            self._fast if self._fast is not None else self._validator.is_valid
        )

    def explain(self, message: Any) -> Errors:
        """Return every (field path, reason) the message fails on."""
        errors: Errors = []
        for error in self._validator.iter_errors(message):
            errors.extend(_describe(error))
        if errors or self._fast is None:
            return errors

        # The fast validator refused what jsonschema accepts (they assert a
        # few formats differently); its verdict stands, so report its reason.
        return [self._fast.reason(message)]


def _describe(error: Any) -> Iterable[tuple[str, str]]:
    """Yield (field path, reason) for one jsonschema error.

    `required` and closed `additionalProperties` errors sit on the parent
    object; they are moved onto the keys they are about.
    """
    path = _path(error.absolute_path)
    instance = error.instance
    if (
        error.validator == "additionalProperties"
        and error.validator_value is False
        and isinstance(instance, dict)
        and isinstance(error.schema, dict)
    ):
        extras = _extra_keys(instance, error.schema)
        for key in extras:
            yield (
                join_key(path, key),
                "unexpected key; additional properties are not allowed",
            )
        if extras:
            return
    if error.validator == "required" and isinstance(instance, dict):
        missing = [name for name in error.validator_value if name not in instance]
        # One error per missing key; each mentions its own name first.
        for name in missing:
            if error.message.startswith(repr(name)):
                yield join_key(path, name), "missing required key"
                return
    yield path, error.message


def _extra_keys(instance: dict[Any, Any], schema: dict[str, Any]) -> list[Any]:
    declared = schema.get("properties") or {}
    patterns = [re.compile(p) for p in schema.get("patternProperties") or {}]
    return [
        key
        for key in instance
        if key not in declared and not any(p.search(str(key)) for p in patterns)
    ]


def _path(parts: Iterable[Any]) -> str:
    path = ""
    for part in parts:
        path = join_index(path, part) if isinstance(part, int) else join_key(path, part)
    return path


def _format_checker() -> Any:
    """Return a checker for every format jsonschema knows, date-time included.

    Every draft's formats are asserted, as fastjsonschema does (a draft 7
    schema may still say `format: uuid`). `date-time` needs an extra package
    in jsonschema; without it we check it ourselves.
    """
    from jsonschema import FormatChecker

    checker = FormatChecker()
    if "date-time" not in checker.checkers:
        checker.checks("date-time", raises=ValueError)(_is_datetime)
    return checker


def _is_datetime(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return dt.datetime.fromisoformat(value).utcoffset() is not None


def _needs_jsonschema(spec: Any) -> bool:
    """Return True if fastjsonschema would read `spec` differently.

    That is: keywords newer than draft 7, array-form `items`, or a `$ref`
    outside the document (fastjsonschema would fetch it over the network).
    """
    if isinstance(spec, dict):
        if _NEWER_KEYWORDS.intersection(spec):
            return True
        if isinstance(spec.get("items"), list):
            return True
        ref = spec.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(_needs_jsonschema(value) for value in spec.values())
    if isinstance(spec, list):
        return any(_needs_jsonschema(value) for value in spec)
    return False


class _Fast:
    """Adapt a fastjsonschema validator (which raises) to a predicate."""

    def __init__(self, raw: Callable[[Any], Any], error: type[Exception]) -> None:
        self._raw = raw
        self._error = error

    def __call__(self, message: Any) -> bool:
        try:
            self._raw(message)
        except self._error:
            return False
        return True

    def reason(self, message: Any) -> tuple[str, str]:
        """Return the first failing field as fastjsonschema reports it."""
        try:
            self._raw(message)
        except self._error as exc:
            parts = list(getattr(exc, "path", None) or [])[1:]  # drop "data"
            return _path(parts), str(getattr(exc, "message", exc))
        return "", "rejected by the schema"


def _fast_validator(spec: Mapping[str, Any]) -> _Fast | None:
    if _needs_jsonschema(spec):
        return None
    try:
        import fastjsonschema
    except ImportError:
        return None

    try:
        raw = fastjsonschema.compile(dict(spec))
    except Exception:
        # jsonschema accepted the schema, so it is valid; fastjsonschema just
        # cannot compile it. jsonschema alone will do.
        return None
    return _Fast(raw, fastjsonschema.JsonSchemaValueException)
