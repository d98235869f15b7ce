"""Session 13: a long randomized hostile-peer campaign against the real Server over real sockets
(/tmp/campaign/campaign.py: seeded scripts of raw HTTP/2 frames, cut at random offsets, against
handlers of every cardinality that behave in every way, on asyncio and on trio). Each test here
is one defect the campaign found, cut down to its smallest reproduction; each failed before its
fix, the connection's other calls lost in three of them (GOAWAY INTERNAL_ERROR after h2's
StreamClosedError, from a stream the peer reset later in the same read: one we refused, or one
given window) and a call never answered in the fourth (a half-close read while its status still
waited to go dropped it); a client's GOAWAY was not answered with ours before the close, and
it made h2 empty what we had queued and not yet written (ACKs, a reply's HEADERS and their HPACK
entries: later header blocks on the connection no longer decoded).
"""

from __future__ import annotations

import socket
from typing import Any

import anyio
import hpack
import pytest
from hyperframe.frame import PingFrame

from app_kit import Configuration, Server

from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HANDSHAKE,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    request_block,
)
from .services import ByteCounter, EchoService
from .test_session12_trio_review import _Peer, _until

pytestmark = pytest.mark.anyio

_CANCEL = (8).to_bytes(4, "big")
_MESSAGE = b"\x00\x00\x00\x00\x04\x0a\x02hi"  # BytesValue(value=b"hi"), one gRPC message


