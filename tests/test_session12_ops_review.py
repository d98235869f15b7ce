"""Session 12: an operator's review (grpcio + Kubernetes + Prometheus + uvicorn habits) of
``python -m app_kit run``: drain and health as Kubernetes probes see them, --env-file with
--workers, the Prometheus endpoint, and logging that must not leak metadata.

Every App here runs as a real process (``tests/process.py``) from a module written to
``tmp_path``, called by grpcio clients; metrics are scraped over HTTP and parsed with
prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import re
import signal
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, StringValue
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from app_kit import App, AppSettings, Server
from app_kit.observe.prometheus import ServerMetrics, serve_metrics

from .process import AppProcess
from .services import EchoService, grpcio_method

pytestmark = pytest.mark.anyio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# A self-contained App, as a user would write one: a resource with a health check (counting
# its runs in a file), a service that sleeps, and one that echoes settings and os.environ.
OPS_APP = textwrap.dedent(
    """
    import asyncio
    import os
    from collections.abc import AsyncIterator

    from google.protobuf.wrappers_pb2 import DoubleValue, StringValue
    from pydantic import Field

    from app_kit import App, AppSettings, Cardinality, Handler, Stream


    class OpsSettings(AppSettings):
        greeting: str = Field("hi", validation_alias="OPS_GREETING")
        checks_file: str = Field("", validation_alias="OPS_CHECKS_FILE")


    class Db:
        def __init__(self, checks_file: str) -> None:
            self.checks_file = checks_file

        async def ping(self) -> bool:
            if self.checks_file:
                with open(self.checks_file, "a") as file:
                    file.write("check\\n")
            return True


    class Ops:
        def __init__(self, settings: OpsSettings) -> None:
            self.settings = settings

        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/ops.Ops/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
                "/ops.Ops/Greet": Handler(self.greet, Cardinality.UNARY_UNARY, StringValue, StringValue),
            }

        async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
            request = await stream.recv_message()
            assert request is not None
            await asyncio.sleep(request.value)
            await stream.send_message(request)

        async def greet(self, stream: Stream[StringValue, StringValue]) -> None:
            request = await stream.recv_message()
            assert request is not None
            raw = os.environ.get("OPS_RAW", "-")
            await stream.send_message(StringValue(value=f"{self.settings.greeting} {request.value} {raw}"))


    app = App(OpsSettings, name="ops")


    @app.resource(health_check=Db.ping)
    async def db(settings: OpsSettings) -> AsyncIterator[Db]:
        yield Db(settings.checks_file)


    @app.service
    def ops(settings: OpsSettings, db: Db) -> Ops:
        return Ops(settings)
    """
)


def write_app(directory: Path, prelude: str = "") -> None:
    (directory / "ops_app.py").write_text(prelude + OPS_APP)


async def fresh_check(port: int, service: str = "") -> object:
    """One Health/Check on a new connection, as the kubelet's gRPC probe makes it."""
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1
            )
            return reply.status
    except grpc.aio.AioRpcError as error:
        return error.code()


