"""Tests for composite keys, derivation and refs to component types."""

from __future__ import annotations

from typing import Any

import pytest

from duct_messaging.system import (
    ConfigError,
    check_config,
    component,
    halt,
    init,
    read_config,
)

CONFIG = """
dv.t/producer kafka-primary: {cluster: primary}
dv.t/producer kafka-data: {cluster: data}
dv.t/other-producer redis-main: {cluster: redis}
dv.t/app:
  main: !ref kafka-primary
  by_full_key: !ref dv.t/producer kafka-data
  every: !refset dv.t/producer
  every_kind: !refset dv.t/any-producer
"""


@pytest.fixture(autouse=True)
def producers() -> None:
    @component("dv.t/producer", derives_from="dv.t/any-producer")
    def producer(value: Any, key: str) -> str:
        return f"{key.split()[-1]}@{value['cluster']}"

    @component("dv.t/other-producer", derives_from=["dv.t/any-producer"])
    def other(value: Any) -> str:
        return f"other@{value['cluster']}"

    @component("dv.t/app")
    def app(value: Any) -> Any:
        return value


class TestDerivation:
    def test_instances_live_under_composite_keys(self) -> None:
        """Two instances of one type start under their own keys."""
        system = init(read_config(CONFIG))

        assert system["dv.t/producer kafka-primary"] == "kafka-primary@primary"
        assert system["dv.t/producer kafka-data"] == "kafka-data@data"
        halt(system)

    def test_refs_by_name_full_key_and_type(self) -> None:
        """A ref may name an instance, a full key; a refset a type or its parent."""
        system = init(read_config(CONFIG))

        app = system["dv.t/app"]
        assert app["main"] == "kafka-primary@primary"
        assert app["by_full_key"] == "kafka-data@data"
        assert list(app["every"]) == [
            "dv.t/producer kafka-primary",
            "dv.t/producer kafka-data",
        ]
        assert app["every_kind"] == {
            "dv.t/producer kafka-primary": "kafka-primary@primary",
            "dv.t/producer kafka-data": "kafka-data@data",
            "dv.t/other-producer redis-main": "other@redis",
        }
        halt(system)

    def test_ref_to_a_type_with_one_instance_resolves(self) -> None:
        """!ref TYPE works when exactly one key derives from TYPE."""
        config = read_config(
            "dv.t/producer only: {cluster: c}\ndv.t/app: {p: !ref dv.t/producer}\n"
        )

        system = init(config)

        assert system["dv.t/app"] == {"p": "only@c"}
        halt(system)

    def test_ambiguous_ref_lists_every_candidate(self) -> None:
        """A ref matching several keys is an error naming all of them."""
        config = read_config(CONFIG + "dv.t/broken: {p: !ref dv.t/any-producer}\n")

        problems = check_config(config)

        assert problems == [
            "dv.t/broken.p: !ref 'dv.t/any-producer' is ambiguous: 3 keys derive "
            "from it ('dv.t/producer kafka-primary', 'dv.t/producer kafka-data', "
            "'dv.t/other-producer redis-main'). Refer to one of them by its full "
            "key, or use !refset. [<string>:10]"
        ]
        with pytest.raises(ConfigError, match="is ambiguous"):
            init(config)

    def test_partial_init_by_type_starts_every_instance(self) -> None:
        """init(keys=[TYPE]) starts every key deriving from TYPE."""
        system = init(read_config(CONFIG), keys=["dv.t/producer"])

        assert system.started_keys == (
            "dv.t/producer kafka-primary",
            "dv.t/producer kafka-data",
        )
        halt(system)

    def test_spacing_inside_composite_keys_is_normalised(self) -> None:
        """Extra spaces in a composite key or a ref do not matter."""
        config = read_config(
            "'dv.t/producer    wide': {cluster: w}\n"
            "dv.t/app: {p: !ref 'dv.t/producer   wide'}\n"
        )

        system = init(config)

        assert system["dv.t/app"] == {"p": "wide@w"}
        halt(system)
