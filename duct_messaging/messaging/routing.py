"""Routing: which topics exist, where they are published, who consumes them.

The routing keeps three things apart. `topics` carry metadata (schema,
codec, dead-letter and retry settings). `publish` lists the explicit targets
a produce call fans out to, in order. `subscriptions` are the only source of
consumers: a topic that is only published to starts nothing.

A routing config is either a plain routing map, or `default_routing` plus
`overrides`, deep-merged first (maps merge, other values replace, null
removes; `handlers` merge from both). Handlers are resolved once, at init.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging._imports import import_object, looks_like_import_path
from duct_messaging.messaging._merge import deep_merge
from duct_messaging.messaging.retry import retry_problems
from duct_messaging.messaging.schemas import (
    SchemaConfigError,
    Validator,
    compile_schema,
)
from duct_messaging.transports.base import Target

log = structlog.get_logger(__name__)

ROUTING_SECTIONS = ("defaults", "topics", "publish", "subscriptions", "handlers")
SUBSCRIPTION_FIELDS = frozenset(
    {
        "topic",
        "source",
        "client",
        "producer",
        "handler",
        "options",
        "deadletter",
        "retry",
        "concurrency",
        "schema",
        "codec",
    }
)


class RoutingError(DuctMessagingError, ValueError):
    """Raised when a routing config is invalid; lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        text = "\n  - ".join(self.problems)
        super().__init__(
            f"Invalid routing ({len(self.problems)} problems):\n  - {text}"
        )