async def _started(server: Server) -> int:
    """Start ``server`` on a free port; its port."""
    await server.start("127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    return port


async def _call_in_flight(server: Server, peer: Any, encoder: hpack.Encoder) -> None:
    """The connection's handshake (the server's SETTINGS acknowledged ahead of time), then a
    call on stream 1 whose handler runs, waiting for more of its client stream."""
    first = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/r.R/Count"))
    assert await peer.send(HANDSHAKE + frame(SETTINGS, 1, 0) + first + frame(DATA, 0, 1, _MESSAGE))
    await _until(lambda: server.stats().calls == 1)


async def _stream_1_ended_ok(peer: Any) -> None:
    """Stream 1, the call the defect must not harm, ends OK, and no GOAWAY carries an error."""
    await _until(lambda: 1 in peer.trailer_statuses() or peer.closed)
    assert [g.error_code for g in peer.goaways if g.error_code] == []
    assert peer.trailer_statuses() == {1: b"0"}


async def _close(server: Server) -> None:
    server.close(grace=1)
    with anyio.fail_after(5):
        await server.wait_closed()


def _assert_no_connection_error(server: Server, caplog: Any) -> None:
    assert server.stats().connection_errors == {}
    assert [r.getMessage() for r in caplog.records if r.levelname not in ("DEBUG", "INFO")] == []


def _malformed_block(encoder: hpack.Encoder) -> bytes:
    """A request RFC 9113 §8.2.2 calls malformed (a connection-specific field): the server
    answers it with RST_STREAM PROTOCOL_ERROR."""
    return request_block(encoder, path="/r.R/Count", extra=[("connection", "keep-alive")])


@pytest.mark.backends
@pytest.mark.parametrize("refusal", ["malformed request", "over max_concurrent_streams", "after the final GOAWAY"])
async def test_a_request_the_server_refuses_and_the_peer_resets_in_one_read_harms_no_other_call(
    backend: str, refusal: str, caplog: Any
) -> None:
    """A call (stream 1) is in flight. The peer then sends, in one write, a request the server
    refuses with a reset of its own, and RST_STREAM CANCEL on it (a client cancelling a call
    at once: any client whose caller gives up right after starting a call). The refused stream
    is over either way; stream 1 must go on and end OK when its client half-closes, with no
    GOAWAY and nothing logged above INFO."""
    config = Configuration(max_concurrent_streams=1) if refusal == "over max_concurrent_streams" else None
    server = Server([ByteCounter()], config=config)
    port = await _started(server)
    encoder = hpack.Encoder()
    try:
        async with _Peer(port) as peer:
            await _call_in_flight(server, peer, encoder)
            if refusal == "malformed request":
                block = _malformed_block(encoder)
            else:
                block = request_block(encoder, path="/r.R/Count")
            if refusal == "after the final GOAWAY":
                server.close(grace=5)
                await _until(lambda: len(peer.goaways) == 1)  # the first GOAWAY, and its PING
                assert await peer.send(frame(PING, 1, 0, b"shutdown"))
                await _until(lambda: len(peer.goaways) == 2)  # the final GOAWAY: last stream 1
                assert peer.goaways[1].last_stream_id == 1
            assert await peer.send(frame(HEADERS, END_HEADERS, 3, block) + frame(RST_STREAM, 0, 3, _CANCEL))
            assert await peer.send(frame(DATA, END_STREAM, 1))
            await _stream_1_ended_ok(peer)
    finally:
        await _close(server)
    _assert_no_connection_error(server, caplog)


@pytest.mark.backends
async def test_the_server_says_goaway_before_it_closes_a_connection_its_client_said_goaway_on(backend: str) -> None:
    """A client sends GOAWAY (NO_ERROR: it accepts no pushed streams; nothing stops it opening
    streams of its own), then a call. The server answers the call and, the client going away,
    closes the connection once no stream is open: it must first say which streams it processed
    (GOAWAY NO_ERROR, last stream id 1), so that a stream the client opened meanwhile (3, sent
    once stream 1 is answered) is known to be safe to retry elsewhere."""
    server = Server([ByteCounter()])
    port = await _started(server)
    encoder = hpack.Encoder()
    goaway = frame(7, 0, 0, (0).to_bytes(4, "big") + (0).to_bytes(4, "big"))  # GOAWAY NO_ERROR, last 0
    try:
        async with _Peer(port) as peer:
            call = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/r.R/Count"))
            call += frame(DATA, END_STREAM, 1, _MESSAGE)
            assert await peer.send(HANDSHAKE + frame(SETTINGS, 1, 0) + goaway + call)
            await _until(lambda: 1 in peer.trailer_statuses())
            late = frame(HEADERS, END_HEADERS, 3, request_block(encoder, path="/r.R/Count"))
            await peer.send(late + frame(DATA, END_STREAM, 3, _MESSAGE))
            await _until(lambda: peer.closed)
            assert [g.error_code for g in peer.goaways] == [0], peer.goaways
            processed = peer.goaways[0].last_stream_id  # 1, or 3 if it read stream 3 in time
            assert processed in (1, 3)
            assert peer.trailer_statuses() == {1: b"0", 3: b"0"} if processed == 3 else {1: b"0"}
    finally:
        await _close(server)


def _count(n: int) -> bytes:
    """An Int64Value(value=n) request (n < 128), one gRPC message."""
    return b"\x00\x00\x00\x00\x02\x08" + bytes([n])


@pytest.mark.backends
@pytest.mark.parametrize("window", ["stream WINDOW_UPDATE", "connection WINDOW_UPDATE", "SETTINGS_INITIAL_WINDOW_SIZE"])
async def test_window_given_and_the_stream_reset_in_one_read_harms_no_other_call(
    backend: str, window: str, caplog: Any
) -> None:
    """Stream 1, a call in flight, waits for its client's next message. Stream 3, a server stream,
    has a reply waiting for window: its stream's (the client's SETTINGS_INITIAL_WINDOW_SIZE is 0)
    or the connection's (128 KiB of replies, 64 KiB of window). Then the client gives window and
    cancels stream 3 in one write (a client whose caller gives up as it reads: any gRPC client
    acknowledges what it reads, and resets a call its caller cancels). Stream 3 is over; stream 1
    must go on and end OK, with no GOAWAY and nothing logged above INFO."""
    server = Server([ByteCounter(), EchoService()])
    port = await _started(server)
    encoder = hpack.Encoder()
    on_connection = window == "connection WINDOW_UPDATE"
    initial_window = (1 << 20) if on_connection else 0
    settings = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + initial_window.to_bytes(4, "big"))
    try:
        async with _Peer(port) as peer:
            first = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/r.R/Count"))
            first += frame(DATA, 0, 1, _MESSAGE)
            path = "/test.Echo/Big" if on_connection else "/test.Echo/ServerStream"
            second = frame(HEADERS, END_HEADERS, 3, request_block(encoder, path=path))
            second += frame(DATA, END_STREAM, 3, _count(8 if on_connection else 1))
            handshake = HANDSHAKE[:-9] + settings + frame(SETTINGS, 1, 0)
            assert await peer.send(handshake + first + second)
            # stream 3's reply is queued and blocked: its response headers went, and (on the
            # connection's window) 64 KiB of its DATA
            await _until(lambda: any(f.stream_id == 3 for f in peer.frames))
            await anyio.sleep(0.2)
            if window == "stream WINDOW_UPDATE":
                give = frame(WINDOW_UPDATE, 0, 3, (100).to_bytes(4, "big"))
            elif on_connection:
                give = frame(WINDOW_UPDATE, 0, 0, (100_000).to_bytes(4, "big"))
            else:
                give = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (65535).to_bytes(4, "big"))
            assert await peer.send(give + frame(RST_STREAM, 0, 3, _CANCEL))
            # stream 1 ends; its reply gets window (an initial window of 0 holds it too)
            assert await peer.send(frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")) + frame(DATA, END_STREAM, 1))
            await _stream_1_ended_ok(peer)
    finally:
        await _close(server)
    _assert_no_connection_error(server, caplog)


@pytest.mark.backends
async def test_a_half_close_after_the_handler_is_done_does_not_drop_its_queued_reply(backend: str) -> None:
    """A unary call: the client sends its request, and its half-close in a later frame (as
    clients of streaming calls do, and some unary ones). The handler answers at once, but the
    client's SETTINGS_INITIAL_WINDOW_SIZE is 0: the reply waits for window, the status behind
    it. The client then half-closes, and then gives window: the reply and the status OK must
    come. (The campaign also lost calls this way with the window open: on a connection with
    other calls, a call's end is written at the end of the loop turn, and a half-close read
    before that dropped it.)"""
    server = Server([EchoService()])
    port = await _started(server)
    encoder = hpack.Encoder()
    zero_window = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
    try:
        async with _Peer(port) as peer:
            request = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/test.Echo/Unary"))
            request += frame(DATA, 0, 1, _MESSAGE)
            assert await peer.send(HANDSHAKE[:-9] + zero_window + frame(SETTINGS, 1, 0) + request)
            await _until(lambda: any(f.stream_id == 1 for f in peer.frames))  # the response headers
            await anyio.sleep(0.2)  # the handler is done: its reply and status wait for window
            assert await peer.send(frame(DATA, END_STREAM, 1))
            await anyio.sleep(0.2)
            assert await peer.send(frame(WINDOW_UPDATE, 0, 1, (1000).to_bytes(4, "big")))
            await _until(lambda: 1 in peer.trailer_statuses(), timeout=2)
            assert peer.trailer_statuses() == {1: b"0"}
    finally:
        await _close(server)


_GOAWAY_NO_ERROR = frame(GOAWAY, 0, 0, bytes(8))  # last stream id 0: the client takes no pushed stream


@pytest.mark.backends
async def test_a_clients_goaway_does_not_discard_the_acks_queued_before_it(backend: str) -> None:
    """A call (stream 1) is in flight. The client sends, in one write, SETTINGS, a PING and a
    graceful GOAWAY (it is closing, and lets its calls finish). The server must acknowledge the
    SETTINGS and the PING (RFC 9113 §6.5.3, §6.7), and stream 1 must end OK."""
    server = Server([ByteCounter()])
    port = await _started(server)
    encoder = hpack.Encoder()
    try:
        async with _Peer(port) as peer:
            await _call_in_flight(server, peer, encoder)
            settings = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (1 << 16).to_bytes(4, "big"))
            assert await peer.send(settings + frame(PING, 0, 0, b"answerme") + _GOAWAY_NO_ERROR)
            assert await peer.send(frame(DATA, END_STREAM, 1))
            await _stream_1_ended_ok(peer)
            acks = [type(f).__name__ for f in peer.frames if "ACK" in getattr(f, "flags", ())]
            assert acks.count("SettingsFrame") == 2  # the handshake's, and this one's
            assert any(isinstance(f, PingFrame) and f.opaque_data == b"answerme" for f in peer.frames)
    finally:
        await _close(server)


