"""Tests for schema compilation and validation in all three notations."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import types
import uuid
from typing import Any

import pydantic
import pytest
import typing_extensions
from hypothesis import given
from hypothesis import strategies as st

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging.schemas import (
    SchemaConfigError,
    SchemaError,
    SchemaValidationError,
    Validator,
    compile_schema,
)

PATH = "duct.messaging/routing.topics.order-created.schema.canonical"
ORDER = ["map", {"closed": True}, ["id", "uuid"], ["amount", "double"]]
ORDER_ID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"

ORDER_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "amount": {"type": "number"},
    },
    "required": ["id", "amount"],
    "additionalProperties": False,
}


def errors_of(validator: Validator, message: Any) -> list[tuple[str, str]]:
    """Return the errors `validate` reports for `message` (it must raise)."""
    with pytest.raises(SchemaValidationError) as info:
        validator.validate(message)
    return info.value.errors


def fields_of(validator: Validator, message: Any) -> list[str]:
    """Return the failing field paths for `message`."""
    return [path for path, _ in errors_of(validator, message)]


class TestVectorMaps:
    def test_seed_order_schema_accepts_valid_orders(self) -> None:
        """The seed's order schema accepts UUID strings or objects and numbers."""
        validator = compile_schema(ORDER, path=PATH)

        validator.validate({"id": ORDER_ID, "amount": 12.5})
        validator.validate({"id": uuid.UUID(ORDER_ID), "amount": 12})
        validator.validate({"id": ORDER_ID.upper(), "amount": -0.0})

    def test_every_failing_field_is_listed(self) -> None:
        """One error per failing field, with its path, all in the message."""
        validator = compile_schema(ORDER, path=PATH)

        with pytest.raises(SchemaValidationError) as info:
            validator.validate({"id": "order-1", "amount": "12", "note": "x"})

        assert info.value.errors == [
            ("id", "expected a UUID, got 'order-1'"),
            ("amount", "expected a number, got '12'"),
            ("note", "unexpected key; the map is closed"),
        ]
        assert info.value.schema_path == PATH
        message = str(info.value)
        assert PATH in message
        assert "3 problems" in message
        assert all(field in message for field in ("id:", "amount:", "note:"))

    def test_error_family(self) -> None:
        """Validation errors are schema errors, ValueErrors and ours."""
        validator = compile_schema(ORDER, path=PATH)

        with pytest.raises(SchemaValidationError) as info:
            validator.validate([])

        assert info.value.errors == [("", "expected a map, got a list")]
        assert isinstance(info.value, SchemaError)
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, DuctMessagingError)

    def test_missing_keys_are_named(self) -> None:
        """Each missing required key is listed under its own path."""
        validator = compile_schema(ORDER, path=PATH)

        assert errors_of(validator, {}) == [
            ("id", "missing required key"),
            ("amount", "missing required key"),
        ]

    def test_bools_are_not_numbers(self) -> None:
        """True is neither an int nor a double."""
        validator = compile_schema(["map", ["n", "int"], ["d", "double"]], path=PATH)

        assert fields_of(validator, {"n": True, "d": False}) == ["n", "d"]
        validator.validate({"n": 1, "d": 1})

    def test_open_map_allows_extra_keys(self) -> None:
        """A map is open unless it says closed."""
        validator = compile_schema(["map", ["id", "uuid"]], path=PATH)

        validator.validate({"id": ORDER_ID, "anything": [1, 2]})

    def test_closed_map_rejects_extra_keys(self) -> None:
        """A closed map refuses keys it does not declare, with or without optionals."""
        required_only = compile_schema(ORDER, path=PATH)
        with_optional = compile_schema(
            [
                "map",
                {"closed": True},
                ["id", "uuid"],
                ["note", {"optional": True}, "string"],
            ],
            path=PATH,
        )

        assert fields_of(required_only, {"id": ORDER_ID, "amount": 1, "x": 1}) == ["x"]
        assert fields_of(with_optional, {"id": ORDER_ID, "x": 1}) == ["x"]
        assert fields_of(with_optional, {"id": ORDER_ID, "note": "n", "x": 1}) == ["x"]
        with_optional.validate({"id": ORDER_ID, "note": "n"})

    def test_closed_map_with_missing_key_and_extra_key(self) -> None:
        """Same size as declared but different keys is still two problems."""
        validator = compile_schema(ORDER, path=PATH)

        assert fields_of(validator, {"id": ORDER_ID, "amnt": 1}) == ["amount", "amnt"]

    def test_optional_keys(self) -> None:
        """An optional key may be absent; when present it is checked."""
        validator = compile_schema(
            ["map", ["id", "uuid"], ["note", {"optional": True}, "string"]], path=PATH
        )

        validator.validate({"id": ORDER_ID})
        validator.validate({"id": ORDER_ID, "note": "gift"})
        assert errors_of(validator, {"id": ORDER_ID, "note": 3}) == [
            ("note", "expected a string, got 3")
        ]

    def test_nested_maps_and_lists_report_full_paths(self) -> None:
        """Failures deep inside nested maps and lists carry their full path."""
        validator = compile_schema(
            [
                "map",
                ["customer", ["map", ["email", "string"]]],
                [
                    "items",
                    [
                        "vector",
                        ["map", {"closed": True}, ["id", "uuid"], ["qty", "int"]],
                    ],
                ],
            ],
            path=PATH,
        )
        message = {
            "customer": {"email": None},
            "items": [
                {"id": ORDER_ID, "qty": 1},
                {"id": ORDER_ID, "qty": 2},
                {"id": "nope", "qty": 1.5, "extra": True},
            ],
        }

        assert fields_of(validator, message) == [
            "customer.email",
            "items[2].id",
            "items[2].qty",
            "items[2].extra",
        ]

    def test_odd_keys_are_quoted(self) -> None:
        """Keys that are not plain names are quoted in paths."""
        validator = compile_schema(["map", ["content type", "string"]], path=PATH)

        assert fields_of(validator, {"content type": 1}) == ['["content type"]']

    def test_edn_style_names(self) -> None:
        """Type and property names may keep their EDN colon."""
        validator = compile_schema(
            [":map", {":closed": True}, ["id", ":uuid"]], path=PATH
        )

        validator.validate({"id": ORDER_ID})
        assert fields_of(validator, {"id": ORDER_ID, "x": 1}) == ["x"]

    def test_documentation_props_are_allowed(self) -> None:
        """title/description props document a node without changing it."""
        validator = compile_schema(
            ["map", {"title": "Order"}, ["id", {"description": "order id"}, "uuid"]],
            path=PATH,
        )

        validator.validate({"id": ORDER_ID})


