"""Fresh-eyes review (session 16) of the server against many peers at once, as a Kubernetes
operator sees it: what thousands of connections, well-behaved or not, cost the server (RSS,
CPU, file descriptors, log lines), and whether an ordinary grpcio client is served with its
usual latency meanwhile.

Each server runs in its own process (a small script below, or an App under ``python -m
app_kit run``): its RSS, CPU and descriptors are read from /proc, its log from a file.
Peers are raw sockets of this process, opened in batches (the listen backlog is 100).

Tests marked ``xfail(strict=True)`` show a defect left (see session 16's note): asyncio's TLS
layer holds ~290 KiB per connection, uvloop closes connections past the descriptor limit without
a word. Fixed after this review: asyncio's log storm out of descriptors, one log line per peer
for each handshake and keepalive timeout, trio's ERROR line ten times a second out of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import resource
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue

from .frames import HANDSHAKE, PREFACE, SETTINGS, frame, process_cpu_seconds, process_rss_bytes
from .process import ROOT, AppProcess

pytestmark = pytest.mark.anyio
T = TypeVar("T")

KiB, MiB = 1024, 1024 * 1024
GOAWAY = 7
SETTINGS_ACK = frame(SETTINGS, 0x1, 0)

# Thousands of sockets on this side too: as many descriptors as we may have.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

CA = trustme.CA()
LEAF = CA.issue_cert("localhost", "127.0.0.1")


# -- a server in its own process ------------------------------------------------------------

_SERVER = """
import json, logging, os, resource, ssl, sys
import anyio
from google.protobuf.wrappers_pb2 import BytesValue
from app_kit import Cardinality, Configuration, Handler, Server

logging.basicConfig(level=logging.INFO, format="%(created).3f %(levelname)s %(name)s: %(message)s")

class Echo:
    def __mapping__(self):
        return {"/r.R/Echo": Handler(self.echo, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def echo(self, stream):
        await stream.send_message(await stream.recv_message())

async def main():
    context = None
    if os.environ.get("REVIEW_CERT"):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(os.environ["REVIEW_CERT"])
    server = Server([Echo()], config=Configuration(**json.loads(os.environ["REVIEW_CONFIG"])))
    await server.start("127.0.0.1", 0, ssl=context)
    if os.environ.get("REVIEW_NOFILE"):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(os.environ["REVIEW_NOFILE"]), hard))
    print(server.sockets[0].getsockname()[1], flush=True)
    await anyio.sleep_forever()

loop = os.environ["REVIEW_LOOP"]
if loop == "trio":
    import trio
    trio.run(main)
elif loop == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    import asyncio
    asyncio.run(main())
"""


def _socket_count(pid: int) -> int:
    """Sockets the process holds (its listener and its connections)."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return count


def _holds_sockets(pid: int, count: int) -> bool:
    return _socket_count(pid) >= count


@dataclasses.dataclass
class ServerProcess:
    pid: int
    port: int
    log_path: str

    def rss(self) -> int:
        return process_rss_bytes(self.pid)

    def cpu(self) -> float:
        return process_cpu_seconds(self.pid)

    def sockets(self) -> int:
        return _socket_count(self.pid)

    def log_lines(self) -> list[str]:
        with open(self.log_path, errors="replace") as file:
            return file.read().splitlines()


@contextlib.asynccontextmanager
async def server_process(
    loop: str = "asyncio", *, tls: bool = False, nofile: int | None = None, **config: Any
) -> AsyncIterator[ServerProcess]:
    with tempfile.TemporaryDirectory() as directory:
        env = {**os.environ, "REVIEW_LOOP": loop, "REVIEW_CONFIG": json.dumps(config)}
        if tls:
            env["REVIEW_CERT"] = os.path.join(directory, "server.pem")
            LEAF.private_key_and_cert_chain_pem.write_to_path(env["REVIEW_CERT"])
        if nofile is not None:
            env["REVIEW_NOFILE"] = str(nofile)
        log_path = os.path.join(directory, "server.log")
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-c", _SERVER], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env
            )
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
            assert line.strip(), open(log_path).read()
            server = ServerProcess(process.pid, int(line), log_path)
            yield server
        finally:
            process.kill()
            process.wait()


