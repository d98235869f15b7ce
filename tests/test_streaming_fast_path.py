"""The server's per-message fast path (``Stream.send_message`` appending to a stream's queue
itself, without the connection): it must keep every rule the connection's own path keeps.

Real sockets, hand-built frames: the peer acknowledges each message, holds the window shut,
resets the stream or drops the connection while the handler is still sending.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import anyio
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value
from hyperframe.frame import DataFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, ServerInterceptor, Stream
from app_kit.aio.client import method_for
from app_kit.rpc.framing import frame_message

from .conftest import running_server
from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
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
from .services import EchoService

pytestmark = pytest.mark.anyio

_PACED_MESSAGE = b"p" * 1024


class Streamer:
    """A server stream that sends a reply every 10 ms until sending fails."""

    def __init__(self) -> None:
        self.sent = 0
        self.ended: BaseException | None = None
        self.done = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Streamer/Paced": Handler(self.paced, Cardinality.UNARY_STREAM, Int64Value, BytesValue)}

    async def paced(self, stream: Stream[Int64Value, BytesValue]) -> None:
        await stream.recv_message()
        try:
            while True:
                await stream.send_message(BytesValue(value=_PACED_MESSAGE))
                self.sent += 1
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass  # carries on regardless (as a handler that shields its work would):
                    # only send_message can tell it the call is over
        except BaseException as exc:
            self.ended = exc
            raise
        finally:
            self.done.set()


def _request(path: str, value: int) -> bytes:
    """Stream 1: a request of ``value`` (for EchoService's ServerStream, how many replies)."""
    message = frame_message(Int64Value(value=value).SerializeToString())
    return frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path)) + frame(DATA, END_STREAM, 1, message)


def _messages(payload: bytes) -> tuple[list[bytes], bytes]:
    """The whole gRPC messages in ``payload``, and what is left of an incomplete one."""
    messages = []
    while len(payload) >= 5:
        (length,) = struct.unpack_from(">I", payload, 1)
        if len(payload) < 5 + length:
            break
        messages.append(payload[5 : 5 + length])
        payload = payload[5 + length :]
    return messages, payload


async def test_window_updates_for_each_streamed_message_are_not_a_flood() -> None:
    # gRPC clients give back each message's window as their application reads it: two
    # WINDOW_UPDATEs per message, against a stream of tiny replies packed many to a frame.
    # Each message sent licenses them (the last 1,024 messages' licences are in stock);
    # messages the fast path failed to count would make 2,000 updates for a handful of
    # frames look like a flood (over the 1,000 unlicensed frames allowed: ENHANCE_YOUR_CALM).
    count = 1000
    async with running_server([EchoService()]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(HANDSHAKE + _request("/test.Echo/ServerStream", count))
            seen, rest, values = 0, b"", []
            for _ in range(1000):
                frames = peer.frames[seen:]
                seen += len(frames)
                updates = []
                for data_frame in frames:
                    if isinstance(data_frame, DataFrame):
                        messages, rest = _messages(rest + bytes(data_frame.data))
                        for message in messages:
                            values.append(Int64Value.FromString(message).value)
                            update = (len(message) + 5).to_bytes(4, "big")
                            updates += [frame(WINDOW_UPDATE, 0, 1, update), frame(WINDOW_UPDATE, 0, 0, update)]
                if updates:
                    await peer.send(b"".join(updates))
                if 1 in peer.trailer_statuses() or peer.closed.is_set():
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.1)  # the last updates reach the guard
            assert not peer.goaways, peer.goaways
            assert peer.trailer_statuses().get(1) == b"0"
            assert values == list(range(count))


