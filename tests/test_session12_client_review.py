"""A fresh-eyes review of the client (Channel and its calls) against real peers over real sockets:
hand-built HTTP/2 servers (raw frames), grpc.aio servers, and the segmenting relay between them.

Every call must end with a clear gRPC status on every path, in time, without leaving anything
behind. The first section's tests showed defects (fixed since), the second's pin down the
fixes' edges; the others confirm behaviour no other test pins down.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import anyio
import h2.errors
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value
from hyperframe.frame import Frame, PingFrame, SettingsFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, ProtocolError, Status
from app_kit.aio.client import ClientInterceptor, ClientStream, method_for
from app_kit.rpc.deadline import parse_grpc_timeout
from app_kit.rpc.framing import frame_message

from .relay import segmenting_relay
from .test_client import GrpcioEcho, grpcio_server, methods

pytestmark = pytest.mark.anyio

T = TypeVar("T")
C = Cardinality
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 5, 6, 7, 8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 3, 4
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
REPLY = BytesValue(value=b"hi")
E = h2.errors.ErrorCodes


async def bounded(awaitable: Awaitable[T], timeout: float, failure: str) -> T:
    """``awaitable``'s result; if it takes longer than ``timeout``, the test fails saying ``failure``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"{failure} (nothing after {timeout} s)")


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


# -- a raw HTTP/2 server, scripted per connection -----------------------------------------------


class Peer:
    """The server's end of one connection: every frame the client sends is parsed (its SETTINGS
    and PINGs acknowledged), and the script writes whatever bytes it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.frames: asyncio.Queue[Frame | None] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def run_reader(self) -> None:
        buffer = b""
        try:
            while len(buffer) < len(PREFACE):
                chunk = await self.reader.read(65536)
                if not chunk:
                    return
                buffer += chunk
            buffer = buffer[len(PREFACE) :]
            while True:
                while len(buffer) >= 9:
                    parsed, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    parsed.parse_body(memoryview(buffer[9 : 9 + length]))
                    buffer = buffer[9 + length :]
                    if isinstance(parsed, SettingsFrame) and "ACK" not in parsed.flags:
                        self.write(frame(SETTINGS, ACK, 0))
                    elif isinstance(parsed, PingFrame) and "ACK" not in parsed.flags:
                        self.write(frame(PING, ACK, 0, parsed.opaque_data))
                    await self.frames.put(parsed)
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            await self.frames.put(None)

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def request(self) -> tuple[int, dict[bytes, bytes]]:
        """The next request's stream id and header fields (ConnectionError once the client left)."""
        while True:
            got = await self.frames.get()
            if got is None:
                raise ConnectionError("the client closed the connection")
            if got.type == HEADERS:
                return got.stream_id, dict(self.decoder.decode(got.data, raw=True))  # type: ignore[attr-defined]

    def headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool = False) -> None:
        self.write(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream_id, self.encoder.encode(fields)))

    def message(self, stream_id: int, payload: bytes) -> None:
        self.write(frame(DATA, 0, stream_id, frame_message(payload)))

    def trailers(self, stream_id: int, fields: list[tuple[bytes, bytes]] | None = None) -> None:
        self.headers(stream_id, fields if fields is not None else [(b"grpc-status", b"0")], end=True)

    def answer(self, stream_id: int) -> None:
        self.headers(stream_id, RESPONSE)
        self.message(stream_id, REPLY.SerializeToString())
        self.trailers(stream_id)

    def reset(self, stream_id: int, code: int) -> None:
        self.write(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))


