"""Health, reflection and the metrics endpoint on trio as on asyncio (the ``backends`` marker).

The peers are grpcio's synchronous client and plain sockets, in worker threads
(``anyio.to_thread``), so that they are independent of the loop under test.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from app_kit import Health, Server, ServerInterceptor, ServiceLike
from app_kit.observe.prometheus import ServerMetrics, ServerStatsCollector, serve_metrics
from app_kit.protos.grpc.reflection.v1 import reflection_pb2 as v1
from app_kit.services.reflection import Reflection

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

T = TypeVar("T")
Response = health_pb2.HealthCheckResponse
SERVING, NOT_SERVING, SERVICE_UNKNOWN = Response.SERVING, Response.NOT_SERVING, Response.SERVICE_UNKNOWN


@contextlib.asynccontextmanager
async def serving(
    *services: ServiceLike, interceptors: tuple[ServerInterceptor, ...] = ()
) -> AsyncIterator[tuple[Server, str]]:
    server = Server(list(services), interceptors=interceptors)
    await server.start("127.0.0.1", 0)
    try:
        yield server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close(grace=1.0)
        with anyio.fail_after(10):
            await server.wait_closed()


async def in_thread(func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` in a worker thread; a test that goes wrong fails in 10 s."""
    with anyio.fail_after(10):
        return await anyio.to_thread.run_sync(functools.partial(func, *args, **kwargs), abandon_on_cancel=True)


async def read(watch: Any) -> int | None:
    """The next status of a Watch stream; None once it ended."""
    response = await in_thread(next, watch, None)
    return None if response is None else response.status


def request(service: str = "") -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


async def eventually(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.01)


# -- health ---------------------------------------------------------------------------------


