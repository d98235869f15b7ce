"""A fresh-eyes review of the client's retries and reconnects, against gRFC A6 (client retries),
gRPC's connection-backoff spec (doc/connection-backoff.md) and PROTOCOL-HTTP2 (REFUSED_STREAM,
GOAWAY's last-stream-id), with grpcio as the reference users compare us with.

Every peer is real and on a real socket: our Server, grpcio's ``grpc.aio`` server (behind the
segmenting relay once), an h2 server in this process that misbehaves on purpose (refuses
streams, sends GOAWAY, answers with pushback or headers first), and bare TCP listeners that
accept and drop connections (before or after the server's SETTINGS) or never speak.

Where a wait is measured and the policy's jitter would make it random, ``random.uniform`` is
made to return its upper bound (``jitter_at_top``): app_kit's own code runs unchanged, only
the dice are loaded, so each wait is the largest the rules allow.

The defects it found, fixed (their tests failed before): a backend that drops every connection
right after its SETTINGS (or GOAWAYs it at once) made the channel reconnect in a tight loop, and
calls that do not wait for ready hung until their deadline; retry attempts lacked
``grpc-previous-rpc-attempts``; the backoff after a server pushback did not restart from
``initialBackoff``; our Server could not send ``grpc-retry-pushback-ms`` at all; the retry
backoff was A6's pre-2024 ``random(0, cap)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import grpc
import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, RetryPolicy, Server, Status, Stream
from app_kit.aio.client import method_for
from app_kit.rpc.framing import frame_message

from .frames import GOAWAY, SETTINGS, frame
from .relay import segmenting_relay

pytestmark = pytest.mark.anyio

C = Cardinality
U, US, SU, SS = C.UNARY_UNARY, C.UNARY_STREAM, C.STREAM_UNARY, C.STREAM_STREAM
GRPC_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def gaps(times: list[float]) -> list[float]:
    return [round(later - earlier, 3) for earlier, later in itertools.pairwise(times)]


@pytest.fixture
def jitter_at_top(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``random.uniform(a, b)`` returns ``b``: each random wait is its largest."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


def unary(channel: Channel, path: str = "/t.R/U") -> Any:
    return method_for(channel, path, U, Int64Value, Int64Value)


async def status_of(call: Any) -> Status | str:
    try:
        await call
    except GRPCError as exc:
        return exc.status
    return "OK"


# -- peers ------------------------------------------------------------------------------------


class Failing:
    """Our Server's service: every call of /t.R/U fails with ``status`` (after ``delay``) for the
    first ``failures`` attempts, then answers; /t.R/Ok answers; /t.R/Up and /t.R/Bidi (client
    and bidi streams) fail like /t.R/U. Records each attempt's time."""

    def __init__(self, failures: int = 10**6, status: Status = Status.UNAVAILABLE, delay: float = 0.0) -> None:
        self.failures = failures
        self.status = status
        self.delay = delay
        self.times: list[float] = []
        self.first = anyio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.R/U": Handler(self.unary, U, Int64Value, Int64Value),
            "/t.R/Ok": Handler(self.ok, U, Int64Value, Int64Value),
            "/t.R/Up": Handler(self.up, SU, BytesValue, Int64Value),
            "/t.R/Bidi": Handler(self.bidi, SS, BytesValue, BytesValue),
        }

    async def _attempt(self) -> None:
        self.times.append(time.monotonic())
        self.first.set()
        if self.delay:
            await anyio.sleep(self.delay)
        if len(self.times) <= self.failures:
            raise GRPCError(self.status, f"attempt {len(self.times)}")

    async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await self._attempt()
        await stream.send_message(Int64Value(value=len(self.times)))

    async def ok(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=7))

    async def up(self, stream: Stream[BytesValue, Int64Value]) -> None:
        async for _ in stream:
            pass
        await self._attempt()

    async def bidi(self, stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        await self._attempt()


@contextlib.asynccontextmanager
async def our_server(service: Any) -> AsyncIterator[int]:
    server = Server([service])
    await server.start("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=0.2)
        await server.wait_closed()


class H2Peer(asyncio.Protocol):
    """One connection of :class:`RawH2`: plain h2, told what to do by the test's callbacks."""

    def __init__(self, owner: RawH2) -> None:
        self.owner = owner
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.received: dict[int, int] = {}  # DATA bytes per stream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.peers.append(self)
        self.conn.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.owner.requests.append((time.monotonic(), dict(event.headers or [])))
                self.owner.on_request(self, event.stream_id, len(self.owner.requests))
            elif isinstance(event, h2.events.DataReceived):
                self.received[event.stream_id] = self.received.get(event.stream_id, 0) + len(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.owner.on_end(self, event.stream_id, len(self.owner.requests))
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def refuse(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
        self.flush()

    def goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """Built by hand: h2's own would stop it answering the streams it promises to finish."""
        self.flush()
        assert self.transport is not None
        self.transport.write(frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + error_code.to_bytes(4, "big")))

    def trailers_only(self, stream_id: int, status: int = 14, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.conn.send_headers(stream_id, [*GRPC_HEAD, (b"grpc-status", str(status).encode()), *(extra or [])], True)

    def answer(self, stream_id: int, message: bytes, status: int = 0) -> None:
        self.conn.send_headers(stream_id, GRPC_HEAD)
        self.conn.send_data(stream_id, frame_message(message))
        self.conn.send_headers(stream_id, [(b"grpc-status", str(status).encode())], end_stream=True)


Script = Callable[[H2Peer, int, int], None]


def _nothing(peer: H2Peer, stream_id: int, number: int) -> None:
    pass


class RawH2:
    """An h2 server in this process: ``on_request(peer, stream_id, n)`` when the n-th request's
    headers come, ``on_end(...)`` when its client half-closes. ``requests``: (time, headers)."""

    def __init__(self, on_request: Script = _nothing, on_end: Script = _nothing) -> None:
        self.on_request = on_request
        self.on_end = on_end
        self.requests: list[tuple[float, dict[bytes, bytes]]] = []
        self.peers: list[H2Peer] = []
        self.port = 0

    async def __aenter__(self) -> RawH2:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: H2Peer(self), "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()
        for peer in self.peers:
            if peer.transport is not None:
                peer.transport.close()

    @property
    def times(self) -> list[float]:
        return [at for at, _ in self.requests]


class Acceptor(asyncio.Protocol):
    """A TCP listener's connection: ``mode`` "close" (dropped before any HTTP/2), "settings"
    (SETTINGS, then dropped), "goaway" (SETTINGS and GOAWAY, kept open), "hold" (never speaks)."""

    def __init__(self, mode: str, log: list[float], transports: list[asyncio.Transport]) -> None:
        self.mode = mode
        self.log = log
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.log.append(time.monotonic())
        self.transports.append(transport)
        if self.mode == "settings":
            transport.write(frame(SETTINGS, 0, 0))
        elif self.mode == "goaway":
            transport.write(frame(SETTINGS, 0, 0) + frame(GOAWAY, 0, 0, bytes(8)))
        if self.mode in ("close", "settings"):
            transport.close()

    def data_received(self, data: bytes) -> None:
        pass


@contextlib.asynccontextmanager
async def acceptor(mode: str) -> AsyncIterator[tuple[int, list[float]]]:
    log: list[float] = []
    transports: list[asyncio.Transport] = []
    server = await asyncio.get_running_loop().create_server(lambda: Acceptor(mode, log, transports), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        server.close()
        for transport in transports:
            transport.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(condition: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(failure)
        await asyncio.sleep(0.005)


# -- 1. a retryable status with a policy --------------------------------------------------------


async def test_unavailable_is_retried_max_attempts_times_waits_growing_to_the_cap_and_the_last_status_raised(
    jitter_at_top: None,
) -> None:
    # Waits at their largest: initial 0.05, x2, capped at 0.15, +20 % → 0.06, 0.12, 0.18, 0.18.
    service = Failing()
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.15, backoff_multiplier=2)
    async with our_server(service) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        with pytest.raises(GRPCError) as info:
            await unary(channel)(Int64Value(), timeout=5)
    assert info.value.status is Status.UNAVAILABLE and info.value.message == "attempt 5"  # the last one's
    assert len(service.times) == 5
    for gap, expected in zip(gaps(service.times), (0.06, 0.12, 0.18, 0.18), strict=True):
        assert expected - 0.002 <= gap <= expected + 0.04, gaps(service.times)


async def test_random_retry_waits_never_exceed_their_cap() -> None:
    service = Failing()
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.04, max_backoff=0.04, backoff_multiplier=1)
    async with our_server(service) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        for _ in range(3):
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    measured = [gap for index, gap in enumerate(gaps(service.times)) if index % 5 != 4]  # within a call
    assert len(measured) == 12 and max(measured) < 0.04 * 1.2 + 0.06, measured


async def test_pushback_from_a_grpcio_server_is_obeyed_through_a_segmenting_relay() -> None:
    times: list[float] = []

    async def handler(request: Int64Value, context: Any) -> Int64Value:
        times.append(time.monotonic())
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "150"),))
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    method = grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=Int64Value.FromString, response_serializer=Int64Value.SerializeToString
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.R", {"U": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    try:
        async with segmenting_relay("127.0.0.1", port) as relay_port:
            async with Channel("127.0.0.1", relay_port, retry_policy=policy) as channel:
                assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    finally:
        await server.stop(None)
    assert len(times) == 3
    assert all(0.145 <= gap < 0.4 for gap in gaps(times)), gaps(times)


@pytest.mark.parametrize(
    "pushback",
    [b"-1", b"-100", b"+5", b"5.0", b"0x10", b"1e3", b"\xd9\xa1", b"99999999999", b""],
    ids=["-1", "-100", "plus", "decimal", "hex", "exponent", "arabic-digit", "11-digits", "empty"],
)
async def test_a_negative_or_malformed_pushback_stops_retries(pushback: bytes) -> None:
    def fail(peer: H2Peer, stream_id: int, number: int) -> None:
        peer.trailers_only(stream_id, 14, [(b"grpc-retry-pushback-ms", pushback)])

    policy = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.001)
    async with RawH2(on_end=fail) as server, Channel("127.0.0.1", server.port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    assert len(server.requests) == 1


async def test_pushback_zero_retries_at_once_and_pushback_never_outdoes_status_or_attempts(jitter_at_top: None) -> None:
    def fail(peer: H2Peer, stream_id: int, number: int) -> None:
        status = 9 if peer.owner is not_retryable else 14  # FAILED_PRECONDITION: not in the policy
        peer.trailers_only(stream_id, status, [(b"grpc-retry-pushback-ms", b"0")])

    policy = RetryPolicy(max_attempts=3, initial_backoff=2, max_backoff=2)  # its own wait: 2 s
    not_retryable = RawH2(on_end=fail)
    async with RawH2(on_end=fail) as server, Channel("127.0.0.1", server.port, retry_policy=policy) as channel:
        began = time.monotonic()
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        assert time.monotonic() - began < 0.5  # the server's 0 ms, not the policy's 2 s
        assert len(server.requests) == 3  # and still no more than max_attempts
    async with not_retryable, Channel("127.0.0.1", not_retryable.port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.FAILED_PRECONDITION
    assert len(not_retryable.requests) == 1


async def test_the_backoff_after_a_pushback_restarts_from_the_initial_backoff(jitter_at_top: None) -> None:
    # Attempt 2 is pushed back 0 ms. A6: "If this attempt also fails, retry delay will reset to
    # initial backoff for the following retry"; grpc-core resets its BackOff on a pushback. So
    # the wait before attempt 4 is the initial 0.05 s (0.06 with +20 % jitter), not 0.05 x 4**2.
    def fail(peer: H2Peer, stream_id: int, number: int) -> None:
        peer.trailers_only(stream_id, 14, [(b"grpc-retry-pushback-ms", b"0")] if number == 2 else [])

    policy = RetryPolicy(max_attempts=4, initial_backoff=0.05, max_backoff=5, backoff_multiplier=4)
    async with RawH2(on_end=fail) as server, Channel("127.0.0.1", server.port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    measured = gaps(server.times)
    assert len(measured) == 3 and measured[1] < 0.04, measured
    assert measured[2] < 0.2, f"wait after the pushed-back attempt: {measured[2]} s (app_kit was: initial x 4**2)"


async def test_retry_attempts_tell_the_server_how_many_came_before() -> None:
    # gRFC A6 "Exposed Retry Metadata"; grpcio (grpc-core), grpc-go and grpc-java send it on
    # every retry attempt: absent on the first, "1" on the second, "2" on the third.
    def fail(peer: H2Peer, stream_id: int, number: int) -> None:
        peer.trailers_only(stream_id)

    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    async with RawH2(on_end=fail) as server, Channel("127.0.0.1", server.port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    seen = [headers.get(b"grpc-previous-rpc-attempts") for _, headers in server.requests]
    assert seen == [None, b"1", b"2"]


async def test_our_server_can_push_back() -> None:
    # A6: "Servers may explicitly pushback by setting metadata in their response"; a grpcio
    # server does it with set_trailing_metadata (see the relay test above). Ours refused every
    # grpc-* key, and the call ended INTERNAL ("the status could not be sent") instead.
    times: list[float] = []

    class PushingBack:
        def __mapping__(self) -> dict[str, Handler]:
            return {"/t.R/U": Handler(self.unary, U, Int64Value, Int64Value)}

        async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
            await stream.recv_message()
            times.append(time.monotonic())
            raise GRPCError(Status.UNAVAILABLE, "later", trailing_metadata={"grpc-retry-pushback-ms": "200"})

    policy = RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.001)
    async with our_server(PushingBack()) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    assert len(times) == 2 and gaps(times)[0] >= 0.19


async def test_retry_waits_follow_a6s_jittered_backoff() -> None:
    # A6 as updated in 2024 (grpc/proposal#452, to match grpc-core): the n-th retry comes after
    # min(initialBackoff x multiplier^(n-1), maxBackoff) x random(0.8, 1.2). With a 50 ms cap
    # no wait may be under 40 ms; app_kit's random(0, 50 ms) made most of twenty waits shorter,
    # some nearly immediate.
    service = Failing()
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.05, max_backoff=0.05, backoff_multiplier=1)
    async with our_server(service) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        for _ in range(5):
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    measured = [gap for index, gap in enumerate(gaps(service.times)) if index % 5 != 4]
    assert len(measured) == 20 and min(measured) >= 0.04, sorted(measured)


# -- 2. what commits a call; what is kept to send again ---------------------------------------


@pytest.mark.parametrize("reply", ["trailers-only", "headers", "message"])
async def test_response_headers_or_a_message_commit_a_call_a_trailers_only_answer_does_not(reply: str) -> None:
    def fail(peer: H2Peer, stream_id: int, number: int) -> None:
        if reply == "trailers-only":
            peer.trailers_only(stream_id)
            return
        peer.conn.send_headers(stream_id, GRPC_HEAD)
        if reply == "message":
            peer.conn.send_data(stream_id, frame_message(Int64Value(value=1).SerializeToString()))
        peer.conn.send_headers(stream_id, [(b"grpc-status", b"14")], end_stream=True)

    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    async with RawH2(on_end=fail) as server, Channel("127.0.0.1", server.port, retry_policy=policy) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        expected = 3 if reply == "trailers-only" else 1
        assert len(server.requests) == expected
        # A server stream: retried before its first reply, never after it.
        replies: list[int] = []
        with pytest.raises(GRPCError) as info:
            async for item in method_for(channel, "/t.R/S", US, Int64Value, Int64Value)(Int64Value(), timeout=5):
                replies.append(item.value)
        assert info.value.status is Status.UNAVAILABLE
        assert len(server.requests) == 2 * expected
        assert replies == ([1] if reply == "message" else [])


async def test_retry_policies_leave_client_and_bidi_streams_alone_as_documented() -> None:
    # README: "Policies apply to calls with a single request message (unary and
    # server-streaming)". (grpcio retries these too, within its 256 KiB buffer.)
    service = Failing()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.001)
    async with our_server(service) as port, Channel("127.0.0.1", port, retry_policy=policy) as channel:
        up = method_for(channel, "/t.R/Up", SU, BytesValue, Int64Value)
        assert await status_of(up([BytesValue(value=b"x")] * 3, timeout=5)) is Status.UNAVAILABLE
        bidi = method_for(channel, "/t.R/Bidi", SS, BytesValue, BytesValue)
        assert await status_of(bidi([BytesValue(value=b"x")], timeout=5)) is Status.UNAVAILABLE
    assert len(service.times) == 2


@pytest.mark.parametrize("cardinality", [SU, SS])
async def test_a_refused_stream_of_requests_is_sent_again_in_full(cardinality: Cardinality) -> None:
    # The first attempt is refused after three of six requests went out; the second must get
    # all six (the three kept, then the rest from the same iterator), byte for byte.
    def count(peer: H2Peer, stream_id: int, number: int) -> None:
        peer.answer(stream_id, Int64Value(value=peer.received.get(stream_id, 0)).SerializeToString())

    server = RawH2(on_end=count)

    async def requests() -> AsyncIterator[BytesValue]:
        for index in range(6):
            yield BytesValue(value=bytes([index]) * 1000)
            await asyncio.sleep(0.01)
            if index == 2:
                peer = server.peers[0]
                peer.refuse(max(peer.conn.streams))

    async with server, Channel("127.0.0.1", server.port) as channel:
        method = method_for(channel, "/t.R/Up", cardinality, BytesValue, Int64Value)
        reply = await method(requests(), timeout=5)
        reply = reply if cardinality is SU else reply[0]
    assert len(server.requests) == 2
    assert reply.value == 6 * (5 + 3 + 1000)  # six messages: prefix, field tag and length, payload


async def test_a_100_mib_client_stream_refused_after_it_was_read_is_neither_kept_nor_sent_again() -> None:
    # A misbehaving server reads 100 MiB, then claims REFUSED_STREAM. gRFC A6: once the
    # requests outgrow the per-call retry buffer the call is committed. app_kit keeps 256 KiB
    # (grpc-core's per_rpc_retry_buffer_size), so nothing is sent again and memory stays flat.
    server = RawH2(on_end=lambda peer, stream_id, number: peer.refuse(stream_id))
    chunk = b"x" * (1 << 20)

    def requests() -> Iterator[BytesValue]:
        for _ in range(100):
            yield BytesValue(value=chunk)

    async with server, Channel("127.0.0.1", server.port) as channel:
        up = method_for(channel, "/t.R/Up", SU, BytesValue, Int64Value)
        tracemalloc.start()
        try:
            status = await status_of(up(requests(), timeout=30))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert status is Status.UNAVAILABLE
    assert len(server.requests) == 1 and sum(server.peers[0].received.values()) > 100 << 20
    assert peak < 16 << 20, f"peak traced memory {peak >> 20} MiB"


# -- 3. transparent retries -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("transparent", "policy_attempts", "expected"),
    [(3, None, 4), (3, 2, 5), (0, None, 1), (1, None, 2)],
    ids=["default", "with-policy", "none", "one"],
)
async def test_refused_streams_are_retried_at_once_up_to_max_transparent_retries_outside_the_policy(
    transparent: int, policy_attempts: int | None, expected: int
) -> None:
    policy = None if policy_attempts is None else RetryPolicy(max_attempts=policy_attempts, initial_backoff=0.001)
    config = Configuration(max_transparent_retries=transparent)
    async with RawH2(on_request=lambda peer, stream_id, number: peer.refuse(stream_id)) as server:
        async with Channel("127.0.0.1", server.port, retry_policy=policy, config=config) as channel:
            began = time.monotonic()
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
            assert time.monotonic() - began < 0.5
    assert len(server.requests) == expected  # 1 + transparent, + the policy's own retries