Script = Callable[[Peer, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(
    script: Script, *, settings: list[tuple[int, int]] | None = None, send_settings: bool = True
) -> AsyncIterator[tuple[int, list[Peer]]]:
    """Serve ``script(peer, connection_number)`` on each connection; yield the port and the peers.
    The server's SETTINGS (``settings``) go out as it accepts, unless ``send_settings`` is False."""
    peers: list[Peer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        peers.append(peer)
        if send_settings:
            pairs = settings or []
            peer.write(frame(SETTINGS, 0, 0, b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)))
        reading = asyncio.create_task(peer.run_reader())
        try:
            await script(peer, len(peers))
            await peer.closed.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            writer.transport.abort()

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], peers
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def silent(peer: Peer, number: int) -> None:
    """Accept, then say nothing (with send_settings=False: never speaks HTTP/2)."""


async def hold_each_call(peer: Peer, number: int) -> None:
    """Take every request and never answer it."""
    while True:
        await peer.request()


def method(channel: Channel, cardinality: Cardinality) -> Any:
    return method_for(channel, "/t.S/M", cardinality, BytesValue, BytesValue)


async def call_once(channel: Channel, cardinality: Cardinality, **options: Any) -> Any:
    """One call of the given kind with one request; its reply (or its replies, in a list)."""
    stub = method(channel, cardinality)
    if cardinality is C.UNARY_UNARY:
        return await stub(BytesValue(value=b"x"), **options)
    if cardinality is C.UNARY_STREAM:
        return await stub(BytesValue(value=b"x"), **options)
    if cardinality is C.STREAM_UNARY:
        return await stub([BytesValue(value=b"x")], **options)
    return await stub([BytesValue(value=b"x")], **options)


# -- defects (fixed) -------------------------------------------------------------------------------


async def test_cancel_ends_a_call_waiting_for_its_connection() -> None:
    # The server accepts but never sends its SETTINGS: the connection stays CONNECTING (until the
    # 10 s handshake timeout). A bidi call's receiver places the call and waits for a connection;
    # another task cancels the call. cancel() says "it ends with CANCELLED": the receiver must
    # get CANCELLED now, as it does once the call is placed.
    async with raw_server(silent, send_settings=False) as (port, _), Channel("127.0.0.1", port) as channel:
        async with method(channel, C.STREAM_STREAM).open() as call:
            receiver = asyncio.create_task(call.recv_message())
            await asyncio.sleep(0.2)
            await call.cancel()
            assert call.status is Status.CANCELLED
            with pytest.raises(GRPCError) as info:
                await bounded(receiver, 2, "the cancelled call's receiver still waits for a connection")
            assert info.value.status is Status.CANCELLED


async def test_cancel_ends_a_call_waiting_for_a_stream_slot() -> None:
    # The server allows one stream and holds it; the second call waits for a slot. Cancelling
    # it from another task must end it (CANCELLED) at once, not when the first call ends.
    settings = [(MAX_CONCURRENT_STREAMS, 1)]
    async with raw_server(hold_each_call, settings=settings) as (port, _), Channel("127.0.0.1", port) as channel:
        async with method(channel, C.STREAM_STREAM).open() as first:
            await first.send_request()
            async with method(channel, C.STREAM_STREAM).open() as call:
                receiver = asyncio.create_task(call.recv_message())
                await asyncio.sleep(0.2)
                await call.cancel()
                with pytest.raises(GRPCError) as info:
                    await bounded(receiver, 2, "the cancelled call's receiver still waits for a stream slot")
                assert info.value.status is Status.CANCELLED


async def test_a_bidi_receiver_survives_its_sender_task_being_cancelled_while_placing() -> None:
    # One stream slot, held by a first call: the bidi call's sender task waits for the slot,
    # its receiver task waits for the sender to place the call. The sender task is cancelled
    # (its producer shut down); then the slot frees. The receiver did nothing wrong: it must
    # go on (place the call itself and get the reply) or end with a GRPCError, never raise
    # ProtocolError, which the docs keep for using a call against its contract.
    release = asyncio.Event()

    async def script(peer: Peer, number: int) -> None:
        first, _ = await peer.request()
        await release.wait()
        peer.headers(first, RESPONSE)
        peer.trailers(first)
        while True:
            stream_id, _ = await peer.request()
            peer.answer(stream_id)

    settings = [(MAX_CONCURRENT_STREAMS, 1)]
    async with raw_server(script, settings=settings) as (port, _), Channel("127.0.0.1", port) as channel:
        async with method(channel, C.STREAM_STREAM).open() as first:
            await first.send_request(end=True)
            async with method(channel, C.STREAM_STREAM).open() as call:
                sender = asyncio.create_task(call.send_message(BytesValue(value=b"x")))
                await asyncio.sleep(0.05)
                receiver = asyncio.create_task(call.recv_message())
                await asyncio.sleep(0.1)
                sender.cancel()
                await asyncio.sleep(0.1)
                release.set()
                try:
                    reply = await bounded(receiver, 3, "the receiver did not end")
                except GRPCError:
                    pass  # a status: acceptable
                except ProtocolError as exc:
                    pytest.fail(f"the receiver raised ProtocolError({exc}) though the call was used as documented")
                else:
                    assert reply == REPLY
            await first.recv_trailing_metadata()


async def test_a_connection_out_of_stream_ids_is_replaced() -> None:
    # A long-lived channel to a busy backend (10,000 calls/s: 30 hours) runs out of client stream
    # ids. grpc-core and grpc-go then stop using that connection and open another; calls go on.
    # The connection's id counter is moved to its last ids here, instead of making 2^30 calls.
    async with grpcio_server(GrpcioEcho()) as server, Channel("127.0.0.1", server.bound_port) as channel:
        unary = methods(channel)["Unary"]
        assert await unary(BytesValue(value=b"a")) == BytesValue(value=b"a")
        protocol = channel._subchannels[0].protocol
        assert protocol is not None
        protocol.connection._h2.highest_outbound_stream_id = 2**31 - 3  # the next call takes the last id
        for value in (b"last id", b"new connection", b"and on"):
            try:
                reply = await bounded(unary(BytesValue(value=value)), 5, "a call hung")
            except GRPCError as exc:
                pytest.fail(f"{value!r}: {exc!r}")
            assert reply == BytesValue(value=value)


async def test_a_trailers_only_status_is_kept_whatever_grpc_encoding_it_names() -> None:
    # No message comes, so there is nothing to inflate: the status is the server's (grpc-go and
    # grpc-core look the encoding up only when a compressed message arrives).
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        fields = [*RESPONSE, (b"grpc-encoding", b"zstd"), (b"grpc-status", b"5"), (b"grpc-message", b"no such order")]
        peer.headers(stream_id, fields, end=True)

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as info:
            await bounded(call_once(channel, C.UNARY_UNARY), 3, "the call did not end")
        assert (info.value.status, info.value.message) == (Status.NOT_FOUND, "no such order")


class SlowStart(ClientInterceptor):
    """An interceptor whose ``start`` takes long (fetching a token from a slow service)."""

    async def start(self, call: ClientStream[Any, Any]) -> None:
        await asyncio.sleep(2)


async def test_a_deadline_bounds_the_interceptors_start() -> None:
    async with (
        raw_server(hold_each_call) as (port, _),
        Channel("127.0.0.1", port, interceptors=[SlowStart()]) as channel,
    ):
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await bounded(call_once(channel, C.UNARY_UNARY, timeout=0.3), 5, "the call did not end")
        elapsed = time.monotonic() - started
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert elapsed < 1.0, f"a call with a 0.3 s deadline ended after {elapsed:.2f} s"


# -- around the fixes ------------------------------------------------------------------------------


async def test_the_grpc_timeout_sent_is_what_the_interceptors_start_left_of_the_deadline() -> None:
    # The deadline is the caller's, absolute: an interceptor's start took part of it.
    class HalfSecondStart(ClientInterceptor):
        async def start(self, call: ClientStream[Any, Any]) -> None:
            await asyncio.sleep(0.5)

    sent: list[float] = []

    async def script(peer: Peer, number: int) -> None:
        stream_id, fields = await peer.request()
        sent.append(parse_grpc_timeout(fields[b"grpc-timeout"]))
        peer.answer(stream_id)

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port, interceptors=[HalfSecondStart()]) as channel:
        assert await bounded(call_once(channel, C.UNARY_UNARY, timeout=2), 5, "the call hung") == REPLY
    assert 1.2 < sent[0] <= 1.5, sent