async def test_check_list_and_check_functions_run_once_per_ttl(backend: str) -> None:
    runs = {"slow": 0, "ok": 0}

    async def slow() -> bool:
        runs["slow"] += 1
        await anyio.sleep(0.3)
        return True

    async def ok() -> bool:
        runs["ok"] += 1
        return True

    async def broken() -> bool:
        raise ConnectionError("database down")

    async def hangs() -> bool:
        await anyio.sleep(30)
        return True

    health = Health()
    health.set_status("", True)
    health.set_status("cafe.CoffeeMachine", False)
    health.add_check("slow", slow, ttl=60)
    health.add_check("ok", ok, ttl=0.2)
    health.add_check("broken", broken)
    health.add_check("hangs", hangs, timeout=0.1)
    async with serving(health) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert (await in_thread(stub.Check, request(), timeout=5)).status == SERVING
            assert (await in_thread(stub.Check, request("cafe.CoffeeMachine"), timeout=5)).status == NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                await in_thread(stub.Check, request("no.Such"), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

            # Ten probes at once share one run of the check.
            probes = [stub.Check.future(request("slow"), timeout=5) for _ in range(10)]
            assert [(await in_thread(probe.result)).status for probe in probes] == [SERVING] * 10
            assert runs["slow"] == 1

            # A result is reused within its TTL, and the check runs again after it.
            assert [(await in_thread(stub.Check, request("ok"), timeout=5)).status for _ in range(3)] == [SERVING] * 3
            assert runs["ok"] == 1
            await anyio.sleep(0.25)
            assert (await in_thread(stub.Check, request("ok"), timeout=5)).status == SERVING
            assert runs["ok"] == 2

            assert (await in_thread(stub.Check, request("broken"), timeout=5)).status == NOT_SERVING
            started = time.monotonic()
            assert (await in_thread(stub.Check, request("hangs"), timeout=5)).status == NOT_SERVING
            assert time.monotonic() - started < 3  # its timeout is 0.1 s

            listed = await in_thread(stub.List, health_pb2.HealthListRequest(), timeout=5)
            assert {name: value.status for name, value in listed.statuses.items()} == {
                "": SERVING,
                "cafe.CoffeeMachine": NOT_SERVING,
                "slow": SERVING,
                "ok": SERVING,
                "broken": NOT_SERVING,
                "hangs": NOT_SERVING,
            }


async def test_a_probe_whose_deadline_passes_does_not_cancel_the_run_others_wait_for(backend: str) -> None:
    """The server cancels the handler that started the run (on asyncio with ``task.cancel()``,
    which goes through anyio's shields): the run still completes, and its result is shared."""
    runs, completed = 0, 0
    started = anyio.Event()

    async def slow() -> bool:
        nonlocal runs, completed
        runs += 1
        started.set()
        await anyio.sleep(0.5)
        completed += 1
        return True

    health = Health()
    health.add_check("db", slow, ttl=60, timeout=5)
    async with serving(health) as (server, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            impatient = stub.Check.future(request("db"), timeout=0.2)
            with anyio.fail_after(5):
                await started.wait()
            patient = stub.Check.future(request("db"), timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                await in_thread(impatient.result)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert (await in_thread(patient.result)).status == SERVING
            assert (runs, completed) == (1, 1)
            assert (await in_thread(stub.Check, request("db"), timeout=5)).status == SERVING  # cached
            assert runs == 1
            await eventually(lambda: server.stats().calls == 0)


async def test_graceful_shutdown_answers_the_probes_waiting_for_a_check_at_once(backend: str) -> None:
    started = anyio.Event()

    async def stuck() -> bool:
        started.set()
        await anyio.sleep(30)
        return True

    health = Health()
    health.add_check("db", stuck, ttl=60, timeout=60)
    async with serving(health) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            probe = stub.Check.future(request("db"), timeout=8)
            with anyio.fail_after(5):
                await started.wait()
            began = time.monotonic()
            health.enter_graceful_shutdown()
            assert (await in_thread(probe.result)).status == NOT_SERVING
            assert time.monotonic() - began < 4  # not the check's 30 s, nor the probe's deadline


async def test_watch_pushes_changes_unknown_services_and_shutdown(backend: str) -> None:
    health = Health()
    health.set_status("", True)
    async with serving(health) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            overall = stub.Watch(request(), timeout=30)
            later = stub.Watch(request("orders.Orders"), timeout=30)
            assert await read(overall) == SERVING
            assert await read(later) == SERVICE_UNKNOWN  # the stream stays open

            health.set_status("orders.Orders", True)
            assert await read(later) == SERVING
            health.set_status("", False)
            assert await read(overall) == NOT_SERVING
            health.set_status("", True)
            assert await read(overall) == SERVING

            # Many changes faster than the client reads: the latest state always arrives.
            for index in range(50):
                health.set_status("orders.Orders", index % 2 == 0)
            health.set_status("orders.Orders", False)
            seen: list[int | None] = []
            while not seen or seen[-1] != NOT_SERVING:
                seen.append(await read(later))

            health.enter_graceful_shutdown()
            assert await read(overall) == NOT_SERVING
            health.set_status("", True)  # ignored from now on
            assert (await in_thread(stub.Check, request(), timeout=5)).status == NOT_SERVING
            health.close()  # the watches end cleanly, so the server can drain
            assert await read(overall) is None and overall.code() == grpc.StatusCode.OK
            assert await read(later) is None and later.code() == grpc.StatusCode.OK


async def test_a_watched_check_is_rerun_and_another_watcher_takes_over_when_its_runner_leaves(backend: str) -> None:
    state = {"up": True}
    runs = 0

    async def flaky() -> bool:
        nonlocal runs
        runs += 1
        return state["up"]

    health = Health()
    health.add_check(["a", "b"], flaky, ttl=0.1)
    async with serving(health) as (server, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            first = stub.Watch(request("a"), timeout=30)
            assert await read(first) == SERVING  # its stream now runs the check every 0.1 s
            second = stub.Watch(request("b"), timeout=30)
            assert await read(second) == SERVING
            state["up"] = False
            assert await read(first) == NOT_SERVING
            assert await read(second) == NOT_SERVING

            began, runs_before = time.monotonic(), runs
            first.cancel()
            await eventually(lambda: server.stats().calls == 1)
            state["up"] = True
            assert await read(second) == SERVING  # re-run from the second stream now
            await anyio.sleep(0.5)
            # Once per TTL for both services, not once per watcher.
            assert runs - runs_before <= (time.monotonic() - began) / 0.1 + 2
            second.cancel()
            await eventually(lambda: server.stats().calls == 0)
            idle = runs
            await anyio.sleep(0.3)
            assert runs == idle  # nobody watches: nothing runs


async def test_watchers_of_a_service_hear_of_a_check_added_later_once_it_ran(backend: str) -> None:
    runs = 0

    async def ok() -> bool:
        nonlocal runs
        runs += 1
        return True

    health = Health()
    async with serving(health) as (_, target):
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(request("late.Service"), timeout=30)
            assert await read(watch) == SERVICE_UNKNOWN
            health.add_check("late.Service", ok, ttl=60)
            # Straight to the check's result: no NOT_SERVING while the first run is under way.
            assert await read(watch) == SERVING
            assert runs == 1
            health.close()
            assert await read(watch) == NOT_SERVING
            assert await read(watch) is None


# -- reflection -----------------------------------------------------------------------------


def _reflect(target: str, requests: list[v1.ServerReflectionRequest]) -> list[v1.ServerReflectionResponse]:
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            v1.ServerReflectionRequest.SerializeToString,
            v1.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=10))


async def test_reflection_answers_at_its_rate_limit(backend: str) -> None:
    health = Health()
    reflection = Reflection.for_services([health], max_requests_per_second=5)
    async with serving(health, *reflection) as (_, target):
        began = time.monotonic()
        responses = await in_thread(_reflect, target, [v1.ServerReflectionRequest(list_services="")] * 10)
        took = time.monotonic() - began
    assert len(responses) == 10
    assert {s.name for s in responses[-1].list_services_response.service} == {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    # A burst of 5, then 5 more at 5 a second: about 1 s.
    assert took > 0.8, took


# -- the metrics endpoint -------------------------------------------------------------------


def _get(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read until the endpoint closes; b"" if it dropped the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with request bytes unread
        return received


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(body: bytes) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


async def _scraped_once_handled(port: int) -> Samples:
    """Scrape until one Health/Check call counts as handled OK (its end is counted just after
    its client saw it); those samples."""
    labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_code": "OK"}
    handled = ("grpc_server_handled_total", frozenset(labels.items()))
    with anyio.fail_after(5):
        while True:
            samples = _samples((await in_thread(_get, f"http://127.0.0.1:{port}/metrics"))[2])
            if samples.get(handled) == 1:
                return samples
            await anyio.sleep(0.02)


async def test_the_metrics_endpoint_answers_only_metrics_and_shuts_down_cleanly(backend: str) -> None:
    registry = CollectorRegistry()
    Counter("scrapes_seen", "A counter.", registry=registry).inc(3)
    async with serve_metrics("127.0.0.1", 0, registry) as port:
        base = f"http://127.0.0.1:{port}"
        status, content_type, body = await in_thread(_get, f"{base}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        assert _samples(body)[("scrapes_seen_total", frozenset())] == 3
        assert (await in_thread(_get, f"{base}/"))[0] == 404
        assert (await in_thread(_get, f"{base}/metricsx"))[0] == 404
        assert (await in_thread(_get, f"{base}/metrics", "POST"))[0] == 405
        assert (await in_thread(_get, f"{base}/metrics?name[]=x", "HEAD"))[::2] == (200, b"")
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        status, content_type, body = await in_thread(_get, f"{base}/metrics", "GET", accept)
        assert status == 200 and content_type.startswith("application/openmetrics-text; version=1.0.0")
        assert body.endswith(b"# EOF\n")
        # A client that connects and sends nothing does not hold the exit up.
        idle = await in_thread(socket.create_connection, ("127.0.0.1", port), 5)
        await anyio.sleep(0.05)
    with idle:
        assert await in_thread(idle.recv, 100) == b""  # closed by the exit
    with pytest.raises(OSError):
        await in_thread(socket.create_connection, ("127.0.0.1", port), 5)


async def test_the_metrics_endpoint_limits_the_request_head_and_the_wait_for_it(backend: str) -> None:
    limit = 256

    def head(size: int) -> bytes:
        start, end = b"GET /metrics HTTP/1.1\r\nX-Pad: ", b"\r\n\r\n"
        return start + b"p" * (size - len(start) - len(end)) + end

    async with serve_metrics("127.0.0.1", 0, CollectorRegistry(), max_request_bytes=limit, read_timeout=0.3) as port:
        assert (await in_thread(_exchange, port, head(limit))).startswith(b"HTTP/1.1 200 OK\r\n")
        assert await in_thread(_exchange, port, head(limit + 1)) == b""  # dropped unanswered
        assert await in_thread(_exchange, port, b"x" * 10 * limit) == b""
        assert await in_thread(_exchange, port, b"NONSENSE\r\n\r\n") == b""
        began = time.monotonic()
        assert await in_thread(_exchange, port, b"GET /metrics HTTP/1.1\r\n") == b""  # never finished
        assert 0.25 < time.monotonic() - began < 3


class _BigPage:
    """A collector whose page is far larger than the sockets' buffers (~8 MB)."""

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("padding", "x" * 100, labels=["n"])
        for n in range(80_000):
            family.add_metric([f"{n:064d}"], n)
        yield family


def _scrape_without_reading(port: int, wait: float) -> tuple[int, int]:
    """Ask for the page, read nothing for ``wait`` seconds, then read until the endpoint
    closes: (bytes received, the length the response announced)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        time.sleep(wait)
        received = b""
        try:
            while chunk := sock.recv(1 << 20):
                received += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return len(body), length


async def test_the_metrics_endpoint_drops_a_scraper_that_does_not_read(backend: str) -> None:
    # A client that asks for the page and never reads it held its connection (and the
    # page) as long as it liked: the send waited for it without a bound.
    registry = CollectorRegistry()
    registry.register(_BigPage())
    async with serve_metrics("127.0.0.1", 0, registry, write_timeout=0.3) as port:
        received, length = await in_thread(_scrape_without_reading, port, 1.5)
        assert length > 5_000_000 and received < length  # dropped before the page was out
        # The endpoint still answers others.
        status, _, _ = await in_thread(_get, f"http://127.0.0.1:{port}/metrics", "HEAD")
        assert status == 200


async def test_the_metrics_endpoint_limits_its_open_connections(backend: str) -> None:
    # Connections that send nothing are each held up to read_timeout; over max_connections
    # more are closed at once instead of piling up.
    async with serve_metrics("127.0.0.1", 0, CollectorRegistry(), max_connections=3, read_timeout=30) as port:
        idle = [await in_thread(socket.create_connection, ("127.0.0.1", port), 5) for _ in range(3)]
        try:
            await anyio.sleep(0.1)
            began = time.monotonic()
            assert await in_thread(_exchange, port, b"GET /metrics HTTP/1.1\r\n\r\n") == b""
            assert time.monotonic() - began < 2  # closed at once, not after read_timeout
        finally:
            for sock in idle:
                sock.close()
        for _ in range(100):  # their tasks end as the endpoint sees them closed
            reply = await in_thread(_exchange, port, b"GET /metrics HTTP/1.1\r\n\r\n")
            if reply:
                break
            await anyio.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_server_metrics_and_the_collector_scraped_from_a_server_on_this_loop(backend: str) -> None:
    registry = CollectorRegistry()
    health = Health()
    health.set_status("", True)
    server = Server([health], interceptors=[ServerMetrics(registry)])
    registry.register(ServerStatsCollector(server))
    await server.start("127.0.0.1", 0)
    try:
        async with serve_metrics("127.0.0.1", 0, registry) as metrics_port:
            with grpc.insecure_channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert (await in_thread(stub.Check, request(), timeout=5)).status == SERVING
                samples = await _scraped_once_handled(metrics_port)
                assert samples[("app_kit_server_open_connections", frozenset())] == 1
                assert samples[("app_kit_server_connections_total", frozenset())] == 1
    finally:
        server.close(grace=1.0)
        with anyio.fail_after(10):
            await server.wait_closed()


async def test_an_error_in_the_block_comes_out_of_serve_metrics_as_it_is(backend: str) -> None:
    with pytest.raises(LookupError, match="the block's own"):  # not inside an ExceptionGroup
        async with serve_metrics("127.0.0.1", 0, CollectorRegistry()):
            raise LookupError("the block's own")


# -- all three in an App --------------------------------------------------------------------


async def test_an_app_serves_health_reflection_and_metrics_on_this_loop(backend: str) -> None:
    from app_kit import App, AppSettings
    from examples.interop.server import TestService

    app: App[AppSettings] = App(AppSettings, name="metered")
    app.service(lambda: TestService())
    settings = AppSettings(host="127.0.0.1", port=0, metrics_port=0, grace_period=1)
    with contextlib.ExitStack() as channels:
        async with app.serve(settings) as running:
            assert running.metrics_port
            metrics_port = running.metrics_port
            channel = channels.enter_context(
                grpc.insecure_channel(f"127.0.0.1:{running.server.sockets[0].getsockname()[1]}")
            )
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(request(), timeout=30)
            assert await read(watch) == SERVING
            assert (await in_thread(stub.Check, request("grpc.testing.TestService"), timeout=5)).status == SERVING
            reflected = await in_thread(
                _reflect,
                f"127.0.0.1:{running.server.sockets[0].getsockname()[1]}",
                [v1.ServerReflectionRequest(list_services="")],
            )
            assert "grpc.testing.TestService" in {s.name for s in reflected[0].list_services_response.service}
            await _scraped_once_handled(metrics_port)
        # The drain told the watcher, then ended its stream, so that the server could close.
        assert await read(watch) == NOT_SERVING
        assert await read(watch) is None and watch.code() == grpc.StatusCode.OK
    with pytest.raises(urllib.error.URLError):
        await in_thread(_get, f"http://127.0.0.1:{metrics_port}/metrics")  # gone with the App