class TestVectorTypes:
    @pytest.mark.parametrize(
        "value",
        [
            ORDER_ID,
            ORDER_ID.upper(),
            uuid.UUID(ORDER_ID),
            "00000000-0000-0000-0000-000000000000",
        ],
    )
    def test_uuid_accepts(self, value: Any) -> None:
        """A canonical UUID string or a UUID object is a uuid."""
        compile_schema("uuid", path=PATH).validate(value)

    @pytest.mark.parametrize(
        "value",
        [
            "1b4e28ba2fa111d2883f0016d3cca427",
            "{1b4e28ba-2fa1-11d2-883f-0016d3cca427}",
            "urn:uuid:1b4e28ba-2fa1-11d2-883f-0016d3cca427",
            "1b4e28ba-2fa1-11d2-883f-0016d3cca42g",
            ORDER_ID + "\n",
            12,
            None,
        ],
    )
    def test_uuid_rejects(self, value: Any) -> None:
        """Only the canonical hyphenated form counts as a UUID string."""
        assert fields_of(compile_schema("uuid", path=PATH), value) == [""]

    @pytest.mark.parametrize(
        "value",
        [
            "2025-01-01T10:00:00Z",
            "2025-01-01T10:00:00.123456+02:00",
            "2025-01-01 10:00:00-05:30",
            dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        ],
    )
    def test_inst_accepts(self, value: Any) -> None:
        """ISO-8601 datetimes with an offset, and aware datetimes, are insts."""
        compile_schema("inst", path=PATH).validate(value)

    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            ("2025-01-01T10:00:00", "has no timezone offset"),
            ("2025-01-01", "has no timezone offset"),
            (dt.datetime(2025, 1, 1), "has no timezone offset"),
            ("yesterday", "expected an ISO-8601 datetime"),
            (1735725600, "expected an ISO-8601 datetime"),
        ],
    )
    def test_inst_rejects(self, value: Any, reason: str) -> None:
        """Naive datetimes and non-datetimes are not insts, with distinct reasons."""
        ((path, message),) = errors_of(compile_schema("inst", path=PATH), value)

        assert path == ""
        assert reason in message

    @pytest.mark.parametrize(
        ("spec", "good", "bad"),
        [
            ("string", "x", 1),
            ("keyword", "order-created", None),
            ("int", 3, 3.0),
            ("double", 3.5, "3.5"),
            ("float", 3, True),
            ("boolean", False, 0),
            ("nil", None, 0),
            ("some", 0, None),
            (["string", {"min": 2, "max": 3}], "ab", "a"),
            (["string", {"min": 2, "max": 3}], "abc", "abcd"),
            (["int", {"min": 1}], 1, 0),
            (["double", {"max": 1.5}], 1.5, 1.6),
            (["vector", {"min": 1}, "int"], [1], []),
            (["vector", "int"], (1, 2), [1, "2"]),
            (["list", "string"], [], "abc"),
            (["maybe", "uuid"], None, "x"),
            (["maybe", "uuid"], ORDER_ID, 1),
            (["enum", "small", "large"], "small", "medium"),
            (["enum", 1, 2], 1, True),
            (["enum", True], True, 1),
            (["enum", "a"], "a", ["a"]),
            (["or", "int", "string"], "x", 1.5),
            (["and", "int", ["int", {"min": 5}]], 5, 4),
            (["map-of", "string", "int"], {"a": 1}, {"a": "1"}),
            (["map-of", "uuid", "int"], {ORDER_ID: 1}, {"x": 1}),
            (["tuple", "string", "int"], ["a", 1], ["a", 1, 2]),
            (["tuple", "string", "int"], ("a", 1), [1, "a"]),
            ("any", object(), None),
        ],
    )
    def test_type_accepts_and_rejects(self, spec: Any, good: Any, bad: Any) -> None:
        """Each type accepts its example and rejects the counter-example."""
        validator = compile_schema(spec, path=PATH)

        validator.validate(good)
        if spec == "any":
            validator.validate(bad)
        else:
            assert errors_of(validator, bad)

    def test_bounds_reasons_name_the_limit(self) -> None:
        """A bound failure says which bound and the measured value."""
        validator = compile_schema(
            ["map", ["name", ["string", {"min": 2}]], ["qty", ["int", {"max": 9}]]],
            path=PATH,
        )

        assert errors_of(validator, {"name": "a", "qty": 10}) == [
            ("name", "expected length at least 2, got 1"),
            ("qty", "expected value at most 9, got 10"),
        ]

    def test_or_explains_every_option(self) -> None:
        """A value matching no option reports why each option failed."""
        validator = compile_schema(["or", "int", ["map", ["id", "uuid"]]], path=PATH)

        ((path, reason),) = errors_of(validator, {"id": "x"})

        assert path == ""
        assert "option 1: expected an integer" in reason
        assert "option 2: id: expected a UUID" in reason

    def test_tuple_reports_size_and_items(self) -> None:
        """A tuple of the wrong size and wrong items reports both."""
        validator = compile_schema(["tuple", "string", "int"], path=PATH)

        assert errors_of(validator, [1]) == [
            ("", "expected 2 items, got 1"),
            ("[0]", "expected a string, got 1"),
        ]

    def test_map_of_reports_bad_keys(self) -> None:
        """A map-of with a bad key names the key."""
        validator = compile_schema(["map-of", "uuid", "int"], path=PATH)

        assert errors_of(validator, {"x": 1}) == [
            ("x", "invalid key: expected a UUID, got 'x'")
        ]


