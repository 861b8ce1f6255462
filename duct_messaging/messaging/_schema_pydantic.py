"""Schemas given as pydantic models (extra `pydantic`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging._imports import import_object
from duct_messaging.messaging._paths import join_index, join_key
from duct_messaging.messaging._schema_errors import SchemaConfigError

Errors = list[tuple[str, str]]

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_NAME}(?:\.{_NAME})*"
# `pkg.mod:Class`, `pkg.mod/Class` or `pkg.mod.Class` (at least one dot).
_IMPORT_PATH = re.compile(rf"{_DOTTED}[:/]{_DOTTED}|{_NAME}(?:\.{_NAME})+")


def is_import_path(text: str) -> bool:
    """Return True if `text` has the shape of a Python import path."""
    return _IMPORT_PATH.fullmatch(text) is not None


def _pydantic() -> Any:
    try:
        import pydantic
    except ImportError as exc:
        raise MissingExtraError("Pydantic schemas", "pydantic", "pydantic") from exc
    return pydantic


def load_model(spec: str, path: str) -> Any:
    """Import the model named by `spec`, or raise `SchemaConfigError`."""
    _pydantic()
    try:
        return import_object(spec)
    except Exception as exc:
        # Importing runs arbitrary module code; any failure means the same
        # thing here: the path does not lead to a model.
        reason = f"cannot import {spec!r}: {type(exc).__name__}: {exc}"
        raise SchemaConfigError(path, reason) from exc


class PydanticCheck:
    """Validate messages with a pydantic model (or a type pydantic adapts)."""

    def __init__(self, target: Any, path: str) -> None:
        pydantic = _pydantic()
        if not isinstance(target, type):
            reason = f"expected a pydantic model class, got {target!r}"
            raise SchemaConfigError(path, reason)

        model: Any = target
        if issubclass(model, pydantic.BaseModel):
            self._validate: Callable[[Any], Any] = model.model_validate
        else:
            try:
                adapter = pydantic.TypeAdapter(target)
            except pydantic.PydanticUserError as exc:
                reason = (
                    f"{target.__qualname__} is neither a pydantic model nor a type "
                    f"pydantic can validate ({exc.message})"
                )
                raise SchemaConfigError(path, reason) from exc
            self._validate = adapter.validate_python
        self._error: type[Exception] = pydantic.ValidationError
        self.model = target

    def is_valid(self, message: Any) -> bool:
        """Return True if the model accepts `message`."""
        try:
            self._validate(message)
        except self._error:
            return False
        return True

    def explain(self, message: Any) -> Errors:
        """Return every (field path, reason) the model reports."""
        try:
            self._validate(message)
        except self._error as exc:
            details: Iterable[Any] = exc.errors(include_url=False)  # type: ignore[attr-defined]
            return [(_loc_path(d["loc"]), str(d["msg"])) for d in details]
        return []


def _loc_path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        path = join_index(path, part) if isinstance(part, int) else join_key(path, part)
    return path
