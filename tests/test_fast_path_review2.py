"""A second fresh-eyes review of the server's per-message fast path (commit eeb5441):
``Stream.send_message`` appending a server stream's replies past the first to its queue
(``StreamState.pending``) itself, and the messages counted for the WINDOW_UPDATE licence
when flushed (``StreamState.messages``) rather than when queued.

Each test runs over real sockets, mostly against hand-built frames (tests/frames.py), so
that what is on the wire is seen as it is: the compressed flag of each message, where the
trailers fall, which WINDOW_UPDATEs the flood guard lets through. Most tests show a rule
of the path the fast path bypasses (``Call._put`` and ``GrpcConnection.send_message``) that
the fast path keeps, and would fail if it did not (each was checked against a copy of the
code with that rule broken). Two found defects older than the fast path, fixed since:
``..._raises_cancelled`` (a handler told of the connection's end with an internal exception)
and ``test_replies_never_sent_do_not_license_...`` (replies never sent licensed updates).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import anyio
import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, ServerInterceptor, Status, Stream
from app_kit.aio.client import method_for

from .conftest import running_server
from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HANDSHAKE,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawPeer,
    frame,
    request_block,
)
from .services import grpcio_method

pytestmark = pytest.mark.anyio

_SHUT = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE 0: every stream's window shut
_WIDE = struct.pack(">HI", 0x4, (1 << 31) - 1)  # ... the largest
_KIB = b"k" * 1024


def _port(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def _request(
    path: str,
    value: int,
    stream_id: int = 1,
    encoder: hpack.Encoder | None = None,
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    body = Int64Value(value=value).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    block = request_block(encoder or hpack.Encoder(), path, extra)
    return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, message)


def _update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def _split(payload: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole gRPC messages in ``payload`` as (compressed flag, bytes), and what is left."""
    messages, position = [], 0
    while len(payload) - position >= 5:
        flag, length = struct.unpack_from(">BI", payload, position)
        if len(payload) - position < 5 + length:
            break
        messages.append((flag, payload[position + 5 : position + 5 + length]))
        position += 5 + length
    return messages, payload[position:]


def _stream_data(frames: list[Frame], stream_id: int = 1) -> bytes:
    return b"".join(bytes(f.data) for f in frames if isinstance(f, DataFrame) and f.stream_id == stream_id)


