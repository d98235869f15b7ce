"""A rolling restart behind a real L7 proxy loses no call.

HAProxy (from the OS packages; ``.ci/run`` installs it) proxies gRPC to two backends, each a
``python -m app_kit run`` process, and health-checks them with a real ``grpc.health.v1``
Check (HTTP/2 bytes written out below). A grpcio client keeps 50 calls in flight through
the proxy, a fifth of them slow, while each backend in turn is replaced the way an
orchestrator does it: start the new one, wait until the proxy sees it healthy, SIGTERM the
old one, which must drain and exit 0. With keepalive to the backends and without it (a new
backend connection per call, where a connection reset in the listen backlog was a lost
call): not one call may fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import random
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator

import grpc
import h2.config
import h2.connection
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit.rpc.framing import frame_message

from .process import AppProcess

pytestmark = pytest.mark.anyio

APP = "tests.apps.rolling_app:app"
IN_FLIGHT = 50
SLOW = 0.3  # seconds a slow call sleeps in its handler; every fifth caller is slow
BACKEND_ENV = {
    # NOT_SERVING for this long before the listener closes: the proxy's checks (every
    # 100 ms, 300 ms timeout) take the backend out of rotation well before.
    "APP_DRAIN_DELAY": "1.0",
    "APP_GRACE_PERIOD": "5",
}
HEALTH_SERVING = "00000000020801"  # the reply's gRPC frame: 2 bytes, HealthCheckResponse{status: SERVING}


def health_check_request() -> str:
    """A complete HTTP/2 Health/Check call, as hex, for HAProxy's ``tcp-check send-binary``."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Check"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    conn.send_data(1, frame_message(b""), end_stream=True)  # HealthCheckRequest{service: ""}
    return conn.data_to_send().hex()


def unused_ports(count: int) -> list[int]:
    """Free ports below the ephemeral range: unlike a port-0 pick released for a process to
    bind later, no outgoing connection (the proxy makes thousands) can take one meanwhile."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
        ephemeral_low = int(file.read().split()[0])
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(max(1024, ephemeral_low // 2), ephemeral_low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


class Proxy:
    """HAProxy with one gRPC frontend and a backend of ``slots`` (host ports), checked often."""

    def __init__(self, directory: str, frontend: int, slots: dict[str, int], *, keepalive: bool) -> None:
        self.stats_path = os.path.join(directory, "stats.sock")
        self.config_path = os.path.join(directory, "haproxy.cfg")
        self.log_path = os.path.join(directory, "haproxy.log")
        # Without keepalive, each backend connection carries one call (max-reuse 0), then closes.
        reuse = "http-reuse always" if keepalive else "http-reuse never\n    default-server max-reuse 0"
        servers = "\n".join(f"    server {name} 127.0.0.1:{port}" for name, port in slots.items())
        with open(self.config_path, "w") as file:
            file.write(f"""global
    stats socket {self.stats_path} level admin
    log stderr format short local0 notice

defaults
    mode http
    log global
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout check 300ms
    retries 3
    option redispatch 1

frontend grpc
    bind 127.0.0.1:{frontend} proto h2
    default_backend apps