ORDER_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
    | st.just(ORDER_ID)
    | st.sampled_from(["2025-01-01T00:00:00Z", "2025-01-01T00:00:00"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["id", "amount", "items", "at", "x"]), inner, max_size=4
        )
    ),
    max_leaves=12,
)

PROPERTY_SCHEMA = [
    "map",
    {"closed": True},
    ["id", "uuid"],
    ["amount", {"optional": True}, ["or", "double", "nil"]],
    ["at", {"optional": True}, "inst"],
    ["items", {"optional": True}, ["vector", ["map", ["id", "uuid"]]]],
]


class TestVectorConsistency:
    @given(message=ORDER_VALUES)
    def test_fast_check_and_explanation_agree(self, message: Any) -> None:
        """A message is rejected exactly when the explanation finds errors."""
        validator: Any = compile_schema(PROPERTY_SCHEMA, path=PATH)

        assert validator.is_valid(message) == (validator.errors(message) == [])

    @given(
        ids=st.lists(st.uuids().map(str), min_size=1, max_size=5),
        amount=st.floats(allow_nan=False) | st.integers(),
    )
    def test_valid_orders_pass(self, ids: list[str], amount: float) -> None:
        """Well-formed orders always pass."""
        validator = compile_schema(PROPERTY_SCHEMA, path=PATH)

        validator.validate(
            {"id": ids[0], "amount": amount, "items": [{"id": i} for i in ids]}
        )