async def _paced_until(action: str) -> Streamer:
    """Start a paced stream to a peer whose window is shut (its replies stay queued on the
    server: the fast path's case), let it queue a few, then reset the stream or drop the
    connection; the handler's next send must fail."""
    streamer = Streamer()
    shut = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE 0
    async with running_server([streamer]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, shut) + _request("/test.Streamer/Paced", 0))
            for _ in range(200):
                if streamer.sent >= 5:
                    break
                await asyncio.sleep(0.01)
            assert streamer.sent >= 5 and not streamer.done.is_set()
            before = streamer.sent
            if action == "reset":
                await peer.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))  # CANCEL
            else:
                peer.writer.transport.abort()
            await asyncio.wait_for(streamer.done.wait(), 2)
            # One reply may have been sent while the reset or the close was on its way;
            # queued into a stream already gone, the replies would go on until the send
            # buffer filled (64 of them, 0.64 s).
            assert streamer.sent - before <= 2, (before, streamer.sent)
            assert isinstance(streamer.ended, GRPCError), repr(streamer.ended)
    return streamer


async def test_a_send_after_the_peer_reset_the_stream_fails() -> None:
    await _paced_until("reset")


async def test_a_send_after_the_connection_is_lost_fails() -> None:
    await _paced_until("abort")


async def test_a_sender_over_its_buffer_waits_for_the_window_then_finishes() -> None:
    # With the window shut every reply stays queued; over max_send_buffer_size (64 KiB) the
    # handler must wait, and go on when the peer opens the window: all 20,000 replies
    # (160 KB) arrive.
    count = 20_000
    async with running_server([EchoService()]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            shut = struct.pack(">HI", 0x4, 0)
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, shut) + _request("/test.Echo/ServerStream", count))
            await asyncio.sleep(0.2)
            assert not any(isinstance(f, DataFrame) for f in peer.frames)
            grant = (1 << 20).to_bytes(4, "big")
            await peer.send(frame(WINDOW_UPDATE, 0, 1, grant) + frame(WINDOW_UPDATE, 0, 0, grant))
            for _ in range(400):
                if 1 in peer.trailer_statuses():
                    break
                await asyncio.sleep(0.01)
            assert peer.trailer_statuses().get(1) == b"0"
            payload = b"".join(bytes(f.data) for f in peer.frames if isinstance(f, DataFrame))
            messages, rest = _messages(payload)
            assert [Int64Value.FromString(m).value for m in messages] == list(range(count)) and not rest


async def test_a_started_server_keeps_its_attributes_in_a_shared_key_dict() -> None:
    # CPython 3.11 keeps an instance's attributes in a dict whose keys its class shares only up
    # to 30 of them; past that, every attribute read of the instance loses its fast path. The
    # server is read per call: two attributes more cost 0.3 % per unary call (callgrind,
    # bench/instructions.py). Keep new state elsewhere (its config, the connection's protocol).
    server = Server([])
    await server.start("127.0.0.1", 0)
    try:
        assert len(vars(server)) <= 30, sorted(vars(server))
    finally:
        server.close()
        await server.wait_closed()


async def test_a_clients_connection_keeps_its_attributes_in_a_shared_key_dict() -> None:
    # The same for the client's connection, read per call and per frame. Measured: with 30
    # attributes (session 15 added a 30th) its calls cost 2 % more instructions than with 29:
    # the limit in practice is one under the 30 CPython names.
    async with running_server([EchoService()]) as (_, target), Channel(target) as channel:
        unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        await unary(BytesValue(value=b"x"), timeout=5)
        connection = channel._protocol.connection  # type: ignore[union-attr]
        assert len(vars(connection)) < 30, sorted(vars(connection))


# -- what a server stream reports as sent ----------------------------------------------------
# Its replies past the first are counted by its stream's state (StreamState.sent_messages and
# sent_bytes), not one by one by the call: read after every reply and at the call's end, for
# each way a reply leaves (queued behind others, first into an empty queue, compressed or not,
# large enough to be sent at once, behind a window that opens bit by bit, dropped by a reset).

_BUFFER = 4096  # max_send_buffer_size: replies of this size and more go at once when nothing is queued