# -- many peers -------------------------------------------------------------------------------


def _client_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    CA.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    return context


def _client_hello() -> bytes:
    """A real TLS ClientHello, as its client would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Peer:
    """One raw connection: sends its first bytes, keeps what comes back, notes when it ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.answered = asyncio.Event()  # the server's first bytes came
        self.opened_at = 0.0
        self.closed_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, port: int, first: bytes = b"", tls: ssl.SSLContext | None = None) -> None:
        self.opened_at = time.monotonic()  # (before the server's accept: lifetimes are not too short)
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None), 10
        )
        if first:
            self.writer.write(first)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while chunk := await self.reader.read(65536):
                self.received += chunk
                self.answered.set()
        self.closed_at = time.monotonic()
        self.answered.set()

    @property
    def lifetime(self) -> float:
        assert self.closed_at is not None
        return self.closed_at - self.opened_at

    def goaway_codes(self) -> list[int]:
        codes, data, at = [], self.received, 0
        while at + 9 <= len(data):
            length = int.from_bytes(data[at : at + 3], "big")
            if data[at + 3] == GOAWAY:
                codes.append(int.from_bytes(data[at + 13 : at + 17], "big"))
            at += 9 + length
        return codes

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.writer.transport.abort()


async def open_peers(
    port: int,
    count: int,
    first: bytes = b"",
    tls: ssl.SSLContext | None = None,
    *,
    server_pid: int | None = None,
    batch: int = 50,
) -> list[Peer]:
    """``count`` connections, ``batch`` at a time, each batch accepted by the server before the
    next one connects (the listen backlog is 100: past it the kernel drops SYNs, and their
    clients try again 1 s later). Accepted: each peer has the server's first bytes or, for
    peers the server does not speak to (``server_pid`` given), the server holds their sockets."""
    peers: list[Peer] = []
    base = _socket_count(server_pid) if server_pid is not None else 0
    for start in range(0, count, batch):
        group = [Peer() for _ in range(min(batch, count - start))]
        await asyncio.gather(*(peer.open(port, first, tls) for peer in group))
        peers += group
        if server_pid is None:
            await asyncio.wait_for(asyncio.gather(*(peer.answered.wait() for peer in group)), 10)
        else:
            accepted = functools.partial(_holds_sockets, server_pid, base + len(peers))
            await wait_for(accepted, 10, "the server accepted them")
    return peers


def close_peers(peers: list[Peer]) -> None:
    for peer in peers:
        peer.abort()


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str = "") -> float:
    """Seconds until ``predicate()`` holds; fails past ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def settled_rss(server: ServerProcess) -> int:
    """The server's RSS once it stopped moving (two readings 0.2 s apart within 64 KiB)."""
    previous = server.rss()
    for _ in range(20):
        await asyncio.sleep(0.2)
        now = server.rss()
        if abs(now - previous) < 64 * KiB:
            return now
        previous = now
    return previous


# -- an ordinary grpcio client -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def grpcio_echo(port: int, tls: bool = False) -> AsyncIterator[Callable[..., Awaitable[BytesValue]]]:
    target = f"127.0.0.1:{port}"
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=CA.cert_pem.bytes())
        channel = grpc.aio.secure_channel(target, credentials)
    else:
        channel = grpc.aio.insecure_channel(target)
    async with channel:
        yield channel.unary_unary("/r.R/Echo", BytesValue.SerializeToString, BytesValue.FromString)


async def latencies(echo: Callable[..., Awaitable[BytesValue]], calls: int = 100) -> tuple[float, float]:
    """p50 and p99 (ms) of ``calls`` unary calls in a row, each of which must succeed."""
    times = []
    request = BytesValue(value=b"x" * 100)
    for _ in range(calls):
        started = time.perf_counter()
        reply = await echo(request, timeout=10, wait_for_ready=True)
        times.append((time.perf_counter() - started) * 1000)
        assert reply.value == request.value
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.99)]