async def _until(condition: Any, timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


class Replies:
    """Server streams that send their replies back to back (the fast path's case: the first
    reply is queued, each one after it finds the queue not empty)."""

    def __init__(self) -> None:
        self.sent = 0
        self.paced_sent = 0
        self.ended: BaseException | None = None
        self.done = asyncio.Event()
        self.queued = asyncio.Event()
        self.release = asyncio.Event()
        self.refused: Status | None = None

    def __mapping__(self) -> dict[str, Handler]:
        us = Cardinality.UNARY_STREAM
        return {
            "/r.R/Mixed": Handler(self.mixed, us, Int64Value, BytesValue),
            "/r.R/Sizes": Handler(self.sizes, us, Int64Value, BytesValue),
            "/r.R/Limit": Handler(self.limit, us, Int64Value, BytesValue),
            "/r.R/Tiny": Handler(self.tiny, us, Int64Value, Int64Value),
            "/r.R/Batches": Handler(self.batches, us, Int64Value, Int64Value),
            "/r.R/Paced": Handler(self.paced, us, Int64Value, BytesValue),
            "/r.R/Kilo": Handler(self.kilo, us, Int64Value, BytesValue),
        }

    async def mixed(self, stream: Stream[Int64Value, BytesValue]) -> None:
        """Replies compressed and not, alternately (``compress=False`` on the odd ones)."""
        request = await stream.recv_message()
        assert request is not None
        assert stream.set_compression("gzip") == "gzip"
        for index in range(request.value):
            await stream.send_message(BytesValue(value=b"%06d" % index * 20), compress=index % 2 == 0)

    async def sizes(self, stream: Stream[Int64Value, BytesValue]) -> None:
        """Replies of 0 to 299 bytes (prefixes on both sides of 256), back to back."""
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(BytesValue(value=bytes([index % 256]) * (index % 300)))

    async def limit(self, stream: Stream[Int64Value, BytesValue]) -> None:
        """A reply of exactly max_send_message_length (1000) behind a queued one, then one over."""
        await stream.recv_message()
        await stream.send_message(BytesValue(value=b"a"))
        await stream.send_message(BytesValue(value=b"b" * 997))  # 1 + 2 + 997 bytes encoded
        try:
            await stream.send_message(BytesValue(value=b"c" * 998))  # 1001
        except GRPCError as exc:
            self.refused = exc.status
        await stream.send_message(BytesValue(value=b"d"))

    async def tiny(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))
            self.sent += 1

    async def batches(self, stream: Stream[Int64Value, Int64Value]) -> None:
        """Replies in batches of 100, a loop turn between batches (the flushes in between find
        the stream waiting for window), then it waits for ``release`` before it ends."""
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))
            if index % 100 == 99:
                await asyncio.sleep(0)
        self.queued.set()
        await self.release.wait()

    async def paced(self, stream: Stream[Int64Value, BytesValue]) -> None:
        """1 KiB every 10 ms until a send fails (it carries on through cancellation)."""
        await stream.recv_message()
        try:
            while True:
                await stream.send_message(BytesValue(value=_KIB))
                self.paced_sent += 1
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass  # only send_message may tell it the call is over
        except BaseException as exc:
            self.ended = exc
            raise
        finally:
            self.done.set()

    async def kilo(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for _ in range(request.value):
            await stream.send_message(BytesValue(value=_KIB))


# -- what the fast path must keep ----------------------------------------------------------


async def test_replies_of_a_compressed_call_keep_their_compression_behind_queued_ones() -> None:
    # The fast path appends with the compressed flag clear; it must stand aside in a call
    # with a send encoding, where the connection compresses each message (or not:
    # compress=False). Every reply here finds the one before it still queued.
    count = 200
    async with running_server([Replies()]) as (_, target), RawPeer(_port(target)) as peer:
        accept = [("grpc-accept-encoding", "gzip")]
        await peer.send(HANDSHAKE + _request("/r.R/Mixed", count, extra=accept))
        await _until(lambda: 1 in peer.trailer_statuses())
        assert peer.trailer_statuses()[1] == b"0"
        messages, rest = _split(_stream_data(peer.frames))
        assert not rest and len(messages) == count
        assert [flag for flag, _ in messages] == [1 - index % 2 for index in range(count)]
        values = [BytesValue.FromString(gzip.decompress(m) if flag else m).value for flag, m in messages]
        assert values == [b"%06d" % index * 20 for index in range(count)]


class _Counter(ServerInterceptor):
    def __init__(self) -> None:
        self.hooked = 0
        self.ended: list[tuple[int, int, Status | None]] = []

    def on_message_sent(self, call: Stream[Any, Any], message: Any) -> Any:
        self.hooked += 1
        return message

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.ended.append((call.messages_sent, call.bytes_sent, call.status))


async def test_interceptors_count_every_reply_and_its_bytes() -> None:
    # messages_sent and bytes_sent (what access logs, Prometheus and OTel report) count the
    # replies that join the queue themselves as the connection's path counts them; their
    # bytes arrive whole, with the right length prefix whatever their size.
    count = 600
    counter = _Counter()
    expected = [bytes([index % 256]) * (index % 300) for index in range(count)]
    async with running_server([Replies()], interceptors=[counter]) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port)) as channel:
            sizes = method_for(channel, "/r.R/Sizes", Cardinality.UNARY_STREAM, Int64Value, BytesValue)
            replies = [reply.value async for reply in sizes(Int64Value(value=count), timeout=10)]
        await _until(lambda: counter.ended)
    assert replies == expected
    encoded = sum(len(BytesValue(value=value).SerializeToString()) for value in expected)
    assert counter.ended == [(count, encoded, Status.OK)]
    assert counter.hooked == count


async def test_a_reply_of_exactly_the_limit_goes_and_one_byte_more_is_refused_behind_queued_ones() -> None:
    # max_send_message_length (1000): 1000 bytes go, 1001 raise RESOURCE_EXHAUSTED without
    # ending the call (as for the first reply) and without reaching the wire.
    service = Replies()
    config = Configuration(max_send_message_length=1000)
    async with running_server([service], config=config) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port)) as channel:
            limit = method_for(channel, "/r.R/Limit", Cardinality.UNARY_STREAM, Int64Value, BytesValue)
            replies = [reply.value async for reply in limit(Int64Value(value=0), timeout=10)]
    assert replies == [b"a", b"b" * 997, b"d"]
    assert service.refused is Status.RESOURCE_EXHAUSTED


