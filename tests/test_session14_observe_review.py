"""Session 14: a review of the observability accounting (access log, Prometheus metrics,
OpenTelemetry spans and metrics), over real sockets.

The invariant: every call that reaches the interceptors is counted started and handled once,
with the status its client saw (CANCELLED when it saw none), is one span ended once with that
status, and is one access-log line; the client side likewise. Peers: hand-built frames
(RawPeer, RawClient), grpcio clients and servers, our Channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import h2.settings
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from prometheus_client import CollectorRegistry

from app_kit import (
    Cardinality,
    Channel,
    ClientInterceptor,
    ClientStream,
    Configuration,
    GRPCError,
    Server,
    ServerInterceptor,
    Status,
    Stream,
)
from app_kit.aio.client import method_for
from app_kit.observe.access_log import AccessLog
from app_kit.observe.otel import ClientTracing, ServerTracing
from app_kit.observe.prometheus import GO_CODE_NAMES, ClientMetrics, ServerMetrics
from app_kit.rpc.framing import frame_message

from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, RST_STREAM, RawPeer, frame, request_block
from .h2client import RawClient
from .services import EchoService, grpcio_method

pytestmark = pytest.mark.anyio

CANCEL = (8).to_bytes(4, "big")
UNARY = frame_message(BytesValue(value=b"x").SerializeToString())


async def until(predicate: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def provider_with(exporter: SpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


class Lines(logging.Handler):
    """The access log's records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Explode(ServerInterceptor):
    """Raises before proceeding when the call asks for it (metadata ``x-explode``)."""

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        if "x-explode" in call.metadata:
            raise RuntimeError("the interceptor broke")
        await proceed()


class Observed:
    """A server's four sinks: spans, Prometheus metrics, the access log and each call's end."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.exporter = InMemorySpanExporter()
        self.tracing = ServerTracing(provider_with(self.exporter))
        self.lines = Lines()
        logger = logging.getLogger(f"session14.access.{id(self)}")
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(self.lines)
        self.calls: list[tuple[str, Status | None]] = []
        observed = self

        class Ends(ServerInterceptor):
            def on_call_end(self, call: Stream[Any, Any]) -> None:
                observed.calls.append((call.method, call.status))

        self.interceptors: list[ServerInterceptor] = [
            self.tracing,
            ServerMetrics(self.registry),
            AccessLog(logger),
            Ends(),
            Explode(),
        ]

    def sample(self, name: str, **labels: str) -> float:
        found = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    found += sample.value
        return found

    @property
    def ended(self) -> list[Status | None]:
        return [status for _, status in self.calls]

    def spans(self, method: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == method.lstrip("/")]

    def check(self, method: str, statuses: Sequence[Status]) -> None:
        """Each sink has exactly one record per call of ``method``, with these statuses (any order)."""
        want = Counter(statuses)
        assert Counter(status for name, status in self.calls if name == method) == want
        lines = [r.grpc_status for r in self.lines.records if r.grpc_method == method]  # type: ignore[attr-defined]
        assert Counter(lines) == Counter(status.name for status in statuses)
        spans = self.spans(method)
        assert Counter((span.attributes or {})["rpc.grpc.status_code"] for span in spans) == Counter(
            int(status) for status in statuses
        )
        assert all(span.kind is SpanKind.SERVER for span in spans)
        assert self.tracing._spans == {}  # every span ended and let go
        name = method.rpartition("/")[2]
        assert self.sample("grpc_server_started_total", grpc_method=name) == len(statuses)
        assert self.sample("grpc_server_handling_seconds_count", grpc_method=name) == len(statuses)
        for status, count in want.items():
            assert self.sample("grpc_server_handled_total", grpc_method=name, grpc_code=GO_CODE_NAMES[status]) == count


@contextlib.asynccontextmanager
async def serving(
    observed: Observed, config: Configuration | None = None, service: Any = None
) -> AsyncIterator[tuple[Server, int]]:
    server = Server([service or EchoService()], config=config, interceptors=observed.interceptors)
    await server.start("127.0.0.1", 0)
    try:
        yield server, server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=0.5)
        await asyncio.wait_for(server.wait_closed(), 3)


def seen(peer: RawPeer, stream_ids: Sequence[int]) -> list[Status]:
    """The status each stream's client saw: its grpc-status, CANCELLED if none came."""
    statuses = peer.trailer_statuses()
    return [Status(int(statuses[i])) if i in statuses else Status.CANCELLED for i in stream_ids]