class TestVectorConfigErrors:
    @pytest.mark.parametrize(
        ("spec", "where", "reason"),
        [
            (["map", ["id", "uuidd"]], f"{PATH}[1][1]", "unknown type 'uuidd'"),
            ("uuidd", PATH, "neither a type name nor an import path"),
            (["map", {"closd": True}], f"{PATH}[1].closd", "unknown property 'closd'"),
            (["map", {"closed": "yes"}], f"{PATH}[1].closed", "expected true or false"),
            (["map", ["id"]], f"{PATH}[1]", "expected a map entry"),
            (["map", [1.5, "int"]], f"{PATH}[1][0]", "expected a string key"),
            (["map", ["a", "int"], ["a", "string"]], f"{PATH}[2]", "declared twice"),
            (
                ["map", ["a", {"optional": 1}, "int"]],
                f"{PATH}[1][1].optional",
                "true or false",
            ),
            (
                ["map", ["a", {"opt": True}, "int"]],
                f"{PATH}[1][1].opt",
                "unknown property",
            ),
            (["vector"], PATH, "takes exactly 1 argument"),
            (["vector", "int", "int"], PATH, "takes exactly 1 argument"),
            (["vector", {"min": "1"}, "int"], f"{PATH}[1].min", "expected an integer"),
            (
                ["maybe", ["vector", ["nope"]]],
                f"{PATH}[1][1][0]",
                "unknown type 'nope'",
            ),
            (["string", "x"], PATH, "takes exactly 0 argument"),
            (["int", {"min": True}], f"{PATH}[1].min", "expected a number"),
            (["enum"], PATH, "at least 1"),
            (["enum", "a", {"b": 1}], f"{PATH}[2]", "enum members must be scalars"),
            ([], PATH, "empty list"),
            ([3, "int"], f"{PATH}[0]", "expected a type name"),
            (["vector", 3], f"{PATH}[1]", "expected a type name or a [type, ...] list"),
        ],
    )
    def test_malformed_spec_names_its_place(
        self, spec: Any, where: str, reason: str
    ) -> None:
        """A malformed spec fails at compile time, naming the exact place."""
        with pytest.raises(SchemaConfigError) as info:
            compile_schema(spec, path=PATH)

        assert f"Invalid schema at {where}: " in str(info.value)
        assert reason in info.value.reason
        assert info.value.path == PATH
        assert isinstance(info.value, ValueError)

    def test_unknown_type_lists_known_ones(self) -> None:
        """The unknown-type error lists the known types."""
        with pytest.raises(SchemaConfigError, match=r"known types: .*uuid"):
            compile_schema(["map", ["id", "uid"]], path=PATH)


