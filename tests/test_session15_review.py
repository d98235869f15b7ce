"""Session 15: a fresh-eyes review of the day's changes (aecb3ac..): the channel's "young loss"
rule, what a peer makes us answer, the flood licences, retries' metadata, the TLS handshake
logging installed on the caller's context.

Every peer is real and on a real socket: our Server (asyncio, and trio for the TLS logging),
a scripted TCP backend in this process that greets chosen connections with SETTINGS and GOAWAY
and relays the others to our Server, and a raw HTTP/2 client (tests/frames.py).

The one defect it found is fixed (its test, with a context used on asyncio then on trio, failed
before); the others confirm behaviour the changes rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import hpack
import pytest
import trio
import trustme
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value
from hyperframe.frame import RstStreamFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, RetryPolicy, Server, Status, Stream
from app_kit.aio.client import method_for
from app_kit.aio.subchannel import ConnectivityState

from .frames import (
    DATA,
    END_HEADERS,
    GOAWAY,
    HANDSHAKE,
    HEADERS,
    RST_STREAM,
    SETTINGS,
    RawPeer,
    frame,
    request_block,
)
from .services import EchoService

pytestmark = pytest.mark.anyio

C = Cardinality
CANCEL = 0x8


def unary(channel: Channel, path: str = "/t.R/U") -> Any:
    return method_for(channel, path, C.UNARY_UNARY, Int64Value, Int64Value)


async def status_of(call: Awaitable[Any], timeout: float = 5.0) -> Status | str:
    try:
        await asyncio.wait_for(call, timeout)
    except GRPCError as exc:
        return exc.status
    return "OK"


class Counting:
    """/t.R/U: fails UNAVAILABLE the first ``failures`` times, then answers how many calls came."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.R/U": Handler(self.unary, C.UNARY_UNARY, Int64Value, Int64Value),
            "/t.R/Sleep": Handler(self.sleep, C.UNARY_UNARY, DoubleValue, DoubleValue),
            "/t.R/Head": Handler(self.head, C.UNARY_UNARY, Int64Value, Int64Value),
        }

    async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        self.calls += 1
        if self.calls <= self.failures:
            raise GRPCError(Status.UNAVAILABLE, f"attempt {self.calls}")
        await stream.send_message(Int64Value(value=self.calls))

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await asyncio.sleep(request.value)
        await stream.send_message(request)

    async def head(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_initial_metadata(metadata={"grpc-retry-pushback-ms": "10"})
        await stream.send_message(Int64Value(value=1))


@contextlib.asynccontextmanager
async def our_server(service: Any, config: Configuration | None = None) -> AsyncIterator[int]:
    server = Server([service], config=config)
    await server.start("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=0.2)
        await server.wait_closed()


# -- a backend whose connections follow a script ----------------------------------------------


class _Pipe(asyncio.Protocol):
    """The backend side of a relayed connection: what the backend says goes to ``peer``."""

    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()


class _Scripted(asyncio.Protocol):
    def __init__(self, backend: Scripted) -> None:
        self.backend = backend
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        backend = self.backend
        index = len(backend.connections)
        backend.connections.append(time.monotonic())
        backend.transports.append(transport)
        what = backend.script[index] if index < len(backend.script) else backend.script[-1]
        if what == "goaway":
            transport.write(frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, bytes(8)))
        else:
            backend.tasks.append(asyncio.ensure_future(self._relay()))

    async def _relay(self) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(lambda: _Pipe(transport), "127.0.0.1", self.backend.relay_to)
        self.upstream = upstream
        self.backend.transports.append(upstream)
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class Scripted:
    """A listener whose n-th connection is ``script[n]`` (the last entry for all later ones):
    "goaway" (SETTINGS and GOAWAY NO_ERROR at once, kept open: a server draining), "relay"
    (piped to our Server on ``relay_to``: a healthy backend behind the same address)."""

    def __init__(self, script: list[str], relay_to: int = 0) -> None:
        self.script = script
        self.relay_to = relay_to
        self.connections: list[float] = []
        self.transports: list[asyncio.Transport] = []
        self.tasks: list[asyncio.Future[None]] = []
        self.port = 0

    async def __aenter__(self) -> Scripted:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Scripted(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for transport in self.transports:
            transport.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


FAST_BACKOFF = Configuration(connect_initial_backoff=0.6, connect_backoff_jitter=0, connect_max_backoff=0.6)


# -- 1. the young-loss rule (app_kit/aio/subchannel.py ready_protocol) --------------------------


async def test_one_connection_greeted_with_goaway_then_a_healthy_backend_serves_a_fail_fast_call() -> None:
    # Behind one address (a virtual IP), a connection that lands on a draining backend is
    # greeted with GOAWAY; the next one reaches a healthy backend. The first such loss
    # reconnects at once: the call that does not wait for ready is served, promptly.
    async with our_server(Counting()) as port, Scripted(["goaway", "relay"], relay_to=port) as backend:
        async with Channel("127.0.0.1", backend.port, config=FAST_BACKOFF) as channel:
            began = time.monotonic()
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) == "OK"
            assert time.monotonic() - began < 0.5
            assert len(backend.connections) == 2


async def test_two_goaway_greetings_fail_fast_calls_until_the_backoff_then_serve_them() -> None:
    # Two in a row: TRANSIENT_FAILURE (a fail-fast call fails at once), no connection attempt
    # before the backoff expires whatever the calls do, then the backend (healthy by now) is
    # reached in the background and the channel is READY again.
    async with our_server(Counting()) as port, Scripted(["goaway", "goaway", "relay"], relay_to=port) as backend:
        async with Channel("127.0.0.1", backend.port, config=FAST_BACKOFF) as channel:
            began = time.monotonic()
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
            assert time.monotonic() - began < 0.3
            assert channel.get_state() is ConnectivityState.TRANSIENT_FAILURE
            for _ in range(20):
                assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
                assert channel.get_state(try_to_connect=True) is ConnectivityState.TRANSIENT_FAILURE
            assert len(backend.connections) == 2
            # The backoff (0.6 s from the second attempt's start) runs out: a call that waits
            # for ready is served on the third connection.
            assert await status_of(unary(channel)(Int64Value(), timeout=5, wait_for_ready=True)) == "OK"
            assert len(backend.connections) == 3
            assert 0.45 < backend.connections[2] - backend.connections[1] < 1.5
            assert channel.get_state() is ConnectivityState.READY
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) == "OK"