async def test_a_drain_stays_not_serving_for_fresh_probes_while_the_resource_check_keeps_passing(
    tmp_path: Path,
) -> None:
    # Kubernetes' gRPC probes open a connection per probe. From SIGTERM on, every probe must see
    # NOT_SERVING for the whole drain delay (the resource's check, which passes, must not flip
    # it back to SERVING). Ordinary calls are still served in the delay, then new connections are refused,
    # the call in flight finishes within the grace period, and the process exits 0.
    write_app(tmp_path)
    checks = tmp_path / "checks"
    env = {
        "APP_DRAIN_DELAY": "1.5",
        "APP_GRACE_PERIOD": "5",
        "APP_HEALTH_CHECK_TTL": "0.1",
        "OPS_CHECKS_FILE": str(checks),
    }
    async with AppProcess("ops_app:app", "--port", "0", env=env, cwd=str(tmp_path)) as app:
        port = await app.ready()
        assert await fresh_check(port) == SERVING
        assert "check" in checks.read_text()  # the resource's check runs, and passes
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="ops.Ops"))
            assert (await watch.read()).status == SERVING
            sleep = channel.unary_unary("/ops.Ops/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
            in_flight = asyncio.ensure_future(sleep(DoubleValue(value=2.5), timeout=10))
            await asyncio.sleep(0.2)
            signalled = time.monotonic()
            app.signal(signal.SIGTERM)
            assert (await watch.read()).status == NOT_SERVING
            seen: list[object] = []
            while time.monotonic() - signalled < 1.2:
                seen.append(await fresh_check(port))
                seen.append(await fresh_check(port, "ops.Ops"))
                await asyncio.sleep(0.1)
            # Still served in the delay, on the connection already open.
            assert (await sleep(DoubleValue(value=0.01), timeout=2)).value == pytest.approx(0.01)
            assert seen and all(status == NOT_SERVING for status in seen), seen
            await asyncio.sleep(max(0.0, signalled + 1.8 - time.monotonic()))
            assert await fresh_check(port) == grpc.StatusCode.UNAVAILABLE  # listener closed: refused
            assert (await in_flight).value == 2.5  # within the grace period: served to the end
            assert await watch.read() == grpc.aio.EOF
            assert await watch.code() == grpc.StatusCode.OK
        assert await app.wait() == 0, app.log


async def test_env_file_reaches_every_worker_settings_and_environment(tmp_path: Path) -> None:
    # --env-file "loads a file into the process's environment first, as uvicorn's does ... so the
    # settings and any code that reads os.environ see it": with --workers each worker is a child
    # process; every worker must see the file, in its settings and in os.environ.
    write_app(tmp_path)
    (tmp_path / "ops.env").write_text("OPS_GREETING=hello-from-file\nOPS_RAW=raw-from-file\nAPP_ACCESS_LOG=true\n")
    args = ("ops_app:app", "--port", "0", "--workers", "2", "--env-file", "ops.env")
    async with AppProcess(*args, cwd=str(tmp_path)) as app:
        port = await app.ready()
        async with asyncio.timeout(15):
            while app.log.count(" serving ") < 2:
                await asyncio.sleep(0.05)
        replies: set[str] = set()
        served_by: set[str] = set()
        async with asyncio.timeout(30):
            while len(served_by) < 2:
                # A channel of its own each time: a new connection, which SO_REUSEPORT hands to
                # either worker.
                options = [("grpc.use_local_subchannel_pool", 1)]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
                    greet = channel.unary_unary("/ops.Ops/Greet", StringValue.SerializeToString, StringValue.FromString)
                    replies.add((await greet(StringValue(value="x"), timeout=5)).value)
                await asyncio.sleep(0.05)
                served_by = {
                    match.group(1)
                    for line in app.lines
                    if "app_kit.access" in line and (match := re.search(r"\[worker (\d+) pid", line))
                }
        assert replies == {"hello-from-file x raw-from-file"}, replies
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    assert app.log.count("exited with code 0") == 2, app.log


async def _scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return bytes(response.read()).decode()

    body = await asyncio.to_thread(get)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


async def test_grpc_code_labels_are_go_grpc_prometheus_values() -> None:
    registry = CollectorRegistry()
    server = Server([EchoService()], interceptors=[ServerMetrics(registry)])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with serve_metrics("127.0.0.1", 0, registry) as metrics_port:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                fail = grpcio_method(channel, "unary_unary", "/test.Echo/Fail", StringValue, StringValue)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await fail(StringValue(value="grpc"))
                assert failed.value.code() == grpc.StatusCode.NOT_FOUND
            labels = {"grpc_type": "unary", "grpc_service": "test.Echo", "grpc_method": "Fail"}
            async with asyncio.timeout(5):
                while True:
                    samples = await _scrape(metrics_port)
                    codes = {
                        dict(key)["grpc_code"]
                        for (name, key), _ in samples.items()
                        if name == "grpc_server_handled_total" and labels.items() <= dict(key).items()
                    }
                    if codes:
                        break
                    await asyncio.sleep(0.02)
            assert codes == {"NotFound"}  # what go-grpc-prometheus (and its dashboards) use
    finally:
        server.close(grace=1)
        await server.wait_closed()


async def test_an_apps_metrics_endpoint_serves_the_apps_own_metrics() -> None:
    name = f"session12_orders_{uuid.uuid4().hex[:8]}"
    orders = Counter(name, "Orders taken, counted by the app itself.")  # the default REGISTRY
    try:
        orders.inc(3)
        app = App(AppSettings, name="metered")
        settings = AppSettings(port=0, metrics_port=0)
        async with app.serve(settings) as running:
            assert running.metrics_port is not None
            samples = await _scrape(running.metrics_port)
            assert any(key[0] == "app_kit_server_open_connections" for key in samples)  # the endpoint works
            assert samples.get((f"{name}_total", frozenset())) == 3, sorted({key[0] for key in samples})
    finally:
        REGISTRY.unregister(orders)


async def test_a_debug_root_logger_made_at_import_does_not_print_authorization_tokens(tmp_path: Path) -> None:
    write_app(tmp_path, prelude="import logging\nlogging.basicConfig(level=logging.DEBUG)\n")
    secret = "s3cr3t-" + uuid.uuid4().hex
    async with AppProcess("ops_app:app", "--port", "0", cwd=str(tmp_path)) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            greet = channel.unary_unary("/ops.Ops/Greet", StringValue.SerializeToString, StringValue.FromString)
            reply = await greet(StringValue(value="x"), metadata=(("authorization", f"Bearer {secret}"),), timeout=5)
            assert reply.value.startswith("hi x")
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    assert "DEBUG" in app.log  # the user's DEBUG configuration is in effect (theirs to choose)
    assert secret not in app.log, [line for line in app.lines if secret in line][:2]
