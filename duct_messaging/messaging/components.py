"""The messaging component types a system config can name.

- `duct.messaging/routing`: the resolved `Routing` (topics, publish,
  subscriptions, handlers), from a plain routing map or `default_routing`
  plus `overrides`.
- `duct.messaging/producers`: one client -> transport producer mapping,
  merged from the per-transport registries listed in its value.
- `duct.messaging/producer`: the common `Producer` (`produce`/`aproduce`).
- `duct.messaging/tracing`: OpenTelemetry spans on or off.

Transports register their own keys (`duct.kafka/clients`, ...) in their
modules. Every check here runs before anything starts, on the raw config:
a schema (see `_config_check`) checks each field where it is written, and
check hooks follow refs to compare names across keys (clients, topics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any

from duct_messaging.messaging._config_check import (
    ConfigFieldError,
    DataOnly,
    Field,
    Fields,
    Kind,
    ListOf,
    OneOf,
    RefTo,
    as_schema,
    boolean,
    integer,
    is_ref,
    number,
    text,
)
from duct_messaging.messaging.producer import Producer, merge_registries
from duct_messaging.messaging.routing import (
    Routing,
    build_routing,
    merge_routing,
    routing_issues,
    routing_problems,
)
from duct_messaging.system import CheckContext, Ref, RefSet, component
from duct_messaging.transports.base import TransportProducer


def deref_deep(ctx: CheckContext, value: Any, depth: int = 8) -> Any:
    """Return `value` with refs replaced by the raw config they point to."""
    if depth <= 0:
        return value
    if isinstance(value, Ref | RefSet):
        return deref_deep(ctx, ctx.deref(value), depth - 1)
    if isinstance(value, Mapping):
        return {k: deref_deep(ctx, v, depth - 1) for k, v in value.items()}
    if isinstance(value, list):
        return [deref_deep(ctx, v, depth - 1) for v in value]
    return value


def _refers_to_sections(value: Any) -> bool:
    """Tell whether a routing value is a ref, or has whole sections as refs."""
    if is_ref(value):
        return True
    return isinstance(value, Mapping) and any(is_ref(v) for v in value.values())


def _routing_schema(value: Any) -> None:
    """Check the routing in place, so each problem points at its own line.

    A routing with sections given as refs is left to the check hook, which
    can follow them.
    """
    if _refers_to_sections(value):
        return
    problems = routing_issues(value)
    if problems:
        raise ConfigFieldError(problems)


@component("duct.messaging/routing", schema=_routing_schema)
def routing(value: Mapping[str, Any]) -> Routing:
    """Validate the routing, resolve its handlers and compile its schemas."""
    return build_routing(value)


@routing.check
def _check_routing(value: Any, ctx: CheckContext) -> Iterator[str]:
    if _refers_to_sections(value):
        depth = 3 if is_ref(value) else 2
        yield from routing_problems(deref_deep(ctx, value, depth=depth))


#: One transport's producers registry, as listed by `duct.messaging/producers`.
_REGISTRY = RefTo(
    "duct.memory/producers", what="a transport's producers (duct.<transport>/producers)"
)
_REGISTRIES = ListOf(_REGISTRY, expected="a list of !ref to transport producers")

PRODUCERS = OneOf(
    _REGISTRIES,
    DataOnly(Fields({"registries": Field(_REGISTRIES, required=True)})),
    expected="a list of !ref to transport producers",
    otherwise=_REGISTRY,
)


@component("duct.messaging/producers", schema=as_schema(PRODUCERS))
def producers(value: Any) -> dict[str, TransportProducer]:
    """Merge per-transport producer registries into one client mapping."""
    if isinstance(value, Mapping) and "registries" in value:
        value = value["registries"]
    return merge_registries(value)


PRODUCER = Fields(
    {
        "routing": Field(
            RefTo("duct.messaging/routing"),
            required=True,
            hint="use !ref duct.messaging/routing",
        ),
        "producers": Field(
            OneOf(
                _REGISTRIES,
                expected="a !ref to duct.messaging/producers",
                otherwise=RefTo("duct.messaging/producers"),
            ),
            required=True,
            hint="use !ref duct.messaging/producers",
        ),
        "deferred": RefTo("duct.messaging/deferred"),
    },
    nullable=False,
)


@component("duct.messaging/producer", schema=as_schema(PRODUCER))
async def producer(value: Mapping[str, Any]) -> Producer:
    """Return the common producer bound to the running event loop."""
    registry = value["producers"]
    if not isinstance(registry, Mapping) or not all(
        isinstance(p, TransportProducer) for p in registry.values()
    ):
        registry = merge_registries(registry)
    return Producer(
        value["routing"],
        registry,
        deferred=value.get("deferred"),
        loop=asyncio.get_running_loop(),
    )


@producer.check
def _check_producer(value: Any, ctx: CheckContext) -> Iterator[str]:
    if not isinstance(value, Mapping) or not all(
        name in value for name in ("routing", "producers")
    ):
        return  # the schema reports the missing fields
    known = client_names(ctx, value["producers"])
    if known is None:
        return
    raw_routing = deref_deep(ctx, value["routing"], depth=3)
    if not isinstance(raw_routing, Mapping):
        return
    merged = merge_routing(raw_routing)
    publish = merged.get("publish")
    for topic, spec in (publish if isinstance(publish, Mapping) else {}).items():
        targets = spec.get("targets") if isinstance(spec, Mapping) else None
        for i, target in enumerate(targets if isinstance(targets, list) else ()):
            client = (
                target.get("client") or target.get("producer")
                if isinstance(target, Mapping)
                else None
            )
            if isinstance(client, str) and client not in known:
                yield (
                    f"routing publish.{topic}.targets[{i}].client: unknown client "
                    f"{client!r}; known clients: {', '.join(sorted(known)) or '(none)'}"
                )


def client_names(ctx: CheckContext, producers_ref: Any) -> set[str] | None:
    """Return every client name the producer registries behind a ref serve.

    Follows `duct.messaging/producers` to each transport registry and on to
    its clients map. Returns None when the chain cannot be followed (a ref
    problem reported elsewhere, or a registry swapped for a ready object).
    """
    registries = (
        ctx.deref(producers_ref) if isinstance(producers_ref, Ref) else producers_ref
    )
    if isinstance(registries, Mapping) and "registries" in registries:
        registries = registries["registries"]
    if isinstance(registries, Ref | RefSet):
        registries = [registries]
    if not isinstance(registries, list):
        return None
    names: set[str] = set()
    for registry_ref in registries:
        registry = (
            ctx.deref(registry_ref) if isinstance(registry_ref, Ref) else registry_ref
        )
        if not isinstance(registry, Mapping):
            return None
        clients = registry.get("clients")
        clients = ctx.deref(clients) if isinstance(clients, Ref) else clients
        if not isinstance(clients, Mapping):
            return None
        names.update(clients)
    return names


def subscription_client_problems(
    value: Mapping[str, Any], ctx: CheckContext, transport: str
) -> Iterator[str]:
    """Yield problems of the subscriptions a consumers component will serve.

    Each served subscription must name a client of this transport's
    `clients` map; a missing one is a config error, never a fallback.
    """
    clients = deref_deep(ctx, value.get("clients"), depth=1)
    raw_routing = deref_deep(ctx, value.get("routing"), depth=3)
    if not isinstance(clients, Mapping) or not isinstance(raw_routing, Mapping):
        return
    sources = value.get("sources")
    if not isinstance(sources, list) or not sources:
        sources = [transport]
    merged = merge_routing(raw_routing)
    subscriptions = merged.get("subscriptions")
    if not isinstance(subscriptions, Mapping):
        return
    for sub_id, spec in subscriptions.items():
        if not isinstance(spec, Mapping) or spec.get("source") not in sources:
            continue
        client = spec.get("client") or spec.get("producer")
        if isinstance(client, str) and client not in clients:
            yield (
                f"routing subscriptions.{sub_id}.client: unknown {transport} client "
                f"{client!r}; known: {', '.join(sorted(clients)) or '(none)'}"
            )


CONSUMER_SETTINGS = ("batch_size", "drain_timeout_s", "start_timeout_s")


def consumer_settings(value: Mapping[str, Any]) -> dict[str, Any]:
    """Return the runtime settings of a consumers component's value."""
    settings = {k: value[k] for k in CONSUMER_SETTINGS if k in value}
    if value.get("deadletter") is not None:
        settings["sink"] = value["deadletter"]
    if value.get("sources"):
        settings["sources"] = tuple(value["sources"])
    return settings