class UnknownTopicError(DuctMessagingError, KeyError):
    """Raised when a produce call names a topic the routing does not publish."""

    def __init__(self, topic: str, known: list[str]) -> None:
        self.topic = topic
        self.known = sorted(known)
        names = ", ".join(self.known) or "(none)"
        super().__init__(
            f"No publish targets for topic {topic!r}. "
            f"Add it under routing 'publish', or pass targets=. Known: {names}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


Handler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic's metadata: the raw schema, codec and per-topic settings."""

    name: str
    schema: Any = None
    codec: str = "json"
    deadletter: Mapping[str, Any] = field(default_factory=dict)
    retry: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Subscription:
    """One consumer: a topic read from one client by one handler.

    `deadletter` and `retry` are already merged: defaults, then the topic's,
    then the subscription's own.
    """

    id: str
    topic: str
    source: str
    client: str
    handler: Handler
    handler_name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    deadletter: Mapping[str, Any] = field(default_factory=dict)
    retry: Mapping[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    schema: Any = None
    codec: str = "json"


@dataclass(frozen=True, slots=True)
class Routing:
    """The resolved routing: topics, publish targets, subscriptions, handlers."""

    topics: Mapping[str, Topic]
    publish: Mapping[str, tuple[Target, ...]]
    subscriptions: Mapping[str, Subscription]
    defaults: Mapping[str, Any]
    handlers: Mapping[str, Any]
    validators: Mapping[str, Validator] = field(default_factory=dict)
    subscription_validators: Mapping[str, Validator] = field(default_factory=dict)

    def targets(self, topic: str) -> tuple[Target, ...]:
        """Return the publish targets of `topic`, in order."""
        try:
            return self.publish[topic]
        except KeyError:
            raise UnknownTopicError(topic, list(self.publish)) from None

    def consumer_destination(self, subscription: Subscription, option: str) -> str:
        """Return the broker destination `subscription` reads from.

        The first of these that sets `option` (e.g. `kafka_topic`) wins: the
        subscription's `options`, the topic's metadata, the topic's publish
        target on the same client. Otherwise the topic name itself.
        """
        if option in subscription.options:
            return str(subscription.options[option])
        topic = self.topics.get(subscription.topic)
        if topic is not None and option in topic.metadata:
            return str(topic.metadata[option])
        for target in self.publish.get(subscription.topic, ()):
            if target.client == subscription.client and option in target.options:
                return str(target.options[option])
        return subscription.topic

    def subscriptions_for(self, source: str) -> list[Subscription]:
        """Return the subscriptions a runtime serving `source` must start."""
        return [s for s in self.subscriptions.values() if s.source == source]


def merge_routing(value: Mapping[str, Any]) -> dict[str, Any]:
    """Return the routing map of `value`, merging `default_routing` + `overrides`.

    A plain routing map (no `default_routing` / `overrides`) is returned as a
    copy. `handlers` end up as the union of both sides, overrides winning.
    """
    if "default_routing" not in value and "overrides" not in value:
        return dict(value)
    base = dict(value.get("default_routing") or {})
    overrides = dict(value.get("overrides") or {})
    handlers = {**(base.get("handlers") or {}), **(overrides.get("handlers") or {})}
    base.pop("handlers", None)
    overrides.pop("handlers", None)
    merged = deep_merge(base, overrides)
    if handlers:
        merged["handlers"] = handlers
    return merged


def routing_problems(value: Mapping[str, Any]) -> Iterator[str]:
    """Yield every problem of a routing config, each naming its path.

    Used both before anything starts (with refs still unresolved) and at
    init. Handler import paths are imported to prove they resolve.
    """
    if not isinstance(value, Mapping):
        yield f"expected a mapping, got {type(value).__name__}"
        return
    routing = merge_routing(value)
    extra = set(routing) - set(ROUTING_SECTIONS)
    for name in sorted(extra):
        expected = ", ".join(ROUTING_SECTIONS)
        yield f"{name}: unknown routing section; expected one of {expected}"
    sections: dict[str, Mapping[str, Any]] = {}
    for name in ROUTING_SECTIONS:
        section = routing.get(name) or {}
        if not isinstance(section, Mapping):
            yield f"{name}: expected a mapping, got {type(section).__name__}"
            section = {}
        sections[name] = section
    topics = sections["topics"]
    handlers = sections["handlers"]

    for topic, spec in sections["publish"].items():
        path = f"publish.{topic}"
        if topic not in topics:
            yield f"{path}: topic {topic!r} is not defined under 'topics'"
        targets = spec.get("targets") if isinstance(spec, Mapping) else None
        if not isinstance(targets, list) or not targets:
            yield f"{path}.targets: expected a non-empty list of targets"
            continue
        for i, target in enumerate(targets):
            if not isinstance(target, Mapping):
                yield f"{path}.targets[{i}]: expected a mapping with 'client'"
            elif not (target.get("client") or target.get("producer")):
                yield f"{path}.targets[{i}]: missing 'client' (the cluster to send to)"

    for sub_id, spec in sections["subscriptions"].items():
        yield from _subscription_problems(sub_id, spec, topics, handlers)

    yield from _retry_config_problems(sections)
    yield from _schema_problems(topics, sections["subscriptions"])


def _retry_config_problems(sections: Mapping[str, Mapping[str, Any]]) -> Iterator[str]:
    """Check every `retry` section (defaults, topics, subscriptions) before start."""
    yield from _retry_at("defaults.retry", sections["defaults"].get("retry"))
    for name in ("topics", "subscriptions"):
        for key, spec in sections[name].items():
            if isinstance(spec, Mapping):
                yield from _retry_at(f"{name}.{key}.retry", spec.get("retry"))


def _retry_at(path: str, config: Any) -> Iterator[str]:
    if type(config).__name__ in ("Ref", "RefSet"):
        return
    for problem in retry_problems(config):
        # A problem starts with the field it is about, or with "expected"
        # when the section itself has the wrong shape.
        sep = ": " if problem.startswith("expected ") else "."
        yield f"{path}{sep}{problem}"


def _schema_problems(
    topics: Mapping[str, Any], subscriptions: Mapping[str, Any]
) -> Iterator[str]:
    """Compile every schema once, so a malformed one is found before start."""
    specs = []
    for name, spec in topics.items():
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if isinstance(schema, Mapping) and schema.get("canonical") is not None:
            specs.append((f"topics.{name}.schema.canonical", schema["canonical"]))
    for sub_id, spec in subscriptions.items():
        if isinstance(spec, Mapping) and spec.get("schema") is not None:
            specs.append((f"subscriptions.{sub_id}.schema", spec["schema"]))
    for path, schema in specs:
        if type(schema).__name__ in ("Ref", "RefSet"):
            continue
        try:
            compile_schema(schema, path=path)
        except SchemaConfigError as exc:
            yield str(exc)
        except MissingExtraError as exc:
            yield f"{path}: {exc}"


def _subscription_problems(
    sub_id: str, spec: Any, topics: Mapping[str, Any], handlers: Mapping[str, Any]
) -> Iterator[str]:
    path = f"subscriptions.{sub_id}"
    if not isinstance(spec, Mapping):
        yield f"{path}: expected a mapping"
        return
    for name in sorted(set(spec) - SUBSCRIPTION_FIELDS):
        expected = ", ".join(sorted(SUBSCRIPTION_FIELDS))
        yield f"{path}.{name}: unknown field; expected one of {expected}"
    topic = spec.get("topic")
    if not topic:
        yield f"{path}.topic: missing"
    elif topic not in topics:
        yield f"{path}.topic: topic {topic!r} is not defined under 'topics'"
    if not spec.get("source"):
        yield f"{path}.source: missing (the transport, e.g. 'kafka')"
    if not (spec.get("client") or spec.get("producer")):
        yield f"{path}.client: missing (the cluster to consume from)"
    concurrency = spec.get("concurrency", 1)
    if (
        not isinstance(concurrency, int)
        or isinstance(concurrency, bool)
        or concurrency < 1
    ):
        yield f"{path}.concurrency: expected a positive integer, got {concurrency!r}"
    handler = spec.get("handler")
    if handler is None:
        yield f"{path}.handler: missing"
        return
    try:
        resolve_handler(handler, handlers)
    except HandlerResolutionError as exc:
        yield f"{path}.handler: {exc}"


class HandlerResolutionError(DuctMessagingError, LookupError):
    """Raised when a subscription's handler names nothing callable."""

    def __init__(self, handler: Any, known: list[str], reason: str = "") -> None:
        self.handler = handler
        self.known = sorted(known)
        names = ", ".join(self.known) or "none defined"
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"cannot resolve handler {handler!r}{detail}. Use a name from "
            f"'handlers' ({names}) or an import path such as "
            "'my_app.handlers:on_order' (or 'my_app.handlers.on_order')"
        )

    def __str__(self) -> str:
        return str(self.args[0])


def resolve_handler(handler: Any, handlers: Mapping[str, Any]) -> Handler:
    """Return the callable `handler` names.

    `handler` may be a callable, a name in `handlers`, or an import path. A
    name in `handlers` may itself map to a callable or an import path. An
    unresolved `!ref` (config checking) counts as resolvable.
    """
    if callable(handler):
        return cast(Handler, handler)
    if not isinstance(handler, str):
        if type(handler).__name__ in ("Ref", "RefSet"):
            return lambda *_: None
        raise HandlerResolutionError(handler, list(handlers), "not a name or callable")
    if handler in handlers:
        target = handlers[handler]
        if isinstance(target, str):
            return _import_handler(target, handlers)
        return resolve_handler(target, {})
    if looks_like_import_path(handler):
        return _import_handler(handler, handlers)
    raise HandlerResolutionError(handler, list(handlers))


def _import_handler(path: str, handlers: Mapping[str, Any]) -> Handler:
    try:
        obj = import_object(path)
    except (ImportError, AttributeError) as exc:
        raise HandlerResolutionError(path, list(handlers), str(exc)) from exc
    if not callable(obj):
        raise HandlerResolutionError(path, list(handlers), "not callable")
    return obj  # type: ignore[no-any-return]


def build_routing(value: Mapping[str, Any]) -> Routing:
    """Validate `value`, resolve every handler, and return the `Routing`."""
    problems = list(routing_problems(value))
    if problems:
        raise RoutingError(problems)
    routing = merge_routing(value)
    defaults = dict(routing.get("defaults") or {})
    handlers = dict(routing.get("handlers") or {})
    topics = {
        name: _topic(name, spec or {})
        for name, spec in (routing.get("topics") or {}).items()
    }
    publish = {
        name: tuple(_target(t) for t in spec["targets"])
        for name, spec in (routing.get("publish") or {}).items()
    }
    subscriptions = {
        sub_id: _subscription(sub_id, spec, topics[spec["topic"]], defaults, handlers)
        for sub_id, spec in (routing.get("subscriptions") or {}).items()
    }
    validators = {
        name: compile_schema(canonical, path=f"topics.{name}.schema.canonical")
        for name, topic in topics.items()
        if (canonical := canonical_schema(topic)) is not None
    }
    sub_validators = {
        sub_id: compile_schema(sub.schema, path=f"subscriptions.{sub_id}.schema")
        for sub_id, sub in subscriptions.items()
        if sub.schema is not None
    }
    return Routing(
        topics, publish, subscriptions, defaults, handlers, validators, sub_validators
    )


def _topic(name: str, spec: Mapping[str, Any]) -> Topic:
    known = {"schema", "codec", "deadletter", "retry"}
    return Topic(
        name=name,
        schema=spec.get("schema"),
        codec=spec.get("codec", "json"),
        deadletter=dict(spec.get("deadletter") or {}),
        retry=dict(spec.get("retry") or {}),
        metadata={k: v for k, v in spec.items() if k not in known},
    )


def _target(spec: Mapping[str, Any]) -> Target:
    options = {k: v for k, v in spec.items() if k not in ("client", "producer")}
    return Target(client=spec.get("client") or spec["producer"], options=options)


def _subscription(
    sub_id: str,
    spec: Mapping[str, Any],
    topic: Topic,
    defaults: Mapping[str, Any],
    handlers: Mapping[str, Any],
) -> Subscription:
    def merged(section: str, topic_part: Mapping[str, Any]) -> dict[str, Any]:
        out = deep_merge(defaults.get(section) or {}, topic_part)
        return deep_merge(out, spec.get(section) or {})

    handler = resolve_handler(spec["handler"], handlers)
    name = (
        spec["handler"] if isinstance(spec["handler"], str) else _callable_name(handler)
    )
    return Subscription(
        id=sub_id,
        topic=topic.name,
        source=spec["source"],
        client=spec.get("client") or spec["producer"],
        handler=handler,
        handler_name=name,
        options=dict(spec.get("options") or {}),
        deadletter=merged("deadletter", topic.deadletter),
        retry=merged("retry", topic.retry),
        concurrency=spec.get("concurrency", 1),
        schema=spec.get("schema", canonical_schema(topic)),
        codec=spec.get("codec", topic.codec),
    )


def canonical_schema(topic: Topic) -> Any:
    """Return the topic's `schema.canonical`, or None when it has none."""
    if isinstance(topic.schema, Mapping):
        return topic.schema.get("canonical")
    return None


def _callable_name(fn: Callable[..., Any]) -> str:
    module = inspect.getmodule(fn)
    qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    return f"{module.__name__}:{qualname}" if module else qualname
