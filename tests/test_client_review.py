"""A second adversarial review of the client: calls that hang, end with the wrong status or
exception, or leak, over real sockets against our server and scripted HTTP/2 peers.

Each test names the rule users rely on; those that fail show a defect (see the review report).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, ClassVar, TypeVar

import anyio
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, Status, Stream
from app_kit.aio.client import method_for
from app_kit.rpc.framing import frame_message

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .frames import SETTINGS, WINDOW_UPDATE, frame
from .services import EchoService

pytestmark = pytest.mark.anyio

T = TypeVar("T")
MiB = 1024 * 1024
RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


async def bounded(awaitable: Awaitable[T], timeout: float, failure: str) -> T:
    """``awaitable``'s result; if it takes longer than ``timeout``, the test fails saying ``failure``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"{failure} (nothing after {timeout} s)")


class Streams:
    """Client-streaming and bidi handlers that record whether they were cancelled."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        c = Cardinality
        return {
            "/t.R/Drain": Handler(self.drain, c.STREAM_UNARY, BytesValue, Int64Value),
            "/t.R/First": Handler(self.first, c.STREAM_UNARY, Int64Value, Int64Value),
            "/t.R/Echo": Handler(self.echo, c.STREAM_STREAM, BytesValue, BytesValue),
        }

    async def drain(self, stream: Stream[BytesValue, Int64Value]) -> None:
        try:
            count = len([request async for request in stream])
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await stream.send_message(Int64Value(value=count))

    async def first(self, stream: Stream[Int64Value, Int64Value]) -> None:
        """Answers from the first request alone (a server may end a call before the client has)."""
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(Int64Value(value=request.value))

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        try:
            async for request in stream:
                await stream.send_message(request)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def stream_method(channel: Channel, name: str, cardinality: Cardinality, request: Any, reply: Any) -> Any:
    return method_for(channel, f"/t.R/{name}", cardinality, request, reply)


# -- a client-streaming call's deadline holds while its request iterator waits ----------------


async def test_stream_unary_deadline_ends_the_call_while_the_request_iterator_waits() -> None:
    # The requests come from an async iterable waiting for something that does not come (yet):
    # the call's 0.3 s deadline must still end it with DEADLINE_EXCEEDED, as grpc.aio's does.
    never = asyncio.Event()

    async def requests() -> AsyncIterator[BytesValue]:
        yield BytesValue(value=b"one")
        await never.wait()
        yield BytesValue(value=b"two")

    service = Streams()
    async with running_server([service]) as (_, target), Channel(target) as channel:
        drain = stream_method(channel, "Drain", Cardinality.STREAM_UNARY, BytesValue, Int64Value)
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await bounded(drain(requests(), timeout=0.3), 2, "the deadline did not end the call")
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        await bounded(service.cancelled.wait(), 3, "the server's handler was not cancelled")


async def test_stream_unary_returns_the_reply_a_server_sends_before_reading_every_request() -> None:
    # The server answers OK after the first request; the client still has requests to send.
    # The reply is the call's result (gRPC lets a server end a client-streaming call early):
    # not a ProtocolError from the next send.
    async def requests() -> AsyncIterator[Int64Value]:
        for index in range(1, 1000):
            yield Int64Value(value=index)
            await asyncio.sleep(0.01)

    async with running_server([Streams()]) as (_, target), Channel(target) as channel:
        first = stream_method(channel, "First", Cardinality.STREAM_UNARY, Int64Value, Int64Value)
        reply = await bounded(first(requests(), timeout=5), 4, "the call did not end")
        assert reply.value == 1


# -- a bidi call whose requests fail with a GRPCError on our side ends ------------------------


@pytest.mark.parametrize("failure", ["request too large", "iterator raises GRPCError"])
async def test_bidi_call_ends_when_sending_its_requests_fails_with_a_grpc_error(failure: str) -> None:
    # stub.Method(requests) sends from a task of its own. When that fails with a GRPCError raised
    # here (a request over max_send_message_length; an iterator piping another call that
    # failed), the call must end with it and the server's handler be cancelled; the server,
    # still waiting for requests, would otherwise never end it.
    async def requests() -> AsyncIterator[BytesValue]:
        yield BytesValue(value=b"a")
        await asyncio.sleep(0.05)
        if failure == "request too large":
            yield BytesValue(value=b"x" * (5 * MiB))  # over the default 4 MiB
        else:
            raise GRPCError(Status.UNAVAILABLE, "the upstream call failed")

    service = Streams()
    async with running_server([service]) as (_, target), Channel(target) as channel:
        echo = stream_method(channel, "Echo", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
        with pytest.raises(GRPCError) as info:
            await bounded(echo(requests()), 2, "the bidi call hung after its requests failed")
        expected = Status.RESOURCE_EXHAUSTED if failure == "request too large" else Status.UNAVAILABLE
        assert info.value.status is expected, info.value
        await bounded(service.cancelled.wait(), 3, "the server's handler was not cancelled")


# -- a deadline ends a call whose sender waits for the socket --------------------------------


class _StalledPeer(asyncio.Protocol):
    """An HTTP/2 peer that grants every window, then never reads again (a hung server)."""

    # Held here: a transport that neither reads nor writes is referenced by nothing else, and
    # the garbage collector would close it (a reset) whenever a collection happens to run.
    transports: ClassVar[list[asyncio.BaseTransport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)
        largest = 2**31 - 1
        settings = (4).to_bytes(2, "big") + largest.to_bytes(4, "big")  # SETTINGS_INITIAL_WINDOW_SIZE
        window = frame(WINDOW_UPDATE, 0, 0, (largest - 65535).to_bytes(4, "big"))
        transport.write(frame(SETTINGS, 0, 0, settings) + window)  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return True


async def test_a_deadline_ends_a_call_whose_request_waits_for_a_full_socket() -> None:
    # The server granted the window but stopped reading: the request fills the kernel's buffers
    # and the transport's, and its sender waits for the transport to drain. The call's 0.5 s
    # deadline must end it (DEADLINE_EXCEEDED) all the same.
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = await loop.create_server(_StalledPeer, sock=listener)
    config = Configuration(max_send_message_length=32 * MiB)
    try:
        async with Channel("127.0.0.1", listener.getsockname()[1], config=config) as channel:
            unary = method_for(channel, "/t.R/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            with pytest.raises(GRPCError) as info:
                await bounded(
                    unary(BytesValue(value=b"x" * (12 * MiB)), timeout=0.5), 2.5, "the deadline did not end the call"
                )
            assert info.value.status is Status.DEADLINE_EXCEEDED
    finally:
        server.close()
        for transport in _StalledPeer.transports:
            transport.close()
        _StalledPeer.transports.clear()


# -- a connection is READY once the server speaks HTTP/2, not at TCP connect ------------------


class _AcceptThenClose(asyncio.Protocol):
    """What a TCP proxy with no live backend does: accept, then close."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _reply(connection: FakeConnection, stream_id: int, number: int) -> None:
    connection.reply(stream_id, BytesValue(value=b"served").SerializeToString())