async def test_closing_the_channel_in_that_failure_cancels_its_retry() -> None:
    async with Scripted(["goaway"]) as backend:
        channel = Channel("127.0.0.1", backend.port, config=FAST_BACKOFF)
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        assert len(backend.connections) == 2
        channel.close()
        await asyncio.sleep(1.0)  # past the retry's time (0.6 s after the second attempt)
        assert len(backend.connections) == 2
        assert channel.get_state() is ConnectivityState.SHUTDOWN


async def test_connections_lost_after_the_initial_backoff_never_fail_calls() -> None:
    # A healthy server closing idle connections (its idle timeout, here 0.3 s, longer than the
    # client's initial backoff of 0.1 s): each loss is an old connection's, the backoff is
    # reset, the channel goes IDLE (never TRANSIENT_FAILURE) and a fail-fast call is served.
    config = Configuration(connect_initial_backoff=0.1, connect_backoff_jitter=0)
    async with our_server(Counting(), Configuration(idle_timeout=0.3)) as port:
        async with Channel("127.0.0.1", port, config=config) as channel:
            for _ in range(3):
                await asyncio.wait_for(channel.channel_ready(), 5)
                deadline = time.monotonic() + 3
                while (state := channel.get_state()) is ConnectivityState.READY and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert state is ConnectivityState.IDLE
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) == "OK"


# -- 2. what a peer makes us answer (h2_internals _reset_once) ----------------------------------


async def test_frames_a_client_sends_on_a_stream_it_reset_are_answered_once() -> None:
    # The server side of "answered once": a client resets its call, then sends 2,000 DATA
    # frames (and HEADERS) on it. One RST_STREAM STREAM_CLOSED back; the connection serves on.
    async with our_server(Counting()) as port, RawPeer(port) as peer:
        encoder = hpack.Encoder()
        opening = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/t.R/Sleep"))
        await peer.send(HANDSHAKE + opening + frame(DATA, 0, 1, b"\x00\x00\x00"))  # a message begun
        await asyncio.sleep(0.1)
        await peer.send(frame(RST_STREAM, 0, 1, CANCEL.to_bytes(4, "big")))
        await peer.send(frame(DATA, 0, 1, b"x" * 64) * 2000)
        await peer.send(frame(HEADERS, END_HEADERS | 0x1, 1, request_block(encoder, path="/t.R/Sleep")))
        request = Int64Value(value=1).SerializeToString()
        whole = b"\x00" + len(request).to_bytes(4, "big") + request
        await peer.send(frame(HEADERS, END_HEADERS, 3, request_block(encoder, path="/t.R/U")))
        await peer.send(frame(DATA, 0x1, 3, whole))
        for _ in range(250):
            if 3 in peer.trailer_statuses():
                break
            await asyncio.sleep(0.02)
        resets = [f for f in peer.frames if isinstance(f, RstStreamFrame) and f.stream_id == 1]
        assert len(resets) <= 1, f"{len(resets)} resets for frames on a stream the client reset"
        assert peer.trailer_statuses().get(3) == b"0"
        assert peer.goaways == []