@pytest.mark.parametrize(
    ("how", "status"),
    [("headers-then-refused", Status.UNAVAILABLE), ("cancel", Status.CANCELLED), ("internal", Status.INTERNAL)],
)
async def test_resets_that_may_follow_processing_are_not_retried_transparently(how: str, status: Status) -> None:
    def reset(peer: H2Peer, stream_id: int, number: int) -> None:
        if how == "headers-then-refused":
            peer.conn.send_headers(stream_id, GRPC_HEAD)
            peer.refuse(stream_id)
        else:
            code = h2.errors.ErrorCodes.CANCEL if how == "cancel" else h2.errors.ErrorCodes.INTERNAL_ERROR
            peer.conn.reset_stream(stream_id, code)

    async with RawH2(on_request=reset) as server, Channel("127.0.0.1", server.port) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is status
    assert len(server.requests) == 1


@pytest.mark.parametrize("error_code", [0, 11], ids=["graceful", "enhance-your-calm-and-close"])
async def test_a_call_above_a_goaways_last_stream_id_is_retried_on_a_new_connection(error_code: int) -> None:
    def goaway(peer: H2Peer, stream_id: int, number: int) -> None:
        if number == 1:
            peer.goaway(0, error_code)
            if error_code:
                assert peer.transport is not None
                peer.transport.close()

    def answer(peer: H2Peer, stream_id: int, number: int) -> None:
        if number >= 2:
            peer.answer(stream_id, Int64Value(value=number).SerializeToString())

    async with RawH2(goaway, answer) as server, Channel("127.0.0.1", server.port) as channel:
        assert (await unary(channel)(Int64Value(), timeout=5)).value == 2
    assert len(server.requests) == 2 and len(server.peers) == 2


