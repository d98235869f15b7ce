"""OpenTelemetry over real sockets: spans from our client to our server share a trace, a
``traceparent`` a grpcio client sends is continued, a handler's own spans and calls are the
server span's children; the RPC metrics. Each test has its own TracerProvider (with the SDK's
in-memory exporter) passed explicitly: no global state is set."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, StringValue
from opentelemetry import propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app_kit import Cardinality, Channel, GRPCError, Handler, ServerInterceptor, Status, Stream
from app_kit.aio.client import method_for
from app_kit.observe.otel import ClientTracing, ServerTracing

from .conftest import running_server
from .services import EchoService

pytestmark = pytest.mark.anyio


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@contextlib.asynccontextmanager
async def traced_server(services: Sequence[Any], interceptors: Sequence[ServerInterceptor]) -> AsyncIterator[int]:
    async with running_server(services, interceptors=interceptors) as (server, _):
        yield server.sockets[0].getsockname()[1]


async def finished(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The ended spans, once there are ``count`` (a server span ends after its client saw the
    status)."""
    async with asyncio.timeout(5):
        while len(exporter.get_finished_spans()) < count:
            await asyncio.sleep(0.01)
    spans = list(exporter.get_finished_spans())
    assert len(spans) == count, [span.name for span in spans]
    exporter.clear()
    return spans


def by_kind(spans: list[ReadableSpan]) -> dict[SpanKind, ReadableSpan]:
    found = {span.kind: span for span in spans}
    assert len(found) == len(spans)
    return found


def echo_method(channel: Channel, name: str, request: Any, reply: Any) -> Any:
    return method_for(channel, f"/test.Echo/{name}", Cardinality.UNARY_UNARY, request, reply)