backend apps
    balance roundrobin
    {reuse}
    option tcp-check
    tcp-check connect
    tcp-check send-binary {health_check_request()}
    tcp-check expect binary {HEALTH_SERVING}
    default-server proto h2 check inter 100ms fall 1 rise 1
{servers}
""")

    async def __aenter__(self) -> Proxy:
        haproxy = shutil.which("haproxy")
        assert haproxy is not None, "HAProxy is not installed (.ci/run installs it: apt-get install haproxy)"
        self._log = open(self.log_path, "wb")  # closed in __aexit__
        self.process = await asyncio.create_subprocess_exec(
            haproxy, "-db", "-f", self.config_path, stdout=self._log, stderr=self._log
        )
        async with asyncio.timeout(10):
            while not os.path.exists(self.stats_path):
                assert self.process.returncode is None, self.log
                await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()
        self._log.close()

    @property
    def log(self) -> str:
        with open(self.log_path, errors="replace") as file:
            return file.read()

    async def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers, by name."""
        reader, writer = await asyncio.open_unix_connection(self.stats_path)
        writer.write(b"show stat\n")
        text = (await reader.read()).decode()
        writer.close()
        rows = csv.DictReader(io.StringIO(text.lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "apps" and row["svname"] != "BACKEND"}

    async def wait_status(self, expected: dict[str, str], timeout: float = 10) -> None:
        """Until the proxy's health checks see each named server as UP or DOWN."""
        async with asyncio.timeout(timeout):
            while {name: (await self.stats())[name]["status"] for name in expected} != expected:
                await asyncio.sleep(0.05)


class Nginx:
    """nginx ``grpc_pass`` to every slot, a new upstream connection per call (no ``keepalive``),
    as ingress-nginx does by default. It has no active health checks: it learns that a backend
    went away from the refused connection, which it retries on the next server (nothing was
    sent yet), while a reset after its request was sent is a 502 for the caller."""

    def __init__(self, directory: str, frontend: int, slots: dict[str, int]) -> None:
        self.directory = directory
        self.config_path = os.path.join(directory, "nginx.conf")
        servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=0;" for port in slots.values())
        temp = " ".join(
            f"{kind}_temp_path {directory};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        with open(self.config_path, "w") as file:
            file.write(f"""daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log error;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temp}
    upstream apps {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{frontend} http2;
        location / {{
            grpc_pass grpc://apps;
            grpc_next_upstream error timeout;
        }}
    }}
}}
""")

    async def __aenter__(self) -> Nginx:
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
        assert nginx is not None, "nginx is not installed (.ci/run installs it: apt-get install nginx)"
        self.process = await asyncio.create_subprocess_exec(nginx, "-c", self.config_path, "-p", self.directory)
        async with asyncio.timeout(10):
            while not os.path.exists(os.path.join(self.directory, "nginx.pid")):
                assert self.process.returncode is None, self.log
                await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    @property
    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError), open(os.path.join(self.directory, "error.log")) as file:
            return file.read()
        return ""


class Load:
    """IN_FLIGHT grpcio callers through the proxy, back to back, counting every outcome."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.succeeded = 0
        self.failures: list[str] = []
        self._stop = asyncio.Event()

    async def _caller(self, channel: grpc.aio.Channel, slow: bool) -> None:
        sleep = channel.unary_unary("/rolling.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
        value = SLOW if slow else 0.0
        while not self._stop.is_set():
            try:
                reply = await sleep(DoubleValue(value=value), timeout=10)
            except grpc.aio.AioRpcError as exc:
                self.failures.append(f"{exc.code().name}: {exc.details()}")
            else:
                assert reply.value == value
                self.succeeded += 1

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with grpc.aio.insecure_channel(self.target) as channel:
            callers = [asyncio.create_task(self._caller(channel, i % 5 == 0)) for i in range(IN_FLIGHT)]
            try:
                yield
            finally:
                self._stop.set()
                await asyncio.gather(*callers)


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as path:  # short: the stats socket's path must fit
        yield path


class Fleet:
    """Backend processes, one per slot, started and stopped as the test says."""

    def __init__(
        self, stack: contextlib.AsyncExitStack, slots: dict[str, int], env: dict[str, str], workers: int = 1
    ) -> None:
        self.stack, self.slots, self.env, self.workers = stack, slots, env, workers
        self.backends: dict[str, AppProcess] = {}

    async def start(self, name: str) -> None:
        process = AppProcess(APP, "--port", str(self.slots[name]), "--workers", str(self.workers), env=self.env)
        self.backends[name] = await self.stack.enter_async_context(process)
        await process.ready()

    async def stop(self, name: str) -> None:
        """SIGTERM: the backend drains and exits 0."""
        backend = self.backends[name]
        backend.signal(signal.SIGTERM)
        assert await backend.wait() == 0, backend.log
        assert "Traceback" not in backend.log, backend.log


@pytest.mark.parametrize(
    ("keepalive", "workers"),
    # (Pooled connections to two workers each: what the first and the last cover together,
    # 11 s of the suite's budget, left out.)
    [(True, 1), (False, 1), (False, 2)],
    ids=["keepalive", "connection-per-call", "connection-per-call-2-workers"],
)
async def test_a_rolling_restart_behind_haproxy_fails_no_call(keepalive: bool, workers: int, directory: str) -> None:
    frontend, *ports = unused_ports(5)
    slots = dict(zip(["a1", "a2", "b1", "b2"], ports, strict=True))  # a: the first generation, b: replacements
    async with contextlib.AsyncExitStack() as stack:
        fleet = Fleet(stack, slots, BACKEND_ENV, workers)
        await asyncio.gather(fleet.start("a1"), fleet.start("a2"))
        proxy = await stack.enter_async_context(Proxy(directory, frontend, slots, keepalive=keepalive))
        await proxy.wait_status({"a1": "UP", "a2": "UP", "b1": "DOWN", "b2": "DOWN"})
        load = Load(f"127.0.0.1:{frontend}")
        async with load.running():
            await asyncio.sleep(0.5)
            for old, new in [("a1", "b1"), ("a2", "b2")]:
                await fleet.start(new)
                await proxy.wait_status({new: "UP"})  # the orchestrator's readiness gate
                await fleet.stop(old)
                await asyncio.sleep(0.3)  # the other backend takes all the load for a moment
            await asyncio.sleep(0.3)
        stats = await proxy.stats()
        assert load.failures == [], f"{len(load.failures)} failed of {load.succeeded + len(load.failures)}"
        assert load.succeeded > 500
        # Every backend served, and the proxy never met an error it had to hide (by a retry).
        for name in slots:
            row = stats[name]
            assert int(row["stot"]) > 0 and row["econ"] == row["eresp"] == row["wretr"] == "0", (name, row)
        # The proxy reused its backend connections, or never did.
        connects = sum(int(stats[name]["connect"]) for name in slots)
        reuses = sum(int(stats[name]["reuse"]) for name in slots)
        if keepalive:
            assert reuses > connects, stats
        else:
            assert reuses == 0 and connects >= load.succeeded, stats
        await fleet.stop("b1")
        await fleet.stop("b2")


async def test_a_rolling_restart_behind_nginx_without_keepalive_fails_no_call(directory: str) -> None:
    """No health checks: nginx sends new connections until the listener closes. Those the
    kernel had queued when it closed were reset, after nginx had sent their request (issue 16:
    147 failed of 42,000 calls); now they are served."""
    frontend, *ports = unused_ports(5)
    slots = dict(zip(["a1", "a2", "b1", "b2"], ports, strict=True))
    async with contextlib.AsyncExitStack() as stack:
        # No drain delay: nginx would not notice it; the listener closes on the signal.
        fleet = Fleet(stack, slots, {**BACKEND_ENV, "APP_DRAIN_DELAY": "0"})
        await asyncio.gather(fleet.start("a1"), fleet.start("a2"))
        proxy = await stack.enter_async_context(Nginx(directory, frontend, slots))
        load = Load(f"127.0.0.1:{frontend}")
        async with load.running():
            await asyncio.sleep(0.5)
            for old, new in [("a1", "b1"), ("a2", "b2"), ("b1", "a1"), ("b2", "a2")]:
                await fleet.start(new)
                await fleet.stop(old)
            await asyncio.sleep(0.3)
        total = load.succeeded + len(load.failures)
        assert load.succeeded > 500
        # Before the accept queue was served at close, about 1 call in 900 failed here (21 of
        # 18,485). What is left is a connection still in its handshake at the instant the
        # listener closes, which no socket call can take (seen once in 8,721 calls on a loaded
        # machine), and nginx giving up after its retries all went to slots that were down,
        # every connect refused (2 in 7,299 on a loaded CI run). Allowed: one in 2,000, which
        # the old behaviour exceeds twice over.
        assert len(load.failures) * 2000 <= total, (
            f"{len(load.failures)} failed of {total}: {load.failures[:3]}\n{proxy.log[-2000:]}"
        )
        await fleet.stop("a1")
        await fleet.stop("a2")