@pytest.mark.parametrize("reply", ["none", "uncompressed", "compressed"])
async def test_an_unknown_grpc_encoding_fails_only_a_compressed_message(reply: str) -> None:
    # Response headers naming an encoding we lack: the server's status stands, and messages it
    # did not compress are read; a compressed one cannot be, and fails the call INTERNAL.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, [*RESPONSE, (b"grpc-encoding", b"zstd")])
        payload = REPLY.SerializeToString()
        if reply == "uncompressed":
            peer.message(stream_id, payload)
        elif reply == "compressed":
            peer.write(frame(DATA, 0, stream_id, b"\x01" + len(payload).to_bytes(4, "big") + payload))
        peer.trailers(stream_id, [(b"grpc-status", b"5" if reply == "none" else b"0")])

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        call = call_once(channel, C.UNARY_UNARY)
        if reply == "uncompressed":
            assert await bounded(call, 3, "the call hung") == REPLY
            return
        with pytest.raises(GRPCError) as info:
            await bounded(call, 3, "the call hung")
        if reply == "none":
            assert info.value.status is Status.NOT_FOUND
        else:
            assert info.value.status is Status.INTERNAL and "zstd" in (info.value.message or ""), info.value


async def test_a_bidi_call_is_placed_once_its_interceptors_start_is_over() -> None:
    # The sender task starts the interceptors (a token fetch, adding metadata); the receiver
    # task, wanting the call placed too, waits for that: placing it meanwhile would send the
    # headers without the token (and the interceptor's add_metadata would then fail).
    class TokenStart(ClientInterceptor):
        async def start(self, call: ClientStream[Any, Any]) -> None:
            await asyncio.sleep(0.2)
            call.add_metadata("authorization", "Bearer t")

    seen: list[dict[bytes, bytes]] = []

    async def script(peer: Peer, number: int) -> None:
        stream_id, fields = await peer.request()
        seen.append(fields)
        peer.answer(stream_id)

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port, interceptors=[TokenStart()]) as channel:
        async with method(channel, C.STREAM_STREAM).open() as call:
            sender = asyncio.create_task(call.send_message(BytesValue(value=b"x"), end=True))
            await asyncio.sleep(0.05)
            reply = await bounded(call.recv_message(), 3, "the receiver hung")
            await bounded(sender, 3, "the sender hung")
            assert reply == REPLY
    assert seen[0].get(b"authorization") == b"Bearer t", seen


