"""Routing: default_routing + overrides merge, validation, handler resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import structlog

from duct_messaging import init
from duct_messaging.cli import main
from duct_messaging.messaging.routing import (
    HandlerResolutionError,
    RoutingError,
    build_routing,
    merge_routing,
)
from duct_messaging.system import ConfigError


def on_order(message: Any) -> None:
    """A handler found by import path."""


def on_order_data(message: Any) -> None:
    """A second handler found by import path."""


BASE: dict[str, Any] = {
    "defaults": {"retry": {"max_attempts": 3, "backoff": {"initial_ms": 100}}},
    "topics": {
        "order-created": {
            "schema": {"canonical": ["map", {"closed": True}]},
            "partitions": 4,
        },
        "audit": {},
    },
    "publish": {
        "order-created": {
            "targets": [
                {"client": "kafka-primary", "kafka_topic": "core.orders"},
                {"client": "kafka-data", "kafka_topic": "core.orders.data"},
            ]
        }
    },
    "subscriptions": {
        "orders-worker": {
            "topic": "order-created",
            "source": "kafka",
            "handler": "orders-handler",
            "options": {"group_id": "orders-core", "partitions": 4},
        }
    },
    "handlers": {"orders-handler": f"{__name__}:on_order"},
}


class TestMerge:
    def test_nested_maps_merge_key_by_key(self) -> None:
        """Overrides add and replace leaves of nested maps without dropping siblings."""
        merged = merge_routing(
            {
                "default_routing": BASE,
                "overrides": {
                    "subscriptions": {"orders-worker": {"client": "kafka-primary"}},
                    "defaults": {"retry": {"backoff": {"max_ms": 900}}},
                },
            }
        )

        worker = merged["subscriptions"]["orders-worker"]
        assert worker["client"] == "kafka-primary"
        assert worker["options"] == {"group_id": "orders-core", "partitions": 4}
        assert merged["defaults"]["retry"] == {
            "max_attempts": 3,
            "backoff": {"initial_ms": 100, "max_ms": 900},
        }

    def test_lists_are_replaced_not_appended(self) -> None:
        """A list in overrides replaces the default list whole."""
        merged = merge_routing(
            {
                "default_routing": BASE,
                "overrides": {
                    "publish": {
                        "order-created": {"targets": [{"client": "kafka-data"}]}
                    }
                },
            }
        )

        assert merged["publish"]["order-created"]["targets"] == [
            {"client": "kafka-data"}
        ]

    def test_null_removes_a_key(self) -> None:
        """An explicit null in overrides removes the key, at any depth."""
        merged = merge_routing(
            {
                "default_routing": BASE,
                "overrides": {
                    "topics": {"audit": None, "order-created": {"partitions": None}},
                },
            }
        )

        assert set(merged["topics"]) == {"order-created"}
        assert "partitions" not in merged["topics"]["order-created"]
        assert (
            merged["topics"]["order-created"]["schema"]
            == BASE["topics"]["order-created"]["schema"]
        )

    def test_handlers_come_from_both_sides(self) -> None:
        """Handlers named in default_routing and in overrides are all available."""
        merged = merge_routing(
            {
                "default_routing": BASE,
                "overrides": {
                    "handlers": {"data-handler": f"{__name__}:on_order_data"}
                },
            }
        )

        assert set(merged["handlers"]) == {"orders-handler", "data-handler"}

    def test_merge_leaves_its_inputs_alone(self) -> None:
        """Merging does not change the default routing it started from."""
        before = repr(BASE)

        merge_routing(
            {"default_routing": BASE, "overrides": {"topics": {"audit": None}}}
        )

        assert repr(BASE) == before


def _with_client(routing: dict[str, Any]) -> dict[str, Any]:
    return {
        "default_routing": routing,
        "overrides": {"subscriptions": {"orders-worker": {"client": "kafka-primary"}}},
    }


class TestBuild:
    def test_handler_names_resolve_through_handlers_and_import_paths(self) -> None:
        """A handler may be a name in handlers, an import path, or a callable."""
        routing = build_routing(_with_client({**BASE, "topics": {"order-created": {}}}))

        sub = routing.subscriptions["orders-worker"]
        assert sub.handler is on_order
        assert sub.client == "kafka-primary"
        assert sub.retry["max_attempts"] == 3

    def test_unknown_handler_lists_the_known_names(self) -> None:
        """An unresolvable handler is an error that names the handlers on offer."""
        bad = _with_client({**BASE, "topics": {"order-created": {}}})
        bad["overrides"]["subscriptions"]["orders-worker"]["handler"] = "nope"

        with pytest.raises(RoutingError, match="orders-handler") as caught:
            build_routing(bad)

        assert "subscriptions.orders-worker.handler" in caught.value.problems[0]

    def test_every_routing_problem_is_reported_at_once(self) -> None:
        """Missing topic, client, source and a bad import path show up together."""
        routing = {
            "topics": {"a": {}},
            "publish": {"ghost": {"targets": [{"kafka_topic": "x"}]}},
            "subscriptions": {
                "s1": {"topic": "missing", "handler": "no.such.module:fn"},
            },
        }

        with pytest.raises(RoutingError) as caught:
            build_routing(routing)

        text = "\n".join(caught.value.problems)
        assert "publish.ghost: topic 'ghost' is not defined" in text
        assert "publish.ghost.targets[0]: missing 'client'" in text
        assert "subscriptions.s1.topic: topic 'missing' is not defined" in text
        assert "subscriptions.s1.source: missing" in text
        assert "subscriptions.s1.client: missing" in text
        assert (
            "subscriptions.s1.handler: cannot resolve handler 'no.such.module:fn'"
            in text
        )

    def test_producer_alias_names_the_client(self) -> None:
        """`producer` is accepted wherever `client` is."""
        routing = build_routing(
            {
                "topics": {"t": {}},
                "publish": {"t": {"targets": [{"producer": "c1", "kafka_topic": "k"}]}},
                "subscriptions": {
                    "s": {
                        "topic": "t",
                        "source": "kafka",
                        "producer": "c1",
                        "handler": on_order,
                    }
                },
            }
        )

        assert routing.targets("t")[0].client == "c1"
        assert routing.targets("t")[0].options == {"kafka_topic": "k"}
        assert routing.subscriptions["s"].client == "c1"

    def test_unknown_subscription_field_is_reported(self) -> None:
        """A misspelt subscription field is an error, not silently ignored."""
        with pytest.raises(
            RoutingError, match=r"subscriptions\.s\.hanlder: unknown field"
        ):
            build_routing(
                {
                    "topics": {"t": {}},
                    "subscriptions": {
                        "s": {
                            "topic": "t",
                            "source": "kafka",
                            "client": "c",
                            "handler": on_order,
                            "hanlder": "x",
                        }
                    },
                }
            )

    def test_resolution_error_type(self) -> None:
        """HandlerResolutionError is a LookupError carrying the known names."""
        from duct_messaging.messaging.routing import resolve_handler

        with pytest.raises(HandlerResolutionError) as caught:
            resolve_handler("x", {"b": on_order, "a": on_order})

        assert caught.value.known == ["a", "b"]
        assert isinstance(caught.value, LookupError)


def _retry_routing(
    defaults: Any = None, topic: Any = None, subscription: Any = None
) -> dict[str, Any]:
    """Return a routing whose three `retry` sections are the given ones."""
    return {
        "defaults": {"retry": defaults},
        "topics": {"orders": {"retry": topic}},
        "subscriptions": {
            "worker": {
                "topic": "orders",
                "source": "memory",
                "client": "mem",
                "handler": f"{__name__}:on_order",
                "retry": subscription,
            }
        },
    }


class TestRetryCheck:
    def test_every_retry_section_is_checked_with_its_path(self) -> None:
        """Defaults, topic and subscription retry problems all name their path."""
        routing = _retry_routing(
            defaults={"max_attempts": 0},
            topic={"backoff": {"initial_ms": -1}},
            subscription={"non_retriable": ["no_such_module_for_retry:Boom"]},
        )

        with pytest.raises(RoutingError) as caught:
            build_routing(routing)

        assert caught.value.problems == [
            "defaults.retry.max_attempts: expected an integer >= 1, got 0",
            "topics.orders.retry.backoff.initial_ms: expected a number >= 0, got -1",
            "subscriptions.worker.retry.non_retriable[0]: cannot import "
            "'no_such_module_for_retry:Boom': "
            "No module named 'no_such_module_for_retry'",
        ]

    def test_a_retry_section_of_the_wrong_shape_is_reported(self) -> None:
        """A retry section that is not a mapping is named, not crashed on."""
        with pytest.raises(RoutingError) as caught:
            build_routing(_retry_routing(subscription=[3]))

        assert caught.value.problems == [
            "subscriptions.worker.retry: expected a mapping such as "
            "{max_attempts: 3}, got a list"
        ]

    def test_good_retry_sections_pass(self) -> None:
        """Valid retry settings in all three places build a routing."""
        routing = build_routing(
            _retry_routing(
                defaults={"max_attempts": 2},
                topic={"backoff": {"max_ms": 50}},
                subscription={"non_retriable": ["ValueError", "json:JSONDecodeError"]},
            )
        )

        assert routing.subscriptions["worker"].retry == {
            "max_attempts": 2,
            "backoff": {"max_ms": 50},
            "non_retriable": ["ValueError", "json:JSONDecodeError"],
        }

    def test_init_refuses_bad_retry_config_before_starting(self) -> None:
        """`init` raises ConfigError naming each retry problem; nothing starts."""
        config = {
            "duct.memory/clients": {"mem": {}},
            "duct.messaging/routing": _retry_routing(
                defaults={"max_attempts": 0},
                subscription={"non_retriable": ["no_such_module_for_retry:Boom"]},
            ),
        }

        with pytest.raises(ConfigError) as caught:
            init(config)

        assert caught.value.problems == [
            "duct.messaging/routing.defaults.retry.max_attempts: "
            "expected an integer >= 1, got 0",
            "duct.messaging/routing.subscriptions.worker.retry.non_retriable[0]: "
            "cannot import 'no_such_module_for_retry:Boom': "
            "No module named 'no_such_module_for_retry'",
        ]

    def test_check_command_lists_retry_problems(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`duct-messaging check` prints each retry problem with its path and line."""
        config = tmp_path / "retry.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                duct.memory/clients: {{mem: {{}}}}
                duct.messaging/routing:
                  defaults: {{retry: {{max_attempts: 0}}}}
                  topics: {{orders: {{}}}}
                  subscriptions:
                    worker:
                      topic: orders
                      source: memory
                      client: mem
                      handler: {__name__}:on_order
                      retry: {{non_retriable: [no_such_module_for_retry:Boom]}}
                """
            )
        )
        saved = structlog.get_config()
        try:
            code = main(["check", str(config)])
        finally:
            structlog.configure(**saved)

        err = capsys.readouterr().err.splitlines()
        assert code == 1
        assert err == [
            f"{config}: 2 problems",
            "  - duct.messaging/routing.defaults.retry.max_attempts: expected an "
            f"integer >= 1, got 0 [{config}:3]",
            "  - duct.messaging/routing.subscriptions.worker.retry.non_retriable[0]: "
            "cannot import 'no_such_module_for_retry:Boom': "
            f"No module named 'no_such_module_for_retry' [{config}:11]",
        ]