class TestJsonSchema:
    def test_valid_message_passes(self) -> None:
        """A message matching the JSON Schema passes."""
        validator = compile_schema(ORDER_JSON_SCHEMA, path=PATH)

        validator.validate({"id": ORDER_ID, "amount": 1.5})

    def test_every_failing_field_is_listed(self) -> None:
        """Every failing field is listed, required and extra keys by name."""
        validator = compile_schema(ORDER_JSON_SCHEMA, path=PATH)

        with pytest.raises(SchemaValidationError) as info:
            validator.validate({"id": "order-1", "amount": "12", "note": "x"})

        assert [p for p, _ in info.value.errors] == ["id", "amount", "note"]
        assert "'order-1' is not a 'uuid'" in info.value.errors[0][1]
        assert fields_of(validator, {}) == ["id", "amount"]

    def test_nested_paths(self) -> None:
        """Nested failures carry list indexes and keys."""
        validator = compile_schema(
            {
                "type": "object",
                "properties": {
                    "items": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"qty": {"type": "integer"}},
                            "required": ["qty"],
                        },
                    }
                },
            },
            path=PATH,
        )

        assert sorted(
            fields_of(validator, {"items": [{"qty": 1}, {"qty": "a"}, {}]})
        ) == [
            "items[1].qty",
            "items[2].qty",
        ]

    def test_date_time_format_is_asserted(self) -> None:
        """format: date-time is checked, not just an annotation."""
        validator = compile_schema({"type": "string", "format": "date-time"}, path=PATH)

        validator.validate("2025-01-01T10:00:00Z")
        assert fields_of(validator, "yesterday") == [""]

    def test_newer_keywords_use_jsonschema(self) -> None:
        """2020-12 keywords fastjsonschema lacks are still enforced."""
        validator = compile_schema(
            {
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "array",
                "prefixItems": [{"type": "string"}, {"type": "integer"}],
            },
            path=PATH,
        )

        validator.validate(["a", 1])
        assert fields_of(validator, [1, "a"]) == ["[0]", "[1]"]

    def test_works_without_fastjsonschema(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without fastjsonschema, jsonschema alone gives the same verdicts."""
        monkeypatch.setitem(sys.modules, "fastjsonschema", None)
        validator = compile_schema(ORDER_JSON_SCHEMA, path=PATH)

        validator.validate({"id": ORDER_ID, "amount": 1})
        assert fields_of(validator, {"id": 1, "amount": 1}) == ["id"]

    def test_fast_verdict_stands_when_jsonschema_would_accept(self) -> None:
        """If only fastjsonschema refuses (a format), its reason is reported."""
        from jsonschema import FormatChecker

        if "uri" in FormatChecker().checkers:
            pytest.skip("jsonschema checks uri here, so both agree")
        validator = compile_schema({"type": "string", "format": "uri"}, path=PATH)

        ((path, reason),) = errors_of(validator, "not a uri")

        assert path == ""
        assert "uri" in reason

    @pytest.mark.parametrize(
        ("spec", "where"),
        [
            ({"type": "objec"}, f"{PATH}.type"),
            (
                {"type": "object", "properties": {"id": {"type": 5}}},
                f"{PATH}.properties.id.type",
            ),
            ({"type": "object", "required": "id"}, f"{PATH}.required"),
        ],
    )
    def test_malformed_schema_names_its_place(self, spec: Any, where: str) -> None:
        """An invalid JSON Schema fails at compile time with its sub-path."""
        with pytest.raises(SchemaConfigError, match="not a valid JSON Schema") as info:
            compile_schema(spec, path=PATH)

        assert str(info.value).startswith(f"Invalid schema at {where}: ")

    def test_missing_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without jsonschema installed, the error names the extra."""
        monkeypatch.setitem(sys.modules, "jsonschema", None)

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[jsonschema\]"):
            compile_schema(ORDER_JSON_SCHEMA, path=PATH)


class OrderLine(pydantic.BaseModel):
    sku: str
    qty: int


class OrderModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    id: uuid.UUID
    amount: float
    lines: list[OrderLine] = []


@dataclasses.dataclass
class OrderRecord:
    id: uuid.UUID
    amount: float


class OrderDict(typing_extensions.TypedDict):
    id: str
    amount: float


class Opaque:
    """A plain class pydantic has no schema for."""


@pytest.fixture
def models_module(monkeypatch: pytest.MonkeyPatch) -> str:
    """Expose the test models under an importable module name."""
    name = "duct_test_schema_models"
    module = types.ModuleType(name)
    module.OrderModel = OrderModel  # type: ignore[attr-defined]
    module.OrderRecord = OrderRecord  # type: ignore[attr-defined]
    module.OrderDict = OrderDict  # type: ignore[attr-defined]
    module.Opaque = Opaque  # type: ignore[attr-defined]
    module.not_a_type = 42  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)
    return name