class AnyioSlowStart(ClientInterceptor):
    async def start(self, call: ClientStream[Any, Any]) -> None:
        await anyio.sleep(2)


@pytest.mark.backends
async def test_a_call_being_placed_ends_with_cancel_or_its_deadline_on_either_loop(backend: str) -> None:
    # Waiting for a connection (a listener that never accepts: no SETTINGS ever), cancel()
    # from another task ends the call; an interceptor's start ends at the deadline.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        async with Channel("127.0.0.1", port) as channel:
            async with method(channel, C.STREAM_STREAM).open() as call:
                statuses: list[Status] = []

                async def receive() -> None:
                    with pytest.raises(GRPCError) as info:
                        await call.recv_message()
                    statuses.append(info.value.status)

                with anyio.fail_after(2):
                    async with anyio.create_task_group() as group:
                        group.start_soon(receive)
                        await anyio.sleep(0.2)
                        await call.cancel()
                assert statuses == [Status.CANCELLED]
        async with Channel("127.0.0.1", port, interceptors=[AnyioSlowStart()]) as channel:
            started = time.monotonic()
            with anyio.fail_after(1.5), pytest.raises(GRPCError) as info:
                await call_once(channel, C.UNARY_UNARY, timeout=0.3)
            assert info.value.status is Status.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1


# -- confirmed behaviour ---------------------------------------------------------------------------

# RST_STREAM error codes as PROTOCOL-HTTP2.md maps them to statuses; every other code: INTERNAL.
RESET_STATUS = {
    E.REFUSED_STREAM: Status.UNAVAILABLE,
    E.CANCEL: Status.CANCELLED,
    E.ENHANCE_YOUR_CALM: Status.RESOURCE_EXHAUSTED,
    E.INADEQUATE_SECURITY: Status.PERMISSION_DENIED,
}