def _reply(index: int) -> BytesValue:
    """Sizes on both sides of 256 (the prefix table) and of the send buffer."""
    return BytesValue(value=bytes([index % 251]) * (5000 if index % 37 == 0 else index % 300))


class Counted:
    """Replies of every size, each third one uncompressed in a compressed call, counted."""

    def __init__(self) -> None:
        self.tally: list[tuple[int, int]] = []  # (messages, bytes) after each reply sent
        self.seen: list[tuple[int, int]] = []  # what the stream said then
        self.failed: tuple[int, int] | None = None  # the tally had the reply being sent counted
        self.done = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        us = Cardinality.UNARY_STREAM
        return {
            "/c.C/Replies": Handler(self.replies, us, Int64Value, BytesValue),
            "/c.C/Compressed": Handler(self.compressed, us, Int64Value, BytesValue),
        }

    async def compressed(self, stream: Stream[Int64Value, BytesValue]) -> None:
        assert stream.set_compression("gzip") == "gzip"
        await self.replies(stream)

    async def replies(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        messages = size = 0
        try:
            for index in range(request.value):
                reply = _reply(index)
                self.failed = (messages + 1, size + len(reply.SerializeToString()))
                await stream.send_message(reply, compress=index % 3 != 0)
                messages, size = self.failed
                self.tally.append((messages, size))
                self.seen.append((stream.messages_sent, stream.bytes_sent))
                if index % 50 == 49:
                    await asyncio.sleep(0)  # a flush: the next reply finds the queue empty
        finally:
            self.done.set()


class _Ends(ServerInterceptor):
    """Counts at each call's end; overrides no message hook (the fast path stays on)."""

    def __init__(self) -> None:
        self.ended: list[tuple[int, int]] = []

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.ended.append((call.messages_sent, call.bytes_sent))


@pytest.mark.parametrize("compressed", [False, True])
async def test_counts_after_each_reply_and_at_the_end(compressed: bool) -> None:
    service, ends = Counted(), _Ends()
    config = Configuration(max_send_buffer_size=_BUFFER)
    async with running_server([service], config=config, interceptors=[ends]) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port)) as channel:
            path = "/c.C/Compressed" if compressed else "/c.C/Replies"
            replies = method_for(channel, path, Cardinality.UNARY_STREAM, Int64Value, BytesValue)
            received = [reply async for reply in replies(Int64Value(value=400), timeout=10)]
        with anyio.fail_after(3):
            while not ends.ended:
                await anyio.sleep(0.005)
    assert received == [_reply(index) for index in range(400)]
    assert service.seen == service.tally
    assert ends.ended == [service.tally[-1]]


async def test_counts_of_replies_behind_a_window_opened_bit_by_bit_then_dropped_by_a_reset() -> None:
    # The stream's window is shut; it opens 1,000 bytes at a time (each flush sends part of
    # the queue), then the client resets the stream: the replies still queued are dropped,
    # and they still count, as sent by the handler (and so does the one whose wait for room
    # the reset ended, if it was queued before).
    service, ends = Counted(), _Ends()
    async with running_server([service], interceptors=[ends]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            body = Int64Value(value=100_000).SerializeToString()
            request = frame(HEADERS, END_HEADERS, 1, request_block(path="/c.C/Replies"))
            request += frame(DATA, END_STREAM, 1, b"\x00" + len(body).to_bytes(4, "big") + body)
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0)) + request)
            for _ in range(20):
                await asyncio.sleep(0.01)
                await peer.send(frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")))
            await asyncio.sleep(0.05)
            await peer.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
            with anyio.fail_after(3):
                await service.done.wait()
                while not ends.ended:
                    await anyio.sleep(0.005)
    assert 0 < len(service.tally) < 100_000
    assert service.seen == service.tally
    assert ends.ended in ([service.tally[-1]], [service.failed])