class TestPydantic:
    @pytest.mark.parametrize("sep", [":", "."])
    def test_model_by_import_path(self, models_module: str, sep: str) -> None:
        """A model named by `mod:Class` or `mod.Class` validates messages."""
        validator = compile_schema(f"{models_module}{sep}OrderModel", path=PATH)

        validator.validate({"id": ORDER_ID, "amount": 3})

    def test_every_failing_field_is_listed(self) -> None:
        """Errors carry pydantic's loc as a field path, all of them."""
        validator = compile_schema(OrderModel, path=PATH)
        message = {
            "id": "order-1",
            "amount": "lots",
            "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": "many"}],
            "note": "x",
        }

        assert fields_of(validator, message) == ["id", "amount", "lines[1].qty", "note"]

    def test_missing_fields(self) -> None:
        """Missing fields are listed by name."""
        validator = compile_schema(OrderModel, path=PATH)

        assert errors_of(validator, {}) == [
            ("id", "Field required"),
            ("amount", "Field required"),
        ]

    @pytest.mark.parametrize("model", ["OrderRecord", "OrderDict"])
    def test_other_types_pydantic_adapts(self, models_module: str, model: str) -> None:
        """Dataclasses and TypedDicts validate through pydantic too."""
        validator = compile_schema(f"{models_module}:{model}", path=PATH)

        validator.validate({"id": ORDER_ID, "amount": 1.0})
        assert fields_of(validator, {"id": ORDER_ID}) == ["amount"]

    def test_import_failure_names_path(self) -> None:
        """A path that does not import fails at compile time, naming the path."""
        with pytest.raises(
            SchemaConfigError, match=r"cannot import 'no_such_mod_x:Order'"
        ) as info:
            compile_schema("no_such_mod_x:Order", path=PATH)

        assert info.value.path == PATH

    def test_import_of_non_type_fails(self, models_module: str) -> None:
        """A path to something that is not a class is refused."""
        with pytest.raises(SchemaConfigError, match="expected a pydantic model class"):
            compile_schema(f"{models_module}:not_a_type", path=PATH)

    def test_type_pydantic_cannot_adapt(self, models_module: str) -> None:
        """A class pydantic refuses to build a schema for is a config error."""
        with pytest.raises(SchemaConfigError, match="Opaque is neither"):
            compile_schema(f"{models_module}:Opaque", path=PATH)

    def test_missing_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without pydantic installed, the error names the extra."""
        monkeypatch.setitem(sys.modules, "pydantic", None)

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[pydantic\]"):
            compile_schema("my_app.schemas:OrderCreated", path=PATH)


class TestForms:
    @pytest.mark.parametrize(
        "spec",
        [
            "not a path",
            "order created",
            {"canonical": ORDER},
            {},
            42,
            None,
            True,
        ],
    )
    def test_unknown_forms_list_the_accepted_ones(self, spec: Any) -> None:
        """Anything in no known notation is refused, naming all three forms."""
        with pytest.raises(SchemaConfigError) as info:
            compile_schema(spec, path=PATH)

        message = str(info.value)
        assert message.startswith(f"Invalid schema at {PATH}: ")
        assert "vector schema" in message
        assert "JSON Schema" in message
        assert "pydantic model import path" in message

    def test_ready_validator_passes_through(self) -> None:
        """An object with a validate method is used as it is."""

        class Always:
            def validate(self, message: Any) -> None:
                return None

        ready = Always()

        assert compile_schema(ready, path=PATH) is ready

    def test_compiled_validators_satisfy_the_protocol(self) -> None:
        """Every built-in notation gives a Validator."""
        for spec in (ORDER, ORDER_JSON_SCHEMA, OrderModel):
            assert isinstance(compile_schema(spec, path=PATH), Validator)