@pytest.mark.parametrize(
    "moment", ["before-headers", "after-headers", "mid-message", "after-message", "after-trailers"]
)
@pytest.mark.parametrize("cardinality", list(C), ids=lambda c: c.name)
async def test_rst_stream_with_each_error_code_at_each_moment_ends_the_call_with_its_status(
    cardinality: Cardinality, moment: str
) -> None:
    # The server resets each call with the code its request names, at the moment the test says;
    # every call ends with the mapped status (after the trailers: as the trailers said), and the
    # connection, never at fault, goes on serving: one connection for all of them.
    async def script(peer: Peer, number: int) -> None:
        while True:
            stream_id, fields = await peer.request()
            code = int(fields[b"x-code"])
            if moment != "before-headers":
                peer.headers(stream_id, RESPONSE)
            if moment == "mid-message":
                peer.write(frame(DATA, 0, stream_id, b"\x00\x00\x00\x00\x10abc"))
            elif moment in ("after-message", "after-trailers"):
                peer.message(stream_id, REPLY.SerializeToString())
            if moment == "after-trailers":
                peer.trailers(stream_id)
            peer.reset(stream_id, code)

    config = Configuration(max_transparent_retries=1)
    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port, config=config) as channel:
        for code in E:
            metadata = [("x-code", str(int(code)))]
            if moment == "after-trailers":
                result = await bounded(call_once(channel, cardinality, metadata=metadata), 3, f"{code!r}: no end")
                assert result in (REPLY, [REPLY]), (code, result)
                continue
            with pytest.raises(GRPCError) as info:
                await bounded(call_once(channel, cardinality, metadata=metadata), 3, f"{code!r}: the call hung")
            assert info.value.status is RESET_STATUS.get(code, Status.INTERNAL), (code, info.value)
        assert len(peers) == 1, "a stream reset closed the connection"


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ([(b"grpc-status", b"abc")], Status.UNKNOWN, "grpc-status 'abc' from the server"),
        ([(b"grpc-status", b"-1")], Status.UNKNOWN, "grpc-status '-1' from the server"),
        ([(b"grpc-status", b"00")], Status.UNKNOWN, "grpc-status 00 from the server"),
        ([(b"grpc-status", b"")], Status.UNKNOWN, "grpc-status '' from the server"),
        ([(b"grpc-message", b"lost")], Status.UNKNOWN, "grpc-status missing in the trailers: lost"),
        ([(b"grpc-status", b"3"), (b"grpc-message", b"%ZZ%C3\xff")], Status.INVALID_ARGUMENT, "%ZZ\ufffd\ufffd"),
        ([(b"grpc-status", b"3"), (b"grpc-status-details-bin", b"\xff\x01!")], Status.INVALID_ARGUMENT, None),
        # A NUL in a field value makes the response malformed (RFC 9113 §8.2.1): a stream error.
        (
            [(b"grpc-status", b"3"), (b"grpc-status-details-bin", b"\xff\x00!")],
            Status.INTERNAL,
            "malformed response from the server: invalid characters in the value of 'grpc-status-details-bin'",
        ),
        ([(b"grpc-status", b"3"), (b"grpc-status-details-bin", b"AAAA")], Status.INVALID_ARGUMENT, None),
    ],
    ids=[
        "non-numeric",
        "negative",
        "leading-zero",
        "empty",
        "missing",
        "bad-message",
        "binary-details",
        "nul-in-details",
        "b64-junk",
    ],
)
@pytest.mark.parametrize("trailers_only", [True, False], ids=["trailers-only", "after-headers"])
async def test_malformed_trailers_end_the_call_alone_through_a_segmenting_relay(
    fields: list[tuple[bytes, bytes]], status: Status, message: str | None, trailers_only: bool
) -> None:
    # Broken statuses are UNKNOWN keeping what came; a garbled message or undecodable details
    # keep the status (no details). The connection stays: the next call on it succeeds.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        if trailers_only:
            peer.headers(stream_id, [*RESPONSE, *fields], end=True)
        else:
            peer.headers(stream_id, RESPONSE)
            peer.trailers(stream_id, fields)
        stream_id, _ = await peer.request()
        peer.answer(stream_id)

    async with (
        raw_server(script) as (port, peers),
        segmenting_relay("127.0.0.1", port) as relay_port,
        Channel("127.0.0.1", relay_port) as channel,
    ):
        with pytest.raises(GRPCError) as info:
            await bounded(call_once(channel, C.UNARY_UNARY), 3, "the call hung")
        assert (info.value.status, info.value.message) == (status, message)
        assert not info.value.details
        assert await bounded(call_once(channel, C.UNARY_UNARY), 3, "the next call hung") == REPLY
        assert len(peers) == 1


