"""Session 15: the flood budgets that a proxy's ordinary traffic no longer trips (HAProxy's
small DATA frames between full ones, its WINDOW_UPDATEs as its buffers drain: see
test_session15_proxies_review.py) still cut off a peer that sends such frames alone.

What a peer gets for free is licensed by work it had us do — a DATA frame of 1 KiB or more
licenses one small frame inside a message, each KiB we send two WINDOW_UPDATEs — and no more
than that: past it, each such frame counts towards ``max_empty_frames_per_window`` again.
Over a real socket, against an in-process Server, with hand-built frames.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import Server
from app_kit.wire.config import Configuration
from tests.frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, WINDOW_UPDATE, RawPeer, frame, request_block
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


async def test_window_updates_past_what_our_data_licenses_are_a_flood(port: int) -> None:
    # A 48 KiB reply (within the default 64 KiB window of the peer) licenses ~2 WINDOW_UPDATEs
    # per KiB, per frame and per message: ~110. Then 1,000 updates of 1 byte each: a flood.
    body = BytesValue(value=bytes(48 * 1024)).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    request = frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path="/test.Echo/Unary"))
    request += frame(DATA, END_STREAM, 1, message)
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE + request)
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
    body = BytesValue(value=bytes(48 * 1024)).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    request = frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path="/test.Echo/Unary"))
    request += frame(DATA, END_STREAM, 1, message)
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE + request)
        await asyncio.sleep(0.2)
        await peer.send(frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 190)
        await asyncio.sleep(0.3)
        assert peer.goaways == []
