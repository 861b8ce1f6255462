"""W3C trace context for messages, with optional OpenTelemetry spans.

Every message carries a `traceparent` header (and `tracestate` when there is
one) in the W3C Trace Context format, so any tracer or plain client can read
it. The trace a piece of code runs under lives in a context variable:
`use_trace` binds it, `current_trace` reads it, `inject` writes a child of
it into outgoing headers, and `extract` reads it back from incoming ones.

Context variables follow asyncio tasks on their own. Threads do not inherit
them: run the function through `contextvars.copy_context().run` (as
`asyncio.to_thread` and `loop.run_in_executor` with a copied context do).

OpenTelemetry is optional (extra `otel`). After `enable_opentelemetry()`,
`start_span` opens a real span under the given parent; without it,
`start_span` yields a plain child context, so calling code is the same
either way.
"""

from __future__ import annotations

import contextvars
import random
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from duct_messaging.errors import DuctMessagingError, MissingExtraError

__all__ = [
    "SPAN_KINDS",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "InvalidTraceContextError",
    "TraceContext",
    "TracingError",
    "UnknownSpanKindError",
    "bind_trace",
    "current_trace",
    "disable_opentelemetry",
    "enable_opentelemetry",
    "extract",
    "inject",
    "opentelemetry_enabled",
    "start_span",
    "unbind_trace",
    "use_trace",
]

TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_TRACE_ID = re.compile(r"[0-9a-f]{32}")
_SPAN_ID = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

# version "-" trace-id "-" parent-id "-" trace-flags, all lowercase hex.
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL
)
# tracestate list members: key "=" value, with simple or multi-tenant keys.
_KEY_CHARS = r"[a-z0-9_\-*/]"
_TRACESTATE_KEY = (
    rf"(?:[a-z]{_KEY_CHARS}{{0,255}}"
    rf"|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}})"
)
_VALUE_CHARS = r"\x20-\x2b\x2d-\x3c\x3e-\x7e"
_TRACESTATE_VALUE = rf"[{_VALUE_CHARS}]{{0,255}}[{_VALUE_CHARS.replace('20', '21', 1)}]"
_TRACESTATE_MEMBER = re.compile(f"{_TRACESTATE_KEY}={_TRACESTATE_VALUE}")
_TRACESTATE_MAX_MEMBERS = 32
SPAN_KINDS = ("internal", "server", "client", "producer", "consumer")

_getrandbits = random.getrandbits


class TracingError(DuctMessagingError):
    """Root of the errors raised by the tracing helpers."""


class InvalidTraceContextError(TracingError, ValueError):
    """Raised when a `TraceContext` is built from malformed ids."""

    def __init__(self, field: str, value: str, expected: str) -> None:
        self.field = field
        self.value = value
        super().__init__(
            f"Invalid trace context {field}: {value!r}. Expected {expected}."
        )


class UnknownSpanKindError(TracingError, ValueError):
    """Raised when `start_span` gets a span kind OpenTelemetry does not define."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(
            f"Unknown span kind: {kind!r}. Use one of: {', '.join(SPAN_KINDS)}."
        )


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One position in a trace: which trace, which span, and its vendor state.

    Instances are immutable; `child` makes the context for the next hop.
    Building one validates the ids and raises `InvalidTraceContextError`;
    `parse` returns None for bad input instead.
    """

    trace_id: str
    span_id: str
    sampled: bool = True
    tracestate: str | None = None

    def __post_init__(self) -> None:
        if not _TRACE_ID.fullmatch(self.trace_id) or self.trace_id == _ZERO_TRACE_ID:
            raise InvalidTraceContextError(
                "trace_id", self.trace_id, "32 lowercase hex digits, not all zero"
            )
        if not _SPAN_ID.fullmatch(self.span_id) or self.span_id == _ZERO_SPAN_ID:
            raise InvalidTraceContextError(
                "span_id", self.span_id, "16 lowercase hex digits, not all zero"
            )

    @property
    def traceparent(self) -> str:
        """Return the `traceparent` header value (version 00)."""
        flags = "01" if self.sampled else "00"
        return f"00-{self.trace_id}-{self.span_id}-{flags}"

    @classmethod
    def parse(
        cls,
        traceparent: str | bytes | None,
        tracestate: str | bytes | None = None,
    ) -> TraceContext | None:
        """Return the context in W3C header values, or None if they are invalid.

        Follows the W3C rules: version `ff` and all-zero ids are invalid,
        uppercase hex is invalid, version 00 must be exactly 55 characters,
        and later versions are read by their version-00 prefix. A malformed
        `tracestate` is dropped while the `traceparent` is kept.
        """
        text = _text(traceparent)
        if text is None:
            return None

        match = _TRACEPARENT.fullmatch(text.strip(" \t"))
        if match is None:
            return None
        version, trace_id, span_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest is not None):
            return None
        if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
            return None

        sampled = bool(int(flags, 16) & 0x01)
        state = _parse_tracestate(tracestate) if tracestate else None
        return _trusted(trace_id, span_id, sampled, state)

    @classmethod
    def new_root(cls) -> TraceContext:
        """Return a sampled context that starts a new trace."""
        return _trusted(_new_trace_id(), _new_span_id(), True, None)

    def child(self) -> TraceContext:
        """Return a context in the same trace with a new span id."""
        return _trusted(self.trace_id, _new_span_id(), self.sampled, self.tracestate)


