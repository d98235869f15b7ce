"""Prometheus metrics over real sockets: calls of every kind from grpcio clients and app_kit's
Channel, then ``/metrics`` scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value, StringValue
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app_kit import Cardinality, Channel, GRPCError, Server, Status
from app_kit.aio.client import method_for
from app_kit.observe.prometheus import ClientMetrics, ServerMetrics, ServerStatsCollector, serve_metrics

from .frames import HANDSHAKE, RawPeer, flood
from .services import EchoService, grpcio_method

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


async def scrape(port: int) -> Samples:
    """GET /metrics over HTTP (in a thread: the endpoint runs in this loop) and parse it."""
    status, content_type, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def labelled(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


async def eventually(port: int, name: str, want: float, **labels: str) -> Samples:
    """Scrape until the sample has its value (a call's end is heard after its client saw it)."""
    async with asyncio.timeout(5):
        while True:
            samples = await scrape(port)
            if value(samples, name, **labels) == want:
                return samples
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def metered_server(registry: CollectorRegistry, service: Any) -> AsyncIterator[tuple[Server, int, int]]:
    """A server with ServerMetrics and its collector in ``registry``; yields it, its port and
    the metrics endpoint's port."""
    server = Server([service], interceptors=[ServerMetrics(registry)])
    registry.register(ServerStatsCollector(server))
    await server.start("127.0.0.1", 0)
    try:
        async with serve_metrics("127.0.0.1", 0, registry) as metrics_port:
            yield server, server.sockets[0].getsockname()[1], metrics_port
    finally:
        server.close(grace=1.0)
        await server.wait_closed()


def call_labels(kind: str, method: str) -> dict[str, str]:
    return {"grpc_type": kind, "grpc_service": "test.Echo", "grpc_method": method}


async def test_server_metrics_count_calls_of_every_kind_by_type_method_and_code() -> None:
    registry = CollectorRegistry()
    service = EchoService()
    async with metered_server(registry, service) as (_, port, metrics_port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            for _ in range(2):
                await unary(BytesValue(value=b"x"))
            client_stream = grpcio_method(channel, "stream_unary", "/test.Echo/ClientStream", BytesValue, Int64Value)
            assert (await client_stream(BytesValue(value=b"ab") for _ in range(3))).value == 6
            server_stream = grpcio_method(channel, "unary_stream", "/test.Echo/ServerStream", Int64Value, Int64Value)
            assert len([r async for r in server_stream(Int64Value(value=4))]) == 4
            bidi = grpcio_method(channel, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)
            assert len([r async for r in bidi(BytesValue(value=b"b") for _ in range(5))]) == 5
            fail = grpcio_method(channel, "unary_unary", "/test.Echo/Fail", StringValue, StringValue)
            for how, code in (("grpc", grpc.StatusCode.NOT_FOUND), ("crash", grpc.StatusCode.UNKNOWN)):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await fail(StringValue(value=how))
                assert failed.value.code() == code
            sleep = grpcio_method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)
            held = sleep(DoubleValue(value=30))
            await service.started.wait()
            # While it runs: one connection open, one call running, counted started, not handled.
            samples = await scrape(metrics_port)
            assert value(samples, "app_kit_server_open_connections") == 1
            assert value(samples, "app_kit_server_running_calls") == 1
            assert value(samples, "grpc_server_started_total", **call_labels("unary", "Sleep")) == 1
            assert value(samples, "grpc_server_handled_total", **call_labels("unary", "Sleep"), grpc_code="OK") is None
            await asyncio.sleep(0.01)  # (held over 5 ms, whatever the scrape took: its bucket below)
            held.cancel()
            samples = await eventually(
                metrics_port, "grpc_server_handled_total", 1, **call_labels("unary", "Sleep"), grpc_code="Canceled"
            )

    started = labelled(samples, "grpc_server_started_total")
    assert started == {
        frozenset(call_labels(kind, method).items()): count
        for kind, method, count in [
            ("unary", "Unary", 2),
            ("client_stream", "ClientStream", 1),
            ("server_stream", "ServerStream", 1),
            ("bidi_stream", "Bidi", 1),
            ("unary", "Fail", 2),
            ("unary", "Sleep", 1),
        ]
    }
    handled = labelled(samples, "grpc_server_handled_total")
    assert handled == {
        frozenset({**call_labels(kind, method), "grpc_code": code}.items()): count
        for kind, method, code, count in [
            ("unary", "Unary", "OK", 2),
            ("client_stream", "ClientStream", "OK", 1),
            ("server_stream", "ServerStream", "OK", 1),
            ("bidi_stream", "Bidi", "OK", 1),
            ("unary", "Fail", "NotFound", 1),
            ("unary", "Fail", "Unknown", 1),
            ("unary", "Sleep", "Canceled", 1),  # Go's names, as go-grpc-prometheus
        ]
    }
    received = labelled(samples, "grpc_server_msg_received_total")
    sent = labelled(samples, "grpc_server_msg_sent_total")
    for kind, method, requests, replies in [
        ("unary", "Unary", 2, 2),
        ("client_stream", "ClientStream", 3, 1),
        ("server_stream", "ServerStream", 1, 4),
        ("bidi_stream", "Bidi", 5, 5),
        ("unary", "Fail", 2, 0),
        ("unary", "Sleep", 1, 0),
    ]:
        key = frozenset(call_labels(kind, method).items())
        assert (received[key], sent.get(key, 0)) == (requests, replies), method
    # The histogram: one observation per call, under the bucket that holds its duration.
    unary_labels = call_labels("unary", "Unary")
    assert value(samples, "grpc_server_handling_seconds_count", **unary_labels) == 2
    assert value(samples, "grpc_server_handling_seconds_bucket", **unary_labels, le="+Inf") == 2
    assert value(samples, "grpc_server_handling_seconds_bucket", **unary_labels, le="10.0") == 2
    assert 0 < value(samples, "grpc_server_handling_seconds_sum", **unary_labels) < 5  # type: ignore[operator]
    sleep_labels = call_labels("unary", "Sleep")
    assert value(samples, "grpc_server_handling_seconds_bucket", **sleep_labels, le="0.005") == 0
    assert value(samples, "app_kit_server_connections_total") == 1
    assert labelled(samples, "app_kit_server_connection_errors_total") == {}


async def test_the_collector_counts_connections_and_the_connections_ended_with_errors() -> None:
    registry = CollectorRegistry()
    async with metered_server(registry, EchoService()) as (_, port, metrics_port):
        for attack in (flood("PING", 100), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", HANDSHAKE + b"\x00" * 9):
            async with RawPeer(port) as peer:
                await peer.send(attack)
                await peer.wait_closed()
        samples = await eventually(metrics_port, "app_kit_server_connections_total", 3)
        async with asyncio.timeout(5):
            while value(samples, "app_kit_server_open_connections") != 0:
                samples = await scrape(metrics_port)
    assert labelled(samples, "app_kit_server_connection_errors_total") == {
        frozenset({("error", "ENHANCE_YOUR_CALM")}): 1,
        frozenset({("error", "PROTOCOL_ERROR")}): 2,
    }
    assert value(samples, "app_kit_server_running_calls") == 0


async def test_client_metrics_of_app_kit_channel_calls() -> None:
    registry = CollectorRegistry()
    async with metered_server(CollectorRegistry(), EchoService()) as (_, port, _):
        async with serve_metrics("127.0.0.1", 0, registry) as metrics_port:
            async with Channel("127.0.0.1", port, interceptors=[ClientMetrics(registry)]) as channel:

                def method(name: str, cardinality: Cardinality, request: Any, reply: Any) -> Any:
                    return method_for(channel, f"/test.Echo/{name}", cardinality, request, reply)

                await method("Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)(BytesValue(value=b"x"))
                client_stream = method("ClientStream", Cardinality.STREAM_UNARY, BytesValue, Int64Value)
                assert (await client_stream([BytesValue(value=b"ab")] * 3)).value == 6
                server_stream = method("ServerStream", Cardinality.UNARY_STREAM, Int64Value, Int64Value)
                assert len(await server_stream(Int64Value(value=4))) == 4
                bidi = method("Bidi", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
                assert len(await bidi([BytesValue(value=b"b")] * 5)) == 5
                fail = method("Fail", Cardinality.UNARY_UNARY, StringValue, StringValue)
                with pytest.raises(GRPCError) as failed:
                    await fail(StringValue(value="grpc"))
                assert failed.value.status is Status.NOT_FOUND
                sleep = method("Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
                with pytest.raises(GRPCError) as late:
                    await sleep(DoubleValue(value=5), timeout=0.2)
                assert late.value.status is Status.DEADLINE_EXCEEDED
            samples = await scrape(metrics_port)

    rows = [
        ("unary", "Unary", "OK", 1, 1),
        ("client_stream", "ClientStream", "OK", 3, 1),
        ("server_stream", "ServerStream", "OK", 1, 4),
        ("bidi_stream", "Bidi", "OK", 5, 5),
        ("unary", "Fail", "NotFound", 1, 0),
        ("unary", "Sleep", "DeadlineExceeded", 1, 0),
    ]
    assert labelled(samples, "grpc_client_started_total") == {
        frozenset(call_labels(kind, method).items()): 1 for kind, method, *_ in rows
    }
    assert labelled(samples, "grpc_client_handled_total") == {
        frozenset({**call_labels(kind, method), "grpc_code": code}.items()): 1 for kind, method, code, *_ in rows
    }
    for kind, name, _, requests, replies in rows:
        labels = call_labels(kind, name)
        assert value(samples, "grpc_client_msg_sent_total", **labels) == requests, name
        assert (value(samples, "grpc_client_msg_received_total", **labels) or 0) == replies, name
        assert value(samples, "grpc_client_handling_seconds_count", **labels) == 1, name
    # The deadline call took at least its 0.2 s (the upper bound is the timer's slack).
    sleep_labels = call_labels("unary", "Sleep")
    assert value(samples, "grpc_client_handling_seconds_bucket", **sleep_labels, le="0.1") == 0
    assert not any(name.startswith("grpc_server_") for name, _ in samples)  # another registry's


async def test_the_endpoint_answers_only_metrics_and_shuts_down_cleanly() -> None:
    registry = CollectorRegistry()
    async with serve_metrics("127.0.0.1", 0, registry) as port:
        base = f"http://127.0.0.1:{port}"
        assert (await asyncio.to_thread(_get, f"{base}/"))[0] == 404
        assert (await asyncio.to_thread(_get, f"{base}/metricsx"))[0] == 404
        assert (await asyncio.to_thread(_get, f"{base}/metrics", "POST"))[0] == 405
        status, _, body = await asyncio.to_thread(_get, f"{base}/metrics?name[]=x", "HEAD")
        assert (status, body) == (200, b"")
        # What Prometheus asks for when it prefers OpenMetrics.
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        status, content_type, body = await asyncio.to_thread(_get, f"{base}/metrics", "GET", accept)
        assert status == 200 and content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert body.endswith(b"# EOF\n")
        # A client that connects and sends nothing does not hold the shutdown up.
        idle, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        assert await idle.read() == b""  # closed by the endpoint's exit
    idle_writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_importing_app_kit_loads_neither_prometheus_nor_opentelemetry() -> None:
    code = (
        "import sys, app_kit, app_kit.observe, app_kit.observe.access_log; "
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))))"
    )
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0 and out.strip() == b"[]"


async def test_an_app_with_app_metrics_port_serves_metrics_until_it_has_drained() -> None:
    from app_kit import App, AppSettings
    from examples.interop.server import TestService

    app: App[AppSettings] = App(AppSettings, name="metered")
    app.service(lambda: TestService())
    settings = AppSettings(host="127.0.0.1", port=0, metrics_port=0, grace_period=1)
    async with app.serve(settings) as running:
        assert running.metrics_port
        target = f"127.0.0.1:{running.server.sockets[0].getsockname()[1]}"
        async with grpc.aio.insecure_channel(target) as channel:
            empty = channel.unary_unary("/grpc.testing.TestService/EmptyCall")
            await empty(b"")
            samples = await eventually(
                running.metrics_port,
                "grpc_server_handled_total",
                1,
                grpc_service="grpc.testing.TestService",
                grpc_method="EmptyCall",
                grpc_code="OK",
                grpc_type="unary",
            )
            assert value(samples, "app_kit_server_open_connections") == 1
        port = running.metrics_port
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")  # gone with the App