async def test_a_clients_goaway_does_not_discard_a_replys_queued_headers() -> None:
    """A call (stream 1) is in flight. The client then sends, in one write, 256 KiB: more of
    stream 1's message, and a unary call (stream 5) at its very end; then a graceful GOAWAY.
    asyncio reads 256 KiB at a time: the server reads the call, its handler answers (response
    HEADERS into h2's buffer, the reply and status queued for the end of the loop turn), and the
    GOAWAY is read before that turn ends. Stream 5's response must be HEADERS, DATA, trailers.

    On asyncio only: there the order is certain (the handler's step is due before the next read,
    the write at the end of the turn after it). On trio the same race is won one time in two
    (trio orders the handler, the reader and the scheduler at random): the campaign saw it there."""
    server = Server([ByteCounter(), EchoService()])
    await server.start("127.0.0.1", 0)
    # (room for the whole write in the socket before the server reads any of it)
    server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    port = server.sockets[0].getsockname()[1]
    encoder = hpack.Encoder()
    try:
        async with _Peer(port) as peer:
            first = frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/r.R/Count"))
            first += frame(DATA, 0, 1, b"\x00" + (3 << 20).to_bytes(4, "big"))  # a 3 MiB message begins
            assert await peer.send(HANDSHAKE + frame(SETTINGS, 1, 0) + first)
            await _until(lambda: server.stats().calls == 1)
            call = frame(HEADERS, END_HEADERS, 5, request_block(encoder, path="/test.Echo/Unary"))
            call += frame(DATA, END_STREAM, 5, _MESSAGE)
            whole, last = divmod(256 * 1024 - len(call) - 9, 16384 + 9)
            more = frame(DATA, 0, 1, bytes(16384)) * whole + frame(DATA, 0, 1, bytes(last))
            assert len(more + call) == 256 * 1024
            assert await peer.send(more + call + _GOAWAY_NO_ERROR)
            await _until(lambda: 5 in peer.trailer_statuses())
            kinds = [type(f).__name__ for f in peer.frames if f.stream_id == 5]
            assert kinds == ["HeadersFrame", "DataFrame", "HeadersFrame"]
            assert peer.trailer_statuses()[5] == b"0"
    finally:
        await _close(server)
