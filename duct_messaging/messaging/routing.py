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
from duct_messaging.messaging._config_check import (
    ANY,
    ConfigPath,
    Field,
    FieldProblem,
    Fields,
    Kind,
    ListOf,
    MapOf,
    Template,
    boolean,
    closest,
    describe,
    format_path,
    integer,
    is_ref,
    text,
)
from duct_messaging.messaging._imports import import_object, looks_like_import_path
from duct_messaging.messaging._merge import deep_merge
from duct_messaging.messaging.retry import RETRY
from duct_messaging.messaging.schemas import (
    SchemaConfigError,
    Validator,
    compile_schema,
)
from duct_messaging.transports.base import Target

log = structlog.get_logger(__name__)

ROUTING_SECTIONS = ("defaults", "topics", "publish", "subscriptions", "handlers")
_MERGED_FORM = ("default_routing", "overrides")

#: Dead-letter choices a subscription makes for the producer sink (see
#: `ProducerSink.route`): the dead-letter topic (a template) and client.
DEADLETTER = Fields(
    {
        "topic": Template("topic", "destination", "subscription"),
        "client": text(),
    },
    noun="dead-letter field",
    expected="a mapping such as {topic: '{topic}.dl'}",
)

#: Per-target options the transports read; a target may carry any of them.
TARGET_OPTIONS: dict[str, Kind] = {
    "kafka_topic": text(),  # kafka, memory
    "partition": integer(minimum=0, nullable=True),  # kafka
    "stream": text(),  # redis, memory
    "maxlen": integer(minimum=0, nullable=True),  # redis
    "subject": text(),  # nats, memory
    "exchange": text(nonempty=False),  # rabbitmq ("" is the default exchange)
    "exchange_type": text(),  # rabbitmq
    "routing_key": text(),  # rabbitmq
    "queue": text(),  # rabbitmq, memory
    "mandatory": boolean(),  # rabbitmq
    "destination": text(),  # memory
}
_NAME = text(nonempty=False, nullable=True)  # emptiness is a reference check

TARGET = Fields(
    {"client": _NAME, "producer": _NAME, **TARGET_OPTIONS},
    noun="target option",
    nullable=False,
    expected="a mapping with 'client' (the cluster to send to)",
)

SUBSCRIPTION = Fields(
    {
        "topic": _NAME,
        "source": _NAME,
        "client": _NAME,
        "producer": _NAME,
        "handler": ANY,
        "options": MapOf(ANY, expected="a mapping of transport options"),
        "deadletter": DEADLETTER,
        "retry": RETRY,
        "concurrency": integer(minimum=1),
        "schema": ANY,
        "codec": text(),
    },
    nullable=False,
)
SUBSCRIPTION_FIELDS = frozenset(SUBSCRIPTION.fields)

TOPIC = Fields(
    {
        "schema": Fields(
            {"canonical": ANY},
            noun="schema field",
            expected="a mapping such as {canonical: [map, [id, uuid]]}",
        ),
        "codec": text(),
        "retry": RETRY,
        "deadletter": DEADLETTER,
    },
    extra=ANY,  # free metadata (kafka_topic, stream, ...), read by transports
    typo_cutoff=0.8,
    noun="topic setting",
    hint="Other keys of a topic are free metadata: rename it if it is metadata",
)

