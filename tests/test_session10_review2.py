"""Second fresh-eyes review of 852e185 (prefix in the first DATA frame, one-frame payloads by
reference), 108f29e (a frame spanning reads joined once, a plain one taken as a view) and
a7db3e6 (``_fail_here``: the call's status says what the caller got).

Real peers only: a raw socket peer writing hand-built frames (tests/frames.py), a scripted h2
server (tests/fake_server.py), the segmenting relay (tests/relay.py), our own Channel and Server.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import tracemalloc
from typing import Any

import anyio
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value
from hyperframe.frame import DataFrame, SettingsFrame

from app_kit import Cardinality, Channel, GRPCError, Handler, Status, Stream
from app_kit.aio.client import ClientInterceptor, ClientStream, method_for

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    SETTINGS,
    RawPeer,
    frame,
    request_block,
)
from .relay import segmenting_relay

pytestmark = pytest.mark.anyio

_MiB = 1 << 20


def _payload(index: int, size: int) -> bytes:
    """``size`` bytes that differ per message and per offset (a misplaced byte shows)."""
    seed = hashlib.sha256(index.to_bytes(4, "big")).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _prefixed(body: bytes, flag: int = 0, length: int | None = None) -> bytes:
    return bytes([flag]) + (len(body) if length is None else length).to_bytes(4, "big") + body


class _Recorder(ClientInterceptor):
    """Records the status each call ended with, as interceptors hear it (``on_call_end``)."""

    def __init__(self) -> None:
        self.ends: list[Status | None] = []

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        self.ends.append(call.status)


async def _settled_peer(peer: RawPeer) -> None:
    """Wait for the server's SETTINGS and acknowledge them (its 1 MiB window and frames apply)."""
    with anyio.fail_after(5):
        while not any(isinstance(f, SettingsFrame) and "ACK" not in f.flags for f in peer.frames):
            await asyncio.sleep(0.01)
    await peer.send(frame(SETTINGS, 0x1, 0))


# -- 108f29e: what a frame joined from many reads leaves behind ------------------------------------


class _Sink:
    """A client-streaming method that reads each message and drops it (counting them)."""

    def __init__(self) -> None:
        self.received = 0
        self.sizes: list[int] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.S/Sink": Handler(self.sink, Cardinality.STREAM_UNARY, BytesValue, BytesValue)}

    async def sink(self, stream: Stream[BytesValue, BytesValue]) -> None:
        async for message in stream:
            self.received += 1
            self.sizes.append(len(message.value))
        await stream.send_message(BytesValue())


def _sink_frame(frame_size: int, tail: int) -> bytes:
    """One DATA frame of ``frame_size`` bytes: a whole message, then the prefix of a 2 MiB one
    and its first ``tail`` bytes (the rest never comes)."""
    body_size = frame_size - 5 - 5 - tail
    value = b"a" * (body_size - 4)  # field tag, 3-byte varint length
    body = BytesValue(value=value).SerializeToString()
    assert len(body) == body_size
    return _prefixed(body) + _prefixed(b"b" * tail, length=2 * _MiB)


async def test_an_incomplete_message_does_not_pin_the_large_frame_it_began_in() -> None:
    # A DATA frame of 1 MiB (max_frame_size) comes in many reads; its first message is taken by
    # the handler and dropped; the next message's first 600 bytes are all that is left of it
    # (and all that max_connection_receive_buffer counts). Kept as a view of the joined frame,
    # they hold the whole megabyte: 1,700 times what is counted, per stream (1,000 of them by
    # default). Before 108f29e they were a 600-byte copy.
    streams, tail = 12, 600
    service = _Sink()
    async with running_server([service]) as (_, target):
        port = int(target.rsplit(":", 1)[1])
        async with RawPeer(port) as peer:
            await peer.send(HANDSHAKE)
            await _settled_peer(peer)
            encoder = hpack.Encoder()
            ids = [2 * n + 1 for n in range(streams)]
            for stream_id in ids:
                await peer.send(frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, path="/t.S/Sink")))
            await asyncio.sleep(0.2)
            gc.collect()
            tracemalloc.start()
            try:
                baseline = tracemalloc.get_traced_memory()[0]
                for stream_id in ids:
                    data = frame(DATA, 0, stream_id, _sink_frame(_MiB, tail))
                    for offset in range(0, len(data), 64 * 1024):  # (reads of at most this)
                        await peer.send(data[offset : offset + 64 * 1024])
                    del data
                with anyio.fail_after(10):
                    while service.received < streams:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - baseline
            finally:
                tracemalloc.stop()
            assert not peer.goaways
    counted = streams * (tail + 5)
    assert held < 4 * _MiB, f"{held / _MiB:.1f} MiB held for {counted} bytes of incomplete messages"