async def test_our_client_and_our_server_share_one_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    server_tracing = ServerTracing(provider)
    async with traced_server([EchoService()], [server_tracing]) as port:
        async with Channel("127.0.0.1", port, interceptors=[ClientTracing(provider)]) as channel:
            await echo_method(channel, "Unary", BytesValue, BytesValue)(BytesValue(value=b"x"))
            spans = by_kind(await finished(exporter, 2))
            client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
            assert client.name == server.name == "test.Echo/Unary"
            assert client.parent is None  # nothing was current: the client span is the root
            assert server.parent is not None and server.parent.is_remote
            assert server.context.trace_id == client.context.trace_id
            assert server.parent.span_id == client.context.span_id
            for span in (client, server):
                assert span.status.status_code is StatusCode.UNSET
                assert span.attributes is not None
                assert {key: span.attributes[key] for key in ("rpc.system", "rpc.service", "rpc.method")} == {
                    "rpc.system": "grpc",
                    "rpc.service": "test.Echo",
                    "rpc.method": "Unary",
                }
                assert span.attributes["rpc.grpc.status_code"] == 0
                assert span.attributes["network.peer.address"] == "127.0.0.1"
                assert span.attributes["network.transport"] == "tcp"
            assert client.attributes is not None and server.attributes is not None
            assert client.attributes["network.peer.port"] == port
            assert isinstance(server.attributes["network.peer.port"], int)
            assert server.attributes["network.peer.port"] not in (0, port)
            assert server.start_time is not None and client.start_time is not None
            assert client.start_time <= server.start_time

            # NOT_FOUND: the client's error, not the server's; UNKNOWN (a crash) and
            # UNIMPLEMENTED: errors on both sides, and the crash's exception is on the span.
            fail = echo_method(channel, "Fail", StringValue, StringValue)
            for how, status, server_error in [
                ("grpc", Status.NOT_FOUND, False),
                ("crash", Status.UNKNOWN, True),
                ("unimplemented", Status.UNIMPLEMENTED, True),
            ]:
                with pytest.raises(GRPCError) as failed:
                    await fail(StringValue(value=how))
                assert failed.value.status is status
                spans = by_kind(await finished(exporter, 2))
                client, server = spans[SpanKind.CLIENT], spans[SpanKind.SERVER]
                assert server.parent is not None and server.parent.span_id == client.context.span_id
                assert client.attributes is not None and server.attributes is not None
                assert client.attributes["rpc.grpc.status_code"] == server.attributes["rpc.grpc.status_code"] == status
                assert client.status.status_code is StatusCode.ERROR, how
                assert client.status.description is not None and client.status.description.startswith(status.name)
                assert server.status.status_code is (StatusCode.ERROR if server_error else StatusCode.UNSET), how
                exceptions = [event for event in server.events if event.name == "exception"]
                if how == "crash":
                    assert exceptions[0].attributes is not None
                    assert exceptions[0].attributes["exception.type"] == "RuntimeError"
                else:
                    assert exceptions == []

            # A deadline: the client's own DEADLINE_EXCEEDED is an error on both sides.
            with pytest.raises(GRPCError):
                await echo_method(channel, "Sleep", DoubleValue, DoubleValue)(DoubleValue(value=5), timeout=0.1)
            spans = by_kind(await finished(exporter, 2))
            assert spans[SpanKind.CLIENT].status.status_code is StatusCode.ERROR
            assert spans[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert server_tracing._spans == {}  # every span ended and was let go


def grpcio_unary(channel: grpc.aio.Channel, path: str, request_type: Any, reply_type: Any) -> Any:
    return channel.unary_unary(
        path, request_serializer=request_type.SerializeToString, response_deserializer=reply_type.FromString
    )


async def test_a_traceparent_from_a_grpcio_client_is_continued(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    service = EchoService()
    async with traced_server([service], [ServerTracing(provider)]) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcio_unary(channel, "/test.Echo/Unary", BytesValue, BytesValue)
            traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"
            await unary(BytesValue(value=b"x"), metadata=(("traceparent", traceparent), ("tracestate", "vendor=1")))
            [server] = await finished(exporter, 1)
            assert server.kind is SpanKind.SERVER and server.name == "test.Echo/Unary"
            assert server.context.trace_id == trace_id
            assert server.parent is not None and server.parent.is_remote
            assert server.parent.span_id == parent_id
            assert server.context.trace_state.get("vendor") == "1"
            assert server.context.trace_flags.sampled

            # What an OpenTelemetry-instrumented grpcio client sends: the global propagator's
            # headers for the span current when it calls.
            with provider.get_tracer("grpcio-side").start_as_current_span("caller") as caller:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                await unary(BytesValue(value=b"y"), metadata=tuple(carrier.items()))
            spans = await finished(exporter, 2)
            [server] = [span for span in spans if span.kind is SpanKind.SERVER]
            assert server.context.trace_id == caller.get_span_context().trace_id
            assert server.parent is not None and server.parent.span_id == caller.get_span_context().span_id

            # Without a traceparent (or with a broken one) the server span starts a trace.
            for metadata in [(), (("traceparent", "00-zz-broken-01"),)]:
                await unary(BytesValue(value=b"z"), metadata=metadata)
                [server] = await finished(exporter, 1)
                assert server.parent is None and server.context.trace_id != trace_id

            # A call the client cancels is no server error.
            sleep = grpcio_unary(channel, "/test.Echo/Sleep", DoubleValue, DoubleValue)
            call = sleep(DoubleValue(value=30), metadata=(("traceparent", traceparent),))
            await service.started.wait()
            call.cancel()
            [server] = await finished(exporter, 1)
            assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == Status.CANCELLED
            assert server.status.status_code is StatusCode.UNSET
            assert server.context.trace_id == trace_id


class WorkingService:
    """Starts a span of its own, and inside it calls the Echo service through a traced channel."""

    def __init__(self, tracer: trace.Tracer, channel: Channel) -> None:
        self.tracer = tracer
        self.channel = channel

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Work/Do": Handler(self.do, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def do(self, stream: Stream[StringValue, StringValue]) -> StringValue:
        request = await stream.recv_message()
        assert request is not None
        with self.tracer.start_as_current_span("inner work"):
            reply = await echo_method(self.channel, "Unary", BytesValue, BytesValue)(BytesValue(value=b"nested"))
        return StringValue(value=reply.value.decode())


async def test_a_handlers_spans_and_calls_are_children_of_the_server_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    tracing = [ServerTracing(provider)]
    async with traced_server([EchoService()], tracing) as echo_port:
        async with Channel("127.0.0.1", echo_port, interceptors=[ClientTracing(provider)]) as inner_channel:
            worker = WorkingService(provider.get_tracer("handler"), inner_channel)
            async with traced_server([worker], tracing) as port:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    do = grpcio_unary(channel, "/test.Work/Do", StringValue, StringValue)
                    assert (await do(StringValue(value="go"))).value == "nested"
                spans = {(span.name, span.kind): span for span in await finished(exporter, 4)}
    work = spans["test.Work/Do", SpanKind.SERVER]
    inner = spans["inner work", SpanKind.INTERNAL]
    echo_client = spans["test.Echo/Unary", SpanKind.CLIENT]
    echo_server = spans["test.Echo/Unary", SpanKind.SERVER]
    assert work.parent is None
    assert inner.parent is not None and inner.parent.span_id == work.context.span_id
    assert echo_client.parent is not None and echo_client.parent.span_id == inner.context.span_id
    assert echo_server.parent is not None and echo_server.parent.span_id == echo_client.context.span_id
    assert {span.context.trace_id for span in spans.values()} == {work.context.trace_id}


async def test_rpc_metrics_through_the_opentelemetry_api(provider: TracerProvider) -> None:
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    async with traced_server([EchoService()], [ServerTracing(provider, meter_provider=meters)]) as port:
        tracing = ClientTracing(provider, meter_provider=meters)
        async with Channel("127.0.0.1", port, interceptors=[tracing]) as channel:
            for _ in range(3):
                await echo_method(channel, "Unary", BytesValue, BytesValue)(BytesValue(value=b"x"))
            with pytest.raises(GRPCError):
                await echo_method(channel, "Fail", StringValue, StringValue)(StringValue(value="grpc"))

        def points() -> dict[tuple[str, str, int], tuple[int, float]]:
            data = reader.get_metrics_data()
            assert data is not None
            found = {}
            for resource in data.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        for point in metric.data.data_points:
                            assert isinstance(point, HistogramDataPoint) and point.attributes is not None
                            method, code = point.attributes["rpc.method"], point.attributes["rpc.grpc.status_code"]
                            assert isinstance(method, str) and isinstance(code, int)
                            found[metric.name, method, code] = (point.count, point.sum)
            return found

        async with asyncio.timeout(5):
            while ("rpc.server.duration", "Fail", 5) not in (found := points()):
                await asyncio.sleep(0.01)
    for side in ("server", "client"):
        assert found[(f"rpc.{side}.duration", "Unary", 0)][0] == 3
        assert found[(f"rpc.{side}.duration", "Fail", 5)][0] == 1
        assert found[(f"rpc.{side}.requests_per_rpc", "Unary", 0)] == (3, 3)
        assert found[(f"rpc.{side}.responses_per_rpc", "Unary", 0)] == (3, 3)
        assert found[(f"rpc.{side}.responses_per_rpc", "Fail", 5)] == (1, 0)
    meters.shutdown()
