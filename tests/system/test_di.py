"""Tests for handing a started system to dependency-injector."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from dependency_injector import providers

from duct_messaging.errors import MissingExtraError
from duct_messaging.system import ConfigError, attribute_name, halt, init

MakeModule = Callable[[str], ModuleType]


class TestContainer:
    def test_providers_by_key_and_by_attribute_name(self) -> None:
        """Each key is provided under itself and under its attribute-safe name."""
        system = init({"app.di/db primary": {"url": "x"}}, overrides={"app/clock": 5})

        container = system.container()

        assert container.app_di_db_primary() == {"url": "x"}
        assert container.providers["app.di/db primary"]() == {"url": "x"}
        assert container.app_clock() == 5
        halt(system)

    def test_inject_and_override_work_as_usual(self, make_module: MakeModule) -> None:
        """@inject with Provide[...] gets components; container.override swaps them."""
        module = make_module(
            """
            from dependency_injector.wiring import Provide, inject

            @inject
            def handler(db=Provide["app_db"]):
                return db
            """
        )
        system = init({"app/db": {"name": "real"}})
        container = system.container()
        container.wire(modules=[module])

        try:
            assert module.handler() == {"name": "real"}
            with container.app_db.override(providers.Object("fake")):
                assert module.handler() == "fake"
        finally:
            container.unwire()
            halt(system)

    def test_clashing_attribute_names_are_refused(self) -> None:
        """Two keys mapping to one attribute name are a ConfigError."""
        system = init({"app/a-b": 1, "app/a_b": 2})

        with pytest.raises(ConfigError, match="'app_a_b' is also the name of"):
            system.container()
        halt(system)

    def test_missing_extra_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without dependency-injector, container() asks for the `di` extra."""
        monkeypatch.setitem(sys.modules, "dependency_injector", None)
        monkeypatch.delitem(sys.modules, "duct_messaging.system._di", raising=False)
        system = init({"app/a": 1})

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[di\]"):
            system.container()
        halt(system)

    @pytest.mark.parametrize(
        ("key", "name"),
        [
            ("duct.kafka/producer kafka-primary", "duct_kafka_producer_kafka_primary"),
            ("9lives/x", "_9lives_x"),
        ],
    )
    def test_attribute_name(self, key: str, name: Any) -> None:
        """Non-word characters become `_`; a leading digit gets a prefix."""
        assert attribute_name(key) == name
