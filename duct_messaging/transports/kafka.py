"""The Kafka transport, on confluent-kafka (librdkafka).

Clients are named clusters, each with its own `bootstrap.servers` and any
librdkafka setting passed through (config keys are snake_case in YAML and
become librdkafka's dotted names: `bootstrap_servers` -> `bootstrap.servers`).
Optional `producer:` and `consumer:` maps hold settings for one role only.

Producing: one librdkafka producer per client, polled by a background
thread that resolves delivery reports on the event loop in batches.
Consuming: one librdkafka consumer per subscription, driven from a single
worker thread; batches of up to `batch_size` cross to the event loop. Offsets
are committed exactly for finished messages, per partition, never past an
unfinished one: periodically, on partition revocation and on stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from duct_messaging.errors import MissingExtraError
from duct_messaging.messaging._config_check import (
    Checked,
    ConfigPath,
    FieldProblem,
    Fields,
    MapOf,
    Scalar,
    as_schema,
    boolean,
    integer,
    number,
    scalar,
    text,
)
from duct_messaging.messaging.components import (
    consumer_settings,
    consumers_problems,
    consumers_spec,
    producers_spec,
)
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import CheckContext, component
from duct_messaging.transports._shared import clients_spec

try:
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AdminClient,
        NewTopic,
    )
except ImportError as exc:  # tests/transports/test_kafka_extra.py
    raise MissingExtraError("The Kafka transport", "kafka", "confluent-kafka") from exc

# The producer and source modules import confluent-kafka themselves, so they
# come after the check above: a missing extra then reads as MissingExtraError.
from duct_messaging.transports._kafka_producer import (
    TRANSPORT,
    KafkaProducer,
    KafkaTransportError,
)
from duct_messaging.transports._kafka_source import COMMIT_INTERVAL_S, KafkaSource

__all__ = [
    "KafkaClient",
    "KafkaProducer",
    "KafkaSource",
    "KafkaTransportError",
    "clients_problems",
    "librdkafka_settings",
    "make_runtime",
]

KAFKA_CONSUMER_SETTINGS = ("commit_interval_s", "keepalive_after_s", "revoke_timeout_s")
CLIENT_ROLE_KEYS = ("producer", "consumer", "admin", "topics")
CONSUMER_DEFAULTS = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 5,
}


def librdkafka_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return librdkafka settings from snake_case config keys.

    librdkafka property names never contain underscores, so every `_`
    becomes `.`; dotted keys pass through unchanged.
    """
    return {str(k).replace("_", "."): v for k, v in settings.items()}


