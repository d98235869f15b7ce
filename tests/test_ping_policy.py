"""PING policy: gRPC's keepalive enforcement, and BDP-pinging peers that must never be cut off.

grpc-go, grpc-core and grpc-java clients and servers send a PING whenever they receive data, to
estimate the bandwidth-delay product. The peers below do more than that (a PING for every DATA
frame received) with 100 calls in flight for 15 seconds, against our server and our client: no
call may fail. Peers that ping without being sent anything get GOAWAY ENHANCE_YOUR_CALM
``too_many_pings`` after ``max_ping_strikes``.
"""

from __future__ import annotations

import asyncio
import time

import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import Channel, Configuration
from app_kit.wire.guard import PingPolicy

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .frames import HANDSHAKE, HEADERS, PING, RawPeer, frame, request_block
from .services import EchoService
from .test_client import methods

pytestmark = pytest.mark.anyio

IN_FLIGHT = 100
# Past one flood_window (made 2.5 s here, not 10: the suite's time): the policy, not the
# window, keeps the connection alive.
WINDOW = Configuration(flood_window=2.5)
DURATION = 3.0
ENHANCE_YOUR_CALM = 0xB


class _BdpClient(asyncio.Protocol):
    """A raw h2 client that keeps unary calls in flight and PINGs after every DATA frame."""

    def __init__(self, until: float) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.until = until
        self.ok = 0
        self.failed: list[str] = []
        self.pings = 0
        self.in_flight: dict[int, bool] = {}  # stream id -> grpc-status 0 seen
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        for _ in range(IN_FLIGHT):
            self._start_call()
        self.transport.write(self.conn.data_to_send())

    def _start_call(self) -> None:
        stream_id = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/test.Echo/Unary"),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        self.conn.send_headers(stream_id, headers)
        payload = BytesValue(value=b"x" * 100).SerializeToString()
        self.conn.send_data(stream_id, b"\x00" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
        self.in_flight[stream_id] = False

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except Exception as exc:
            self._fail(f"h2 error: {exc!r}")
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if not self.done.done():
                    self.conn.ping(self.pings.to_bytes(8, "big"))
                    self.pings += 1
            elif isinstance(event, h2.events.TrailersReceived):
                self.in_flight[event.stream_id] = (b"grpc-status", b"0") in event.headers
            elif isinstance(event, h2.events.StreamEnded):
                if self.in_flight.pop(event.stream_id):
                    self.ok += 1
                else:
                    self.failed.append(f"stream {event.stream_id} ended without status OK")
                if time.monotonic() < self.until:
                    self._start_call()
                elif not self.in_flight and not self.done.done():
                    self.done.set_result(None)
            elif isinstance(event, h2.events.StreamReset):
                self.in_flight.pop(event.stream_id, None)
                self.failed.append(f"stream {event.stream_id} reset ({event.error_code!r})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._fail(f"GOAWAY {event.error_code!r} {event.additional_data!r}")
        self.transport.write(self.conn.data_to_send())

    def _fail(self, reason: str) -> None:
        self.failed.append(reason)
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self._fail(f"connection lost: {exc!r}")


async def test_bdp_pinging_client_keeps_its_connection() -> None:
    async with running_server([EchoService()], config=WINDOW) as (server, _):
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        client = _BdpClient(time.monotonic() + DURATION)
        transport, _ = await loop.create_connection(lambda: client, "127.0.0.1", port)
        try:
            await asyncio.wait_for(client.done, DURATION + 10)
        finally:
            transport.close()
    assert client.failed == []
    # Far past the flood limit of old (500 per window), so the policy, not luck, kept it alive.
    assert client.pings > 1000 and client.ok > 1000, (client.pings, client.ok)


async def test_client_keeps_its_connection_to_a_bdp_pinging_server() -> None:
    def reply(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.reply(stream_id, BytesValue(value=b"pong").SerializeToString())

    async with (
        fake_server(reply, ping_on_data=True) as (port, log),
        Channel("127.0.0.1", port, config=WINDOW) as channel,
    ):
        unary = methods(channel)["Unary"]
        until = time.monotonic() + DURATION
        failures: list[BaseException] = []
        calls = 0

        async def caller() -> None:
            nonlocal calls
            while time.monotonic() < until:
                try:
                    assert (await unary(BytesValue(value=b"ping"), timeout=10)).value == b"pong"
                    calls += 1
                except Exception as exc:
                    failures.append(exc)

        first = await channel._connection()
        await asyncio.wait_for(asyncio.gather(*(caller() for _ in range(IN_FLIGHT))), DURATION + 15)
        assert channel._protocol is first and not first.is_closed  # one connection the whole time
    assert failures == []
    assert calls > 1000 and len(log) == calls, (calls, len(log))


async def _goaway_after_pings(port: int, opening: bytes, pings: int) -> list[object]:
    async with RawPeer(port) as peer:
        await peer.send(opening + b"".join(frame(PING, 0, 0, n.to_bytes(8, "big")) for n in range(pings)))
        await peer.wait_closed(5)
        return list(peer.goaways)


async def test_pings_nobody_asked_for_are_struck_out() -> None:
    async with running_server([EchoService()]) as (server, _):
        port = server.sockets[0].getsockname()[1]
        # No calls: the first PING is fine, and so are max_ping_strikes (2) more; the next is one too many.
        goaways = await _goaway_after_pings(port, HANDSHAKE, 4)
        assert [(g.error_code, g.additional_data) for g in goaways] == [(ENHANCE_YOUR_CALM, b"too_many_pings")]  # type: ignore[attr-defined]
        # Three are tolerated: the connection stays open and serves a call.
        async with RawPeer(port) as peer:
            await peer.send(HANDSHAKE + b"".join(frame(PING, 0, 0, bytes(8)) for _ in range(3)))
            await peer.send(frame(HEADERS, 0x4, 1, request_block(path="/test.Echo/Sleep")))
            await asyncio.sleep(0.3)
            assert not peer.goaways and not peer.closed.is_set()


async def test_keepalive_at_the_permitted_interval_is_allowed() -> None:
    config = Configuration(min_ping_interval=0.2, min_ping_interval_without_calls=0.2, max_ping_strikes=0)
    assert PingPolicy(config).too_many(0.0, active=False, licensed=False) is False
    async with running_server([EchoService()], config=config) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawPeer(port) as peer:
            await peer.send(HANDSHAKE)
            for n in range(4):
                await asyncio.sleep(0.25)
                await peer.send(frame(PING, 0, 0, n.to_bytes(8, "big")))
            await asyncio.sleep(0.1)
            assert not peer.goaways and not peer.closed.is_set()


def test_ping_policy_counts_strikes_as_grpc_defines_them() -> None:
    policy = PingPolicy(Configuration(min_ping_interval=300.0, min_ping_interval_without_calls=7200.0))
    # With calls: one PING per 5 minutes is fine; sooner ones are strikes; the third strike ends it.
    assert not policy.too_many(0.0, active=True, licensed=False)
    assert not policy.too_many(300.0, active=True, licensed=False)
    assert not policy.too_many(301.0, active=True, licensed=False)  # strike 1
    assert not policy.too_many(302.0, active=True, licensed=False)  # strike 2
    assert policy.too_many(303.0, active=True, licensed=False)  # strike 3 > max_ping_strikes
    # A PING that follows a HEADERS or DATA frame of ours is never a strike, and clears them.
    policy = PingPolicy(Configuration())
    assert not policy.too_many(0.0, active=True, licensed=False)
    assert not policy.too_many(1.0, active=True, licensed=False)  # strike 1
    assert not policy.too_many(2.0, active=True, licensed=False)  # strike 2
    for moment in range(3, 1000):
        assert not policy.too_many(float(moment), active=True, licensed=True)
    assert not policy.too_many(1000.0, active=True, licensed=False)  # strike 1 again
    # Without calls the interval is two hours.
    policy = PingPolicy(Configuration())
    assert not policy.too_many(0.0, active=False, licensed=False)
    assert not policy.too_many(7200.0, active=False, licensed=False)
    assert not policy.too_many(7201.0, active=False, licensed=False)
    assert not policy.too_many(7202.0, active=False, licensed=False)
    assert policy.too_many(7203.0, active=False, licensed=False)
    # max_ping_strikes=0 switches the policy off (the hard cap still applies).
    policy = PingPolicy(Configuration(max_ping_strikes=0))
    assert not any(policy.too_many(float(n) / 1000, active=False, licensed=False) for n in range(100))


async def test_a_client_told_too_many_pings_doubles_its_keepalive_time() -> None:
    # The server allows a PING every 0.15 s (beyond those our frames license). An idle client
    # allowed to (keepalive_permit_without_calls) pings keepalive_time after the last frame it
    # read, the previous PING's ACK: every 0.1 s here, so its connection ends with
    # too_many_pings; it doubles its keepalive_time, and at 0.2 s between PINGs the next
    # connection lives on.
    server_config = Configuration(min_ping_interval=0.15, min_ping_interval_without_calls=0.15, max_ping_strikes=1)
    client_config = Configuration(keepalive_time=0.1, keepalive_timeout=0.05, keepalive_permit_without_calls=True)
    async with running_server([EchoService()], config=server_config) as (_, target):
        async with Channel(target, config=client_config) as channel:
            unary = methods(channel)["Unary"]
            lost = []
            for idle in (1.5, 1.5):
                await unary(BytesValue(value=b"x"), timeout=5)
                protocol = channel._protocol
                await asyncio.sleep(idle)
                assert protocol is not None
                lost.append(protocol.is_closed)
            assert lost == [True, False]
            assert channel.keepalive_time == pytest.approx(0.2)


async def test_a_grpcio_bidi_stream_through_a_network_keeps_its_connection() -> None:
    # grpc-core acknowledges each message it reads with WINDOW_UPDATEs (stream and connection),
    # and we pack the echoes of a bidi stream into as few DATA frames as we can: measured through
    # the relay, 4,620 updates for 1,801 DATA frames. They are answers to what we sent, never a
    # flood: licensing two per DATA frame cut the connection off ("flood") after ~1,000 extra.
    import grpc

    from .relay import segmenting_relay
    from .services import grpcio_method

    config = Configuration(max_empty_frames_per_window=100)  # the budget the extra ones fell into
    total = 20_000
    async with running_server([EchoService()], config=config) as (_, target):
        host, port = target.rsplit(":", 1)
        async with segmenting_relay(host, int(port)) as relay_port:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
                call = grpcio_method(channel, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)()
                window = asyncio.Semaphore(100)

                async def write() -> None:
                    for n in range(total):
                        await window.acquire()
                        await call.write(BytesValue(value=n.to_bytes(4, "big")))
                    await call.done_writing()

                writer = asyncio.ensure_future(write())
                received = 0
                async for reply in call:
                    assert reply.value == received.to_bytes(4, "big")
                    received += 1
                    window.release()
                await writer
                assert received == total
                assert await call.code() == grpc.StatusCode.OK
