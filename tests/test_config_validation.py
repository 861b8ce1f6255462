"""Every built-in component's value is checked field by field before start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from duct_messaging.cli import main
from duct_messaging.messaging._config_check import (
    ConfigFieldError,
    Field,
    Fields,
    ListOf,
    RefTo,
    as_schema,
    integer,
    text,
)
from duct_messaging.messaging.retry import RetryConfigError, RetryPolicy
from duct_messaging.messaging.routing import (
    TARGET_OPTIONS,
    build_routing,
    routing_problems,
)
from duct_messaging.system import Ref, check_config, read_config

ROOT = Path(__file__).resolve().parent.parent


def on_order(message: Any) -> None:
    """A handler found by import path."""


def problems_of(config: dict[str, Any]) -> list[str]:
    """Return what `check_config` reports for `config`."""
    return check_config(config)


def _routing(**changes: Any) -> dict[str, Any]:
    """Return a good routing, with top-level sections replaced by `changes`."""
    routing: dict[str, Any] = {
        "topics": {"orders": {}},
        "publish": {"orders": {"targets": [{"client": "main"}]}},
        "subscriptions": {
            "worker": {
                "topic": "orders",
                "source": "memory",
                "client": "main",
                "handler": f"{__name__}:on_order",
            }
        },
    }
    routing.update(changes)
    return routing


def _worker(**fields: Any) -> dict[str, Any]:
    """Return the routing whose one subscription has `fields` added."""
    routing = _routing()
    routing["subscriptions"]["worker"].update(fields)
    return routing


class TestChecker:
    SPEC = Fields(
        {
            "url": Field(text(), required=True, hint="e.g. redis://host"),
            "size": integer(minimum=1),
            "names": ListOf(text()),
            "clients": RefTo("duct.memory/clients"),
        }
    )

    def test_unknown_field_suggests_the_closest_known_name(self) -> None:
        """A near-miss field name is refused with "did you mean"."""
        found = self.SPEC.problems({"url": "u", "sise": 2})

        assert [str(p) for p in found] == ["sise: unknown field; did you mean 'size'?"]

    def test_unknown_field_far_from_any_name_lists_the_known_ones(self) -> None:
        """Without a close name, the message lists what is accepted."""
        found = self.SPEC.problems({"url": "u", "colour": 2})

        assert str(found[0]) == (
            "colour: unknown field; expected one of clients, names, size, url"
        )

    def test_every_problem_is_returned_with_its_path(self) -> None:
        """Type, range, list-item and missing-field problems come together."""
        found = self.SPEC.problems({"size": 0, "names": ["a", 3]})

        assert [str(p) for p in found] == [
            "url: missing (e.g. redis://host)",
            "size: expected an integer >= 1, got 0",
            "names[1]: expected a non-empty string, got 3",
        ]
        assert found[2].path == ("names", 1)

    def test_a_misspelt_required_field_is_reported_once(self) -> None:
        """`ulr` instead of `url` is one problem, not "unknown" plus "missing"."""
        found = self.SPEC.problems({"ulr": "redis://host"})

        assert [str(p) for p in found] == ["ulr: unknown field; did you mean 'url'?"]

    def test_a_key_written_without_its_tag_is_told_to_add_ref(self) -> None:
        """A plain string where a ref belongs says exactly what to write."""
        found = self.SPEC.problems({"url": "u", "clients": "duct.memory/clients"})

        assert str(found[0]) == (
            "clients: expected a !ref to duct.memory/clients, got the plain "
            "string 'duct.memory/clients'; write `!ref duct.memory/clients`"
        )

    def test_refs_and_python_objects_pass(self) -> None:
        """Refs are resolved later, and objects from Python configs are kept."""
        value = {"url": Ref("app/url"), "size": Ref("app/size"), "clients": object()}

        assert self.SPEC.problems(value) == []

    def test_a_string_where_a_list_belongs_says_how_to_write_the_list(self) -> None:
        """`names: a` is not read character by character; the fix is shown."""
        found = self.SPEC.problems({"url": "u", "names": "abc"})

        assert "write [abc] for a list of one" in str(found[0])

    def test_a_schema_raises_with_each_problem_located(self) -> None:
        """`as_schema` gives the system one located item per problem."""
        schema = as_schema(self.SPEC)

        with pytest.raises(ConfigFieldError) as caught:
            schema({"url": "u", "size": "x"})

        assert caught.value.errors() == [
            {"loc": ("size",), "msg": "expected an integer >= 1, got 'x'"}
        ]
        assert isinstance(caught.value, ValueError)


class TestRoutingFields:
    def test_misspelt_routing_fields_are_refused(self) -> None:
        """Typos in a topic schema, publish, a target and retry are all named."""
        routing = _routing(
            topics={"orders": {"schema": {"canonicl": ["map"]}, "retyr": {}}},
            publish={
                "orders": {"targets": [{"client": "main", "kafka_topc": "x"}]},
                "audit": {"tragets": [{"client": "main"}]},
            },
        )
        routing["topics"]["audit"] = {}
        routing["subscriptions"]["worker"]["retry"] = {"max_attemps": 2}

        found = list(routing_problems(routing))

        assert found == [
            "topics.orders.schema.canonicl: unknown schema field; "
            "did you mean 'canonical'?",
            "topics.orders.retyr: unknown topic setting; did you mean 'retry'? "
            "Other keys of a topic are free metadata: rename it if it is metadata",
            "publish.orders.targets[0].kafka_topc: unknown target option; "
            "did you mean 'kafka_topic'?",
            "publish.audit.tragets: unknown publish field; did you mean 'targets'?",
            "subscriptions.worker.retry.max_attemps: unknown retry field; "
            "did you mean 'max_attempts'?",
        ]

    def test_other_topic_keys_stay_free_metadata(self) -> None:
        """Topic keys far from every setting pass as metadata."""
        routing = _routing(
            topics={"orders": {"relationship": "both", "kafka_topic": "core"}}
        )

        assert list(routing_problems(routing)) == []

    def test_wrong_types_are_refused_before_init(self) -> None:
        """retry, options and deadletter of the wrong type are reported, not raised."""
        routing = _worker(retry=5, options=5, deadletter=123, concurrency="2")

        found = list(routing_problems(routing))

        assert found == [
            "subscriptions.worker.options: expected a mapping of transport "
            "options, got 5",
            "subscriptions.worker.deadletter: expected a mapping such as "
            "{topic: '{topic}.dl'}, got 123",
            "subscriptions.worker.retry: expected a mapping such as "
            "{max_attempts: 3}, got 5",
            "subscriptions.worker.concurrency: expected an integer >= 1, got '2'",
        ]

    def test_retry_fields_are_checked(self) -> None:
        """max_attempts, backoff and non_retriable each name their problem."""
        routing = _worker(
            retry={
                "max_attempts": "x",
                "backoff": {"jitter": 2, "initial_ms": "1s"},
                "non_retriable": "ValueError",
            }
        )

        found = list(routing_problems(routing))

        assert found == [
            "subscriptions.worker.retry.max_attempts: expected an integer >= 1, "
            "got 'x'",
            "subscriptions.worker.retry.backoff.initial_ms: expected a number "
            ">= 0, got '1s'",
            "subscriptions.worker.retry.backoff.jitter: expected a number from "
            "0 to 1, got 2",
            "subscriptions.worker.retry.non_retriable: expected a list of "
            "exception types (builtin names or import paths), got 'ValueError'; "
            "write [ValueError] for a list of one",
        ]

    def test_each_failing_non_retriable_entry_is_named(self) -> None:
        """A failed import or a non-exception names its entry and its path."""
        routing = _worker(
            retry={
                "non_retriable": [
                    "ValueError",
                    "no_such_module_here:Boom",
                    "json:dumps",
                    "ValuError",
                ]
            }
        )

        found = list(routing_problems(routing))

        assert found == [
            "subscriptions.worker.retry.non_retriable[1]: cannot import "
            "'no_such_module_here:Boom': No module named 'no_such_module_here'",
            "subscriptions.worker.retry.non_retriable[2]: 'json:dumps' is a "
            "function, not an exception type",
            "subscriptions.worker.retry.non_retriable[3]: 'ValuError' is not a "
            "builtin exception; did you mean 'ValueError'? Other exceptions need "
            "an import path like 'my_app.errors:Rejected'",
        ]

    def test_deadletter_and_defaults_sections_are_checked(self) -> None:
        """Dead-letter topic templates and defaults fields are validated."""
        routing = _routing(
            defaults={
                "retry": {"max_attempts": 2},
                "deadletter": {"topik": "x"},
                "codec": "json",
            }
        )
        routing["subscriptions"]["worker"]["deadletter"] = {"topic": "{topc}.dl"}

        found = list(routing_problems(routing))

        assert found == [
            "defaults.deadletter.topik: unknown dead-letter field; "
            "did you mean 'topic'?",
            "defaults.codec: unknown defaults field; expected one of deadletter, retry",
            "subscriptions.worker.deadletter.topic: '{topc}.dl' is not a valid "
            "template: unknown placeholder {topc}; did you mean {topic}?",
        ]

    def test_build_routing_refuses_what_the_check_refuses(self) -> None:
        """A routing built in Python gets the same problems, not a TypeError."""
        with pytest.raises(ValueError, match=r"retry: expected a mapping"):
            build_routing(_worker(retry=5))

    def test_problems_point_into_the_side_that_wrote_them(self) -> None:
        """With default_routing + overrides, each path names its side."""
        value = {
            "default_routing": _worker(retry={"max_attemps": 2}),
            "overrides": {"subscriptions": {"worker": {"concurrency": 0}}},
            "topics": {},
        }

        found = list(routing_problems(value))

        assert found == [
            "topics: unknown field next to default_routing and overrides; "
            "move it under one of them",
            "default_routing.subscriptions.worker.retry.max_attemps: unknown "
            "retry field; did you mean 'max_attempts'?",
            "overrides.subscriptions.worker.concurrency: expected an integer "
            ">= 1, got 0",
        ]

    def test_target_options_cover_every_option_a_transport_reads(self) -> None:
        """Each `target.option(...)` the transports read is a known target option."""
        read: set[str] = set()
        for source in (ROOT / "duct_messaging" / "transports").glob("*.py"):
            code = source.read_text()
            read.update(re.findall(r"target\.options?(?:\.get)?\(\"(\w+)\"", code))

        assert read
        assert read <= set(TARGET_OPTIONS)


class TestRetryPolicy:
    def test_a_string_non_retriable_is_refused_not_iterated(self) -> None:
        """`non_retriable: ValueError` fails clearly instead of per character."""
        with pytest.raises(RetryConfigError, match=r"write \[ValueError\]"):
            RetryPolicy.from_config({"non_retriable": "ValueError"})

    def test_a_list_of_exception_types_builds(self) -> None:
        """Builtin names and import paths both resolve."""
        policy = RetryPolicy.from_config(
            {"non_retriable": ["ValueError", "json:JSONDecodeError"]}
        )

        assert policy.non_retriable[0] is ValueError
        assert policy.non_retriable[1].__name__ == "JSONDecodeError"


def _memory(**extra: Any) -> dict[str, Any]:
    """Return a good in-memory system config, with keys added or replaced."""
    config: dict[str, Any] = {
        "duct.memory/clients": {"main": {}},
        "duct.memory/producers": {"clients": Ref("duct.memory/clients")},
        "duct.messaging/producers": [Ref("duct.memory/producers")],
        "duct.messaging/routing": _routing(),
        "duct.messaging/producer": {
            "routing": Ref("duct.messaging/routing"),
            "producers": Ref("duct.messaging/producers"),
        },
        "duct.memory/consumers": {
            "clients": Ref("duct.memory/clients"),
            "routing": Ref("duct.messaging/routing"),
        },
    }
    config.update(extra)
    return config


class TestMessagingComponents:
    def test_the_good_config_has_no_problems(self) -> None:
        """The base config every other test breaks is itself clean."""
        assert problems_of(_memory()) == []

    def test_plain_strings_where_refs_belong_are_refused(self) -> None:
        """producers, producer.routing and consumers.clients need `!ref`."""
        config = _memory(
            **{
                "duct.messaging/producers": ["duct.memory/producers"],
                "duct.memory/producers": {"clients": "duct.memory/clients"},
            }
        )
        config["duct.messaging/producer"]["routing"] = "duct.messaging/routing"
        config["duct.memory/consumers"]["clients"] = "main"

        found = problems_of(config)

        assert found == [
            "duct.memory/producers.clients: expected a !ref to "
            "duct.memory/clients, got the plain string 'duct.memory/clients'; "
            "write `!ref duct.memory/clients`",
            "duct.messaging/producers[0]: expected a !ref to a transport's "
            "producers (duct.<transport>/producers), got the plain string "
            "'duct.memory/producers'; write `!ref duct.memory/producers`",
            "duct.messaging/producer.routing: expected a !ref to "
            "duct.messaging/routing, got the plain string "
            "'duct.messaging/routing'; write `!ref duct.messaging/routing`",
            "duct.memory/consumers.clients: expected a !ref to "
            "duct.memory/clients, got the plain string 'main'; "
            "write `!ref duct.memory/clients`",
        ]

    def test_misspelt_settings_are_refused(self) -> None:
        """Typos on the producer, consumers, clients and producers are named."""
        config = _memory()
        config["duct.memory/clients"]["main"] = {"bogus_setting": 1}
        config["duct.memory/producers"]["extra_field"] = 1
        config["duct.messaging/producer"]["deferd"] = Ref("duct.messaging/routing")
        config["duct.memory/consumers"].update(drain_timout_s=5, batch_sise=10)

        found = problems_of(config)

        assert found == [
            "duct.memory/clients.main.bogus_setting: unknown setting. A memory "
            "client takes no settings: write `name: {}`",
            "duct.memory/producers.extra_field: unknown field; expected one of clients",
            "duct.messaging/producer.deferd: unknown field; did you mean 'deferred'?",
            "duct.memory/consumers.drain_timout_s: unknown field; did you mean "
            "'drain_timeout_s'?",
            "duct.memory/consumers.batch_sise: unknown field; did you mean "
            "'batch_size'?",
        ]

    def test_missing_and_mistyped_consumer_settings(self) -> None:
        """Required refs, numbers and the sources list are checked."""
        config = _memory()
        config["duct.memory/consumers"] = {
            "clients": Ref("duct.memory/clients"),
            "batch_size": 0,
            "sources": "kafka",
        }

        found = problems_of(config)

        assert found == [
            "duct.memory/consumers.routing: missing (use !ref duct.messaging/routing)",
            "duct.memory/consumers.batch_size: expected an integer >= 1, got 0",
            "duct.memory/consumers.sources: expected a list of source names, "
            "got 'kafka'; write [kafka] for a list of one",
        ]

    def test_tracing_takes_a_boolean(self) -> None:
        """`opentelemetry: yes-please` is refused."""
        found = problems_of({"duct.messaging/tracing": {"opentelemetry": "on"}})

        assert found == [
            "duct.messaging/tracing.opentelemetry: expected true or false, got 'on'"
        ]

    def test_routing_sections_given_as_refs_are_still_checked(self) -> None:
        """A routing whose sections are refs is checked once the refs are followed."""
        config = _memory(
            **{
                "app/routing": _worker(retry={"max_attemps": 2}),
                "duct.messaging/routing": {
                    "default_routing": Ref("app/routing"),
                    "overrides": {},
                },
            }
        )

        found = problems_of(config)

        assert found == [
            "duct.messaging/routing: default_routing.subscriptions.worker.retry."
            "max_attemps: unknown retry field; did you mean 'max_attempts'?"
        ]


class TestTransportClients:
    def test_redis_client_settings(self) -> None:
        """A misspelt Redis setting and a missing url are both named."""
        found = problems_of(
            {
                "duct.redis/clients": {
                    "cache": {"url": "redis://127.0.0.1:6379/0", "claim_idl_ms": 1},
                    "other": {"maxlen": -1},
                }
            }
        )

        assert found == [
            "duct.redis/clients.cache.claim_idl_ms: unknown Redis client "
            "setting; did you mean 'claim_idle_ms'?",
            "duct.redis/clients.other.url: missing (e.g. redis://127.0.0.1:6379/0)",
            "duct.redis/clients.other.maxlen: expected an integer >= 0, got -1",
        ]

    def test_kafka_settings_pass_through_but_role_maps_are_checked(self) -> None:
        """librdkafka settings are free; producer/consumer/topics are ours."""
        found = problems_of(
            {
                "duct.kafka/clients": {
                    "good": {
                        "bootstrap_servers": "127.0.0.1:9092",
                        "client_id": "app",
                        "consumer": {"session_timeout_ms": 6000},
                        "topics": {"partitions": 2},
                    },
                    "bad": {
                        "bootstrap_server": "127.0.0.1:9092",
                        "consumer": "fast",
                        "topics": {"partitons": 2},
                        "linger_ms": [5],
                    },
                }
            }
        )

        assert found == [
            "duct.kafka/clients.bad.consumer: expected a mapping of librdkafka "
            "settings, got 'fast'",
            "duct.kafka/clients.bad.topics.partitons: unknown topics setting; "
            "did you mean 'partitions'?",
            "duct.kafka/clients.bad.bootstrap_server: unknown client setting; "
            "did you mean 'bootstrap_servers'?",
            "duct.kafka/clients.bad.linger_ms: expected a librdkafka setting (a "
            "string, number or boolean), got a list",
            "duct.kafka/clients.bad.bootstrap_servers: missing (e.g. 127.0.0.1:9092)",
        ]

    def test_nats_client_and_stream_settings(self) -> None:
        """Servers, stream fields and their enums are checked."""
        found = problems_of(
            {
                "duct.nats/clients": {
                    "main": {
                        "servers": 4222,
                        "streams": {
                            "ORDERS": {"subjects": "orders.>", "storage": "disk"},
                            "AUDIT": {"subjects": ["audit.>"], "max_age": 60},
                        },
                    }
                }
            }
        )

        assert found == [
            "duct.nats/clients.main.servers: expected a server URL or a list of "
            "them, got 4222",
            "duct.nats/clients.main.streams.ORDERS.subjects: expected a non-empty "
            "list of strings, got 'orders.>'; write [orders.>] for a list of one",
            "duct.nats/clients.main.streams.ORDERS.storage: expected one of file, "
            "memory, got 'disk'",
            "duct.nats/clients.main.streams.AUDIT.max_age: unknown stream field; "
            "did you mean 'max_age_s'?",
        ]

    def test_every_nats_stream_field_has_a_kind(self) -> None:
        """The stream spec and the StreamConfig mapping name the same fields."""
        from duct_messaging.transports.nats import STREAM_FIELDS, STREAM_SPEC

        assert set(STREAM_SPEC) == set(STREAM_FIELDS)

    def test_rabbitmq_client_settings(self) -> None:
        """An exchange type typo gets a suggestion."""
        found = problems_of(
            {
                "duct.rabbitmq/clients": {
                    "main": {"url": "amqp://127.0.0.1/", "exchange_type": "topc"}
                }
            }
        )

        assert found == [
            "duct.rabbitmq/clients.main.exchange_type: expected one of fanout, "
            "direct, topic, headers, x-delayed-message, x-consistent-hash, "
            "x-modulus-hash, got 'topc'; did you mean 'topic'?"
        ]


class TestSinksAndDeferred:
    def test_dead_letter_sinks_refuse_typos_and_plain_strings(self) -> None:
        """Storage, hybrid, producer and postgres sinks check every field."""
        found = problems_of(
            {
                "duct.deadletter/storage": {"directory": "var/dl", "fsnyc": True},
                "duct.deadletter/hybrid": {
                    "storage": "duct.deadletter/storage",
                    "producer": Ref("duct.deadletter/storage"),
                },
                "duct.deadletter/postgres": {"conninfo": "postgresql://x", "tabel": 1},
                "duct.deadletter/logger": {"level": "error"},
            }
        )

        assert found == [
            "duct.deadletter/storage.fsnyc: unknown field; did you mean 'fsync'?",
            "duct.deadletter/hybrid.storage: expected a !ref to a dead-letter "
            "sink (duct.deadletter/*), got the plain string "
            "'duct.deadletter/storage'; write `!ref duct.deadletter/storage`",
            "duct.deadletter/postgres.tabel: unknown field; did you mean 'table'?",
            "duct.deadletter/logger.level: unknown setting. The logger sink takes "
            "no settings: write {}",
        ]

    def test_deferred_refuses_unknown_settings_and_plain_producers(self) -> None:
        """The scheduler's settings get "did you mean" and a `!ref` check."""
        found = problems_of(
            {
                "duct.messaging/deferred": {
                    "producers": "duct.messaging/producers",
                    "store": {"sqlite": "x.sqlite"},
                    "lease": 5,
                }
            }
        )

        assert found == [
            "duct.messaging/deferred: lease: unknown setting; did you mean "
            "'lease_s'? known: producers, store, allow_memory_store, concurrency, "
            "lease_s, poll_interval_s, grace_s, halt_timeout_s, delivery, "
            "deadletter",
            "duct.messaging/deferred: producers: expected a !ref to "
            "duct.messaging/producers, got the plain string "
            "'duct.messaging/producers'; write `!ref duct.messaging/producers`",
        ]


