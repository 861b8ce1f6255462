"""Routing: default_routing + overrides merge, validation, handler resolution."""

from __future__ import annotations

from typing import Any

import pytest

from duct_messaging.messaging.routing import (
    HandlerResolutionError,
    RoutingError,
    build_routing,
    merge_routing,
)


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