# -- server: every way a call ends, every sink agrees -------------------------------------------


async def test_every_sink_records_each_way_a_call_ends_once_with_the_status_the_client_saw() -> None:
    observed = Observed()
    service = EchoService()
    config = Configuration(max_receive_message_length=64)
    async with serving(observed, config, service) as (_, port):
        async with RawPeer(port) as peer:
            encoder = hpack.Encoder()

            def head(stream_id: int, path: str = "/test.Echo/Unary", extra: Any = None) -> bytes:
                return frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, path, extra))

            await peer.send(
                HANDSHAKE
                # reset in the same read as its request
                + head(1)
                + frame(DATA, END_STREAM, 1, UNARY)
                + frame(RST_STREAM, 0, 1, CANCEL)
                # deadline passed on arrival
                + head(3, extra=[("grpc-timeout", "1n")])
                + frame(DATA, END_STREAM, 3, UNARY)
                # request over max_receive_message_length
                + head(5)
                + frame(DATA, END_STREAM, 5, frame_message(b"\x0a\x64" + b"x" * 100))
                # a message that does not decode
                + head(7)
                + frame(DATA, END_STREAM, 7, frame_message(b"\xff\xff\xff"))
                # an interceptor that raises before proceeding
                + head(9, extra=[("x-explode", "1")])
                + frame(DATA, END_STREAM, 9, UNARY)
                # its request never comes: the connection's drop ends it
                + head(11)
            )
            await until(lambda: {3, 5, 7, 9} <= set(peer.trailer_statuses()))
            client_saw = seen(peer, [1, 3, 5, 7, 9])
            assert client_saw == [
                Status.CANCELLED,
                Status.DEADLINE_EXCEEDED,
                Status.RESOURCE_EXHAUSTED,
                Status.INTERNAL,
                Status.UNKNOWN,
            ]
        await until(lambda: len(observed.ended) == 6)
        client_saw.append(Status.CANCELLED)
        # A status queued behind a shut flow-control window, then reset by the client.
        client = RawClient("127.0.0.1", port)
        client.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024}
        )
        client.auto_ack = False
        async with client:
            stream_id = await client.request("/test.Echo/Big", Int64Value(value=3).SerializeToString())
            await until(lambda: service.observed.get("sent") == 3)
            await asyncio.sleep(0.05)
            assert len(observed.ended) == 6  # its status still waits
            client.conn.reset_stream(stream_id, 8)
            client.flush()
            await until(lambda: len(observed.ended) == 7)
    observed.check("/test.Echo/Unary", client_saw)
    observed.check("/test.Echo/Big", [Status.CANCELLED])
    # Counted as the handler sent them (queued: most never crossed the wire), as grpc-go's SendMsg.
    assert observed.sample("grpc_server_msg_sent_total", grpc_method="Big") == 3
    # Only a server fault (as the conventions list them) marks the server span ERROR.
    errors = {
        (span.attributes or {})["rpc.grpc.status_code"]
        for span in observed.exporter.get_finished_spans()
        if span.status.status_code is StatusCode.ERROR
    }
    assert errors == {Status.DEADLINE_EXCEEDED, Status.INTERNAL, Status.UNKNOWN}


