"""Session 10 review of the performance changes since 2dc81df.

Large DATA payloads written by reference (views of the message between frame headers, through
``writelines``: asyncio's, uvloop's, the trio transport's, the in-memory one's), the unary stub
call without ``async with`` (``_unary_reply``), and a status given to the server as an int.
(The guard's fast path has its differential test in test_segmentation.py.)

Real peers only: a raw h2 client (tests/h2client.py), a scripted h2 server (tests/fake_server.py),
our own Channel and Server, over TCP and TLS, on asyncio, uvloop and trio.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import h2.events
import h2.settings
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, Status, Stream, client_tls
from app_kit.aio import eventloop
from app_kit.aio.client import ClientInterceptor, ClientStream, method_for
from app_kit.aio.testing import ChannelFor
from app_kit.rpc.framing import frame_message

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .h2client import RawClient, Response

pytestmark = pytest.mark.anyio


def _payload(index: int, size: int) -> bytes:
    """``size`` bytes that differ per message and per offset (a misplaced frame shows)."""
    seed = hashlib.sha256(index.to_bytes(4, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


class _Recorder(ClientInterceptor):
    """Records the status each call ended with, as interceptors hear it (``on_call_end``)."""

    def __init__(self) -> None:
        self.ends: list[Status | None] = []

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        self.ends.append(call.status)


# -- the unary stub call: what it does with a reply it cannot take -------------------------------


class _ReplyThenHold:
    """A unary method whose reply goes out at once and whose status comes much later."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.R/Hold": Handler(self.hold, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def hold(self, stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        # Bytes that a client expecting a StringValue cannot parse (bad UTF-8): a schema mismatch.
        await stream.send_message(BytesValue(value=b"\xff\xfe"))
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise


async def test_an_undecodable_unary_reply_fails_the_call_when_it_arrives() -> None:
    # Before: the reply was decoded as it arrived; one that does not decode failed the call at
    # once with INTERNAL and reset it (the server's handler is cancelled), as grpc-go and
    # grpc-core do. Now the stub waits for the status first: the caller waits as long as the
    # server takes (here until its own deadline), the handler runs on, and the call's status
    # (what interceptors hear) is the deadline's, not the INTERNAL raised.
    service = _ReplyThenHold()
    recorder = _Recorder()
    async with running_server([service]) as (_, target), Channel(target, interceptors=[recorder]) as channel:
        hold = method_for(channel, "/t.R/Hold", Cardinality.UNARY_UNARY, BytesValue, StringValue)
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await hold(BytesValue(value=b"?"), timeout=4)
        elapsed = time.monotonic() - started
        assert info.value.status is Status.INTERNAL and "decode" in (info.value.message or "")
        assert elapsed < 2, f"an undecodable reply failed the call only after {elapsed:.1f}s"
        with anyio.fail_after(3):
            while not service.cancelled.is_set():
                await anyio.sleep(0.01)
        assert recorder.ends == [Status.INTERNAL]


def _invalid_metadata_then_nothing(connection: FakeConnection, stream_id: int, number: int) -> None:
    connection.conn.send_headers(
        stream_id,
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-blob-bin", b"!!not base64!!")],
    )


async def test_invalid_response_metadata_fails_the_unary_call_when_it_arrives() -> None:
    # The same for response headers the client cannot read: before, INTERNAL at once and the
    # stream reset; now only once the server ends the call, or (here) at the deadline.
    async with fake_server(_invalid_metadata_then_nothing) as (port, _), Channel("127.0.0.1", port) as channel:
        call = method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await call(Int64Value(value=1), timeout=4)
        elapsed = time.monotonic() - started
        assert info.value.status is Status.INTERNAL and "invalid response metadata" in (info.value.message or "")
        assert elapsed < 2, f"invalid response metadata failed the call only after {elapsed:.1f}s"


# -- the unary stub call: outcomes a scripted server gives (as before the change) --------------------


def _head(connection: FakeConnection, stream_id: int) -> None:
    connection.conn.send_headers(
        stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-head", b"h")]
    )


def _reply(connection: FakeConnection, stream_id: int, value: int) -> None:
    connection.conn.send_data(stream_id, frame_message(Int64Value(value=value).SerializeToString()))


def _status(connection: FakeConnection, stream_id: int, status: int, message: bytes = b"") -> None:
    fields = [(b"grpc-status", str(status).encode()), (b"x-tail", b"t")]
    if message:
        fields.append((b"grpc-message", message))
    connection.conn.send_headers(stream_id, fields, end_stream=True)


def _scripted(kind: str) -> Callable[[FakeConnection, int, int], None]:
    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if kind == "trailers only":
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"7")]
            connection.conn.send_headers(stream_id, [*fields, (b"x-tail", b"t")], end_stream=True)
            return
        if kind == "trailers only, OK":
            fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
            connection.conn.send_headers(stream_id, fields, end_stream=True)
            return
        _head(connection, stream_id)
        if kind == "reply":
            _reply(connection, stream_id, 42)
            _status(connection, stream_id, 0)
        elif kind == "two replies":
            _reply(connection, stream_id, 1)
            _reply(connection, stream_id, 2)
            _status(connection, stream_id, 0)
        elif kind == "reply then error":
            _reply(connection, stream_id, 1)
            _status(connection, stream_id, 5, b"gone")
        elif kind == "headers and trailers, no reply":
            _status(connection, stream_id, 0)
        elif kind == "reply then reset":
            _reply(connection, stream_id, 1)
            connection.conn.reset_stream(stream_id, 8)  # CANCEL
        elif kind == "reply later":  # its status in a later write than the reply
            _reply(connection, stream_id, 43)
            connection.flush()

            def later() -> None:
                _status(connection, stream_id, 0)
                connection.flush()

            asyncio.get_running_loop().call_later(0.1, later)

    return script