async def test_replies_queued_while_the_connection_window_is_shut_follow_when_it_opens_then_the_trailers() -> None:
    # The streams' windows are wide, the connection's is its initial 65,535 bytes: the stream
    # waits for the connection's window (StreamState.blocked: on_connection) with replies
    # queued, and its handler goes on appending until the send buffer (64 KiB) is full, then
    # waits. A connection WINDOW_UPDATE sends the rest, and the trailers after the last DATA.
    count = 30_000  # ~270 KB of replies: over the window and the send buffer together
    service = Replies()
    async with running_server([service]) as (_, target), RawPeer(_port(target)) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0, _WIDE) + _request("/r.R/Tiny", count))
        await _until(lambda: len(_stream_data(peer.frames)) >= 65_535)
        await asyncio.sleep(0.1)
        assert len(_stream_data(peer.frames)) == 65_535  # the connection's window, and no more
        assert 0 < service.sent < count and 1 not in peer.trailer_statuses()  # over its buffer: waiting
        await peer.send(_update(0, 1 << 24))
        await _until(lambda: 1 in peer.trailer_statuses())
        assert peer.trailer_statuses()[1] == b"0"
        messages, rest = _split(_stream_data(peer.frames))
        assert [Int64Value.FromString(m).value for _, m in messages] == list(range(count)) and not rest
        last_data = max(i for i, f in enumerate(peer.frames) if isinstance(f, DataFrame))
        trailers = [i for i, f in enumerate(peer.frames) if isinstance(f, HeadersFrame) and f.stream_id == 1][-1]
        assert trailers > last_data


async def test_window_updates_for_replies_queued_while_the_stream_waited_for_window_are_licensed() -> None:
    # With the stream's window shut, the first batch is offered to a flush (counted) and the
    # stream waits for window; the nine batches after it join the waiting queue themselves
    # (StreamState.messages), counted only when the stream's WINDOW_UPDATE flushes them. The
    # client then acknowledges each of the 1,000 messages (two WINDOW_UPDATEs each, as gRPC
    # clients do): ~2,000 updates, over the 1,000 unlicensed frames allowed unless each
    # message sent licenses two.
    count = 1000
    service = Replies()
    async with running_server([service]) as (_, target), RawPeer(_port(target)) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Batches", count))
        await asyncio.wait_for(service.queued.wait(), 3)
        assert not _stream_data(peer.frames)
        await peer.send(_update(1, 1 << 20))
        await _until(lambda: len(_split(_stream_data(peer.frames))[0]) == count)
        messages, _ = _split(_stream_data(peer.frames))
        assert [Int64Value.FromString(m).value for _, m in messages] == list(range(count))
        acks = b"".join(_update(1, len(m) + 5) + _update(0, len(m) + 5) for _, m in messages)
        await peer.send(acks)
        await asyncio.sleep(0.2)  # the guard reads them
        service.release.set()
        await _until(lambda: 1 in peer.trailer_statuses() or peer.closed.is_set())
        assert not peer.goaways, peer.goaways
        assert peer.trailer_statuses().get(1) == b"0"


async def test_window_updates_are_not_licensed_by_replies_dropped_before_they_were_flushed() -> None:
    # The other side of counting messages as flushed: 1,500 replies queued behind a stream
    # waiting for window, then dropped by the client's reset, were never sent and license no
    # WINDOW_UPDATE. The client's 1,800 updates after that are unprompted: a flood
    # (ENHANCE_YOUR_CALM past the 1,000 allowed; the first batch of 100, offered to a flush
    # before the stream waited, licenses 200). Counted as queued, before this commit, they
    # were all licensed.
    count = 1500
    service = Replies()
    async with running_server([service]) as (_, target), RawPeer(_port(target)) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Batches", count))
        await asyncio.wait_for(service.queued.wait(), 3)
        await peer.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
        await asyncio.sleep(0.05)
        await peer.send(_update(0, 1) * 1800)
        await peer.wait_closed(3)
        assert [g.error_code for g in peer.goaways] == [0xB]  # ENHANCE_YOUR_CALM


async def _paced_then_goaway(service: Replies) -> int:
    """A paced stream to a client whose window is shut (its replies stay queued), then a
    GOAWAY with an error code from the client, which keeps its socket open; returns how many
    replies were sent after the GOAWAY went."""
    async with running_server([service]) as (_, target), RawPeer(_port(target)) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Paced", 0))
        await _until(lambda: service.paced_sent >= 5)
        before = service.paced_sent
        await peer.send(frame(GOAWAY, 0, 0, (0).to_bytes(4, "big") + (2).to_bytes(4, "big")))  # INTERNAL_ERROR
        await asyncio.wait_for(service.done.wait(), 0.5)
        return service.paced_sent - before


async def test_a_send_after_the_client_ends_the_connection_with_an_error_fails() -> None:
    # A GOAWAY with an error code ends the connection at once (_connection_lost); the server
    # lingers before closing its socket (1 s), and only then are its calls cancelled. A
    # handler whose replies are queued must fail at its next send, not append to the dead
    # stream's queue until its send buffer is full (64 replies) and wait for the socket.
    service = Replies()
    assert await _paced_then_goaway(service) <= 2
    assert service.ended is not None and not isinstance(service.ended, asyncio.CancelledError)