async def test_a_flood_of_unknown_methods_creates_no_label_set_span_or_line() -> None:
    # go-grpc-prometheus never sees a method grpc-go does not serve (it is answered before the
    # interceptors); grpcio's OpenTelemetry plugin folds them into grpc.method="other". Ours
    # records nothing for them: 10,000 distinct paths leave the label sets at what is served.
    observed = Observed()
    async with serving(observed) as (_, port):
        for connection in range(10):
            async with RawPeer(port) as peer:
                encoder = hpack.Encoder()
                requests = b"".join(
                    frame(
                        HEADERS,
                        END_HEADERS | END_STREAM,
                        2 * i + 1,
                        request_block(encoder, f"/evil{connection}.S{i}/M{i}"),
                    )
                    for i in range(1000)
                )
                await peer.send(HANDSHAKE + requests)
                await until(lambda: len(peer.trailer_statuses()) >= 900 or peer.closed.is_set())
                assert set(peer.trailer_statuses().values()) == {b"12"}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            await unary(BytesValue(value=b"x"))
        await until(lambda: observed.ended)
    label_sets = {
        tuple(sorted(sample.labels.items()))
        for family in observed.registry.collect()
        for sample in family.samples
        if sample.name in ("grpc_server_started_total", "grpc_server_handled_total")
    }
    assert len(label_sets) == 2  # started{Unary}, handled{Unary, OK}
    assert len(observed.exporter.get_finished_spans()) == len(observed.lines.records) == 1


# -- DEFECT: a call reset in the read that brought it is recorded with an answer never sent ------


@pytest.mark.parametrize("case", ["shed", "second request", "over the size limit"])
async def test_a_call_reset_in_the_read_that_brought_it_is_recorded_cancelled(case: str) -> None:
    observed = Observed()
    service = EchoService()
    config = Configuration(max_concurrent_calls=1, max_receive_message_length=64)
    async with serving(observed, config, service) as (_, port), RawPeer(port) as peer:
        encoder = hpack.Encoder()
        await peer.send(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, request_block(encoder, "/test.Echo/Sleep"))
            + frame(DATA, END_STREAM, 1, frame_message(DoubleValue(value=0.2).SerializeToString()))
        )
        await service.started.wait()
        body = {
            "shed": UNARY,
            "second request": UNARY * 2,
            "over the size limit": frame_message(b"\x0a\x64" + b"x" * 100),
        }[case]
        if case != "shed":
            await until(lambda: 1 in peer.trailer_statuses())  # the running call ends: no shedding
        await peer.send(
            frame(HEADERS, END_HEADERS, 3, request_block(encoder, "/test.Echo/Unary"))
            + frame(DATA, END_STREAM, 3, body)
            + frame(RST_STREAM, 0, 3, CANCEL)
        )
        await until(lambda: len(observed.ended) == 2)
        await asyncio.sleep(0.05)
        assert seen(peer, [3]) == [Status.CANCELLED]  # nothing was written on stream 3
    observed.check("/test.Echo/Unary", [Status.CANCELLED])


# -- DEFECT: calls to a served method refused for their headers reach no interceptor -------------


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (("x-token-bin", "!!!"), Status.INTERNAL),
        (("grpc-timeout", "soon"), Status.INTERNAL),
        (("grpc-encoding", "lz4"), Status.UNIMPLEMENTED),
    ],
)
async def test_a_call_refused_for_its_headers_is_answered_before_any_interceptor(
    header: tuple[str, str], status: Status
) -> None:
    # As grpc-core and grpc-go do (documented): a request whose headers cannot be taken is
    # refused by the protocol, like a method the server does not serve; no handler, no call.
    observed = Observed()
    async with serving(observed) as (_, port), RawPeer(port) as peer:
        block = request_block(hpack.Encoder(), "/test.Echo/Unary", [header])
        await peer.send(HANDSHAKE + frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, UNARY))
        await until(lambda: 1 in peer.trailer_statuses())
        assert seen(peer, [1]) == [status]
        await asyncio.sleep(0.05)
    observed.check("/test.Echo/Unary", [])


# -- the client side ----------------------------------------------------------------------------


class Boom(ClientInterceptor):
    async def start(self, call: ClientStream[Any, Any]) -> None:
        if call.method_name == "Sleep" and call.request_metadata.get("x-boom"):
            raise RuntimeError("the interceptor broke")