# -- scenarios run once for the tests that look at them ---------------------------------------

_RUNS: dict[str, asyncio.Future[Any]] = {}


async def once(key: str, run: Callable[[], Awaitable[T]]) -> T:
    """``run()``'s result, run once for every test that looks at it (each test can still be
    run alone); the scenarios of one group run side by side, each server in its own process."""
    if key not in _RUNS:
        _RUNS[key] = asyncio.ensure_future(run())
    result: T = await _RUNS[key]
    return result


# -- 1. idle connections: what they cost, and the ordinary client meanwhile -----------------------

_TLS_BUFFER = (
    "asyncio's SSLProtocol allocates (and zero-fills) a 256 KiB read buffer per connection, from its "
    "accept on: uvloop's TLS costs ~35 KiB, trio's ~45 KiB"
)


@pytest.mark.parametrize(
    ("loop", "tls", "count", "kib_per_connection"),
    [
        ("asyncio", False, 1000, 32),
        ("trio", False, 1000, 48),
        pytest.param(
            "asyncio",
            True,
            500,
            96,
            marks=pytest.mark.xfail(
                strict=True, reason=f"DEFECT: an idle TLS connection costs ~290 KiB; {_TLS_BUFFER}"
            ),
        ),
        ("uvloop", True, 500, 96),
    ],
    # (Also run with uvloop without TLS, 2,000 connections: 10.5 KiB each; trio with TLS: 41-44
    # KiB; left out of the suite for its time.)
    ids=["asyncio", "trio", "asyncio-tls", "uvloop-tls"],
)
async def test_idle_http2_connections_cost_little_and_an_ordinary_client_keeps_its_latency(
    loop: str, tls: bool, count: int, kib_per_connection: int
) -> None:
    # Peers that complete the HTTP/2 handshake (preface, SETTINGS, ACK) and then sit: the
    # server's RSS per connection, its CPU while they sit, and a grpcio client's unary latency
    # before, while they sit, and once they are gone.
    async with server_process(loop, tls=tls) as server:
        async with grpcio_echo(server.port, tls) as echo:
            before = await latencies(echo)
            rss_before, sockets_before = await settled_rss(server), server.sockets()
            started = time.monotonic()
            peers = await open_peers(server.port, count, HANDSHAKE + SETTINGS_ACK, _client_context() if tls else None)
            opened = time.monotonic() - started
            try:
                assert server.sockets() >= sockets_before + count
                rss = await settled_rss(server)
                during = await latencies(echo)
                cpu_before = server.cpu()
                await asyncio.sleep(0.5)
                idle_cpu = (server.cpu() - cpu_before) / 0.5
                assert not [peer for peer in peers if peer.closed_at is not None]  # all still open
            finally:
                close_peers(peers)
            await wait_for(lambda: server.sockets() <= sockets_before, 10, "the server closed them")
            after = await latencies(echo, 20)
    per_connection = (rss - rss_before) / count
    print(
        f"\n{loop}{' TLS' if tls else ''}: {count} idle connections opened in {opened:.1f} s;"
        f" RSS +{(rss - rss_before) / MiB:.1f} MiB = {per_connection / KiB:.1f} KiB each;"
        f" server CPU while they sit {idle_cpu:.0%}; grpcio p50/p99 ms: before {before[0]:.2f}/{before[1]:.2f},"
        f" during {during[0]:.2f}/{during[1]:.2f}, after they closed {after[0]:.2f}/{after[1]:.2f}"
    )
    assert during[1] < max(50.0, 5 * before[1]), (before, during)
    assert idle_cpu < 0.1
    assert per_connection < kib_per_connection * KiB, f"{per_connection / KiB:.0f} KiB"


