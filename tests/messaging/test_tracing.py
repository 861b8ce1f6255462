"""Tests for W3C trace context propagation and the OpenTelemetry bridge."""

from __future__ import annotations

import asyncio
import contextvars
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from duct_messaging.errors import DuctMessagingError, MissingExtraError
from duct_messaging.messaging.tracing import (
    SPAN_KINDS,
    InvalidTraceContextError,
    TraceContext,
    UnknownSpanKindError,
    bind_trace,
    current_trace,
    disable_opentelemetry,
    enable_opentelemetry,
    extract,
    inject,
    opentelemetry_enabled,
    start_span,
    unbind_trace,
    use_trace,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")

hex_ids = st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: f"{n:032x}")
span_ids = st.integers(min_value=1, max_value=2**64 - 1).map(lambda n: f"{n:016x}")


class TestTraceContext:
    def test_new_root_has_valid_ids(self) -> None:
        """A new root has well-formed, sampled, distinct ids."""
        roots = [TraceContext.new_root() for _ in range(100)]

        assert all(TRACEPARENT_RE.fullmatch(r.traceparent) for r in roots)
        assert all(r.sampled and r.tracestate is None for r in roots)
        assert len({r.trace_id for r in roots}) == 100

    def test_child_keeps_trace_and_state_with_new_span(self) -> None:
        """A child keeps trace id, flags and tracestate, with a new span id."""
        parent = TraceContext(TRACE_ID, SPAN_ID, sampled=False, tracestate="a=1")

        child = parent.child()

        assert child.trace_id == TRACE_ID
        assert child.span_id != SPAN_ID
        assert child.sampled is False
        assert child.tracestate == "a=1"

    def test_traceparent_encodes_sampled_flag(self) -> None:
        """The traceparent header ends in 01 when sampled, 00 when not."""
        assert TraceContext(TRACE_ID, SPAN_ID).traceparent == TRACEPARENT
        assert TraceContext(TRACE_ID, SPAN_ID, sampled=False).traceparent.endswith(
            "-00"
        )

    @pytest.mark.parametrize(
        ("trace_id", "span_id", "field"),
        [
            ("0" * 32, SPAN_ID, "trace_id"),
            (TRACE_ID.upper(), SPAN_ID, "trace_id"),
            (TRACE_ID[:-1], SPAN_ID, "trace_id"),
            (TRACE_ID, "0" * 16, "span_id"),
            (TRACE_ID, "xyz", "span_id"),
        ],
    )
    def test_constructor_rejects_bad_ids(
        self, trace_id: str, span_id: str, field: str
    ) -> None:
        """Building a context with malformed ids raises a named error."""
        with pytest.raises(
            InvalidTraceContextError, match=f"Invalid trace context {field}"
        ) as info:
            TraceContext(trace_id, span_id)

        assert info.value.field == field
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, DuctMessagingError)

    def test_contexts_are_immutable_values(self) -> None:
        """Contexts compare by value and cannot be changed."""
        ctx = TraceContext(TRACE_ID, SPAN_ID)

        assert ctx == TraceContext(TRACE_ID, SPAN_ID)
        with pytest.raises(AttributeError):
            ctx.span_id = "1" * 16  # type: ignore[misc]


