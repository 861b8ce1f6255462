"""Pieces the broker transports share: consumers, client specs, options.

Each transport module registers `duct.<transport>/consumers` through
`consumers_component`, so the start, drain-on-halt and config check of a
consumers component read the same everywhere; the transport only says how
to build its runtime.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from duct_messaging.messaging._config_check import ANY, Kind, MapOf, as_schema
from duct_messaging.messaging.components import (
    consumer_settings,
    consumers_problems,
    consumers_spec,
)
from duct_messaging.messaging.consumer import ConsumerRuntime
from duct_messaging.messaging.routing import Routing, Subscription
from duct_messaging.system import CheckContext, Component, component

# Header that carries a message key on transports with no key of their own
# (NATS, RabbitMQ). Only UTF-8 keys travel; the key is informational there,
# since these brokers do not partition by it.
KEY_HEADER = "x-key"

RuntimeFactory = Callable[..., ConsumerRuntime]


def consumers_component(
    transport: str,
    make_runtime: RuntimeFactory,
    *,
    extra_settings: Sequence[str] = (),
) -> Component:
    """Register `duct.<transport>/consumers` and return the component.

    Init builds the runtime with `make_runtime(clients, routing, **settings)`
    and starts every subscription whose `source` it serves; halt stops intake
    and drains in-flight handlers; the schema checks every field and the
    check reports unknown clients before anything starts. `extra_settings`
    names value keys passed to `make_runtime` as they are.
    """
    spec = consumers_spec(transport, dict.fromkeys(extra_settings, ANY))

    @component(f"duct.{transport}/consumers", schema=as_schema(spec))
    async def consumers(value: Mapping[str, Any]) -> ConsumerRuntime:
        settings = consumer_settings(value)
        settings.update((k, value[k]) for k in extra_settings if k in value)
        runtime = make_runtime(value["clients"], value["routing"], **settings)
        await runtime.start()
        return runtime

    consumers.init_fn.__doc__ = (
        f"Start the subscriptions whose `source` is `{transport}` (or `sources`)."
    )

    @consumers.halt
    async def _halt(runtime: ConsumerRuntime) -> None:
        await runtime.stop()

    @consumers.check
    def _check(value: Any, ctx: CheckContext) -> Iterator[str]:
        yield from consumers_problems(value, ctx, transport)

    return consumers


def routed_option(routing: Routing, subscription: Subscription, option: str) -> Any:
    """Return where the routing sets `option` for `subscription`, else None.

    Looks where `Routing.consumer_destination` looks (the subscription's
    options, the topic's metadata, the topic's publish target on the same
    client) but tells "not set" apart from "set to the topic name".
    """
    if option in subscription.options:
        return subscription.options[option]
    topic = routing.topics.get(subscription.topic)
    if topic is not None and option in topic.metadata:
        return topic.metadata[option]
    for target in routing.publish.get(subscription.topic, ()):
        if target.client == subscription.client and option in target.options:
            return target.options[option]
    return None


def clients_spec(client: Kind) -> MapOf:
    """Return the spec of a clients map whose every entry is `client`."""
    return MapOf(
        client,
        expected="a mapping of client name -> settings",
        nonempty=True,
        nullable=False,
    )


def key_header(key: bytes | None) -> dict[str, str]:
    """Return the `x-key` header for `key`, or nothing when it is not UTF-8."""
    if key is None:
        return {}
    try:
        return {KEY_HEADER: key.decode("utf-8")}
    except UnicodeDecodeError:
        return {}


def key_from_headers(headers: Mapping[str, str]) -> bytes | None:
    """Return the message key carried in `x-key`, if any."""
    value = headers.get(KEY_HEADER)
    return value.encode("utf-8") if value is not None else None


class Connectable(Protocol):
    """A client that connects once and closes once."""

    async def connect(self) -> None: ...

    async def aclose(self) -> None: ...


async def connect_all(registry: Mapping[str, Connectable]) -> None:
    """Connect every client in turn; if one fails, close them all and raise."""
    try:
        for client in registry.values():
            await client.connect()
    except BaseException:
        await close_all(registry)
        raise


async def close_all(registry: Mapping[str, Connectable]) -> None:
    """Close every client, each failure ignored so the others still close."""
    await asyncio.gather(
        *(client.aclose() for client in registry.values()), return_exceptions=True
    )