def producers_spec(transport: str) -> Fields:
    """Return the spec of a `duct.<transport>/producers` value."""
    clients = f"duct.{transport}/clients"
    return Fields(
        {"clients": Field(RefTo(clients), required=True, hint=f"use !ref {clients}")},
        nullable=False,
    )


def consumers_spec(transport: str, extra: Mapping[str, Kind] | None = None) -> Fields:
    """Return the spec of a `duct.<transport>/consumers` value.

    `extra` adds the transport's own settings to the shared ones.
    """
    clients = f"duct.{transport}/clients"
    return Fields(
        {
            "clients": Field(RefTo(clients), required=True, hint=f"use !ref {clients}"),
            "routing": Field(
                RefTo("duct.messaging/routing"),
                required=True,
                hint="use !ref duct.messaging/routing",
            ),
            "deadletter": RefTo(
                "duct.deadletter/storage", what="a dead-letter sink (duct.deadletter/*)"
            ),
            "batch_size": integer(minimum=1),
            "drain_timeout_s": number(minimum=0),
            "start_timeout_s": number(minimum=0),
            "sources": ListOf(text(), expected="a list of source names"),
            **(extra or {}),
        },
        nullable=False,
    )


def consumers_problems(value: Any, ctx: CheckContext, transport: str) -> Iterator[str]:
    """Yield the problems of a `duct.<transport>/consumers` value the spec misses.

    Each subscription it serves must name a client of its `clients` map.
    """
    if isinstance(value, Mapping):
        yield from subscription_client_problems(value, ctx, transport)


TRACING = Fields({"opentelemetry": boolean()})


@component("duct.messaging/tracing", schema=as_schema(TRACING))
def tracing(value: Mapping[str, Any] | None) -> bool:
    """Turn OpenTelemetry spans for produce and consume on or off.

    `{opentelemetry: true}` needs the `otel` extra; without it (or with
    `false`) the W3C `traceparent` header is still propagated, by the
    library's own small implementation. Returns whether spans are on.
    """
    from duct_messaging.messaging.tracing import enable_opentelemetry

    if value and value.get("opentelemetry"):
        enable_opentelemetry()
        return True
    return False


@tracing.halt
def _halt_tracing(enabled: bool) -> None:
    from duct_messaging.messaging.tracing import disable_opentelemetry

    if enabled:
        disable_opentelemetry()
