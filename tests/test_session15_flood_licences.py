"""Session 15: the flood budgets that a proxy's ordinary traffic no longer trips (HAProxy's
small DATA frames between full ones, its WINDOW_UPDATEs as its buffers drain: see
test_session15_proxies_review.py) still cut off a peer that sends such frames alone.

What a peer gets for free is licensed by work it had us do — a DATA frame of 1 KiB or more
licenses one small frame inside a message, each KiB we send two WINDOW_UPDATEs — and no more
than that: past it, each such frame counts towards ``max_empty_frames_per_window`` again.
Over a real socket, against an in-process Server, with hand-built frames; and our Channel
against a scripted server that resets as HAProxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import Cardinality, Channel, GRPCError, Server
from app_kit.aio.client import method_for
from app_kit.rpc.framing import frame_message
from app_kit.wire.config import Configuration
from tests.fake_server import FakeConnection, fake_server
from tests.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    RST_STREAM,
    WINDOW_UPDATE,
    RawPeer,
    frame,
    request_block,
)
from tests.services import ByteCounter, EchoService

pytestmark = pytest.mark.anyio

ENHANCE_YOUR_CALM = 0xB
EMPTY_LIMIT = 100


async def serving() -> AsyncIterator[int]:
    server = Server([ByteCounter(), EchoService()], config=Configuration(max_empty_frames_per_window=EMPTY_LIMIT))
    await server.start("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=0.2)
        await server.wait_closed()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async for value in serving():
        yield value


def upload(large: int, crumbs_after_each: int, rounds: int) -> bytes:
    """A connection's handshake and one /r.R/Count call whose one message of 1 MiB comes as
    ``rounds`` rounds of ``large`` DATA frames of 2 KiB, each round followed by
    ``crumbs_after_each`` DATA frames of 1 byte."""
    message_prefix = b"\x00" + (1 << 20).to_bytes(4, "big")
    parts = [HANDSHAKE, frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path="/r.R/Count"))]
    parts.append(frame(DATA, 0, 1, message_prefix))
    for _ in range(rounds):
        parts += [frame(DATA, 0, 1, bytes(2048))] * large
        parts += [frame(DATA, 0, 1, b"x")] * crumbs_after_each
    return b"".join(parts)


async def outcome(port: int, data: bytes) -> list[tuple[int, bytes]]:
    """The GOAWAYs the server sent for ``data`` (sent without reading), after it settled."""
    async with RawPeer(port) as peer:
        await peer.send(data)
        await asyncio.sleep(0.3)
        return [(goaway.error_code, goaway.additional_data) for goaway in peer.goaways]


async def test_small_frames_between_large_ones_are_free(port: int) -> None:
    # HAProxy's shape: three full frames, then a piece of a few bytes; 300 pieces in all, three
    # times the empty-frame budget, inside one message (whose 1 MiB is not complete).
    assert await outcome(port, upload(large=3, crumbs_after_each=1, rounds=300)) == []


async def test_small_frames_past_their_licences_are_still_a_flood(port: int) -> None:
    # 100 frames of 2 KiB license 100 pieces; the 400 after them are a flood (the budget: 100).
    assert await outcome(port, upload(large=100, crumbs_after_each=400, rounds=1)) == [(ENHANCE_YOUR_CALM, b"flood")]


async def test_small_frames_alone_are_a_flood(port: int) -> None:
    assert await outcome(port, upload(large=0, crumbs_after_each=300, rounds=1)) == [(ENHANCE_YOUR_CALM, b"flood")]


def _echo_of_48_kib() -> bytes:
    """A /test.Echo/Unary call on stream 1 whose reply (its request echoed) is 48 KiB: within
    the default 64 KiB window of the peer."""
    body = BytesValue(value=bytes(48 * 1024)).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    request = frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path="/test.Echo/Unary"))
    return request + frame(DATA, END_STREAM, 1, message)


async def test_window_updates_past_what_our_data_licenses_are_a_flood(port: int) -> None:
    # A 48 KiB reply (within the default 64 KiB window of the peer) licenses ~2 WINDOW_UPDATEs
    # per KiB, per frame and per message: ~110. Then 1,000 updates of 1 byte each: a flood.
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE + _echo_of_48_kib())
        for _ in range(100):  # until the reply is in
            if any(getattr(f, "stream_id", 0) == 1 and "END_STREAM" in f.flags for f in peer.frames):
                break
            await asyncio.sleep(0.02)
        await peer.send(frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 1000)
        await asyncio.sleep(0.3)
        goaways = [(goaway.error_code, goaway.additional_data) for goaway in peer.goaways]
    assert goaways == [(ENHANCE_YOUR_CALM, b"flood")]


async def test_window_updates_the_data_licenses_are_free(port: int) -> None:
    # The same reply, then 100 updates: under its licences and the budget together, nothing.
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE + _echo_of_48_kib())
        await asyncio.sleep(0.2)
        await peer.send(frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 190)
        await asyncio.sleep(0.3)
        assert peer.goaways == []


async def test_a_proxys_resets_in_the_same_read_as_the_trailers_are_not_a_flood_to_our_client() -> None:
    # HAProxy answers a call the server ended early with RST_STREAM CANCEL, then STREAM_CLOSED
    # for each DATA frame of ours still in flight; they can come in the same read as the
    # trailers, before the call is finished here (the guard reads every frame header of a read
    # first). 300 calls, each answered with its trailers, then 1 + 3 resets in one write: their
    # licences are the call's own frames (HEADERS and DATA: 1 + 2 here; counted while it is
    # open too), so none of the 1,200 counts (the rapid-reset budget: 1,000 per 10 s; seen once
    # in a full run through HAProxy, where reads happened to coalesce).
    reply = frame_message(BytesValue(value=b"ok").SerializeToString())

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        conn = connection.conn
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(stream_id, reply)
        conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        resets = frame(RST_STREAM, 0, stream_id, (8).to_bytes(4, "big"))  # CANCEL
        resets += frame(RST_STREAM, 0, stream_id, (5).to_bytes(4, "big")) * 3  # STREAM_CLOSED
        connection.transport.write(conn.data_to_send() + resets)  # type: ignore[attr-defined]

    async with fake_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        call = method_for(channel, "/t.P/U", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        failures = []
        for _ in range(300):
            try:
                await call(BytesValue(value=b"x"), timeout=5)
            except GRPCError as exc:
                failures.append(exc.message)
        assert failures == []


async def test_resets_past_a_calls_licences_still_count_for_our_client() -> None:
    # The same, with 2,000 resets after the trailers of one call: over its licences, and over
    # the budget: the client closes the connection as a flood (the next call gets a new one).
    reply = frame_message(BytesValue(value=b"ok").SerializeToString())
    flooded = []

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        conn = connection.conn
        conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(stream_id, reply)
        conn.send_headers(stream_id, [("grpc-status", "0")], end_stream=True)
        resets = b""
        if number == 1:
            resets = frame(RST_STREAM, 0, stream_id, (5).to_bytes(4, "big")) * 2000
            flooded.append(connection)
        connection.transport.write(conn.data_to_send() + resets)  # type: ignore[attr-defined]

    async with fake_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        call = method_for(channel, "/t.P/U", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        with contextlib.suppress(GRPCError):  # (the flood may end the connection before the trailers)
            await call(BytesValue(value=b"x"), timeout=5)
        for _ in range(100):
            if flooded[0].transport.is_closing() or b"flood" in bytes(flooded[0].wire):
                break
            await asyncio.sleep(0.02)
        assert b"flood" in bytes(flooded[0].wire)  # our GOAWAY's debug data
        assert (await call(BytesValue(value=b"y"), timeout=5)).value == b"ok"