#: What the merged routing must look like; `routing_issues` adds the checks
#: that look across sections.
ROUTING = Fields(
    {
        "defaults": Fields(
            {"retry": RETRY, "deadletter": DEADLETTER}, noun="defaults field"
        ),
        "topics": MapOf(TOPIC, expected="a mapping of topic name -> settings"),
        "publish": MapOf(
            Fields(
                {
                    "targets": Field(
                        ListOf(TARGET, nonempty=True),
                        required=True,
                        hint="a list of targets such as [{client: main}]",
                    )
                },
                noun="publish field",
                nullable=False,
            ),
            expected="a mapping of topic name -> {targets: [...]}",
        ),
        "subscriptions": MapOf(
            SUBSCRIPTION, expected="a mapping of subscription id -> settings"
        ),
        "handlers": MapOf(
            ANY, expected="a mapping of handler name -> import path or !ref"
        ),
    },
    noun="routing section",
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
    if not uses_overrides(value):
        return dict(value)
    base = dict(value.get("default_routing") or {})
    overrides = dict(value.get("overrides") or {})
    base_handlers = base.get("handlers") or {}
    over_handlers = overrides.get("handlers") or {}
    if not (isinstance(base_handlers, Mapping) and isinstance(over_handlers, Mapping)):
        # Not mergeable: the check reports the section that is not a mapping.
        return deep_merge(base, overrides)
    handlers = {**base_handlers, **over_handlers}
    base.pop("handlers", None)
    overrides.pop("handlers", None)
    merged = deep_merge(base, overrides)
    if handlers:
        merged["handlers"] = handlers
    return merged


def uses_overrides(value: Mapping[str, Any]) -> bool:
    """Tell whether `value` is `default_routing` + `overrides`, not a plain map."""
    return any(name in value for name in _MERGED_FORM)


def routing_problems(value: Any) -> Iterator[str]:
    """Yield every problem of a routing config, each naming its path.

    Used both before anything starts (with refs still unresolved) and at
    init. Handler import paths are imported to prove they resolve.
    """
    for problem in routing_issues(value):
        yield str(problem)


def routing_issues(value: Any) -> list[FieldProblem]:
    """Return every problem of a routing config, each at the path it was written.

    Field names and types are checked against the routing spec; then every
    topic named by publish and subscriptions must be defined, targets and
    subscriptions must name a client, handlers must resolve and schemas
    must compile. With `default_routing` + `overrides`, the merged routing
    is checked and each problem points into the side that wrote it.
    """
    if not isinstance(value, Mapping):
        expected = "a mapping of routing sections"
        return [FieldProblem((), f"expected {expected}, got {describe(value)}")]
    problems = list(_form_problems(value))
    routing = merge_routing(_mergeable(value))
    found = ROUTING.problems(routing)
    found.extend(_reference_problems(routing))
    problems.extend(FieldProblem(written_at(value, p.path), p.message) for p in found)
    return problems


def written_at(value: Mapping[str, Any], path: ConfigPath) -> ConfigPath:
    """Return where in `value` the merged-routing `path` was written.

    A plain routing map is its own merged routing. Otherwise the path is in
    `overrides` when that side holds all of it, else in the side holding
    the longest part of it (`default_routing` on a tie).
    """
    if not uses_overrides(value):
        return path
    if _depth(value.get("overrides"), path) == len(path):
        return ("overrides", *path)
    side = max(_MERGED_FORM, key=lambda name: _depth(value.get(name), path))
    return (side, *path)


def _depth(tree: Any, path: ConfigPath) -> int:
    """Return how many leading parts of `path` exist inside `tree`."""
    depth = 0
    for part in path:
        if not _has(tree, part):
            break
        tree = tree[part]
        depth += 1
    return depth


def _has(tree: Any, part: str | int) -> bool:
    if isinstance(tree, Mapping):
        return part in tree
    return isinstance(tree, list) and isinstance(part, int) and part < len(tree)


def _form_problems(value: Mapping[str, Any]) -> Iterator[FieldProblem]:
    """Yield the problems of the `default_routing` + `overrides` frame itself."""
    if not uses_overrides(value):
        return
    for name in _MERGED_FORM:
        side = value.get(name)
        if side is not None and not is_ref(side) and not isinstance(side, Mapping):
            expected = "a mapping of routing sections"
            yield FieldProblem((name,), f"expected {expected}, got {describe(side)}")
    for name in value:
        if name not in _MERGED_FORM:
            yield FieldProblem(
                (str(name),),
                "unknown field next to default_routing and overrides; "
                "move it under one of them",
            )


def _mergeable(value: Mapping[str, Any]) -> Mapping[str, Any]:
    if not uses_overrides(value):
        return value
    return {name: _section(value, name) for name in _MERGED_FORM}


def _reference_problems(routing: Mapping[str, Any]) -> Iterator[FieldProblem]:
    """Yield what the field checks cannot see: names that point nowhere.

    Parts of the wrong shape are skipped here; the field checks report them.
    """
    sections = {name: _section(routing, name) for name in ROUTING_SECTIONS}
    topics = sections["topics"]
    for topic, spec in sections["publish"].items():
        if topic not in topics:
            yield FieldProblem(("publish", topic), _undefined_topic(topic, topics))
        targets = spec.get("targets") if isinstance(spec, Mapping) else None
        for i, target in enumerate(targets if isinstance(targets, list) else ()):
            if isinstance(target, Mapping) and not (
                target.get("client") or target.get("producer")
            ):
                yield FieldProblem(
                    ("publish", topic, "targets", i),
                    "missing 'client' (the cluster to send to)",
                )

    for sub_id, spec in sections["subscriptions"].items():
        if isinstance(spec, Mapping):
            yield from _subscription_problems(
                sub_id, spec, topics, sections["handlers"]
            )

    yield from _schema_problems(topics, sections["subscriptions"])


def _section(routing: Mapping[str, Any], name: str) -> Mapping[Any, Any]:
    section = routing.get(name)
    return section if isinstance(section, Mapping) else {}


def _undefined_topic(topic: Any, topics: Mapping[str, Any]) -> str:
    near = closest(topic, [str(name) for name in topics])
    tip = f"; did you mean {near!r}?" if near else ""
    return f"topic {topic!r} is not defined under 'topics'{tip}"


def _schema_problems(
    topics: Mapping[str, Any], subscriptions: Mapping[str, Any]
) -> Iterator[FieldProblem]:
    """Compile every schema once, so a malformed one is found before start."""
    specs: list[tuple[ConfigPath, Any]] = []
    for name, spec in topics.items():
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if isinstance(schema, Mapping) and schema.get("canonical") is not None:
            specs.append((("topics", name, "schema", "canonical"), schema["canonical"]))
    for sub_id, spec in subscriptions.items():
        if isinstance(spec, Mapping) and spec.get("schema") is not None:
            specs.append((("subscriptions", sub_id, "schema"), spec["schema"]))
    for path, schema in specs:
        if is_ref(schema):
            continue
        try:
            compile_schema(schema, path=format_path(path))
        except SchemaConfigError as exc:
            yield FieldProblem(path, _schema_reason(exc))
        except MissingExtraError as exc:
            yield FieldProblem(path, str(exc))


def _schema_reason(exc: SchemaConfigError) -> str:
    """Return the error without the config path it starts with."""
    where = f" at {exc.sub_path}" if exc.sub_path else ""
    full = str(exc)
    _, sep, rest = full.partition(": ")
    return f"invalid schema{where}: {rest}" if sep else full


def _subscription_problems(
    sub_id: str, spec: Mapping[str, Any], topics: Mapping[str, Any], handlers: Any
) -> Iterator[FieldProblem]:
    path: ConfigPath = ("subscriptions", sub_id)
    topic = spec.get("topic")
    if not topic:
        yield FieldProblem((*path, "topic"), "missing (a topic under 'topics')")
    elif isinstance(topic, str) and topic not in topics:
        yield FieldProblem((*path, "topic"), _undefined_topic(topic, topics))
    if not spec.get("source"):
        yield FieldProblem((*path, "source"), "missing (the transport, e.g. 'kafka')")
    if not (spec.get("client") or spec.get("producer")):
        yield FieldProblem((*path, "client"), "missing (the cluster to consume from)")
    handler = spec.get("handler")
    if handler is None:
        yield FieldProblem(
            (*path, "handler"),
            "missing (a name under 'handlers' or an import path like "
            "'my_app.handlers:on_order')",
        )
        return
    try:
        resolve_handler(handler, handlers)
    except HandlerResolutionError as exc:
        yield FieldProblem((*path, "handler"), str(exc))


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
