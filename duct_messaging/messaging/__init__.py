"""Messaging: routing, codecs, schemas, tracing, producers and consumers.

The names a service usually needs are importable from here; the component
keys that build them are documented in the README.
"""

from __future__ import annotations

from duct_messaging.messaging._deferred_options import (
    DeferredNotConfiguredError,
    DeferredOptionError,
)
from duct_messaging.messaging.codecs import DecodeError, EncodeError
from duct_messaging.messaging.consumer import MessageContext
from duct_messaging.messaging.deadletter import DeadLetter, DeadLetterStatus
from duct_messaging.messaging.producer import (
    DeferredReceipt,
    Producer,
    PublishError,
    UnknownClientError,
)
from duct_messaging.messaging.routing import (
    Routing,
    RoutingError,
    Subscription,
    Topic,
    UnknownTopicError,
)
from duct_messaging.messaging.schemas import SchemaConfigError, SchemaValidationError
from duct_messaging.transports.base import Receipt, Target

__all__ = [
    "DeadLetter",
    "DeadLetterStatus",
    "DecodeError",
    "DeferredNotConfiguredError",
    "DeferredOptionError",
    "DeferredReceipt",
    "EncodeError",
    "MessageContext",
    "Producer",
    "PublishError",
    "Receipt",
    "Routing",
    "RoutingError",
    "SchemaConfigError",
    "SchemaValidationError",
    "Subscription",
    "Target",
    "Topic",
    "UnknownClientError",
    "UnknownTopicError",
]