class TestParse:
    def test_parses_valid_traceparent(self) -> None:
        """The W3C example header parses into its fields."""
        ctx = TraceContext.parse(TRACEPARENT, "congo=t61rcWkgMzE")

        assert ctx == TraceContext(TRACE_ID, SPAN_ID, True, "congo=t61rcWkgMzE")

    def test_parses_bytes_and_unsampled(self) -> None:
        """Header values may be bytes; flag 00 means not sampled."""
        ctx = TraceContext.parse(f"00-{TRACE_ID}-{SPAN_ID}-00".encode(), b"a=b")

        assert ctx == TraceContext(TRACE_ID, SPAN_ID, False, "a=b")

    def test_only_the_sampled_bit_counts(self) -> None:
        """Unknown flag bits are ignored; the low bit is the sampled flag."""
        assert TraceContext.parse(f"00-{TRACE_ID}-{SPAN_ID}-03").sampled  # type: ignore[union-attr]
        assert not TraceContext.parse(f"00-{TRACE_ID}-{SPAN_ID}-02").sampled  # type: ignore[union-attr]

    def test_future_version_is_read_by_its_prefix(self) -> None:
        """A later version with extra fields is read by its version-00 part."""
        ctx = TraceContext.parse(f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-holds")

        assert ctx == TraceContext(TRACE_ID, SPAN_ID)

    def test_surrounding_whitespace_is_tolerated(self) -> None:
        """Optional whitespace around the header value is ignored."""
        assert TraceContext.parse(f" {TRACEPARENT}\t") == TraceContext(
            TRACE_ID, SPAN_ID
        )

    @pytest.mark.parametrize(
        "header",
        [
            None,
            "",
            "garbage",
            TRACEPARENT.upper(),
            f"ff-{TRACE_ID}-{SPAN_ID}-01",
            f"00-{'0' * 32}-{SPAN_ID}-01",
            f"00-{TRACE_ID}-{'0' * 16}-01",
            f"00-{TRACE_ID}-{SPAN_ID}-01-extra",
            f"00-{TRACE_ID}-{SPAN_ID}-1",
            f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01",
            f"00-{TRACE_ID}-{SPAN_ID}x01",
            f"cc-{TRACE_ID}-{SPAN_ID}-01x",
            f"0-{TRACE_ID}-{SPAN_ID}-01",
            f"g0-{TRACE_ID}-{SPAN_ID}-01",
            f"00-{TRACE_ID}-{SPAN_ID}-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
            b"00-\xff",
        ],
    )
    def test_invalid_traceparent_is_none(self, header: str | bytes | None) -> None:
        """Every header the W3C rules reject parses to None."""
        assert TraceContext.parse(header) is None

    @pytest.mark.parametrize(
        ("tracestate", "expected"),
        [
            (
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            ),
            (" a=1 ,, b=2 ", "a=1,b=2"),
            ("tenant@vendor=x", "tenant@vendor=x"),
            ("", None),
            (",", None),
            ("no-equals", None),
            ("Upper=1", None),
            ("a=trailing ", "a=trailing"),
            ("a=x=y", None),
            (",".join(f"k{i}=v" for i in range(33)), None),
        ],
    )
    def test_tracestate_is_normalised_or_dropped(
        self, tracestate: str, expected: str | None
    ) -> None:
        """A valid tracestate is kept (normalised); an invalid one is dropped."""
        ctx = TraceContext.parse(TRACEPARENT, tracestate)

        assert ctx is not None
        assert ctx.tracestate == expected

    def test_tracestate_without_traceparent_is_ignored(self) -> None:
        """Without a valid traceparent there is no context at all."""
        assert TraceContext.parse(None, "a=1") is None

    @given(trace_id=hex_ids, span_id=span_ids, sampled=st.booleans())
    def test_traceparent_round_trips(
        self, trace_id: str, span_id: str, sampled: bool
    ) -> None:
        """Parsing a context's traceparent gives the same context back."""
        ctx = TraceContext(trace_id, span_id, sampled, "k=v")

        assert TraceContext.parse(ctx.traceparent, ctx.tracestate) == ctx


class TestCurrentTrace:
    def test_use_trace_binds_and_restores(self) -> None:
        """use_trace binds for the block and restores the outer value after."""
        outer = TraceContext.new_root()
        inner = outer.child()

        with use_trace(outer):
            with use_trace(inner) as bound:
                assert bound is inner
                assert current_trace() is inner
            assert current_trace() is outer
        assert current_trace() is None

    def test_bind_and_unbind_trace(self) -> None:
        """bind_trace binds until unbind_trace restores the previous trace."""
        outer, inner = TraceContext.new_root(), TraceContext.new_root()

        with use_trace(outer):
            token = bind_trace(inner)
            assert current_trace() is inner
            unbind_trace(token)
            assert current_trace() is outer

    def test_use_trace_none_clears(self) -> None:
        """Binding None hides the outer trace inside the block."""
        with use_trace(TraceContext.new_root()), use_trace(None):
            assert current_trace() is None

    def test_restored_after_exception(self) -> None:
        """The previous trace is restored even when the block raises."""
        ctx = TraceContext.new_root()

        with pytest.raises(RuntimeError), use_trace(ctx):
            raise RuntimeError("boom")

        assert current_trace() is None

    async def test_asyncio_tasks_inherit_and_isolate(self) -> None:
        """Tasks see the trace bound when they were created, each its own."""
        first, second = TraceContext.new_root(), TraceContext.new_root()

        async def read_after_yield() -> TraceContext | None:
            await asyncio.sleep(0)
            return current_trace()

        with use_trace(first):
            task_a = asyncio.create_task(read_after_yield())
        with use_trace(second):
            task_b = asyncio.create_task(read_after_yield())

        assert await asyncio.wait_for(task_a, 5) is first
        assert await asyncio.wait_for(task_b, 5) is second
        assert current_trace() is None

    def test_threads_see_it_through_copy_context(self) -> None:
        """A thread sees the trace when run through copy_context, not otherwise."""
        ctx = TraceContext.new_root()

        with ThreadPoolExecutor(max_workers=1) as pool, use_trace(ctx):
            copied = pool.submit(contextvars.copy_context().run, current_trace)
            bare = pool.submit(current_trace)
            assert copied.result(timeout=5) is ctx
            assert bare.result(timeout=5) is None

    async def test_to_thread_carries_the_trace(self) -> None:
        """asyncio.to_thread runs the function under the caller's trace."""
        ctx = TraceContext.new_root()

        with use_trace(ctx):
            seen = await asyncio.wait_for(asyncio.to_thread(current_trace), 5)

        assert seen is ctx


class TestInjectExtract:
    def test_inject_without_trace_starts_a_root(self) -> None:
        """With no current trace, inject writes a new root."""
        headers: dict[str, str] = {}

        ctx = inject(headers)

        assert headers == {"traceparent": ctx.traceparent}
        assert TRACEPARENT_RE.fullmatch(headers["traceparent"])

    def test_inject_writes_a_child_of_the_current_trace(self) -> None:
        """inject writes a child: same trace id, new span id, the state kept."""
        parent = TraceContext(TRACE_ID, SPAN_ID, tracestate="a=1")
        headers = {"message-id": "m1"}

        with use_trace(parent):
            ctx = inject(headers)

        assert ctx.trace_id == TRACE_ID
        assert ctx.span_id != SPAN_ID
        assert headers == {
            "message-id": "m1",
            "traceparent": ctx.traceparent,
            "tracestate": "a=1",
        }

    def test_each_inject_is_a_new_hop(self) -> None:
        """Two messages from one trace get distinct span ids."""
        with use_trace(TraceContext.new_root()):
            first, second = inject({}), inject({})

        assert first.trace_id == second.trace_id
        assert first.span_id != second.span_id

    def test_inject_removes_stale_tracestate(self) -> None:
        """A tracestate left in the headers does not outlive its traceparent."""
        headers = {"traceparent": "stale", "tracestate": "old=1"}

        inject(headers)

        assert "tracestate" not in headers
        assert headers["traceparent"] != "stale"

    def test_extract_reads_str_and_bytes(self) -> None:
        """extract reads header values given as str or bytes."""
        assert extract({"traceparent": TRACEPARENT}) == TraceContext(TRACE_ID, SPAN_ID)
        assert extract(
            {"traceparent": TRACEPARENT.encode(), "tracestate": b"a=1"}
        ) == TraceContext(TRACE_ID, SPAN_ID, tracestate="a=1")

    def test_extract_ignores_header_case(self) -> None:
        """Capitalised header names are found too."""
        headers = {"Traceparent": TRACEPARENT, "TraceState": "a=1"}

        assert extract(headers) == TraceContext(TRACE_ID, SPAN_ID, tracestate="a=1")

    @pytest.mark.parametrize(
        "headers", [{}, {"traceparent": "nope"}, {"other": TRACEPARENT}]
    )
    def test_extract_missing_or_invalid_is_none(self, headers: dict[str, str]) -> None:
        """No valid traceparent means no context."""
        assert extract(headers) is None

    def test_inject_then_extract_round_trips(self) -> None:
        """What inject writes, extract reads back unchanged."""
        headers: dict[str, str] = {}

        with use_trace(TraceContext(TRACE_ID, SPAN_ID, tracestate="a=1")):
            written = inject(headers)

        assert extract(headers) == written


class TestStartSpanPlain:
    def test_yields_bound_child_of_parent(self) -> None:
        """Without OpenTelemetry, start_span yields a bound child of the parent."""
        parent = TraceContext(TRACE_ID, SPAN_ID)

        with start_span("handle", "consumer", parent) as ctx:
            assert current_trace() is ctx

        assert ctx.trace_id == TRACE_ID
        assert ctx.span_id != SPAN_ID
        assert current_trace() is None

    def test_defaults_to_current_trace(self) -> None:
        """Without a parent, the span continues the current trace."""
        outer = TraceContext.new_root()

        with use_trace(outer), start_span("work") as ctx:
            assert ctx.trace_id == outer.trace_id

    def test_starts_a_trace_when_there_is_none(self) -> None:
        """Without parent or current trace, the span starts a new trace."""
        with start_span("work") as ctx:
            assert current_trace() is ctx

    def test_unknown_kind_is_refused(self) -> None:
        """A span kind outside SPAN_KINDS raises a named error."""
        with (
            pytest.raises(UnknownSpanKindError, match=r"'sideways'.*consumer"),
            start_span("x", "sideways"),
        ):
            pass

    def test_opentelemetry_is_off_by_default(self) -> None:
        """Spans are plain until the caller enables OpenTelemetry."""
        assert not opentelemetry_enabled()


@pytest.fixture
def otel_spans() -> Iterator[Any]:
    """Enable the OpenTelemetry bridge with an in-memory span exporter."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    enable_opentelemetry(provider)
    try:
        yield exporter
    finally:
        disable_opentelemetry()
        provider.shutdown()


class TestStartSpanOpenTelemetry:
    def test_real_span_under_given_parent(self, otel_spans: Any) -> None:
        """The span is recorded under the parent, and its ids are yielded."""
        parent = TraceContext(TRACE_ID, SPAN_ID, tracestate="a=1")

        with start_span(
            "orders process", "consumer", parent, {"messaging.system": "kafka"}
        ) as ctx:
            assert current_trace() is ctx

        (span,) = otel_spans.get_finished_spans()
        assert ctx.trace_id == TRACE_ID == f"{span.context.trace_id:032x}"
        assert ctx.span_id == f"{span.context.span_id:016x}" != SPAN_ID
        assert f"{span.parent.span_id:016x}" == SPAN_ID
        assert span.parent.is_remote
        assert span.name == "orders process"
        assert span.kind.name == "CONSUMER"
        assert span.attributes["messaging.system"] == "kafka"
        assert ctx.tracestate == "a=1"

    def test_nested_spans_chain(self, otel_spans: Any) -> None:
        """A span opened inside another, without a parent, becomes its child."""
        with start_span("outer", "consumer") as outer, start_span("inner", "producer"):
            pass

        inner_span, outer_span = otel_spans.get_finished_spans()
        assert inner_span.parent.span_id == outer_span.context.span_id
        assert outer_span.parent is None
        assert f"{outer_span.context.span_id:016x}" == outer.span_id

    def test_exception_is_recorded(self, otel_spans: Any) -> None:
        """An exception leaving the block marks the span as failed."""
        with pytest.raises(KeyError), start_span("boom", "consumer"):
            raise KeyError("x")

        (span,) = otel_spans.get_finished_spans()
        assert span.status.status_code.name == "ERROR"
        assert span.events[0].name == "exception"

    def test_no_op_tracer_still_makes_new_span_ids(self) -> None:
        """With the API's no-op provider, each span still gets its own id."""
        pytest.importorskip("opentelemetry")
        from opentelemetry.trace import NoOpTracerProvider

        parent = TraceContext(TRACE_ID, SPAN_ID)
        enable_opentelemetry(NoOpTracerProvider())
        try:
            with start_span("x", "producer", parent) as ctx:
                pass
        finally:
            disable_opentelemetry()

        assert ctx.trace_id == TRACE_ID
        assert ctx.span_id != SPAN_ID

    @pytest.mark.parametrize("kind", SPAN_KINDS)
    def test_every_kind_maps(self, otel_spans: Any, kind: str) -> None:
        """Each accepted kind becomes the OpenTelemetry kind of that name."""
        with start_span("k", kind):
            pass

        (span,) = otel_spans.get_finished_spans()
        assert span.kind.name == kind.upper()


class TestMissingExtra:
    def test_enable_without_opentelemetry_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without opentelemetry installed, enabling it names the extra."""
        monkeypatch.setitem(sys.modules, "opentelemetry", None)

        with pytest.raises(MissingExtraError, match=r"duct-messaging\[otel\]"):
            enable_opentelemetry()

        assert not opentelemetry_enabled()