# -- a7db3e6: the call's status is what the caller got ---------------------------------------------


def _uninflatable_then_ok(connection: FakeConnection, stream_id: int, number: int) -> None:
    fields = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip")]
    connection.conn.send_headers(stream_id, fields)
    connection.conn.send_data(stream_id, _prefixed(b"not gzip at all", flag=1))
    connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)


async def test_interceptors_hear_the_status_when_an_ok_reply_cannot_be_inflated() -> None:
    # The fourth way a call the server ended OK fails on the client: a compressed reply that
    # does not inflate (corrupt, or over the message limit once inflated). _fail_here covers
    # no reply, an undecodable reply and invalid metadata; this one still goes through _fail
    # (= _abort), which does nothing once the OK status is in: the caller gets INTERNAL, the
    # call's status and on_call_end (access logs, metrics) say OK.
    recorder = _Recorder()
    async with (
        fake_server(_uninflatable_then_ok) as (port, log),
        Channel("127.0.0.1", port, interceptors=[recorder]) as channel,
    ):
        call = method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        with pytest.raises(GRPCError) as info:
            await call(Int64Value(value=1), timeout=5)
        assert len(log) == 1
    assert info.value.status is Status.INTERNAL
    assert recorder.ends == [Status.INTERNAL]


# -- 108f29e: frames cut anywhere still mean the same (behaviour to keep) ----------------------------


async def _send_in_pieces(peer: RawPeer, data: bytes, sizes: tuple[int, ...]) -> None:
    """Write ``data`` in pieces of the sizes given, in turn, with a pause now and then (so that
    the cuts reach the server's reads: a frame header, a padded frame, a block split)."""
    offset, turn = 0, 0
    while offset < len(data):
        size = sizes[turn % len(sizes)]
        await peer.send(data[offset : offset + size])
        offset += size
        turn += 1
        if turn % 3 == 0:
            await asyncio.sleep(0.002)