async def test_a_call_the_goaway_says_may_have_been_processed_is_not_retried() -> None:
    def goaway(peer: H2Peer, stream_id: int, number: int) -> None:
        peer.goaway(stream_id)  # "up to this one may have been processed"
        assert peer.transport is not None
        asyncio.get_running_loop().call_later(0.05, peer.transport.close)

    async with RawH2(goaway) as server, Channel("127.0.0.1", server.port) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
    assert len(server.requests) == 1


# -- 4. reconnecting ---------------------------------------------------------------------------


async def test_connection_backoff_defaults_are_the_specs_and_the_first_wait_is_1_s_plus_or_minus_20_percent() -> None:
    config = Configuration()
    assert (
        config.connect_initial_backoff,
        config.connect_backoff_multiplier,
        config.connect_backoff_jitter,
        config.connect_max_backoff,
        config.connect_min_timeout,
    ) == (1.0, 1.6, 0.2, 120.0, 20.0)
    async with acceptor("close") as (port, log), Channel("127.0.0.1", port) as channel:
        channel.get_state(try_to_connect=True)
        await wait_until(lambda: len(log) >= 2, 3, "no second connection attempt within 3 s")
    assert 0.8 - 0.01 <= gaps(log)[0] <= 1.2 + 0.1, gaps(log)


