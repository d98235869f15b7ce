"""A fresh-eyes review of the client's fleet behaviour, as a user of grpc.aio's channel would
see it: connection attempts, failing fast, DNS resolution, GOAWAY and transparent retries,
pushback; over real sockets against our server, scripted HTTP/2 peers and raw TCP peers.

Each test names the rule it checks; each fails while the defect it targets is there (see the
review report). DNS answers come from a stand-in resolver (``socket.getaddrinfo`` for names
ending in ``.test``, every other name resolved as usual): a name that fails, resolves late, or
resolves slowly, on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import h2.errors
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, RetryPolicy, Status, client_tls
from app_kit.aio.client import method_for

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .frames import GOAWAY, frame
from .services import EchoService

pytestmark = pytest.mark.anyio

T = TypeVar("T")
ENHANCE_YOUR_CALM = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


async def bounded(awaitable: Awaitable[T], timeout: float, failure: str) -> T:
    """``awaitable``'s result; if it takes longer than ``timeout``, the test fails saying ``failure``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"{failure} (nothing after {timeout} s)")


def unary(channel: Channel, path: str = "/test.Echo/Unary") -> Any:
    return method_for(channel, path, Cardinality.UNARY_UNARY, BytesValue, BytesValue)


class Resolver:
    """The stand-in DNS: ``answers[name]`` is a list of IPs, or None (the name does not
    resolve); ``delay`` seconds per lookup (a slow DNS server). Other names resolve as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: dict[str, list[str] | None] = {}
        self.delay = 0.0
        self.lookups = 0
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if not (isinstance(host, str) and host.endswith(".test")):
                return real(host, port, *args, **kwargs)
            self.lookups += 1
            if self.delay:
                time.sleep(self.delay)  # in the loop's executor, as a slow resolver would
            ips = self.answers.get(host)
            if ips is None:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [info for ip in ips for info in real(ip, port, *args, **kwargs)]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class SilentPeer(asyncio.Protocol):
    """Accepts TCP, never speaks HTTP/2 (a hung backend, or a proxy whose backend hangs).
    Records when the client closed its side."""

    closed: list[float]
    transports: list[asyncio.BaseTransport]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)

    def eof_received(self) -> bool:
        self.closed.append(time.monotonic())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.append(time.monotonic())


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, list[float]]]:
    """Serve :class:`SilentPeer`; yield the port and the times the client closed connections."""
    closed: list[float] = []
    transports: list[asyncio.BaseTransport] = []

    def factory() -> SilentPeer:
        peer = SilentPeer()
        peer.closed, peer.transports = closed, transports
        return peer

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], closed
    finally:
        server.close()
        for transport in transports:  # what the client left open ends now, not at its timeouts
            transport.abort()  # type: ignore[attr-defined]


# -- a closed channel leaves no connection attempt behind -------------------------------------


async def test_close_ends_a_connection_attempt_to_a_backend_that_never_answers() -> None:
    # A call gave up (its deadline) while the connection attempt waited for the server's
    # SETTINGS. The channel is then closed: its socket must close, and no task of its stay.
    # (It stays open until handshake_timeout, 10 s: a service that opens and closes channels
    # to a hung backend piles up sockets and tasks.)
    async with silent_server() as (port, closed):
        channel = Channel("127.0.0.1", port)
        with pytest.raises(GRPCError) as info:
            await bounded(unary(channel)(BytesValue(), timeout=0.2), 2, "the call did not end")
        assert info.value.status is Status.DEADLINE_EXCEEDED
        closed_at = time.monotonic()
        channel.close()
        await asyncio.sleep(0.5)
        left = [task for task in asyncio.all_tasks() if "Subchannel" in repr(task)]
        assert closed and closed[0] - closed_at < 0.5, "the closed channel's connection attempt kept its socket open"
        assert not left, f"the closed channel left tasks behind: {left}"


# -- every backend failing: a call fails fast, whatever way the attempts fail -----------------


async def test_a_call_fails_unavailable_once_the_only_backends_connection_attempt_timed_out() -> None:
    # The backend accepts TCP and never speaks HTTP/2; each attempt times out after
    # connect_min_timeout (0.3 s here). A call without wait_for_ready must fail UNAVAILABLE once
    # the attempt failed (grpc.aio: TRANSIENT_FAILURE fails such calls), not wait out its whole
    # deadline while the channel starts attempt after attempt (the backoff, 0.05 s, has always
    # expired by the time an attempt failed, so the backend is never seen failing).
    config = Configuration(connect_min_timeout=0.3, connect_initial_backoff=0.05, connect_backoff_jitter=0.0)
    async with silent_server() as (port, _), Channel("127.0.0.1", port, config=config) as channel:
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await bounded(unary(channel)(BytesValue(), timeout=2.5), 3, "the call did not end")
        elapsed = time.monotonic() - started
        assert info.value.status is Status.UNAVAILABLE, f"{info.value} after {elapsed:.2f} s"
        assert elapsed < 1.0, f"failed after {elapsed:.2f} s"


# -- DNS: waiting for a name to resolve ------------------------------------------------------


async def test_close_ends_wait_for_ready_calls_waiting_for_the_name_to_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    # The name does not resolve (yet); a wait_for_ready call waits, re-resolving with backoff
    # (2 s here). Closing the channel must end it at once (UNAVAILABLE), as it does a call
    # waiting for a backend, not when its backoff sleep is over.
    resolver = Resolver(monkeypatch)
    resolver.answers["down.test"] = None
    config = Configuration(connect_initial_backoff=2.0, connect_backoff_jitter=0.0)
    channel = Channel("dns:///down.test:50051", config=config)
    call = asyncio.ensure_future(unary(channel)(BytesValue(), timeout=10, wait_for_ready=True))
    try:
        await asyncio.sleep(0.2)
        assert not call.done() and resolver.lookups >= 1
        closed_at = time.monotonic()
        channel.close()
        with pytest.raises(GRPCError) as info:
            await bounded(asyncio.shield(call), 1.0, "the closed channel's call still waits for its resolution backoff")
        assert info.value.status is Status.UNAVAILABLE
        assert time.monotonic() - closed_at < 0.5
    finally:
        call.cancel()


async def test_wait_for_ready_calls_go_through_soon_after_the_name_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    # Eight calls wait for ready while the name does not resolve; it resolves 0.3 s later. With
    # a re-resolution backoff of 0.1 s (times 1.6), the calls must be served within about a second.
    # Each waiting call draws the channel's one backoff forward for itself, so eight calls make
    # it 0.1 * 1.6**7 = 2.7 s (and more at the next round) before some of them look again.
    resolver = Resolver(monkeypatch)
    resolver.answers["later.test"] = None
    config = Configuration(connect_initial_backoff=0.1, connect_backoff_multiplier=1.6, connect_backoff_jitter=0.0)
    async with running_server([EchoService()]) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with Channel(f"dns:///later.test:{port}", config=config) as channel:
            method = unary(channel)
            calls = [
                asyncio.ensure_future(method(BytesValue(value=b"%d" % n), timeout=5, wait_for_ready=True))
                for n in range(8)
            ]
            await asyncio.sleep(0.3)
            resolver.answers["later.test"] = ["127.0.0.1"]
            up_at = time.monotonic()
            replies = await bounded(
                asyncio.gather(*calls), 1.5, "wait_for_ready calls still waiting after the name resolved"
            )
            assert sorted(reply.value for reply in replies) == [b"%d" % n for n in range(8)]
            assert time.monotonic() - up_at < 1.2


async def test_a_call_does_not_wait_for_re_resolution_while_a_backend_is_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    # The name resolves to two addresses, one dead (nothing listens on 127.0.0.2). The dead one
    # keeps failing, so the channel re-resolves the name (every 0.2 s at most here). That must
    # happen beside the calls, as grpc's resolver does: with a slow DNS server (1 s a lookup),
    # a call must still go at once to the ready backend, not wait for the lookup.
    resolver = Resolver(monkeypatch)
    config = Configuration(dns_min_resolution_interval=0.2, connect_initial_backoff=0.05, connect_backoff_jitter=0.0)
    async with running_server([EchoService()]) as (server, _):
        port = server.sockets[0].getsockname()[1]
        resolver.answers["fleet.test"] = ["127.0.0.1", "127.0.0.2"]
        async with Channel(f"dns:///fleet.test:{port}", config=config) as channel:
            method = unary(channel)
            await bounded(method(BytesValue(value=b"first"), timeout=2), 3, "the first call did not end")
            await asyncio.sleep(0.3)  # the dead address failed again; the interval passed
            resolver.delay = 1.0
            lookups = resolver.lookups
            started = time.monotonic()
            reply = await bounded(method(BytesValue(value=b"x"), timeout=2.5), 3, "the call did not end")
            elapsed = time.monotonic() - started
            assert reply.value == b"x"
            assert elapsed < 0.3, f"the call waited {elapsed:.2f} s for DNS ({resolver.lookups - lookups} lookups)"


# -- transparent retry: calls the server provably never processed ----------------------------


def goaway_on_first_connection(connections: list[FakeConnection]) -> Callable[[FakeConnection, int, int], None]:
    """The first connection answers its first request with GOAWAY last-stream-id 0 (it was
    never processed: a server shutting down); later connections answer every request."""

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if connection not in connections:
            connections.append(connection)
        if connections.index(connection) == 0:
            connection.send_goaway(0)
        else:
            connection.reply(stream_id, Int64Value(value=7).SerializeToString())
            connection.flush()

    return script


@pytest.mark.parametrize("cardinality", [Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM])
async def test_a_streaming_call_never_processed_before_a_goaway_is_retried_transparently(
    cardinality: Cardinality,
) -> None:
    # README: "a call the server ... never processed (above a GOAWAY's last-stream-id) is
    # retried at once, transparently". A unary call is; a client-streaming or bidi call made
    # from a list of requests fails UNAVAILABLE instead (grpc.aio retries it: this same peer
    # serves grpcio's stream_unary call on the second connection). A rolling restart is then
    # visible to every streaming caller that starts a call at the wrong moment.
    connections: list[FakeConnection] = []
    async with fake_server(goaway_on_first_connection(connections)) as (port, log):
        async with Channel("127.0.0.1", port) as channel:
            method = method_for(channel, "/t.S/Collect", cardinality, BytesValue, Int64Value)
            requests = [BytesValue(value=b"a"), BytesValue(value=b"b")]
            if cardinality is Cardinality.STREAM_UNARY:
                reply = await bounded(method(requests, timeout=2), 3, "the call did not end")
                assert reply.value == 7
            else:
                replies = await bounded(method(requests, timeout=2), 3, "the call did not end")
                assert [reply.value for reply in replies] == [7]
    assert len(log) == 2 and len(connections) == 2


async def test_calls_above_the_last_stream_id_of_an_error_goaway_are_retried_transparently() -> None:
    # GOAWAY ENHANCE_YOUR_CALM "too_many_pings", last-stream-id 1, with two calls open (1 and 3).
    # Whatever its error code, a GOAWAY says the streams above its last-stream-id were not
    # processed (RFC 9113 §6.8): call 3 is retried, as grpc.aio does with this same peer; only
    # call 1 fails. Here both fail UNAVAILABLE.
    connections: list[FakeConnection] = []

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if connection not in connections:
            connections.append(connection)
        if connections.index(connection) > 0:
            connection.reply(stream_id, Int64Value(value=7).SerializeToString())
            connection.flush()
        elif len(connection.request_headers) == 2:
            connection.flush()
            payload = (1).to_bytes(4, "big") + ENHANCE_YOUR_CALM.to_bytes(4, "big") + b"too_many_pings"
            connection.transport.write(frame(GOAWAY, 0, 0, payload))  # type: ignore[attr-defined]
            connection.transport.close()

    async with fake_server(script) as (port, log), Channel("127.0.0.1", port) as channel:
        method = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, Int64Value)
        first = asyncio.ensure_future(method(BytesValue(value=b"1"), timeout=2))
        await asyncio.sleep(0.1)  # stream 1 is open on the server
        second = asyncio.ensure_future(method(BytesValue(value=b"3"), timeout=2))
        with pytest.raises(GRPCError) as info:
            await bounded(first, 3, "the first call did not end")
        assert info.value.status is Status.UNAVAILABLE
        reply = await bounded(second, 3, "the second call did not end")
        assert reply.value == 7
    assert len(connections) == 2 and len(log) == 3


# -- retry policy: the server's pushback ------------------------------------------------------


async def test_a_pushback_of_zero_retries_at_once() -> None:
    # gRFC A6: grpc-retry-pushback-ms, a non-negative integer, is how long to wait before the
    # retry: 0 is at once. Here 0 is taken for "no pushback" and the policy's random backoff
    # (up to 10 s) applies: the call, failed four times with pushback 0, is not served at once.
    policy = RetryPolicy(max_attempts=5, initial_backoff=10, max_backoff=10, backoff_multiplier=1)
    trailers_only = [(b":status", b"200"), (b"content-type", b"application/grpc")]

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number < 5:
            headers = [*trailers_only, (b"grpc-status", b"14"), (b"grpc-retry-pushback-ms", b"0")]
            connection.conn.send_headers(stream_id, headers, end_stream=True)
        else:
            connection.reply(stream_id, Int64Value(value=7).SerializeToString())

    async with fake_server(script) as (port, log), Channel("127.0.0.1", port, retry_policy=policy) as channel:
        method = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, Int64Value)
        started = time.monotonic()
        try:
            reply = await bounded(method(BytesValue(), timeout=2.5), 3, "the call did not end")
        except GRPCError as exc:
            pytest.fail(f"{exc} after {len(log)} attempts: pushback 0 was not an immediate retry")
        assert reply.value == 7 and len(log) == 5
        assert time.monotonic() - started < 0.5


async def test_calls_while_the_name_does_not_resolve_do_not_each_query_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    # The name does not resolve (a DNS outage, a service not yet created). Calls without
    # wait_for_ready fail at once, UNAVAILABLE: right. But each of them queries DNS again, with
    # no backoff and no minimum interval (grpc's resolver backs off between failed lookups,
    # its calls fail on the last result): 20 calls in a row are 20 lookups, a flood of queries
    # (and of the loop's executor threads) from every busy client during an outage.
    resolver = Resolver(monkeypatch)
    resolver.answers["gone.test"] = None
    config = Configuration(connect_initial_backoff=1.0, connect_backoff_jitter=0.0)
    async with Channel("dns:///gone.test:50051", config=config) as channel:
        method = unary(channel)
        for _ in range(20):
            with pytest.raises(GRPCError) as info:
                await bounded(method(BytesValue(), timeout=2), 3, "the call did not end")
            assert info.value.status is Status.UNAVAILABLE
    assert resolver.lookups <= 3, f"{resolver.lookups} DNS lookups for 20 calls within a second"


# -- TLS: the server-name override names the server ------------------------------------------


async def test_the_server_name_override_is_the_calls_authority_too() -> None:
    # Dialling 127.0.0.1 with server_hostname="api.internal": grpc-core (ssl_target_name_override)
    # and grpc-go (the credentials' server name) send :authority api.internal, the name the
    # certificate was checked against; a proxy or server routing by :authority (virtual hosts)
    # needs it. grpc.aio sends it to this same peer; here the dialled address goes out instead.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.internal").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2"])
    peers: list[FakeConnection] = []

    def answer(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.reply(stream_id, BytesValue(value=b"ok").SerializeToString())

    def factory() -> FakeConnection:
        peers.append(FakeConnection(answer, []))
        return peers[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0, ssl=server_context)
    try:
        port = server.sockets[0].getsockname()[1]
        context = client_tls(root_certificates=ca.cert_pem.bytes())
        async with Channel("127.0.0.1", port, ssl=context, server_hostname="api.internal") as channel:
            reply = await bounded(unary(channel, "/t.S/Unary")(BytesValue(), timeout=2), 3, "the call did not end")
            assert reply.value == b"ok"
    finally:
        server.close()
    authority = dict(peers[0].request_headers[1])[b":authority"]
    assert authority == b"api.internal", authority