_NO_REPLY = "the server sent no reply to a unary call"


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("reply", Status.OK, None),
        ("reply later", Status.OK, None),
        ("two replies", Status.INTERNAL, "cardinality violation: more than one reply to a unary call"),
        ("reply then error", Status.NOT_FOUND, "gone"),
        ("headers and trailers, no reply", Status.UNIMPLEMENTED, _NO_REPLY),
        ("trailers only", Status.PERMISSION_DENIED, None),
        ("trailers only, OK", Status.UNIMPLEMENTED, _NO_REPLY),
        ("reply then reset", Status.CANCELLED, None),
    ],
)
async def test_unary_outcomes_are_raised_and_heard_as_before(kind: str, status: Status, message: str | None) -> None:
    recorder = _Recorder()
    async with fake_server(_scripted(kind)) as (port, log), Channel("127.0.0.1", port, interceptors=[recorder]) as ch:
        call = method_for(ch, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        if status is Status.OK:
            reply, stream = await call.with_call(Int64Value(value=1), timeout=5)
            assert reply.value in (42, 43)
            assert stream.initial_metadata is not None and stream.initial_metadata["x-head"] == "h"
            assert stream.trailing_metadata is not None and stream.trailing_metadata["x-tail"] == "t"
            assert stream.status is Status.OK
        else:
            with pytest.raises(GRPCError) as info:
                await call(Int64Value(value=1), timeout=5)
            assert info.value.status is status
            if message is not None:
                assert info.value.message == message
            if kind in ("reply then error", "trailers only"):
                assert dict(info.value.trailing_metadata or {})["x-tail"] == "t"
        assert len(log) == 1  # never retried
    if message != _NO_REPLY:  # (see the next test)
        assert recorder.ends == [status]  # what interceptors hear is what the caller got


def _undecodable_then_ok(connection: FakeConnection, stream_id: int, number: int) -> None:
    _head(connection, stream_id)
    connection.conn.send_data(stream_id, frame_message(BytesValue(value=b"\xff\xfe").SerializeToString()))
    _status(connection, stream_id, 0)


@pytest.mark.parametrize("kind", ["no reply", "undecodable reply"])
async def test_interceptors_hear_the_status_the_unary_caller_gets(kind: str) -> None:
    # Not new (2dc81df does the same): a call whose status was OK but whose caller gets
    # UNIMPLEMENTED (no reply) or INTERNAL (a reply that does not decode, its status in the
    # same read) is reported to on_call_end (access logs, metrics) as OK.
    script = _scripted("headers and trailers, no reply") if kind == "no reply" else _undecodable_then_ok
    recorder = _Recorder()
    async with fake_server(script) as (port, _), Channel("127.0.0.1", port, interceptors=[recorder]) as channel:
        call = method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, StringValue)
        with pytest.raises(GRPCError) as info:
            await call(Int64Value(value=1), timeout=5)
    assert recorder.ends == [info.value.status]


