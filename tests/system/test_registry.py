"""Tests for component registration and the key resolution rule."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from duct_messaging.system import (
    Component,
    ConfigError,
    check_config,
    component,
    halt,
    init,
    register_lazy,
)

MakeModule = Callable[[str], ModuleType]


class TestComponentDecorator:
    def test_decorator_returns_a_callable_component(self) -> None:
        """The decorated object still calls the init function directly."""

        @component("reg.t/thing", derives_from="reg.t/base")
        def thing(value: Any) -> Any:
            return ("made", value)

        assert isinstance(thing, Component)
        assert thing(1) == ("made", 1)
        assert thing.derives_from == ("reg.t/base",)

    def test_hook_decorators_return_the_function(self) -> None:
        """halt/check/resolve/suspend/resume leave the hook usable as before."""

        @component("reg.t/hooks")
        def hooks(value: Any) -> Any:
            return value

        def stop(state: Any) -> None:
            return None

        assert hooks.halt(stop) is stop
        assert hooks.halt_fn is stop

    def test_key_parameter_receives_the_concrete_key(self) -> None:
        """An init function with a `key` parameter gets the key it runs for."""

        @component("reg.t/named")
        def named(value: Any, key: str) -> str:
            return key

        system = init({"reg.t/named first": {}})

        assert system["reg.t/named first"] == "reg.t/named first"
        halt(system)


class TestLazyRegistration:
    def test_lazy_key_imports_its_module_on_demand(
        self, make_module: MakeModule
    ) -> None:
        """A lazily registered key imports its module when a config uses it."""
        module = make_module(
            """
            from duct_messaging.system import component

            @component("reg.lazy/one")
            def one(value):
                return value * 2
            """
        )
        register_lazy("reg.lazy/two", module.__name__)
        register_lazy("reg.lazy/one", module.__name__)

        system = init({"reg.lazy/one": 21})

        assert system["reg.lazy/one"] == 42
        assert check_config({"reg.lazy/two": 1}) == [
            f"reg.lazy/two: module {module.__name__!r} did not register it"
        ]
        halt(system)


class TestKeyResolution:
    def test_import_path_calls_the_function(self, make_module: MakeModule) -> None:
        """`pkg.mod/name` calls the module's callable `name` with the value."""
        module = make_module(
            """
            async def build(value, key):
                return {"built": value, "key": key}
            """
        )
        key = f"{module.__name__}/build"

        system = init({key: [1, 2]})

        assert system[key] == {"built": [1, 2], "key": key}
        halt(system)

    def test_module_without_the_attribute_is_an_unknown_key(
        self, make_module: MakeModule
    ) -> None:
        """An importable module lacking the name is reported with close matches."""
        module = make_module("def build_client(value):\n    return value\n")
        key = f"{module.__name__}/build_clint"

        problems = check_config({key: {}})

        assert problems == [
            f"{key}: unknown component key {key!r}: module {module.__name__!r} "
            "imports but has no callable 'build_clint'; a key naming an "
            "importable module must name a callable in it (plain data needs a "
            f"namespace that is not a module). Did you mean: "
            f"{module.__name__}/build_client?"
        ]

    def test_unimportable_namespace_is_plain_data(self) -> None:
        """A key whose module does not exist is data given to dependents as is."""
        from duct_messaging.system import Ref

        seen: list[Any] = []

        @component("reg.t/user")
        def user(value: Any) -> Any:
            seen.append(value)
            return value

        system = init(
            {
                "no_such_pkg_dm.settings/app": {"port": 80},
                "reg.t/user": {"settings": Ref("no_such_pkg_dm.settings/app")},
            }
        )

        assert seen == [{"settings": {"port": 80}}]
        assert system["no_such_pkg_dm.settings/app"] == {"port": 80}
        halt(system)

    def test_key_without_namespace_is_plain_data(self) -> None:
        """A key without `/` is plain data."""
        system = init({"settings": {"a": 1}})

        assert system["settings"] == {"a": 1}
        halt(system)

    def test_duct_namespace_must_be_registered(self) -> None:
        """Unregistered `duct.` keys are unknown, with the closest registered keys."""

        @component("duct.regtest/clients")
        def clients(value: Any) -> Any:
            return value

        problems = check_config({"duct.regtest/client": {}, "duct.qqqq": 1})

        assert len(problems) == 2
        assert problems[0].startswith(
            "duct.regtest/client: unknown component key 'duct.regtest/client'. "
            "Did you mean: duct.regtest/clients"
        )
        assert problems[1] == "duct.qqqq: unknown component key 'duct.qqqq'."

    def test_module_failing_to_import_is_a_problem(
        self, make_module: MakeModule, tmp_path: Any
    ) -> None:
        """A module that raises on import is a problem, not plain data."""
        (tmp_path / "dm_sys_broken_mod.py").write_text("import no_such_dep_dm\n")

        (problem,) = check_config({"dm_sys_broken_mod/x": 1})

        assert problem.startswith(
            "dm_sys_broken_mod/x: importing 'dm_sys_broken_mod' failed"
        )
        assert "no_such_dep_dm" in problem

    def test_composite_key_naming_two_types_is_a_problem(self) -> None:
        """At most one part of a composite key may name a component type."""

        @component("reg.t/a")
        def a(value: Any) -> Any:
            return value

        @component("reg.t/b")
        def b(value: Any) -> Any:
            return value

        with pytest.raises(ConfigError, match="the key names 2 component types"):
            init({"reg.t/a reg.t/b": {}})
