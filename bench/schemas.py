"""Validations per second for the order schema in each notation.

Run: .venv/bin/python bench/schemas.py [--seconds 1.0]

The same messages go through the vector form, the equivalent JSON Schema
and the equivalent pydantic model, valid and invalid. Raw library calls
(fastjsonschema, jsonschema, pydantic) are listed for reference: they
show what our wrappers cost. An invalid message is one with a bad UUID, a
string amount and an extra key, so each validator must report three
problems.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import fastjsonschema
import jsonschema
import pydantic

from duct_messaging.messaging.schemas import SchemaValidationError, compile_schema

VECTOR_SPEC = ["map", {"closed": True}, ["id", "uuid"], ["amount", "double"]]
JSON_SPEC = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "amount": {"type": "number"},
    },
    "required": ["id", "amount"],
    "additionalProperties": False,
}


class OrderCreated(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    id: uuid.UUID
    amount: float


def _valid(n: int) -> list[dict[str, Any]]:
    return [{"id": str(uuid.uuid4()), "amount": i * 1.25} for i in range(n)]


def _invalid(n: int) -> list[dict[str, Any]]:
    return [{"id": f"order-{i}", "amount": "twelve", "note": "x"} for i in range(n)]


def _rate(fn: Callable[[Any], Any], messages: list[Any], seconds: float) -> float:
    """Return calls per second of `fn` over `messages`, run for ~`seconds`."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for message in messages:
            fn(message)
        done += len(messages)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


def _swallow(fn: Callable[[Any], Any], error: type[Exception]) -> Callable[[Any], Any]:
    def call(message: Any) -> None:
        with contextlib.suppress(error):
            fn(message)

    return call


def _errors(validate: Callable[[Any], Any], message: Any) -> list[tuple[str, str]]:
    try:
        validate(message)
    except SchemaValidationError as exc:
        return exc.errors
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()

    vector = compile_schema(VECTOR_SPEC, path="bench.vector")
    json_schema = compile_schema(JSON_SPEC, path="bench.json-schema")
    model = compile_schema(OrderCreated, path="bench.pydantic")
    raw_fast = fastjsonschema.compile(JSON_SPEC)
    raw_jsonschema = jsonschema.Draft7Validator(
        JSON_SPEC, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER
    )

    valid, invalid = _valid(1000), _invalid(1000)
    for validator in (vector, json_schema, model):
        validator.validate(valid[0])
        errors = _errors(validator.validate, invalid[0])
        if len(errors) != 3:
            raise SystemExit(f"{validator} should report 3 problems, got {errors}")

    rows: list[tuple[str, Callable[[Any], Any]]] = [
        ("vector (ours)", vector.validate),
        ("json schema (ours)", json_schema.validate),
        ("pydantic (ours)", model.validate),
        ("raw fastjsonschema", raw_fast),
        ("raw jsonschema is_valid", raw_jsonschema.is_valid),
        ("raw pydantic model_validate", OrderCreated.model_validate),
    ]
    invalid_errors: dict[str, type[Exception]] = {
        "raw fastjsonschema": fastjsonschema.JsonSchemaValueException,
        "raw pydantic model_validate": pydantic.ValidationError,
    }

    print(f"{'validator':<30} {'valid/s':>12} {'invalid/s':>12}")
    for name, fn in rows:
        error = invalid_errors.get(name, SchemaValidationError)
        valid_rate = _rate(fn, valid, args.seconds)
        invalid_rate = _rate(_swallow(fn, error), invalid, args.seconds)
        print(f"{name:<30} {valid_rate:>12,.0f} {invalid_rate:>12,.0f}")


if __name__ == "__main__":
    main()