async def test_connection_attempts_back_off_by_the_multiplier_up_to_the_maximum() -> None:
    config = Configuration(
        connect_initial_backoff=0.1, connect_backoff_multiplier=2, connect_backoff_jitter=0, connect_max_backoff=0.4
    )
    async with acceptor("close") as (port, log), Channel("127.0.0.1", port, config=config) as channel:
        began = time.thread_time()
        assert await status_of(unary(channel)(Int64Value(), timeout=1.25, wait_for_ready=True)) is (
            Status.DEADLINE_EXCEEDED
        )
        cpu = time.thread_time() - began
    measured = gaps(log)
    assert len(measured) >= 4
    for gap, expected in zip(measured, (0.1, 0.2, 0.4, 0.4), strict=False):
        assert expected - 0.005 <= gap <= expected + 0.06, measured
    assert cpu < 0.2, f"{cpu:.2f} s of CPU while waiting for a backend"


async def test_a_connection_attempt_may_take_the_minimum_connect_timeout() -> None:
    # A listener that accepts and never speaks: each attempt ends at max(backoff, min timeout).
    config = Configuration(
        connect_initial_backoff=0.05,
        connect_backoff_multiplier=1,
        connect_backoff_jitter=0,
        connect_min_timeout=0.3,
    )
    async with acceptor("hold") as (port, log), Channel("127.0.0.1", port, config=config) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=1.0, wait_for_ready=True)) is (
            Status.DEADLINE_EXCEEDED
        )
    assert len(log) >= 3 and all(0.29 <= gap <= 0.4 for gap in gaps(log)), gaps(log)