BAD_CONFIG = """\
duct.memory/clients:
  main: {bogus_setting: 1}
duct.redis/clients:
  cache: {url: "redis://127.0.0.1:6379/0", claim_idl_ms: 100}
duct.redis/producers: {clients: duct.redis/clients}
duct.memory/producers: {clients: !ref duct.memory/clients}
duct.messaging/producers: [duct.memory/producers]
duct.messaging/routing:
  topics:
    orders:
      schema: {canonicl: [map, [id, uuid]]}
  publish:
    orders:
      targets:
        - {client: main, kafka_topc: x, strem: y}
  subscriptions:
    worker:
      topic: orders
      source: memory
      client: main
      handler: tests.test_config_validation:on_order
      retry:
        max_attemps: 2
        non_retriable: ValueError
      options: 5
duct.messaging/producer:
  routing: duct.messaging/routing
  producers: !ref duct.messaging/producers
  deferd: true
duct.memory/consumers:
  clients: !ref duct.memory/clients
  routing: !ref duct.messaging/routing
  drain_timout_s: 5
"""


class TestCheckCommand:
    def test_check_lists_every_mistake_with_its_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`duct-messaging check` reports all the mistakes at once and exits 1."""
        config = tmp_path / "bad.yaml"
        config.write_text(BAD_CONFIG)

        code = main(["check", str(config)])

        err = capsys.readouterr().err.splitlines()
        assert code == 1
        assert err == [
            f"{config}: 13 problems",
            "  - duct.memory/clients.main.bogus_setting: unknown setting. A "
            f"memory client takes no settings: write `name: {{}}` [{config}:2]",
            "  - duct.redis/clients.cache.claim_idl_ms: unknown Redis client "
            f"setting; did you mean 'claim_idle_ms'? [{config}:4]",
            "  - duct.redis/producers.clients: expected a !ref to "
            "duct.redis/clients, got the plain string 'duct.redis/clients'; "
            f"write `!ref duct.redis/clients` [{config}:5]",
            "  - duct.messaging/producers[0]: expected a !ref to a transport's "
            "producers (duct.<transport>/producers), got the plain string "
            "'duct.memory/producers'; write `!ref duct.memory/producers` "
            f"[{config}:7]",
            "  - duct.messaging/routing.topics.orders.schema.canonicl: unknown "
            f"schema field; did you mean 'canonical'? [{config}:11]",
            "  - duct.messaging/routing.publish.orders.targets[0].kafka_topc: "
            f"unknown target option; did you mean 'kafka_topic'? [{config}:15]",
            "  - duct.messaging/routing.publish.orders.targets[0].strem: unknown "
            f"target option; did you mean 'stream'? [{config}:15]",
            "  - duct.messaging/routing.subscriptions.worker.options: expected a "
            f"mapping of transport options, got 5 [{config}:25]",
            "  - duct.messaging/routing.subscriptions.worker.retry.non_retriable: "
            "expected a list of exception types (builtin names or import paths), "
            f"got 'ValueError'; write [ValueError] for a list of one [{config}:24]",
            "  - duct.messaging/routing.subscriptions.worker.retry.max_attemps: "
            f"unknown retry field; did you mean 'max_attempts'? [{config}:23]",
            "  - duct.messaging/producer.routing: expected a !ref to "
            "duct.messaging/routing, got the plain string "
            "'duct.messaging/routing'; write `!ref duct.messaging/routing` "
            f"[{config}:27]",
            "  - duct.messaging/producer.deferd: unknown field; did you mean "
            f"'deferred'? [{config}:29]",
            "  - duct.memory/consumers.drain_timout_s: unknown field; did you "
            f"mean 'drain_timeout_s'? [{config}:33]",
        ]

    def test_routing_problems_point_into_an_included_file(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A mistake in an included routing file is shown at that file's line."""
        (tmp_path / "routing.yaml").write_text(
            textwrap.dedent(
                """\
                topics:
                  orders:
                    retry: {max_attempts: 0}
                """
            )
        )
        config = tmp_path / "system.yaml"
        config.write_text(
            "duct.messaging/routing:\n"
            "  default_routing: !include routing.yaml\n"
            "  overrides: {}\n"
        )

        code = main(["check", str(config)])

        err = capsys.readouterr().err.splitlines()
        assert code == 1
        assert err[1] == (
            "  - duct.messaging/routing.default_routing.topics.orders.retry."
            "max_attempts: expected an integer >= 1, got 0 "
            f"[{tmp_path / 'routing.yaml'}:3]"
        )

    @pytest.mark.parametrize(
        "example",
        [
            "examples/orders/config.yaml",
            "examples/orders/config.kafka.yaml",
            "examples/multi_transport/config.yaml",
        ],
    )
    def test_the_examples_check_clean(self, example: str) -> None:
        """The shipped example configs pass every check."""
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP_1": "127.0.0.1:19092",
            "KAFKA_BOOTSTRAP_2": "127.0.0.1:19093",
        }

        result = subprocess.run(
            [sys.executable, "-m", "duct_messaging.cli", "check", example],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"ok: {example}")


def test_yaml_config_with_refs_reads_clean() -> None:
    """A YAML config written with `!ref` everywhere has no problems."""
    config = read_config(
        textwrap.dedent(
            """\
            duct.memory/clients: {main: {}}
            duct.memory/producers: {clients: !ref duct.memory/clients}
            duct.messaging/producers: [!ref duct.memory/producers]
            duct.messaging/tracing: {opentelemetry: false}
            duct.deadletter/logger: {}
            """
        )
    )

    assert check_config(config) == []