async def test_wait_for_ready_waits_past_a_connection_closed_before_the_servers_settings() -> None:
    # The first connection is accepted and closed before any HTTP/2 (a proxy whose backend is
    # down); the next one is served. A wait_for_ready call must wait for a connection that is
    # READY (the server's SETTINGS came) and be served, not be put on the first one and fail.
    loop = asyncio.get_running_loop()
    accepted = 0

    def factory() -> asyncio.Protocol:
        nonlocal accepted
        accepted += 1
        return _AcceptThenClose() if accepted == 1 else FakeConnection(_reply, [])

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Configuration(connect_initial_backoff=0.1)
    try:
        async with Channel("127.0.0.1", port, config=config) as channel:
            unary = method_for(channel, "/t.R/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            reply = await bounded(unary(BytesValue(), timeout=3, wait_for_ready=True), 5, "the call did not end")
            assert reply.value == b"served"
    finally:
        server.close()


async def test_connections_closed_before_the_servers_settings_are_retried_with_backoff() -> None:
    # Every connection is accepted and closed at once. Such a connection never became READY, so
    # reconnecting backs off (gRPC's connection backoff, 0.5 s here): 20 calls in a row must not
    # open 20 connections.
    loop = asyncio.get_running_loop()
    accepted = 0

    def factory() -> asyncio.Protocol:
        nonlocal accepted
        accepted += 1
        return _AcceptThenClose()

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = Configuration(connect_initial_backoff=0.5, connect_backoff_jitter=0.0)
    try:
        async with Channel("127.0.0.1", port, config=config) as channel:
            unary = method_for(channel, "/t.R/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            for _ in range(20):
                with pytest.raises(GRPCError) as info:
                    await bounded(unary(BytesValue(), timeout=1), 3, "the call did not end")
                assert info.value.status is Status.UNAVAILABLE
            assert accepted <= 2, f"{accepted} connections in a tight loop, without backoff"
    finally:
        server.close()


# -- close() and keepalive end calls at once, whatever the peer does --------------------------


class _StickyPeer(FakeConnection):
    """Keeps its side of the connection open after ours closed (a half-open or busy peer)."""

    def eof_received(self) -> bool:
        return True


async def test_channel_close_ends_in_flight_calls_at_once_even_if_the_peer_keeps_the_socket_open() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _StickyPeer(lambda *_: None, []), "127.0.0.1", 0)
    try:
        channel = Channel("127.0.0.1", server.sockets[0].getsockname()[1])
        sleep = method_for(channel, "/t.R/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
        call = asyncio.ensure_future(sleep(DoubleValue(value=10)))
        await asyncio.sleep(0.2)  # placed and sent; the peer will never answer
        assert not call.done()
        closed_at = time.monotonic()
        channel.close()
        with pytest.raises(GRPCError):
            await bounded(call, 5, "the call outlived its channel")
        assert time.monotonic() - closed_at < 0.3, "close() left the call running until the linger ran out"
    finally:
        server.close()


class _SilentPeer(asyncio.Protocol):
    """Completes the handshake, then neither reads nor answers: a peer gone without a word."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(frame(SETTINGS, 0, 0))  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return True


async def test_an_unanswered_keepalive_ping_fails_the_calls_at_its_timeout() -> None:
    # keepalive_time 0.1 s, keepalive_timeout 0.1 s: the dead peer is known after ~0.3 s; its
    # calls must fail then (UNAVAILABLE), not a linger_timeout (1 s) later.
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_SilentPeer, "127.0.0.1", 0)
    config = Configuration(keepalive_time=0.1, keepalive_timeout=0.1)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1], config=config) as channel:
            unary = method_for(channel, "/t.R/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            started = time.monotonic()
            with pytest.raises(GRPCError) as info:
                await bounded(unary(BytesValue()), 5, "the call on a dead connection did not end")
            assert info.value.status is Status.UNAVAILABLE
            assert time.monotonic() - started < 0.8, f"failed after {time.monotonic() - started:.2f} s"
    finally:
        server.close()


# -- a unary call answered with two replies is a protocol violation ---------------------------


async def test_a_unary_call_answered_with_two_replies_fails() -> None:
    # grpc-go and grpc-java fail such a call (INTERNAL: cardinality violation); returning the
    # first reply as the result hides a broken server.
    def two_replies(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.conn.send_headers(stream_id, RESPONSE_HEADERS)
        for value in (b"one", b"two"):
            connection.conn.send_data(stream_id, frame_message(BytesValue(value=value).SerializeToString()))
        connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async with fake_server(two_replies) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = method_for(channel, "/t.R/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        with pytest.raises(GRPCError) as info:
            await bounded(unary(BytesValue(), timeout=3), 4, "the call did not end")
        assert info.value.status in (Status.INTERNAL, Status.UNIMPLEMENTED)


# -- a long-lived channel keeps nothing of calls that gave up waiting for a stream slot -------


async def test_calls_that_time_out_waiting_for_a_stream_slot_leave_nothing_behind() -> None:
    # The server allows one stream, held by a long call; 300 calls in turn wait for a slot and
    # time out. Each left its waiter queued on the connection, for as long as the slot is taken.
    config = Configuration(max_concurrent_streams=1)
    async with running_server([EchoService()], config=config) as (_, target), Channel(target) as channel:
        sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
        held = asyncio.ensure_future(sleep(DoubleValue(value=30)))
        try:
            await asyncio.sleep(0.2)
            for _ in range(300):
                with pytest.raises(GRPCError) as info:
                    await sleep(DoubleValue(value=0), timeout=0.002)
                assert info.value.status is Status.DEADLINE_EXCEEDED
            protocol = channel._protocol
            assert protocol is not None
            assert len(protocol._slot_waiters) < 10, f"{len(protocol._slot_waiters)} waiters of ended calls kept"
        finally:
            held.cancel()


# -- pinned: leaving a server-streaming loop early frees the stream slot (both loops) ---------


class _Counter:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.R/Count": Handler(self.count, Cardinality.UNARY_STREAM, Int64Value, Int64Value)}

    async def count(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))
            await anyio.sleep(0.005)


@pytest.mark.backends
async def test_breaking_out_of_a_reply_stream_frees_its_slot(backend: str) -> None:
    # One stream allowed; each call is abandoned after two replies of a thousand. Were the
    # abandoned streams not reset, the second call would wait for ever for a slot.
    server = Server([_Counter()], config=Configuration(max_concurrent_streams=1))
    await server.start("127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            count = method_for(channel, "/t.R/Count", Cardinality.UNARY_STREAM, Int64Value, Int64Value)
            with anyio.fail_after(5):
                for _ in range(5):
                    async for reply in count(Int64Value(value=1000), timeout=4):
                        if reply.value == 1:
                            break
    finally:
        server.close(grace=0.5)
        await server.wait_closed()