async def test_calls_that_fail_fast_while_the_backend_is_failing_start_no_connection_attempts() -> None:
    async with acceptor("close") as (port, log), Channel("127.0.0.1", port) as channel:
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        attempts = len(log)
        began = time.monotonic()
        for _ in range(100):
            assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        assert time.monotonic() - began < 0.8  # each at once
        assert len(log) == attempts  # the next attempt is the backoff's (1 s), not the calls'


async def test_a_server_down_then_up_on_the_same_port() -> None:
    # Up: a call works. Down: a call fails at once UNAVAILABLE; one that waits for ready waits,
    # costing no CPU; up again on the same port: the waiting call goes through within the
    # backoff, and so does the next one.
    config = Configuration(connect_initial_backoff=0.2, connect_backoff_jitter=0, connect_max_backoff=0.5)
    first, second = Failing(failures=0), Failing(failures=0)
    server = Server([first])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with Channel("127.0.0.1", port, config=config) as channel:
        assert (await unary(channel)(Int64Value(), timeout=5)).value == 1
        server.close(grace=0.2)
        await server.wait_closed()
        began = time.monotonic()
        assert await status_of(unary(channel)(Int64Value(), timeout=5)) is Status.UNAVAILABLE
        assert time.monotonic() - began < 0.5
        waiting = asyncio.ensure_future(unary(channel)(Int64Value(), timeout=10, wait_for_ready=True))
        cpu = time.thread_time()
        await asyncio.sleep(1.2)
        cpu = time.thread_time() - cpu
        assert not waiting.done()
        restarted = Server([second])
        await restarted.start("127.0.0.1", port)
        try:
            up = time.monotonic()
            assert (await asyncio.wait_for(waiting, 3)).value == 1
            assert time.monotonic() - up <= 0.5 + 0.2  # within the largest backoff (0.5 s)
            assert (await unary(channel)(Int64Value(), timeout=5)).value == 2
        finally:
            waiting.cancel()
            restarted.close(grace=0.2)
            await restarted.wait_closed()
    assert len(first.times) == 1 and len(second.times) == 2
    assert cpu < 0.1, f"{cpu:.2f} s of CPU in 1.2 s while the server was down"