class _Blocking:
    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.B/Block": Handler(self.block, Cardinality.UNARY_UNARY, Int64Value, Int64Value),
            "/t.B/Echo": Handler(self.echo, Cardinality.UNARY_UNARY, Int64Value, Int64Value),
        }

    async def block(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        self.started.set()
        try:
            await anyio.sleep(60)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise

    async def echo(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(request)


async def _until(predicate: Callable[[], bool], timeout: float = 5) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


@pytest.mark.backends
async def test_a_unary_call_cancelled_or_expired_resets_its_stream(backend: str) -> None:
    service = _Blocking()
    recorder = _Recorder()
    server = Server([service], config=Configuration(max_concurrent_streams=1))
    await server.start("127.0.0.1", 0)
    try:
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with Channel(target, interceptors=[recorder]) as channel:
            block = method_for(channel, "/t.B/Block", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
            echo = method_for(channel, "/t.B/Echo", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
            # The caller's scope cancels the awaiting task: RST_STREAM, the handler cancelled.
            with anyio.move_on_after(0.3):
                await block(Int64Value(value=1), timeout=30)
            await _until(service.cancelled.is_set)
            assert recorder.ends == [Status.CANCELLED]
            # Its slot (the server allows one stream) is free again.
            assert (await echo(Int64Value(value=7), timeout=5)).value == 7
            service.cancelled.clear()
            with pytest.raises(GRPCError) as info:
                await block(Int64Value(value=1), timeout=0.3)
            assert info.value.status is Status.DEADLINE_EXCEEDED
            await _until(service.cancelled.is_set)
            assert recorder.ends == [Status.CANCELLED, Status.OK, Status.DEADLINE_EXCEEDED]
            assert (await echo(Int64Value(value=8), timeout=5)).value == 8
        with anyio.fail_after(5):
            while server.stats().calls:
                await anyio.sleep(0.01)
    finally:
        server.close(grace=1)
        with anyio.fail_after(10):
            await server.wait_closed()


def _refuse_first(connection: FakeConnection, stream_id: int, number: int) -> None:
    if number == 1:
        connection.conn.reset_stream(stream_id, 7)  # REFUSED_STREAM: never processed
        return
    _head(connection, stream_id)
    _reply(connection, stream_id, 9)
    _status(connection, stream_id, 0)


async def test_a_refused_unary_call_is_retried_transparently_and_each_attempt_ends_once() -> None:
    recorder = _Recorder()
    async with fake_server(_refuse_first) as (port, log), Channel("127.0.0.1", port, interceptors=[recorder]) as ch:
        call = method_for(ch, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        assert (await call(Int64Value(value=1), timeout=5)).value == 9
        assert len(log) == 2
    assert recorder.ends == [Status.UNAVAILABLE, Status.OK]


# -- large payloads by reference: the order of bytes on the wire ----------------------------------


class _Mixed:
    """Replies that mix large payloads (bytes: written by reference) with small frames of
    every kind around them: response headers with metadata, small replies, trailers."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.M/Mixed": Handler(self.mixed, Cardinality.UNARY_STREAM, Int64Value, BytesValue)}

    async def mixed(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        index = request.value
        await stream.send_initial_metadata(metadata={"x-index": str(index), "x-pad": "p" * (index % 7 * 50)})
        for number, size in enumerate(_sizes(index)):
            await stream.send_message(BytesValue(value=_payload(index * 100 + number, size)))
        await stream.send_trailing_metadata(metadata={"x-done": str(index)})


def _sizes(index: int) -> tuple[int, ...]:
    """Large and small messages; every other stream only small ones, whose frames (header
    blocks with HPACK state shared by the connection among them) follow the large ones."""
    if index % 2:
        return (10, 1, 100)
    return (65536 * 3 + 17, 65536 - 5, 10, 200_000, 1, 65536 * 2 + 16384, 100)


def _frames(data: bytes) -> list[bytes]:
    """Each gRPC message's payload in ``data`` (length-prefixed messages)."""
    out = []
    while data:
        length = int.from_bytes(data[1:5], "big")
        out.append(data[5 : 5 + length])
        data = data[5 + length :]
    return out


async def test_large_payloads_interleave_with_headers_trailers_and_ping_acks_in_order() -> None:
    # A raw h2 client with a 16 KiB frame size: payloads from 64 KiB go out by reference, between
    # copied frames (HEADERS whose HPACK state is per connection, trailers, PING ACKs, window
    # updates). 12 concurrent streams, PINGs sent while they run: every byte in its place.
    streams = 12
    config = Configuration(
        initial_stream_window_size=8 << 20, initial_connection_window_size=64 << 20, max_ping_strikes=0
    )
    async with running_server([_Mixed()], config=config) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawClient("127.0.0.1", port) as client:
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16 << 20})
            client.conn.increment_flow_control_window(64 << 20)
            client.flush()
            ids = []
            for index in range(streams):
                ids.append(await client.request("/t.M/Mixed", Int64Value(value=index).SerializeToString()))
            for ping in range(4):  # while the replies flow: each ACK among their frames
                await client.wait_for(lambda n=ping: len(client.events) > 20 * (n + 1), timeout=10)
                client.conn.ping(ping.to_bytes(8, "big"))
                client.flush()
            for stream_id in ids:
                await client.read_response(stream_id, timeout=10)
            assert not [e for e in client.events if isinstance(e, Exception | h2.events.ConnectionTerminated)]
            acks = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
            assert sorted(int.from_bytes(e.ping_data, "big") for e in acks) == [0, 1, 2, 3]
            ends = [i for i, e in enumerate(client.events) if isinstance(e, h2.events.StreamEnded)]
            assert client.events.index(acks[0]) < ends[-1]  # answered while replies were going out
            for index, stream_id in enumerate(ids):
                response = client.responses[stream_id]
                assert response.grpc_status == 0
                assert response.header(b"x-index") == str(index).encode()
                assert response.header(b"x-done") == str(index).encode()
                messages = [BytesValue.FromString(payload).value for payload in _frames(response.data)]
                assert messages == [_payload(index * 100 + number, size) for number, size in enumerate(_sizes(index))]


# -- large payloads by reference: TLS, trio, uvloop, in memory ------------------------------------


class _Big:
    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.G/Get": Handler(self.get, Cardinality.UNARY_UNARY, Int64Value, BytesValue),
            "/t.G/Many": Handler(self.many, Cardinality.UNARY_STREAM, Int64Value, BytesValue),
            "/t.G/Hash": Handler(self.hash, Cardinality.UNARY_UNARY, BytesValue, StringValue),
        }

    async def hash(self, stream: Stream[BytesValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(StringValue(value=hashlib.sha256(request.value).hexdigest()))

    async def get(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(BytesValue(value=_payload(request.value, request.value)))

    async def many(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(BytesValue(value=_payload(index, 65536 + index * 9973)))


# Windows wide enough that a large message is handed to h2 whole (on either side): by reference.
_BIG_LIMITS = Configuration(
    max_send_message_length=32 << 20,
    max_receive_message_length=32 << 20,
    initial_stream_window_size=32 << 20,
    initial_connection_window_size=64 << 20,
)


class _Peer(RawClient):
    """The raw h2 client, over TLS if given a context, with 16 KiB frames (h2's default, grpc-go's)
    and windows wide open: every large reply goes out whole, by reference, in many frames."""

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        super().__init__("127.0.0.1", port)
        self._context = context

    async def __aenter__(self) -> _Peer:
        tls: dict[str, Any] = {"ssl": self._context, "server_hostname": "localhost"} if self._context else {}
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, **tls)
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
        self.conn.increment_flow_control_window((1 << 31) - 1 - 65535)
        self.flush()
        self._task = asyncio.create_task(self._read())
        return self

    async def call(self, path: str, message: bytes) -> Response:
        stream_id = await self.request(path, message)
        self.responses[stream_id] = Response(data=bytearray())  # type: ignore[arg-type]  # (appended to in place)
        return await self.read_response(stream_id, timeout=60)


def _raw_peer_reads_big_replies(port: int, context: ssl.SSLContext | None) -> None:
    """In a thread of its own (its own asyncio loop), whatever loop the server runs on."""

    async def run() -> None:
        async with _Peer(port, context) as peer:
            # 8 MiB in 16 KiB frames: 1,024 views and their headers, over the 1,024 buffers
            # one writev takes (uvloop).
            sizes = [65536 - 5, 65536, 65536 + 1, 1 << 20, 8 << 20]
            calls = [peer.call("/t.G/Get", Int64Value(value=size).SerializeToString()) for size in sizes * 2]
            calls.append(peer.call("/t.G/Many", Int64Value(value=40).SerializeToString()))
            responses = await asyncio.gather(*calls)
            for response, size in zip(responses, sizes * 2, strict=False):
                assert response.grpc_status == 0
                assert [BytesValue.FromString(m).value for m in _frames(response.data)] == [_payload(size, size)]
            assert responses[-1].grpc_status == 0
            streamed = [BytesValue.FromString(m).value for m in _frames(responses[-1].data)]
            assert streamed == [_payload(i, 65536 + i * 9973) for i in range(40)]
            assert not [e for e in peer.events if isinstance(e, Exception | h2.events.ConnectionTerminated)]

    asyncio.run(run())


def _tls() -> tuple[ssl.SSLContext, ssl.SSLContext, bytes]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    roots = ca.cert_pem.bytes()
    return context, client_tls(root_certificates=roots), roots


@pytest.mark.backends
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_large_replies_by_reference_reach_a_raw_peer_intact(backend: str, tls: bool) -> None:
    server_context, client_context, _ = _tls() if tls else (None, None, b"")
    server = Server([_Big()], config=_BIG_LIMITS)
    await server.start("127.0.0.1", 0, ssl=server_context)
    try:
        port = server.sockets[0].getsockname()[1]
        await anyio.to_thread.run_sync(_raw_peer_reads_big_replies, port, client_context)
    finally:
        server.close(grace=1)
        with anyio.fail_after(10):
            await server.wait_closed()


@pytest.mark.backends
@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
async def test_large_messages_between_our_client_and_server_arrive_intact(backend: str, tls: bool) -> None:
    # Both advertise 1 MiB frames: larger payloads go by reference, replies and requests alike.
    context, _, roots = _tls() if tls else (None, None, b"")
    server = Server([_Big()], config=_BIG_LIMITS)
    await server.start("127.0.0.1", 0, ssl=context)
    try:
        port = server.sockets[0].getsockname()[1]
        options: dict[str, Any] = {}
        if tls:
            options = {"ssl": client_tls(root_certificates=roots), "server_hostname": "localhost"}
        async with Channel("127.0.0.1", port, config=_BIG_LIMITS, **options) as channel:
            get = method_for(channel, "/t.G/Get", Cardinality.UNARY_UNARY, Int64Value, BytesValue)
            sizes = [(1 << 20) - 1, (1 << 20) + 6, 3 << 20, 9 << 20]
            results: dict[int, bytes] = {}

            async def one(size: int) -> None:
                results[size] = (await get(Int64Value(value=size), timeout=60)).value

            async with anyio.create_task_group() as tasks:
                for size in sizes:
                    tasks.start_soon(one, size)
            for size in sizes:
                assert results[size] == _payload(size, size), size
            hash_ = method_for(channel, "/t.G/Hash", Cardinality.UNARY_UNARY, BytesValue, StringValue)
            for size in sizes:
                digest = (await hash_(BytesValue(value=_payload(size, size)), timeout=60)).value
                assert digest == hashlib.sha256(_payload(size, size)).hexdigest(), size
    finally:
        server.close(grace=1)
        with anyio.fail_after(10):
            await server.wait_closed()


@pytest.mark.backends
async def test_large_messages_through_channel_for_arrive_intact(backend: str) -> None:
    # The in-memory transport of app_kit.testing (asyncio.Transport's writelines: joined).
    async with ChannelFor([_Big()], config=_BIG_LIMITS) as channel:
        get = method_for(channel, "/t.G/Get", Cardinality.UNARY_UNARY, Int64Value, BytesValue)
        hash_ = method_for(channel, "/t.G/Hash", Cardinality.UNARY_UNARY, BytesValue, StringValue)
        size = (5 << 20) + 3
        assert (await get(Int64Value(value=size), timeout=30)).value == _payload(size, size)
        digest = (await hash_(BytesValue(value=_payload(size, size)), timeout=30)).value
        assert digest == hashlib.sha256(_payload(size, size)).hexdigest()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_large_replies_by_reference_on_uvloop_reach_a_raw_peer_intact(tls: bool) -> None:
    # uvloop's writelines is one writev of the views (asyncio's own joins them first).
    server_context, client_context, _ = _tls() if tls else (None, None, b"")
    port: concurrent.futures.Future[int] = concurrent.futures.Future()
    stop = threading.Event()

    async def serve() -> str:
        server = Server([_Big()], config=_BIG_LIMITS)
        await server.start("127.0.0.1", 0, ssl=server_context)
        port.set_result(server.sockets[0].getsockname()[1])
        while not stop.is_set():
            await asyncio.sleep(0.02)
        server.close(grace=1)
        await server.wait_closed()
        return eventloop.current_loop()

    outcome: concurrent.futures.Future[str] = concurrent.futures.Future()

    def run() -> None:
        try:
            outcome.set_result(eventloop.run(serve, loop="uvloop"))
        except BaseException as exc:
            outcome.set_exception(exc)
            port.cancel()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        _raw_peer_reads_big_replies(port.result(timeout=10), client_context)
    finally:
        stop.set()
        thread.join(15)
    assert outcome.result(timeout=1) == "uvloop"


# -- large payloads by reference: backpressure ---------------------------------------------------


class _Flood:
    def __init__(self) -> None:
        self.sent = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.F/Flood": Handler(self.flood, Cardinality.UNARY_STREAM, Int64Value, BytesValue)}

    async def flood(self, stream: Stream[Int64Value, BytesValue]) -> None:
        await stream.recv_message()
        message = BytesValue(value=b"f" * (1 << 20))
        while True:
            await stream.send_message(message)
            self.sent += 1


@pytest.mark.backends
async def test_a_peer_that_does_not_read_holds_a_sender_of_large_messages(backend: str) -> None:
    # Windows wide open (64 MiB): only the transport's write buffer (writelines) can hold the
    # handler. A raw socket that never reads: the handler must stop after a few messages.
    service = _Flood()
    config = Configuration(initial_stream_window_size=1 << 30, max_connection_send_buffer=1 << 20)
    server = Server([service], config=config)
    await server.start("127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]

        def peer() -> int:
            import socket

            import h2.config
            import h2.connection

            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1})
            conn.increment_flow_control_window((1 << 31) - 1 - 65535)
            headers = [(":method", "POST"), (":scheme", "http"), (":path", "/t.F/Flood"), (":authority", "x")]
            conn.send_headers(1, [*headers, ("content-type", "application/grpc"), ("te", "trailers")])
            conn.send_data(1, frame_message(Int64Value(value=1).SerializeToString()), end_stream=True)
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                sock.sendall(conn.data_to_send())
                time.sleep(1.5)  # never reads: the server's SETTINGS ACK included
                return service.sent

        sent = await anyio.to_thread.run_sync(peer)
        # 64 MiB of window granted, a 1 MiB send buffer, and socket buffers of a few MiB at most.
        assert 1 <= sent < 24, f"{sent} messages of 1 MiB went to a peer that reads nothing"
    finally:
        server.close(grace=0.2)
        with anyio.fail_after(10):
            await server.wait_closed()


# -- a status given as an int ------------------------------------------------------------------


class _IntStatus:
    def __init__(self) -> None:
        self.ended: list[object] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.I/End": Handler(self.end, Cardinality.UNARY_UNARY, Int64Value, Int64Value)}

    async def end(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value == 0:
            await stream.send_message(request)
        await stream.send_trailing_metadata(status=request.value, status_message="as an int")
        self.ended.append(stream.status)


async def test_a_status_given_as_an_int_is_converted() -> None:
    service = _IntStatus()
    async with running_server([service]) as (_, target), Channel(target) as channel:
        end = method_for(channel, "/t.I/End", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        assert (await end(Int64Value(value=0), timeout=5)).value == 0
        with pytest.raises(GRPCError) as info:
            await end(Int64Value(value=5), timeout=5)
        assert info.value.status is Status.NOT_FOUND and info.value.message == "as an int"
        with pytest.raises(GRPCError) as info:
            await end(Int64Value(value=99), timeout=5)  # no such status: the handler's error
        assert info.value.status is Status.UNKNOWN
    assert service.ended == [Status.OK, Status.NOT_FOUND]
    assert all(type(status) is Status for status in service.ended)