@dataclass(slots=True)
class KafkaClient:
    """One named Kafka cluster: its common and per-role settings."""

    name: str
    settings: dict[str, Any]
    producer_settings: dict[str, Any] = field(default_factory=dict)
    consumer_settings: dict[str, Any] = field(default_factory=dict)
    topics: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, config: Mapping[str, Any] | None) -> KafkaClient:
        """Build a client from its config map (see the module docstring)."""
        config = dict(config or {})
        role = {k: config.pop(k, None) or {} for k in CLIENT_ROLE_KEYS}
        return cls(
            name=name,
            settings=librdkafka_settings(config),
            producer_settings=librdkafka_settings(role["producer"]),
            consumer_settings=librdkafka_settings(role["consumer"]),
            topics=dict(role["topics"]),
        )

    @property
    def bootstrap_servers(self) -> str:
        """Return the cluster's bootstrap servers."""
        return str(self.settings.get("bootstrap.servers", ""))

    def producer_config(self) -> dict[str, Any]:
        """Return the librdkafka config for this cluster's producer."""
        return {**self.settings, **self.producer_settings}

    def consumer_config(
        self, group_id: str, extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Return the librdkafka config for one consumer of `group_id`."""
        return {
            **CONSUMER_DEFAULTS,
            **self.settings,
            **self.consumer_settings,
            **librdkafka_settings(extra),
            "group.id": group_id,
        }

    def new_topic(self, topic: str, partitions: int | None = None) -> NewTopic:
        """Return the topic `ensure_topic` creates for `topic`.

        Partitions: `partitions`, else `topics.partitions` (default 1).
        Replication: `topics.replication_factor`, else the broker's own
        `default.replication.factor` (asked for with -1, KIP-464).
        """
        count = partitions or int(self.topics.get("partitions", 1))
        replication = int(self.topics.get("replication_factor", -1))
        return NewTopic(topic, count, replication)

    def ensure_topic(self, topic: str, partitions: int | None = None) -> None:
        """Create `topic` if it does not exist (an existing one is left as is)."""
        admin = AdminClient(self.settings)
        new = self.new_topic(topic, partitions)
        futures = admin.create_topics([new], request_timeout=10)
        for future in futures.values():
            try:
                future.result(timeout=10)
            except KafkaException as exc:
                code = exc.args[0].code()
                if code == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                if code == KafkaError.INVALID_REPLICATION_FACTOR:
                    raise KafkaTransportError(
                        "topic creation",
                        self.name,
                        topic,
                        f"the broker refused replication factor "
                        f"{new.replication_factor} ({exc.args[0].str()})",
                        "Set topics.replication_factor on the client to a "
                        "factor the cluster supports (brokers before Kafka 2.4 "
                        "need an explicit one), or create the topic yourself.",
                    ) from exc
                raise


_LIBRDKAFKA = scalar("a librdkafka setting (a string, number or boolean)")
_ROLE = MapOf(_LIBRDKAFKA, expected="a mapping of librdkafka settings")

#: A Kafka client: librdkafka settings pass through as they are (their
#: names are librdkafka's, not checked here); the role maps and `topics`
#: are ours.
CLIENT = Fields(
    {
        "bootstrap_servers": text(),
        "bootstrap.servers": text(),
        "producer": _ROLE,
        "consumer": _ROLE,
        "admin": _ROLE,
        "topics": Fields(
            {
                "partitions": integer(minimum=1),
                "replication_factor": Scalar(
                    "an integer >= 1, or -1 for the broker's default",
                    lambda v: type(v) is int and (v >= 1 or v == -1),
                ),
                "auto_create": boolean(),
            },
            noun="topics setting",
        ),
    },
    extra=_LIBRDKAFKA,
    typo_cutoff=0.8,
    noun="client setting",
    nullable=False,
)


def clients_problems(value: Any) -> list[str]:
    """Return the problems of a Kafka clients config, each with its path."""
    return [str(problem) for problem in CLIENTS.problems(value)]


def _bootstrap_problems(config: Any, path: ConfigPath) -> Iterator[FieldProblem]:
    if not (config.get("bootstrap_servers") or config.get("bootstrap.servers")):
        yield FieldProblem(
            (*path, "bootstrap_servers"), "missing (e.g. 127.0.0.1:9092)"
        )


CLIENTS = clients_spec(Checked(CLIENT, _bootstrap_problems))


def make_runtime(
    clients: Mapping[str, KafkaClient],
    routing: Routing,
    *,
    sources: Sequence[str] = (TRANSPORT,),
    commit_interval_s: float = COMMIT_INTERVAL_S,
    keepalive_after_s: float | None = None,
    revoke_timeout_s: float | None = None,
    **settings: Any,
) -> ConsumerRuntime:
    """Return a consumer runtime serving `sources` from Kafka clusters.

    `settings` go to `ConsumerRuntime` (`sink`, `batch_size`,
    `drain_timeout_s`, `start_timeout_s`); the others tune `KafkaSource`.
    """

    def make_source(subscription: Subscription) -> KafkaSource:
        topic = routing.consumer_destination(subscription, "kafka_topic")
        return KafkaSource(
            clients[subscription.client],
            subscription,
            topic,
            commit_interval_s=commit_interval_s,
            keepalive_after_s=keepalive_after_s,
            revoke_timeout_s=revoke_timeout_s,
        )

    return ConsumerRuntime(TRANSPORT, routing, make_source, sources=sources, **settings)


@component("duct.kafka/clients", schema=as_schema(CLIENTS))
def clients(value: Mapping[str, Any]) -> dict[str, KafkaClient]:
    """Return one `KafkaClient` per named cluster."""
    return {
        name: KafkaClient.from_config(name, config) for name, config in value.items()
    }


@component("duct.kafka/producers", schema=as_schema(producers_spec(TRANSPORT)))
async def producers(value: Mapping[str, Any]) -> dict[str, KafkaProducer]:
    """Return one producer per Kafka cluster, by client name."""
    loop = asyncio.get_running_loop()
    return {
        name: KafkaProducer(client, loop) for name, client in value["clients"].items()
    }


@producers.halt
async def _halt_producers(registry: Mapping[str, KafkaProducer]) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.gather(
        *(loop.run_in_executor(None, p.close) for p in registry.values())
    )


CONSUMERS = consumers_spec(
    TRANSPORT,
    {name: number(minimum=0, nullable=True) for name in KAFKA_CONSUMER_SETTINGS},
)


@component("duct.kafka/consumers", schema=as_schema(CONSUMERS))
async def consumers(value: Mapping[str, Any]) -> ConsumerRuntime:
    """Start the subscriptions whose `source` is `kafka` (or `sources`).

    Value: `clients`, `routing`, optional `deadletter` (a sink, e.g.
    `!ref duct.deadletter/storage`; logged by default), `batch_size`,
    `drain_timeout_s` (how long halt lets running handlers finish),
    `start_timeout_s`, `commit_interval_s`, `keepalive_after_s`,
    `revoke_timeout_s` (see `KafkaSource`) and `sources`.
    """
    settings = consumer_settings(value)
    for name in KAFKA_CONSUMER_SETTINGS:
        if value.get(name) is not None:
            settings[name] = float(value[name])
    runtime = make_runtime(value["clients"], value["routing"], **settings)
    await runtime.start()
    return runtime


@consumers.halt
async def _halt_consumers(runtime: ConsumerRuntime) -> None:
    await runtime.stop()


@consumers.check
def _check_consumers(value: Any, ctx: CheckContext) -> Iterator[str]:
    yield from consumers_problems(value, ctx, TRANSPORT)