def push_promise(peer: Peer, stream_id: int) -> None:
    block = peer.encoder.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")])
    peer.write(frame(PUSH_PROMISE, END_HEADERS, stream_id, (2).to_bytes(4, "big") + block))


VIOLATIONS: dict[str, Callable[[Peer, int], None]] = {
    "DATA before HEADERS": lambda peer, sid: peer.message(sid, b""),
    "PUSH_PROMISE (push is off)": push_promise,
    "HEADERS on a stream never opened": lambda peer, sid: peer.headers(sid + 2, RESPONSE),
    "trailers without END_STREAM": lambda peer, sid: peer.write(
        frame(HEADERS, END_HEADERS, sid, peer.encoder.encode(RESPONSE))
        + frame(HEADERS, END_HEADERS, sid, peer.encoder.encode([(b"grpc-status", b"0")]))
    ),
    "connection window past 2^31-1": lambda peer, sid: peer.write(
        frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big"))
    ),
    "informational response with END_STREAM": lambda peer, sid: peer.headers(sid, [(b":status", b"100")], end=True),
    "GOAWAY PROTOCOL_ERROR": lambda peer, sid: peer.write(frame(GOAWAY, 0, 0, sid.to_bytes(4, "big") + b"\0\0\0\1")),
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_a_connection_error_fails_its_calls_at_once_and_the_next_call_gets_a_new_connection(
    violation: str,
) -> None:
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        if number == 1:
            VIOLATIONS[violation](peer, stream_id)
        else:
            peer.answer(stream_id)

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as info:
            await bounded(call_once(channel, C.UNARY_UNARY), 3, "the call hung")
        assert info.value.status is Status.UNAVAILABLE, info.value
        assert await bounded(call_once(channel, C.UNARY_UNARY), 3, "the next call hung") == REPLY
        assert len(peers) == 2


@pytest.mark.parametrize("cardinality", list(C), ids=lambda c: c.name)
async def test_cancelling_the_calling_task_anywhere_leaves_the_connection_clean_and_serving(
    cardinality: Cardinality,
) -> None:
    # The caller's task is cancelled at random moments of calls of each kind against grpc.aio
    # (connecting aside: the connection is up): each call ends; then nothing of them is left on
    # the connection (calls, streams, slot or write waiters, streams waiting for window), and a
    # new call on it succeeds.
    service = GrpcioEcho()
    rng = random.Random(12)
    async with grpcio_server(service) as server, Channel("127.0.0.1", server.bound_port) as channel:
        stubs = methods(channel)

        def requests() -> Iterator[BytesValue]:
            for _ in range(2000):
                yield BytesValue(value=b"y" * 20000)

        async def one_call() -> None:
            if cardinality is C.UNARY_UNARY:
                await stubs["Sleep"](DoubleValue(value=0.05))
            elif cardinality is C.UNARY_STREAM:
                async for _ in stubs["ServerStream"](Int64Value(value=100000)):
                    pass
            elif cardinality is C.STREAM_UNARY:
                await stubs["ClientStream"](requests())
            else:
                async for _ in stubs["Bidi"](requests()):
                    pass

        await stubs["Unary"](BytesValue(value=b"warm"))
        protocol = channel._subchannels[0].protocol
        assert protocol is not None
        for _ in range(25):
            task = asyncio.create_task(one_call())
            await asyncio.sleep(rng.random() * 0.03)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bounded(task, 3, "a cancelled call did not end")
        connection = protocol.connection
        left = {
            "calls": len(protocol.calls),
            "streams": len(connection._streams),
            "slot waiters": len(protocol._slot_waiters),
            "writers": len(protocol._writers),
            "blocked": len(connection._blocked.on_connection) + len(connection._blocked.on_stream),
        }
        assert left == dict.fromkeys(left, 0)
        assert channel._subchannels[0].protocol is protocol and not protocol.is_closed
        assert await bounded(stubs["Unary"](BytesValue(value=b"after")), 3, "no call after") == BytesValue(
            value=b"after"
        )


async def test_a_server_that_never_sends_settings_ends_calls_at_their_deadline_or_the_handshake_timeout() -> None:
    async with raw_server(silent, send_settings=False) as (port, _):
        async with Channel("127.0.0.1", port) as channel:
            started = time.monotonic()
            with pytest.raises(GRPCError) as info:
                await bounded(call_once(channel, C.UNARY_UNARY, timeout=0.3), 3, "the call hung")
            assert info.value.status is Status.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 1
        async with Channel("127.0.0.1", port, config=Configuration(handshake_timeout=0.5)) as channel:
            started = time.monotonic()
            with pytest.raises(GRPCError) as info:
                await bounded(call_once(channel, C.STREAM_STREAM), 3, "the call hung")
            assert info.value.status is Status.UNAVAILABLE
            assert "SETTINGS" in (info.value.message or "")
            assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("ending", ["deadline", "channel closed"])
@pytest.mark.parametrize("cardinality", [C.STREAM_UNARY, C.STREAM_STREAM], ids=lambda c: c.name)
async def test_a_call_blocked_on_a_zero_flow_control_window_ends(cardinality: Cardinality, ending: str) -> None:
    # The server's SETTINGS give every stream a window of 0 and it never opens one: the
    # requests wait for window. The call's deadline, or the channel's close, ends it.
    def requests() -> Iterator[BytesValue]:
        while True:
            yield BytesValue(value=b"z" * 4096)

    async def run(channel: Channel, **options: Any) -> Any:
        stub = method(channel, cardinality)
        if cardinality is C.STREAM_UNARY:
            return await stub(requests(), **options)
        return await stub(requests(), **options)

    settings = [(INITIAL_WINDOW_SIZE, 0)]
    async with raw_server(hold_each_call, settings=settings) as (port, _), Channel("127.0.0.1", port) as channel:
        if ending == "deadline":
            call = asyncio.create_task(run(channel, timeout=0.3))
            expected = Status.DEADLINE_EXCEEDED
        else:
            call = asyncio.create_task(run(channel))
            await asyncio.sleep(0.3)
            channel.close()
            expected = Status.UNAVAILABLE
        with pytest.raises(GRPCError) as info:
            await bounded(call, 3, "the call blocked on flow control did not end")
        assert info.value.status is expected


async def test_closing_channels_leaves_no_task_timer_or_socket() -> None:
    # A channel backing off (its backend refuses) and channels whose server keeps its sockets
    # open: once closed, nothing of theirs is scheduled or running, and the server sees every
    # connection closed.
    loop = asyncio.get_running_loop()
    before = set(asyncio.all_tasks())

    def pending_timers() -> list[asyncio.TimerHandle]:
        return [h for h in loop._scheduled if not h.cancelled() and "Subchannel" in repr(h)]  # type: ignore[attr-defined]

    async with raw_server(silent) as (refusing_port, _):
        pass  # its port, now closed: connections are refused
    channel = Channel("127.0.0.1", refusing_port)
    with pytest.raises(GRPCError):
        await call_once(channel, C.UNARY_UNARY, timeout=0.5, wait_for_ready=True)
    assert pending_timers(), "expected the subchannel's backoff timer (the test sees nothing otherwise)"
    channel.close()

    async def answer_all(peer: Peer, number: int) -> None:
        while True:
            stream_id, _ = await peer.request()
            peer.answer(stream_id)

    async with raw_server(answer_all) as (port, peers):
        for _ in range(10):
            async with Channel("127.0.0.1", port) as channel:
                await call_once(channel, C.STREAM_STREAM)
        await bounded(
            asyncio.gather(*(peer.closed.wait() for peer in peers)), 3, "a closed channel's socket stays open"
        )
        await asyncio.sleep(0)
        assert not pending_timers()
        left = {task for task in asyncio.all_tasks() - before if "handle" not in repr(task)}
        assert left <= {asyncio.current_task()}, left
