"""The built-in component keys, each imported only when a config uses it.

Importing a transport module needs its client library (an optional extra),
so nothing here imports one eagerly.
"""

from __future__ import annotations

from duct_messaging.system import register_lazy

BUILTIN_KEYS = {
    "duct.messaging/routing": "duct_messaging.messaging.components",
    "duct.messaging/producers": "duct_messaging.messaging.components",
    "duct.messaging/producer": "duct_messaging.messaging.components",
    "duct.messaging/tracing": "duct_messaging.messaging.components",
    "duct.messaging/deferred": "duct_messaging.messaging.deferred",
    "duct.deadletter/logger": "duct_messaging.messaging.deadletter_sinks",
    "duct.deadletter/storage": "duct_messaging.messaging.deadletter_sinks",
    "duct.deadletter/producer": "duct_messaging.messaging.deadletter_sinks",
    "duct.deadletter/hybrid": "duct_messaging.messaging.deadletter_sinks",
    "duct.deadletter/postgres": "duct_messaging.messaging._deadletter_postgres",
    "duct.memory/clients": "duct_messaging.transports.memory",
    "duct.memory/producers": "duct_messaging.transports.memory",
    "duct.memory/consumers": "duct_messaging.transports.memory",
    "duct.kafka/clients": "duct_messaging.transports.kafka",
    "duct.kafka/producers": "duct_messaging.transports.kafka",
    "duct.kafka/consumers": "duct_messaging.transports.kafka",
    "duct.redis/clients": "duct_messaging.transports.redis_streams",
    "duct.redis/producers": "duct_messaging.transports.redis_streams",
    "duct.redis/consumers": "duct_messaging.transports.redis_streams",
    "duct.nats/clients": "duct_messaging.transports.nats",
    "duct.nats/producers": "duct_messaging.transports.nats",
    "duct.nats/consumers": "duct_messaging.transports.nats",
    "duct.rabbitmq/clients": "duct_messaging.transports.rabbitmq",
    "duct.rabbitmq/producers": "duct_messaging.transports.rabbitmq",
    "duct.rabbitmq/consumers": "duct_messaging.transports.rabbitmq",
}


def register_builtins() -> None:
    """Make every built-in key known to the component registry."""
    for key, module in BUILTIN_KEYS.items():
        register_lazy(key, module)