async def test_client_metrics_and_spans_record_each_call_once_with_what_the_caller_got() -> None:
    registry, exporter = CollectorRegistry(), InMemorySpanExporter()
    ended: list[tuple[str, Status | None, int, int]] = []

    class ClientEnds(ClientInterceptor):
        def on_call_end(self, call: ClientStream[Any, Any]) -> None:
            ended.append((call.method_name, call.status, call.messages_sent, call.messages_received))

    interceptors = [ClientTracing(provider_with(exporter)), ClientMetrics(registry), ClientEnds(), Boom()]
    observed = Observed()
    service = EchoService()
    server = Server([service], interceptors=observed.interceptors)
    await server.start("127.0.0.1", 0)
    async with Channel("127.0.0.1", server.sockets[0].getsockname()[1], interceptors=interceptors) as channel:
        bidi = method_for(channel, "/test.Echo/Bidi", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
        async with bidi.open() as call:
            for _ in range(3):
                await call.send_message(BytesValue(value=b"a"))
                await call.recv_message()
            await call.cancel()
        sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
        with pytest.raises(RuntimeError):
            await sleep(DoubleValue(value=30), metadata={"x-boom": "1"})
        running = asyncio.ensure_future(sleep(DoubleValue(value=30)))
        await service.started.wait()
        server.close(grace=0.1)
        with pytest.raises(GRPCError) as failed:
            await running
        assert failed.value.status is Status.UNAVAILABLE
        await server.wait_closed()
    assert ended == [
        ("Bidi", Status.CANCELLED, 3, 3),
        ("Sleep", Status.UNKNOWN, 0, 0),
        ("Sleep", Status.UNAVAILABLE, 1, 0),
    ]
    spans = exporter.get_finished_spans()
    assert [(s.name, s.kind, s.status.status_code, (s.attributes or {})["rpc.grpc.status_code"]) for s in spans] == [
        ("test.Echo/Bidi", SpanKind.CLIENT, StatusCode.ERROR, Status.CANCELLED),
        ("test.Echo/Sleep", SpanKind.CLIENT, StatusCode.ERROR, Status.UNKNOWN),
        ("test.Echo/Sleep", SpanKind.CLIENT, StatusCode.ERROR, Status.UNAVAILABLE),
    ]
    for method, started, codes in [("Bidi", 1, {"Canceled": 1}), ("Sleep", 2, {"Unknown": 1, "Unavailable": 1})]:
        labels = {"grpc_service": "test.Echo", "grpc_method": method}
        type_ = "bidi_stream" if method == "Bidi" else "unary"
        assert registry.get_sample_value("grpc_client_started_total", {**labels, "grpc_type": type_}) == started
        for code, count in codes.items():
            handled = {**labels, "grpc_type": type_, "grpc_code": code}
            assert registry.get_sample_value("grpc_client_handled_total", handled) == count
    assert observed.ended == [Status.CANCELLED, Status.UNAVAILABLE]  # the server's view of the two it saw


async def test_client_metrics_on_two_channels_count_both() -> None:
    registry = CollectorRegistry()
    observed = Observed()
    async with serving(observed) as (_, port):
        for _ in range(2):
            async with Channel("127.0.0.1", port, interceptors=[ClientMetrics(registry)]) as channel:
                unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
                await unary(BytesValue(value=b"x"))
    labels = {"grpc_type": "unary", "grpc_service": "test.Echo", "grpc_method": "Unary", "grpc_code": "OK"}
    assert registry.get_sample_value("grpc_client_handled_total", labels) == 2


def test_metrics_sharing_a_registry_must_agree_on_their_buckets() -> None:
    registry = CollectorRegistry()
    assert ServerMetrics(registry)._metrics is ServerMetrics(registry)._metrics
    with pytest.raises(ValueError, match="buckets"):
        ServerMetrics(registry, buckets=(0.1, 1.0))


# -- trace context, both ways -------------------------------------------------------------------


async def test_our_channels_traceparent_is_continued_by_a_grpcio_server() -> None:
    exporter = InMemorySpanExporter()
    received: list[tuple[tuple[str, Any], ...]] = []

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        received.append(tuple(context.invocation_metadata() or ()))
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
    grpcio_server = grpc.aio.server()
    grpcio_server.add_generic_rpc_handlers((handler,))
    port = grpcio_server.add_insecure_port("127.0.0.1:0")
    await grpcio_server.start()
    try:
        async with Channel("127.0.0.1", port, interceptors=[ClientTracing(provider_with(exporter))]) as channel:
            call = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            await call(BytesValue(value=b"x"))
    finally:
        await grpcio_server.stop(None)
    [span] = exporter.get_finished_spans()
    [traceparent] = [value for key, value in received[0] if key == "traceparent"]
    version, trace_id, parent_id, flags = traceparent.split("-")
    assert (version, int(trace_id, 16), int(parent_id, 16)) == ("00", span.context.trace_id, span.context.span_id)
    assert int(flags, 16) & TraceFlags.SAMPLED


class XRayLike(TextMapPropagator):
    """A propagator whose header name has capitals, as AWS X-Ray's (``X-Amzn-Trace-Id``) and
    others' do: gRPC metadata keys are lower-case, so an instrumentation lower-cases what it
    injects and reads keys whatever their case (opentelemetry-instrumentation-grpc does, since
    open-telemetry/opentelemetry-python-contrib#382)."""

    KEY = "X-Amzn-Trace-Id"

    def inject(
        self, carrier: CarrierT, context: Context | None = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        span_context = trace.get_current_span(context).get_span_context()
        if span_context.is_valid:
            setter.set(carrier, self.KEY, f"{span_context.trace_id:032x}-{span_context.span_id:016x}")

    def extract(
        self, carrier: CarrierT, context: Context | None = None, getter: Getter[CarrierT] = default_getter
    ) -> Context:
        values = getter.get(carrier, self.KEY)
        if not values:
            return context if context is not None else Context()
        trace_id, span_id = (int(part, 16) for part in values[0].split("-"))
        remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        return trace.set_span_in_context(NonRecordingSpan(remote), context)

    @property
    def fields(self) -> set[str]:
        return {self.KEY}


async def test_client_tracing_with_a_mixed_case_propagator_does_not_fail_calls() -> None:
    observed = Observed()
    service = EchoService()
    tracing = ClientTracing(provider_with(InMemorySpanExporter()), propagator=XRayLike())
    async with serving(observed, service=service) as (_, port):
        async with Channel("127.0.0.1", port, interceptors=[tracing]) as channel:
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            assert (await unary(BytesValue(value=b"x"))).value == b"x"
    metadata: Any = service.observed["metadata"]
    assert "x-amzn-trace-id" in metadata


async def test_server_tracing_finds_a_mixed_case_propagators_header() -> None:
    exporter = InMemorySpanExporter()
    observed = Observed()
    observed.interceptors[0] = ServerTracing(provider_with(exporter), propagator=XRayLike())
    trace_id, span_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    async with serving(observed) as (_, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
        await unary(BytesValue(value=b"x"), metadata=(("x-amzn-trace-id", f"{trace_id:032x}-{span_id:016x}"),))
        await until(lambda: exporter.get_finished_spans())
    [span] = exporter.get_finished_spans()
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == span_id


# -- an exporter that fails ---------------------------------------------------------------------


class FailingExporter(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        raise ConnectionError("the collector is down")


async def test_a_span_exporter_that_raises_fails_no_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL, logger="opentelemetry")  # (the SDK logs each failure)
    server_exporter, client_exporter = FailingExporter(), FailingExporter()
    observed = Observed()
    observed.interceptors[0] = ServerTracing(provider_with(server_exporter))
    async with serving(observed) as (_, port):
        tracing = ClientTracing(provider_with(client_exporter))
        async with Channel("127.0.0.1", port, interceptors=[tracing]) as channel:
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            for _ in range(3):
                assert (await unary(BytesValue(value=b"x"))).value == b"x"
        await until(lambda: len(observed.ended) == 3)
    assert (server_exporter.calls, client_exporter.calls) == (3, 3)
    assert observed.ended == [Status.OK] * 3
    assert [r.grpc_status for r in observed.lines.records] == ["OK"] * 3  # type: ignore[attr-defined]