async def test_a_send_after_the_client_ends_the_connection_with_an_error_raises_cancelled() -> None:
    # It failed with app_kit's internal StreamGone, not the GRPCError CANCELLED a send after
    # a reset or a lost socket raises (tests/test_streaming_fast_path.py): nothing told the
    # call the connection had ended (until the socket closed, after the linger), so
    # Call._put re-raised StreamGone, and _answer_call logged it as the handler's own error
    # ("error in handler of ...", with its traceback).
    service = Replies()
    await _paced_then_goaway(service)
    assert isinstance(service.ended, GRPCError), repr(service.ended)
    assert service.ended.status is Status.CANCELLED


async def test_a_sender_waits_while_the_transport_is_full_even_with_room_in_its_buffer() -> None:
    # Two calls on one connection whose client stops reading: /r.R/Paced (stream 1) has its
    # window shut, so its replies stay queued and each one after the first joins the queue
    # itself, far under the send buffer; /r.R/Kilo (stream 3, its window wide open) fills the
    # transport until writing pauses. While it is paused the paced sender must wait (as the
    # connection's path makes it), not queue on until its 64 KiB buffer is full (64 replies);
    # once the client reads again it goes on.
    service = Replies()
    async with running_server([service]) as (server, target):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(target)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        try:
            encoder = hpack.Encoder()
            writer.write(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _update(0, (1 << 31) - 1 - 65_535))
            writer.write(_request("/r.R/Paced", 0, 1, encoder))
            await _until(lambda: service.paced_sent >= 1)
            call = _request("/r.R/Kilo", 20_000, 3, encoder)
            headers_end = 9 + int.from_bytes(call[:3], "big")  # its HEADERS, its window, its request
            writer.write(call[:headers_end] + _update(3, (1 << 31) - 1) + call[headers_end:])
            await writer.drain()
            (protocol,) = server._connections
            await _until(lambda: protocol.write_paused)
            await asyncio.sleep(0.1)  # (the kernel's send buffer may still grow and take a little more)
            paused_at = service.paced_sent
            await asyncio.sleep(0.3)
            assert protocol.write_paused
            assert service.paced_sent <= paused_at + 1 and paused_at < 30, (paused_at, service.paced_sent)
            # Read again: the paced sender goes on.
            with anyio.fail_after(5):
                while service.paced_sent < paused_at + 5:
                    assert await reader.read(1 << 16)
            assert not service.done.is_set()
        finally:
            writer.close()


# -- on trio as on asyncio -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def _serving(service: Any) -> AsyncIterator[str]:
    server = Server([service])
    await server.start("127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close(grace=1.0)
        with anyio.fail_after(10):
            await server.wait_closed()


class _AnyioReplies:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/r.A/Count": Handler(self.count, Cardinality.UNARY_STREAM, Int64Value, Int64Value)}

    async def count(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))


def _count_with_grpcio(target: str, count: int) -> list[int]:
    with grpc.insecure_channel(target) as channel:
        method = grpcio_method(channel, "unary_stream", "/r.A/Count", Int64Value, Int64Value)
        return [reply.value for reply in method(Int64Value(value=count), timeout=10)]


@pytest.mark.backends
async def test_a_long_stream_of_tiny_replies_arrives_whole_on_either_loop(backend: str) -> None:
    # 20,000 replies back to back: a few hundred KB through the send buffer and grpc-core's
    # windows, almost all of them joining the queue themselves; on trio the same Stream
    # runs over anyio's byte streams and TrioRuntime's flushes.
    count = 20_000
    async with _serving(_AnyioReplies()) as target:
        values = await anyio.to_thread.run_sync(_count_with_grpcio, target, count)
    assert values == list(range(count))


# -- what counting messages as flushed does not hold to ------------------------------------


async def test_replies_never_sent_do_not_license_window_updates_whenever_they_were_queued() -> None:
    # The same 1,500 replies, never sent, licensed WINDOW_UPDATEs or not depending on when
    # they were queued. Queued in the request's own loop turn, the end-of-turn flush offers
    # them to a stream whose window is shut: _flush counted them in _messages_out although
    # it sent nothing. After the reset, the client's 1,800 unprompted updates passed as
    # licensed, where the test above (the same replies, queued a turn later) sees them as
    # the flood they are.
    count = 1500
    async with running_server([Replies()]) as (_, target), RawPeer(_port(target)) as peer:
        await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Tiny", count))
        await asyncio.sleep(0.1)  # all queued in one turn, the stream waits for window
        assert not _stream_data(peer.frames)
        await peer.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
        await asyncio.sleep(0.05)
        await peer.send(_update(0, 1) * 1800)
        with contextlib.suppress(TimeoutError):
            await peer.wait_closed(1)
        assert [g.error_code for g in peer.goaways] == [0xB]  # ENHANCE_YOUR_CALM