@pytest.mark.parametrize("mode", ["settings", "goaway"], ids=["settings-then-close", "settings-and-goaway"])
async def test_a_backend_that_drops_every_connection_after_its_settings_is_backed_off(mode: str) -> None:
    # The connection-backoff spec: implementations "must not attempt connections substantially
    # more often" than 1 s, x1.6... grpcio makes one connection here (it sends the call, which
    # fails UNAVAILABLE). app_kit reset its backoff on SETTINGS and reconnected as soon as the
    # connection was gone: thousands of connections a second, a core at 100 %.
    async with acceptor(mode) as (port, log), Channel("127.0.0.1", port) as channel:
        began = time.thread_time()
        await status_of(unary(channel)(Int64Value(), timeout=1.0, wait_for_ready=True))
        cpu = time.thread_time() - began
    assert len(log) <= 5, f"{len(log)} connections in 1 s"
    assert cpu < 0.3, f"{cpu:.2f} s of CPU in 1 s"


async def test_a_fail_fast_call_fails_at_once_on_a_backend_that_drops_every_connection() -> None:
    # Without wait_for_ready a call must not wait for a backend that cannot take it: grpcio's
    # fails UNAVAILABLE at once here. app_kit's spun reconnecting until its deadline (and
    # without a deadline, for ever).
    async with acceptor("settings") as (port, _), Channel("127.0.0.1", port) as channel:
        began = time.monotonic()
        status = await status_of(unary(channel)(Int64Value(), timeout=1.5))
        elapsed = time.monotonic() - began
    assert status is Status.UNAVAILABLE and elapsed < 1.0, (status, elapsed)


