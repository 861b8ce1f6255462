"""Tests for component schemas and check hooks."""

from __future__ import annotations

import sys
from typing import Any

import pydantic
import pytest

from duct_messaging.errors import MissingExtraError
from duct_messaging.system import CheckContext, check_config, component, read_config

SCHEMA = {
    "type": "object",
    "required": ["servers", "port"],
    "properties": {
        "servers": {"type": "array", "items": {"type": "string"}},
        "port": {"type": "integer"},
        "pool": {"type": "object"},
    },
    "additionalProperties": False,
}


class Settings(pydantic.BaseModel):
    name: str
    retries: int


class TestSchema:
    def test_json_schema_errors_name_key_and_path(self) -> None:
        """Each violation names the key and the path inside its value."""

        @component("vl.t/client", schema=SCHEMA)
        def client(value: Any) -> Any:
            return value

        config = read_config(
            "vl.t/client:\n  servers: [a, 3]\n  port: high\n  extra: 1\n"
        )

        assert check_config(config) == [
            "vl.t/client: Additional properties are not allowed ('extra' was "
            "unexpected) [<string>:1]",
            "vl.t/client.port: 'high' is not of type 'integer' [<string>:3]",
            "vl.t/client.servers[1]: 3 is not of type 'string' [<string>:2]",
        ]

    def test_refs_are_not_judged_by_the_schema(self) -> None:
        """A ref stands for a value not known yet, so the schema skips it."""

        @component("vl.t/client", schema=SCHEMA)
        def client(value: Any) -> Any:
            return value

        config = read_config(
            "vl.t/client: {servers: !ref app/servers, port: 1, pool: !ref app/pool}\n"
            "app/servers: [a]\napp/pool: {}\n"
        )

        assert check_config(config) == []

    def test_callable_schema_reports_pydantic_locations(self) -> None:
        """A pydantic validator as schema gives one problem per failing field."""

        @component("vl.t/settings", schema=Settings.model_validate)
        def settings(value: Any) -> Any:
            return value

        problems = check_config({"vl.t/settings": {"name": "x", "retries": "many"}})

        assert problems == [
            "vl.t/settings.retries: Input should be a valid integer, unable to "
            "parse string as an integer"
        ]

    def test_callable_schema_raising_plainly(self) -> None:
        """Any other exception from a callable schema becomes one problem."""

        def positive(value: Any) -> None:
            if value <= 0:
                raise ValueError("must be positive")

        @component("vl.t/count", schema=positive)
        def count(value: Any) -> Any:
            return value

        assert check_config({"vl.t/count": -1}) == [
            "vl.t/count: ValueError: must be positive"
        ]

    def test_json_schema_without_jsonschema_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without jsonschema installed, a dict schema asks for the extra."""
        monkeypatch.setitem(sys.modules, "jsonschema", None)

        @component("vl.t/client", schema=SCHEMA)
        def client(value: Any) -> Any:
            return value

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[jsonschema\]"):
            check_config({"vl.t/client": {}})


class TestCheckHook:
    def test_context_gives_key_config_and_deref(self) -> None:
        """A check hook sees its key, the raw config and referenced raw values."""
        seen: dict[str, Any] = {}

        @component("vl.t/user")
        def user(value: Any) -> Any:
            return value

        @user.check
        def _check(value: Any, ctx: CheckContext) -> list[str]:
            seen["key"] = ctx.key
            seen["db"] = ctx.deref(value["db"])
            seen["all"] = ctx.deref(value["all"])
            seen["missing"] = ctx.deref("no/such")
            return ["db: too small"] if seen["db"]["size"] < 2 else []

        config = read_config(
            "vl.t/user x: {db: !ref app/db, all: !refset app/db}\napp/db: {size: 1}\n"
        )

        assert check_config(config) == ["vl.t/user x: db: too small [<string>:1]"]
        assert seen == {
            "key": "vl.t/user x",
            "db": {"size": 1},
            "all": {"app/db": {"size": 1}},
            "missing": None,
        }

    def test_check_returning_a_string_or_none(self) -> None:
        """A hook may return one string, or None for no problem."""

        @component("vl.t/one")
        def one(value: Any) -> Any:
            return value

        @one.check
        def _check(value: Any, ctx: CheckContext) -> str | None:
            return "bad" if value else None

        assert check_config({"vl.t/one": 1}) == ["vl.t/one: bad"]
        assert check_config({"vl.t/one": 0}) == []