# -- 3. the flood licences: what a peer may bank ------------------------------------------------


async def test_window_updates_licensed_by_a_large_reply_are_banked_only_up_to_a_bound() -> None:
    # 4 MiB of replies license ~9,000 WINDOW_UPDATEs (two per KiB, frame and message), but
    # at most 2,048 are banked: 1,900 sent after the reply are free, 1,000 more are a flood
    # (with the budget of 100), not a CPU sink paid for long before.
    config = Configuration(max_empty_frames_per_window=100)
    server = Server([EchoService()], config=config)
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RawPeer(port) as peer:
            initial_window = (4).to_bytes(2, "big") + (16 << 20).to_bytes(4, "big")
            request = Int64Value(value=256).SerializeToString()
            message = b"\x00" + len(request).to_bytes(4, "big") + request
            opening = frame(SETTINGS, 0, 0, initial_window) + frame(0x8, 0, 0, (16 << 20).to_bytes(4, "big"))
            block = request_block(hpack.Encoder(), path="/test.Echo/Big")
            await peer.send(
                HANDSHAKE[:-9] + opening + frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, 0x1, 1, message)
            )
            for _ in range(500):
                if 1 in peer.trailer_statuses():
                    break
                await asyncio.sleep(0.02)
            assert peer.trailer_statuses().get(1) == b"0"
            update = frame(0x8, 0, 1, (1).to_bytes(4, "big"))  # on the finished stream: no window change
            await peer.send(update * 1900)
            await asyncio.sleep(0.3)
            assert peer.goaways == []
            await peer.send(update * 1000)
            await peer.wait_closed()
            assert [(g.error_code, g.additional_data) for g in peer.goaways] == [(0xB, b"flood")]
    finally:
        server.close(grace=0.2)
        await server.wait_closed()


# -- 4. retries' metadata ------------------------------------------------------------------------


async def test_retry_attempts_leave_the_callers_metadata_alone_and_each_says_its_count_once() -> None:
    service = Counting(failures=2)
    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02, backoff_multiplier=2)
    metadata = [("x-a", "1")]
    async with our_server(service) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        reply, call = await unary(channel).with_call(Int64Value(), timeout=5, metadata=metadata)
    assert reply.value == 3
    assert metadata == [("x-a", "1")]
    headers = call._metadata
    assert headers.count((b"grpc-previous-rpc-attempts", b"2")) == 1
    assert [name for name, _ in headers].count(b"grpc-previous-rpc-attempts") == 1


async def test_the_pushback_key_is_refused_outside_a_servers_trailers() -> None:
    async with our_server(Counting()) as port, Channel("127.0.0.1", port) as channel:
        with pytest.raises(ValueError):
            await unary(channel)(Int64Value(), timeout=5, metadata={"grpc-retry-pushback-ms": "10"})
        # In a handler's initial metadata: its own error (UNKNOWN), never sent as headers.
        assert await status_of(unary(channel, "/t.R/Head")(Int64Value(), timeout=5)) is Status.UNKNOWN


# -- 5. the TLS handshake logging installed on the caller's context -----------------------------

CA = trustme.CA()
LOCALHOST = CA.issue_cert("localhost")


def _plaintext_to(port: int) -> None:
    """A client that speaks HTTP/2 without TLS to the TLS port (a failed handshake)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(3)
        with contextlib.suppress(OSError):
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
            sock.recv(100)


def test_a_context_used_on_asyncio_then_on_trio_logs_a_failed_handshake_once() -> None:
    from app_kit.aio import eventloop

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    LOCALHOST.configure_cert(context)

    async def on_asyncio() -> None:
        server = Server([Counting()])
        await server.start("127.0.0.1", 0, ssl=context)  # installs its class on `context`
        server.close(grace=0.1)
        await server.wait_closed()

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    async def on_trio() -> None:
        server = Server([Counting()])
        await server.start("127.0.0.1", 0, ssl=context)
        try:
            await trio.to_thread.run_sync(_plaintext_to, server.sockets[0].getsockname()[1])
            await trio.sleep(0.2)
        finally:
            server.close(grace=0.1)
            await server.wait_closed()

    eventloop.run(on_asyncio(), loop="asyncio")
    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("app_kit")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        trio.run(on_trio)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    failed = [r for r in records if r.getMessage().startswith("TLS handshake failed")]
    assert len(failed) == 1, [(r.name, r.funcName, r.getMessage()[:80]) for r in failed]