# -- 5. retries and deadlines -----------------------------------------------------------------


async def test_retries_never_outlive_the_calls_deadline() -> None:
    # grpcio's server fails every attempt UNAVAILABLE after 300 ms; the call has 1 s. Attempts
    # start at ~0, 0.3, 0.6, 0.9 (each told what is left of the deadline); the fourth (or, on a
    # slow machine, the third) is cut by the deadline: DEADLINE_EXCEEDED at 1 s, never later.
    remaining: list[float] = []

    async def handler(request: Int64Value, context: Any) -> Int64Value:
        remaining.append(context.time_remaining())
        await asyncio.sleep(0.3)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")

    method = grpc.unary_unary_rpc_method_handler(
        handler, request_deserializer=Int64Value.FromString, response_serializer=Int64Value.SerializeToString
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.R", {"U": method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.001)
    try:
        async with Channel("127.0.0.1", port, retry_policy=policy) as channel:
            began = time.monotonic()
            status = await status_of(unary(channel)(Int64Value(), timeout=1.0))
            elapsed = time.monotonic() - began
    finally:
        await server.stop(None)
    assert status is Status.DEADLINE_EXCEEDED
    assert 0.95 <= elapsed <= 1.1, elapsed
    assert 3 <= len(remaining) <= 4, remaining
    assert all(left <= 1.0 - 0.28 * index for index, left in enumerate(remaining)), remaining  # what is left


# -- 6. cancelled while backing off -----------------------------------------------------------


@pytest.mark.backends
async def test_cancelling_a_call_while_it_backs_off_ends_it_at_once_and_nothing_more_is_sent(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the policy waits 3 s
    service = Failing()
    policy = RetryPolicy(max_attempts=5, initial_backoff=3, max_backoff=3)
    server = Server([service])
    await server.start("127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1], retry_policy=policy) as channel:
            scope = anyio.CancelScope()
            cancelled_at = ended_at = 0.0

            async def call() -> None:
                nonlocal ended_at
                with scope:
                    await unary(channel)(Int64Value(), timeout=30)
                ended_at = time.monotonic()

            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    group.start_soon(call)
                    await service.first.wait()
                    await anyio.sleep(0.2)  # the attempt failed; the call waits its 3 s
                    cancelled_at = time.monotonic()
                    scope.cancel()
            assert scope.cancelled_caught and ended_at - cancelled_at < 0.1
            await anyio.sleep(0.5)
            assert len(service.times) == 1  # no attempt after the cancellation
            assert (await unary(channel, "/t.R/Ok")(Int64Value(), timeout=5)).value == 7  # the channel goes on
    finally:
        server.close(grace=0.2)
        await server.wait_closed()