async def test_padded_data_and_continued_headers_spanning_reads_arrive_intact() -> None:
    # Not plain frames: the joined frame goes to h2's parser as bytes. A request block in
    # HEADERS + CONTINUATION, a padded DATA frame of 200 KB and a plain one of 300 KB, all cut
    # into reads of 1 to 70,000 bytes (frame headers and message prefixes split too).
    service = _Sink()
    first, second = _payload(1, 200_000), _payload(2, 300_000)
    block = request_block(hpack.Encoder(), path="/t.S/Sink")
    padded = _prefixed(BytesValue(value=first).SerializeToString())
    data = (
        frame(HEADERS, 0, 1, block[:7])
        + frame(CONTINUATION, END_HEADERS, 1, block[7:])
        + frame(DATA, 0x8, 1, bytes([40]) + padded + bytes(40))
        + frame(DATA, END_STREAM, 1, _prefixed(BytesValue(value=second).SerializeToString()))
    )
    async with running_server([service]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(HANDSHAKE)
            await _settled_peer(peer)
            await _send_in_pieces(peer, data, (1, 4, 70_000, 2, 9, 1500, 3, 33_333))
            with anyio.fail_after(10):
                while 1 not in peer.trailer_statuses():
                    await asyncio.sleep(0.01)
            assert peer.trailer_statuses() == {1: b"0"} and not peer.goaways
    assert service.sizes == [len(first), len(second)]


async def test_a_late_large_frame_spanning_reads_goes_to_h2_and_the_connection_goes_on() -> None:
    # A plain DATA frame over many reads for a stream the server has finished: taken as a view
    # of the joined frame, refused by receive_data_frame, so h2's own parser gets the view. It
    # must be dropped (its window given back) and the connection go on.
    service = _Sink()
    encoder = hpack.Encoder()
    async with running_server([service]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(HANDSHAKE)
            await _settled_peer(peer)
            await peer.send(frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/x.Y/Nothing")))
            with anyio.fail_after(5):
                while 1 not in peer.trailer_statuses():
                    await asyncio.sleep(0.01)
            late = frame(DATA, 0, 1, _prefixed(_payload(3, 500_000)))
            await _send_in_pieces(peer, late, (65_536, 1, 100_000))
            message = _prefixed(BytesValue(value=_payload(4, 700_000)).SerializeToString())
            await peer.send(frame(HEADERS, END_HEADERS, 3, request_block(encoder, path="/t.S/Sink")))
            await _send_in_pieces(peer, frame(DATA, END_STREAM, 3, message), (65_536, 7))
            with anyio.fail_after(10):
                while 3 not in peer.trailer_statuses():
                    await asyncio.sleep(0.01)
            assert peer.trailer_statuses()[3] == b"0" and not peer.goaways
    assert service.sizes == [700_000]


class _Echo:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.E/Echo": Handler(self.echo, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(BytesValue(value=request.value[::-1]))


async def test_large_gzip_messages_in_one_frame_each_way_through_a_segmenting_relay() -> None:
    # 852e185 and 108f29e together: a ~700 KB message goes out in one frame (max_frame_size is
    # 1 MiB), its prefix leading it; gzip-compressed (incompressible bytes: a Compressed of
    # ~700 KB) one way, plain the other; the relay cuts both directions into reads of 1 to 1448
    # bytes. Both sides get exactly what was sent.
    value = os.urandom(700_000)
    async with running_server([_Echo()]) as (_, target):
        port = int(target.rsplit(":", 1)[1])
        async with (
            segmenting_relay("127.0.0.1", port) as relay_port,
            Channel("127.0.0.1", relay_port, compression="gzip") as channel,
        ):
            echo = method_for(channel, "/t.E/Echo", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            for _ in range(2):
                reply = await echo(BytesValue(value=value), timeout=30)
                assert reply.value == value[::-1]


# -- 852e185: one large frame by reference, its prefix leading it (behaviour to keep) ------------------

_SIZES = (65_526, 65_527, 65_530, 100_000, 1_000_000, 3_000_000)  # serialized: value + 4 or 5 bytes


class _Replies:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.R/Many": Handler(self.many, Cardinality.UNARY_STREAM, BytesValue, BytesValue)}

    async def many(self, stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        for index, size in enumerate(_SIZES):
            await stream.send_message(BytesValue(value=_payload(index, size)))


async def test_a_peer_allowing_4_mib_frames_gets_large_replies_intact_the_largest_in_one_frame() -> None:
    # grpcio's peers allow frames of 4 MiB: replies just under, at and over the 64 KiB
    # by-reference threshold, up to 3 MB (one frame of its own), arrive intact and in order.
    settings = (5).to_bytes(2, "big") + (4 * _MiB).to_bytes(4, "big") + (4).to_bytes(2, "big")
    settings += (16 * _MiB).to_bytes(4, "big")
    request = _prefixed(BytesValue(value=b"go").SerializeToString())
    async with running_server([_Replies()]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(HANDSHAKE[:-9] + frame(SETTINGS, 0, 0, settings))
            await peer.send(frame(8, 0, 0, (32 * _MiB).to_bytes(4, "big")))  # WINDOW_UPDATE
            await _settled_peer(peer)
            block = request_block(hpack.Encoder(), path="/t.R/Many")
            await peer.send(frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, request))
            with anyio.fail_after(10):
                while 1 not in peer.trailer_statuses():
                    await asyncio.sleep(0.01)
            assert peer.trailer_statuses() == {1: b"0"}
            payloads = [bytes(f.data) for f in peer.frames if isinstance(f, DataFrame) and f.stream_id == 1]
    expected = [_prefixed(BytesValue(value=_payload(i, size)).SerializeToString()) for i, size in enumerate(_SIZES)]
    assert b"".join(payloads) == b"".join(expected)  # (messages queued together may share a frame)
    assert len(expected[-1]) in [len(p) for p in payloads]  # the 3 MB one: a frame of its own