async def test_idle_connections_leave_nothing_behind_when_they_close() -> None:
    # 1,000 idle connections, closed, three times over. The first round's memory stays with
    # the process (the allocator keeps its arenas) and is reused by the next: a round after
    # the first costs at most what allocator fragmentation does (~0.5 MiB; a connection
    # left behind would be ~10 KiB each, 10 MiB a round). (In process, tracemalloc shows no
    # Python object left either, past the first round.)
    async with server_process("asyncio") as server:
        baseline, sockets_before = await settled_rss(server), server.sockets()
        rounds = []
        for _ in range(3):
            peers = await open_peers(server.port, 1000, HANDSHAKE + SETTINGS_ACK)
            close_peers(peers)
            await wait_for(lambda: server.sockets() <= sockets_before, 10, "the server closed them")
            rounds.append(await settled_rss(server) - baseline)
    print(f"\nRSS after each of 3 rounds of 1,000 idle connections: {', '.join(f'+{r / MiB:.1f} MiB' for r in rounds)}")
    assert rounds[2] - rounds[1] < 3 * MiB, rounds


# -- 2. the settings that end idle connections --------------------------------------------------

# Each: the server's configuration, and the earliest and the latest (seconds after the peer
# connected) by which every idle connection that answers nothing must have been ended.
# shutdown_ping_timeout 1: the two-phase GOAWAY's PING goes unanswered, then the final GOAWAY.
_ENDINGS: dict[str, tuple[dict[str, Any], float, float]] = {
    "idle_timeout": ({"idle_timeout": 1.5, "shutdown_ping_timeout": 1.0}, 1.5 + 1.0, 1.5 + 1.0 + 2.0),
    "max_connection_age": ({"max_connection_age": 2.0, "shutdown_ping_timeout": 1.0}, 1.8 + 1.0, 2.2 + 1.0 + 2.0),
    "keepalive": (
        {"keepalive_time": 1.0, "keepalive_timeout": 1.0, "keepalive_permit_without_calls": True},
        1.0 + 1.0,
        1.0 + 1.0 + 2.0,
    ),
}


@dataclasses.dataclass
class Ending:
    lifetimes: list[float]
    goaways: list[list[int]]
    latency: tuple[float, float]
    log: list[str]


async def _ending(kind: str, count: int = 500) -> Ending:
    config, _, latest = _ENDINGS[kind]
    async with server_process("asyncio", **config) as server:
        async with grpcio_echo(server.port) as echo:
            await echo(BytesValue(value=b"warm"), timeout=10)
            peers = await open_peers(server.port, count, HANDSHAKE + SETTINGS_ACK)
            try:
                # The grpcio client calls on while the 500 end together (its own connection
                # may be ended too: the channel connects again).
                calls = asyncio.create_task(latencies(echo, 300))
                await wait_for(lambda: all(peer.closed_at for peer in peers), latest + 5, "all ended")
                latency = await calls
            finally:
                close_peers(peers)
        lifetimes, goaways = [peer.lifetime for peer in peers], [peer.goaway_codes() for peer in peers]
        return Ending(lifetimes, goaways, latency, server.log_lines())


async def ending(kind: str) -> Ending:
    results = await once("endings", lambda: asyncio.gather(*map(_ending, _ENDINGS)))
    return dict(zip(_ENDINGS, results, strict=True))[kind]


@pytest.mark.parametrize("kind", list(_ENDINGS))
async def test_idle_timeout_max_connection_age_and_keepalive_end_500_idle_connections_on_time(kind: str) -> None:
    # 500 peers that handshake, then answer nothing: each setting ends them all, each with
    # GOAWAY NO_ERROR, on time; a grpcio client's calls meanwhile go on as usual.
    result = await ending(kind)
    _, earliest, latest = _ENDINGS[kind]
    lifetimes = sorted(result.lifetimes)
    print(
        f"\n{kind}: {len(lifetimes)} idle connections ended after {lifetimes[0]:.2f}..{lifetimes[-1]:.2f} s;"
        f" grpcio meanwhile p50/p99 {result.latency[0]:.2f}/{result.latency[1]:.2f} ms;"
        f" {len(result.log)} server log lines"
    )
    assert earliest - 0.1 <= lifetimes[0] and lifetimes[-1] <= latest, lifetimes[::50]
    assert all(codes and set(codes) == {0} for codes in result.goaways)
    assert result.latency[1] < 100