def _trusted(
    trace_id: str, span_id: str, sampled: bool, tracestate: str | None
) -> TraceContext:
    """Build a context from ids already known to be valid.

    Skips `__post_init__` validation: this runs several times per message,
    and every caller passes ids that were generated or already checked.
    """
    ctx = object.__new__(TraceContext)
    object.__setattr__(ctx, "trace_id", trace_id)
    object.__setattr__(ctx, "span_id", span_id)
    object.__setattr__(ctx, "sampled", sampled)
    object.__setattr__(ctx, "tracestate", tracestate)
    return ctx


def _new_trace_id() -> str:
    bits = _getrandbits(128)
    while not bits:
        bits = _getrandbits(128)
    return f"{bits:032x}"


def _new_span_id() -> str:
    bits = _getrandbits(64)
    while not bits:
        bits = _getrandbits(64)
    return f"{bits:016x}"


def _text(value: str | bytes | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    try:
        return bytes(value).decode("ascii")
    except UnicodeDecodeError:
        return None


def _parse_tracestate(value: str | bytes | None) -> str | None:
    """Return a normalised tracestate, or None if absent, empty or malformed."""
    text = _text(value)
    if not text:
        return None

    members = [m.strip(" \t") for m in text.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > _TRACESTATE_MAX_MEMBERS:
        return None
    if not all(_TRACESTATE_MEMBER.fullmatch(m) for m in members):
        return None
    return ",".join(members)


_current: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "duct_messaging_trace", default=None
)


def current_trace() -> TraceContext | None:
    """Return the trace context bound in the running context, if any."""
    return _current.get()


@contextmanager
def use_trace(ctx: TraceContext | None) -> Iterator[TraceContext | None]:
    """Bind `ctx` as the current trace for the block, then restore the previous one.

    Binding None clears the current trace for the block. The binding is
    seen by asyncio tasks created inside the block and by functions run
    through `contextvars.copy_context().run`.
    """
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def bind_trace(ctx: TraceContext | None) -> contextvars.Token[TraceContext | None]:
    """Bind `ctx` as the current trace; pass the token to `unbind_trace`.

    The cheaper twin of `use_trace` for per-message hot paths.
    """
    return _current.set(ctx)


def unbind_trace(token: contextvars.Token[TraceContext | None]) -> None:
    """Restore the trace that was current before `bind_trace` returned `token`."""
    _current.reset(token)


def inject(headers: dict[str, str]) -> TraceContext:
    """Write a child of the current trace (or a new root) into `headers`.

    Sets `traceparent`, sets `tracestate` when the context has one and
    removes a stale `tracestate` otherwise. Returns the context written,
    whose span id is new: each message is its own hop.
    """
    parent = _current.get()
    ctx = parent.child() if parent is not None else TraceContext.new_root()

    headers[TRACEPARENT_HEADER] = ctx.traceparent
    if ctx.tracestate:
        headers[TRACESTATE_HEADER] = ctx.tracestate
    else:
        headers.pop(TRACESTATE_HEADER, None)
    return ctx


def extract(headers: Mapping[str, str | bytes]) -> TraceContext | None:
    """Return the trace context in `headers`, or None if absent or invalid.

    Header names match exactly first, then ignoring case (HTTP-style
    transports may capitalise them). Values may be `str` or `bytes`.
    """
    traceparent = headers.get(TRACEPARENT_HEADER)
    tracestate = headers.get(TRACESTATE_HEADER)
    if traceparent is None:
        for name, value in headers.items():
            lowered = name.lower()
            if lowered == TRACEPARENT_HEADER:
                traceparent = value
            elif lowered == TRACESTATE_HEADER:
                tracestate = value
    return TraceContext.parse(traceparent, tracestate)


# --- OpenTelemetry bridge -------------------------------------------------


class _OtelBridge:
    """Open real OpenTelemetry spans whose parent is a `TraceContext`."""

    def __init__(self, tracer_provider: Any | None) -> None:
        # The otel extra is optional; without it installed mypy sees no module.
        from opentelemetry import (  # type: ignore[import-not-found,unused-ignore]
            context,
            trace,
        )
        from opentelemetry.trace import (  # type: ignore[import-not-found,unused-ignore]
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            TraceFlags,
            TraceState,
        )

        self._trace = trace
        self._root_context = context.Context
        self._non_recording_span = NonRecordingSpan
        self._span_context = SpanContext
        self._trace_flags = TraceFlags
        self._trace_state = TraceState
        self._kinds = {kind: SpanKind[kind.upper()] for kind in SPAN_KINDS}
        self._tracer = trace.get_tracer(
            "duct_messaging", tracer_provider=tracer_provider
        )

    @contextmanager
    def span(
        self,
        name: str,
        kind: str,
        parent: TraceContext | None,
        attributes: Mapping[str, Any] | None,
    ) -> Iterator[TraceContext]:
        if parent is None:
            otel_parent = self._root_context()
        else:
            otel_parent = self._trace.set_span_in_context(
                self._non_recording_span(self._to_span_context(parent))
            )
        with self._tracer.start_as_current_span(
            name, context=otel_parent, kind=self._kinds[kind], attributes=attributes
        ) as span:
            yield self._from_span(span, parent)

    def _to_span_context(self, ctx: TraceContext) -> Any:
        state = self._trace_state.from_header(
            [ctx.tracestate] if ctx.tracestate else []
        )
        return self._span_context(
            trace_id=int(ctx.trace_id, 16),
            span_id=int(ctx.span_id, 16),
            is_remote=True,
            trace_flags=self._trace_flags(0x01 if ctx.sampled else 0x00),
            trace_state=state,
        )

    def _from_span(self, span: Any, parent: TraceContext | None) -> TraceContext:
        sc = span.get_span_context()
        span_id = f"{sc.span_id:016x}"
        if not sc.is_valid or (parent is not None and span_id == parent.span_id):
            # A no-op tracer (API without SDK) hands back the parent's ids or
            # invalid ones; every hop must still get its own span id.
            return parent.child() if parent is not None else TraceContext.new_root()

        state = sc.trace_state.to_header() or None
        if state is None and parent is not None:
            state = parent.tracestate
        return TraceContext(
            f"{sc.trace_id:032x}", span_id, bool(sc.trace_flags.sampled), state
        )


_otel: _OtelBridge | None = None


def enable_opentelemetry(tracer_provider: Any | None = None) -> None:
    """Make `start_span` open OpenTelemetry spans.

    Uses `tracer_provider`, or the globally configured one when None.
    Calling it again replaces the provider.

    Raises:
        MissingExtraError: `opentelemetry-api` is not installed.
    """
    global _otel
    try:
        bridge = _OtelBridge(tracer_provider)
    except ImportError as exc:
        raise MissingExtraError(
            "OpenTelemetry spans", "otel", "opentelemetry-api"
        ) from exc
    _otel = bridge


def disable_opentelemetry() -> None:
    """Make `start_span` yield plain child contexts again."""
    global _otel
    _otel = None


def opentelemetry_enabled() -> bool:
    """Return whether `start_span` opens OpenTelemetry spans."""
    return _otel is not None


@contextmanager
def start_span(
    name: str,
    kind: str = "internal",
    parent: TraceContext | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[TraceContext]:
    """Open a span under `parent` and bind its context for the block.

    `parent` defaults to the current trace; with neither, the span starts a
    new trace. `kind` is one of `SPAN_KINDS`. With
    OpenTelemetry enabled the span is real (exceptions leaving the block are
    recorded on it) and the yielded context carries its ids; otherwise the
    yielded context is a plain child of `parent`. Either way it is the
    current trace inside the block.

    Raises:
        UnknownSpanKindError: `kind` is not one of `SPAN_KINDS`.
    """
    if kind not in SPAN_KINDS:
        raise UnknownSpanKindError(kind)
    if parent is None:
        parent = _current.get()

    bridge = _otel
    if bridge is None:
        ctx = parent.child() if parent is not None else TraceContext.new_root()
        with use_trace(ctx):
            yield ctx
        return

    with bridge.span(name, kind, parent, attributes) as ctx, use_trace(ctx):
        yield ctx