async def test_keepalive_timeouts_of_many_peers_do_not_flood_the_log() -> None:
    # 500 idle peers that stop answering (a node gone, a NAT that forgot them) are ended by
    # keepalive together. Lines peers cause elsewhere go through the RateLimitedLogger (20
    # per 10 s, then one line counting those suppressed).
    result = await ending("keepalive")
    lines = [line for line in result.log if "keepalive" in line]
    print(f"\n{len(lines)} log lines for {len(result.lifetimes)} keepalive timeouts")
    assert len(lines) <= 21, f"{len(lines)} lines"


# -- 3. peers that never finish their handshake ------------------------------------------------

HANDSHAKE_TIMEOUT = 3.0


@dataclasses.dataclass
class Handshakes:
    lifetimes: dict[str, list[float]]
    opened_in: float
    rss_per_peer: float
    latency: tuple[float, float]
    sockets_back: bool
    log: list[str]


async def _trickle(peers: list[Peer], data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time to each peer, ``every`` seconds per byte."""
    for index in range(len(data)):
        for peer in peers:
            if peer.closed_at is None:
                with contextlib.suppress(ConnectionError, OSError):
                    peer.writer.write(data[index : index + 1])
        await asyncio.sleep(every)


async def _handshakes(tls: bool) -> Handshakes:
    async with server_process("asyncio", tls=tls, handshake_timeout=HANDSHAKE_TIMEOUT) as server:
        async with grpcio_echo(server.port, tls) as echo:
            await echo(BytesValue(value=b"warm"), timeout=10)
            rss_before, sockets_before = await settled_rss(server), server.sockets()
            started = time.monotonic()
            kinds: dict[str, list[Peer]] = {}
            if tls:
                hello = _client_hello()
                kinds["silent"] = await open_peers(server.port, 300, server_pid=server.pid)
                half = hello[: len(hello) // 2]
                kinds["half a ClientHello"] = await open_peers(server.port, 200, half, server_pid=server.pid)
                kinds["TLS, then silent"] = await open_peers(server.port, 200, tls=_client_context())
            else:
                kinds["silent"] = await open_peers(server.port, 500)
                kinds["half the preface"] = await open_peers(server.port, 300, PREFACE[:12])
                kinds["a trickle"] = await open_peers(server.port, 200)
            opened_in = time.monotonic() - started
            trickle = asyncio.create_task(_trickle(kinds.get("a trickle", []), HANDSHAKE, 0.25))
            every = [peer for peers in kinds.values() for peer in peers]
            try:
                rss = server.rss()
                latency = await latencies(echo)
                await wait_for(lambda: all(peer.closed_at for peer in every), 2 * HANDSHAKE_TIMEOUT + 5, "all ended")
            finally:
                trickle.cancel()
                close_peers(every)
            try:
                await wait_for(lambda: server.sockets() <= sockets_before, 5, "sockets back")
                sockets_back = True
            except AssertionError:
                sockets_back = False
        return Handshakes(
            {kind: [peer.lifetime for peer in peers] for kind, peers in kinds.items()},
            opened_in,
            (rss - rss_before) / len(every),
            latency,
            sockets_back,
            server.log_lines(),
        )


async def handshakes(tls: bool) -> Handshakes:
    tcp, with_tls = await once("handshakes", lambda: asyncio.gather(_handshakes(False), _handshakes(True)))
    return with_tls if tls else tcp


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_1000_peers_that_never_finish_the_handshake_are_ended_at_the_handshake_timeout(tls: bool) -> None:
    # TCP: 500 silent peers, 300 that send half the preface, 200 that trickle it a byte per
    # 0.25 s (which does not extend their time). TLS: 300 silent, 200 with half a ClientHello,
    # 200 that complete TLS and then send nothing (their HTTP/2 handshake has its own
    # handshake_timeout). Each is ended handshake_timeout (3 s) after it connected, the
    # server's sockets go back to what they were, and a grpcio client is served as usual.
    result = await handshakes(tls)
    print(f"\nhandshake timeout {HANDSHAKE_TIMEOUT} s, {'TLS' if tls else 'TCP'}, opened in {result.opened_in:.1f} s:")
    for kind, lifetimes in result.lifetimes.items():
        print(f"  {len(lifetimes)} {kind}: ended after {min(lifetimes):.2f}..{max(lifetimes):.2f} s")
    print(
        f"  RSS {result.rss_per_peer / KiB:.1f} KiB per peer; grpcio p50/p99 meanwhile"
        f" {result.latency[0]:.2f}/{result.latency[1]:.2f} ms; {len(result.log)} log lines:"
        f" {sorted({line.split(' ', 1)[-1] for line in result.log})}"
    )
    assert result.opened_in < HANDSHAKE_TIMEOUT - 0.5  # (else the RSS would not be of all of them)
    for kind, lifetimes in result.lifetimes.items():
        assert HANDSHAKE_TIMEOUT - 0.1 <= min(lifetimes) and max(lifetimes) <= HANDSHAKE_TIMEOUT + 1.5, kind
    # (185 ms once in a full run on 2 busy cores, as 1,000 connections closed at once: bounded,
    # not a stall.)
    assert result.latency[1] < 1000
    assert result.sockets_back


@pytest.mark.parametrize(
    "tls",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.xfail(
                strict=True, reason=f"DEFECT: a peer that stalls its TLS handshake holds ~290 KiB; {_TLS_BUFFER}"
            ),
        ),
    ],
    ids=["tcp", "tls"],
)
async def test_peers_that_stall_their_handshake_cost_little_memory(tls: bool) -> None:
    # Until handshake_timeout ends them, 1,000 (700 TLS) stalled peers cost what an idle
    # connection does at most. On asyncio's TLS, a slowloris of a thousand connections a
    # second held for the default handshake_timeout (10 s) would hold ~2.8 GiB.
    result = await handshakes(tls)
    assert result.rss_per_peer < 48 * KiB, f"{result.rss_per_peer / KiB:.0f} KiB"


async def test_handshake_timeouts_of_many_peers_do_not_flood_the_log() -> None:
    result = await handshakes(False)
    lines = [line for line in result.log if "handshake" in line]
    print(f"\n{len(lines)} log lines for {sum(map(len, result.lifetimes.values()))} handshake timeouts")
    assert len(lines) <= 21, f"{len(lines)} lines"


# -- 4. out of file descriptors ------------------------------------------------------------------

_LOOPS = ["asyncio", "uvloop", "trio"]


@dataclasses.dataclass
class Exhausted:
    connected: int
    dropped: int
    cpu: float
    lines_per_second: float
    recovered_in: float
    log: list[str]


async def _exhausted(loop: str, window: float = 2.0) -> Exhausted:
    # The server's RLIMIT_NOFILE is lowered to 64; 150 peers connect, most beyond it (the
    # rest wait in the listen backlog). For ``window`` seconds: the server's CPU, and the lines
    # it logs. Then the peers leave, and a new grpcio client must be served again.
    async with server_process(loop, nofile=64) as server:
        lines_before = len(server.log_lines())
        peers: list[Peer] = []
        for _ in range(15):
            group = [Peer() for _ in range(10)]
            await asyncio.gather(*(peer.open(server.port, HANDSHAKE + SETTINGS_ACK) for peer in group))
            peers += group
        await asyncio.sleep(0.3)
        cpu_before, lines_at, started = server.cpu(), len(server.log_lines()), time.monotonic()
        await asyncio.sleep(window)
        elapsed = time.monotonic() - started
        cpu = (server.cpu() - cpu_before) / elapsed
        lines_per_second = (len(server.log_lines()) - lines_at) / elapsed
        dropped = sum(peer.closed_at is not None for peer in peers)
        close_peers(peers)
        started = time.monotonic()
        async with grpcio_echo(server.port) as echo:
            reply = await echo(BytesValue(value=b"again"), timeout=15, wait_for_ready=True)
            assert reply.value == b"again"
        recovered_in = time.monotonic() - started
        return Exhausted(len(peers), dropped, cpu, lines_per_second, recovered_in, server.log_lines()[lines_before:])


async def exhausted(loop: str) -> Exhausted:
    results = await once("exhausted", lambda: asyncio.gather(*map(_exhausted, _LOOPS)))
    return dict(zip(_LOOPS, results, strict=True))[loop]


@pytest.mark.parametrize("loop", _LOOPS)
async def test_out_of_file_descriptors_the_server_does_not_spin_and_serves_again_once_they_are_free(
    loop: str,
) -> None:
    result = await exhausted(loop)
    print(
        f"\n{loop}, RLIMIT_NOFILE 64: {result.connected} peers connected, {result.dropped} closed at once by"
        f" the server; CPU {result.cpu:.0%} and {result.lines_per_second:.0f} log lines/s while out of"
        f" descriptors; a new grpcio client served {result.recovered_in:.2f} s after the peers left."
        f" Log: {result.log[:2]} ... ({len(result.log)} lines)"
    )
    assert result.cpu < 0.3
    assert result.recovered_in < 5


@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "uvloop",
            marks=pytest.mark.xfail(
                strict=True,
                reason="DEFECT, left: on uvloop, connections past the descriptor limit are closed at once"
                " without a word in the log (libuv's EMFILE trick; uvloop reports nothing)",
            ),
        ),
        "trio",
    ],
)
async def test_out_of_file_descriptors_the_server_says_so_without_flooding_the_log(loop: str) -> None:
    # What an operator needs: a line that says the server is out of descriptors, at a pace
    # the log can take. On asyncio (fixed: it was thousands of lines a second, more each
    # second, as CPython's selector loops re-armed a retry per backlog slot) that is asyncio's
    # own record, with its traceback (6 lines), once a second; on trio one line per 10 s.
    result = await exhausted(loop)
    assert any("Too many open files" in line or "descriptor" in line for line in result.log), result.log[:5]
    assert result.lines_per_second <= (8 if loop == "asyncio" else 3), f"{result.lines_per_second:.0f} lines/s"


# -- 5. a graceful shutdown with many idle connections ---------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "trio"])  # (uvloop too when written: 3.22 s)
async def test_sigterm_with_1000_idle_connections_ends_within_the_grace_period_and_linger(loop: str) -> None:
    # An App (gRPC's interop service) with APP_GRACE_PERIOD=2, 1,000 idle connections that
    # answer nothing (not even the shutdown's PING): SIGTERM; every connection gets both
    # GOAWAYs, and the process exits 0 within grace period + linger (1 s) + 2 s for its teardown.
    grace = 2.0
    env = {"APP_GRACE_PERIOD": str(grace)}
    async with AppProcess("tests.apps.interop_app:app", "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        peers = await open_peers(port, 1000, HANDSHAKE + SETTINGS_ACK)
        try:
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            code = await app.wait(grace + 15)
            took = time.monotonic() - started
            await wait_for(lambda: all(peer.closed_at for peer in peers), 5, "all closed")
        finally:
            close_peers(peers)
    goaways = [peer.goaway_codes() for peer in peers]
    print(
        f"\n{loop}: SIGTERM with 1,000 idle connections: exit {code} after {took:.2f} s"
        f" (grace {grace} s + linger 1 s); GOAWAYs per peer {sorted({len(g) for g in goaways})};"
        f" {len(app.lines)} log lines"
    )
    assert code == 0, app.log[-3000:]
    assert all(codes == [0, 0] for codes in goaways)
    assert took <= grace + 1.0 + 2.0, took
