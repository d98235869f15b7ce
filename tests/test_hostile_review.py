"""Fresh-eyes review against hostile or broken peers: every call ends with a status, one bad
call never takes its connection's other calls down, and memory and CPU per peer stay bounded.
Each test here failed when it was written (see the review report)."""

from __future__ import annotations

import asyncio

import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from app_kit import Cardinality, Channel, GRPCError, RetryPolicy, Status
from app_kit.aio.client import method_for

from .fake_server import FakeConnection, fake_server
from .frames import (
    DATA,
    END_HEADERS,
    HANDSHAKE,
    HEADERS,
    RawPeer,
    frame,
    process_cpu_seconds,
    process_rss_bytes,
    request_block,
)
from .process import AppProcess
from .test_client import methods

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


# -- a hostile server: what the client does with what it is sent ------------------------------


def _held_then_answered(bad_trailers: list[tuple[bytes, bytes]]):  # type: ignore[no-untyped-def]
    """A script: the first request is held; the second is answered with ``bad_trailers``
    (a whole Trailers-Only response); then the first is answered OK."""

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 1:
            script.held = stream_id  # type: ignore[attr-defined]
            return
        connection.conn.send_headers(stream_id, bad_trailers, end_stream=True)
        connection.reply(script.held, BytesValue(value=b"first").SerializeToString())  # type: ignore[attr-defined]

    return script


@pytest.mark.parametrize(
    "bad",
    [
        [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0" * 5000)],
        [(b":status", b"2" + b"0" * 5000), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")],
    ],
    ids=["grpc-status of 5000 digits", ":status of 5000 digits"],
)
async def test_a_huge_numeric_status_fails_its_call_alone(bad: list[tuple[bytes, bytes]]) -> None:
    # Both fit the default header list limit (16 KiB). int() of more than 4300 digits raises
    # ValueError (Python's int_max_str_digits): the core's catch-all then ends the whole
    # connection with INTERNAL_ERROR, failing the other call in flight, and logs a traceback.
    async with fake_server(_held_then_answered(bad)) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = methods(channel)["Unary"]
        first = asyncio.create_task(unary(BytesValue(value=b"first"), timeout=2))
        await asyncio.sleep(0.1)  # the first request is held by the server
        with pytest.raises(GRPCError) as info:
            await unary(BytesValue(value=b"second"), timeout=2)
        assert info.value.status in (Status.UNKNOWN, Status.INTERNAL), info.value
        assert (await first).value == b"first"  # the connection, and its other call, went on


@pytest.mark.parametrize(
    "pushback",
    [b"\xb2", b"9" * 400, b"1" * 5000],
    ids=["a latin-1 superscript digit", "400 digits", "5000 digits"],
)
async def test_a_malformed_retry_pushback_ends_the_call_with_its_status(pushback: bytes) -> None:
    # grpc-retry-pushback-ms is decoded as latin-1 and checked with str.isdigit(), which takes
    # "²" (0xB2) for a digit that int() refuses; 400 digits are a number no float holds, and
    # 5000 are past int()'s digit limit. Each raised ValueError or OverflowError out of the call
    # (no GRPCError): gRFC A6 says a malformed pushback means "do not retry", with the status.
    attempts: list[int] = []

    def reply(connection: FakeConnection, stream_id: int, number: int) -> None:
        attempts.append(stream_id)
        trailers = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14")]
        connection.conn.send_headers(stream_id, [*trailers, (b"grpc-retry-pushback-ms", pushback)], end_stream=True)

    policy = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)
    async with fake_server(reply) as (port, _), Channel("127.0.0.1", port, retry_policy=policy) as channel:
        unary = method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        with pytest.raises(GRPCError) as info:
            await unary(Int64Value(), timeout=2)
    assert info.value.status is Status.UNAVAILABLE
    assert len(attempts) == 1


# -- a hostile client, against a server process whose memory and CPU are measured -------------

#: The whole receive budget of a connection: one message of 512 KiB (and its prefix).
BUDGET = 512 * 1024


@pytest.fixture
async def small_budget_server():  # type: ignore[no-untyped-def]
    env = {
        "APP_LOG_LEVEL": "INFO",
        "APP_MAX_RECEIVE_MESSAGE_LENGTH": str(BUDGET),
        "APP_MAX_CONNECTION_RECEIVE_BUFFER": str(BUDGET + 5),
    }
    async with AppProcess("tests.apps.lifecycle_app:app", "--port", "0", env=env) as app:
        await app.ready()
        yield app


@pytest.mark.parametrize("piece_bytes", [2, 64])
async def test_an_incomplete_message_in_tiny_frames_holds_what_it_is_counted_for(
    small_budget_server, piece_bytes: int
) -> None:  # type: ignore[no-untyped-def]
    # max_connection_receive_buffer bounds the bytes of incomplete messages a connection holds.
    # A message that arrives in DATA frames of 2 bytes is kept as one bytes object per frame
    # (MessageDecoder._chunks): ~48 bytes of heap per 2 bytes counted. 256 Ki frames (2.75 MB
    # on the wire) park 512 KiB, the whole budget, and grew the server by ~13 MiB: 25 times
    # the configured limit (64 MiB by default: ~1.6 GiB per connection).
    #
    # Since session 12, DATA frames of fewer than 64 bytes inside a message count as empty
    # frames: frames of 2 bytes are a flood past 1,000 (GOAWAY ENHANCE_YOUR_CALM, having held
    # little); frames of 64 bytes, the smallest that are not, hold what they are counted for.
    #
    # The frames are sent in runs of ~32 KiB, each followed by a SETTINGS frame whose ACK says
    # the server has read and handled the run: what the server holds is then what is measured.
    # (Reading 256 KiB of 11-byte frames at once makes ~190 bytes of short-lived objects per
    # frame, whatever happens to the data: a one-off high-water mark of ~3.5 MiB in a fresh
    # process's allocator, which does not grow with the connections or the budget.) Fewer
    # SETTINGS frames in all than the flood limit of 100.
    pid = small_budget_server.process.pid
    encoder = hpack.Encoder()
    head = frame(HEADERS, END_HEADERS, 1, request_block(encoder, "/test.Sleeper/Sleep"))
    prefix = frame(DATA, 0, 1, b"\x00" + BUDGET.to_bytes(4, "big"))
    piece = frame(DATA, 0, 1, b"a" * piece_bytes)
    pieces = piece * (BUDGET // piece_bytes - 1)  # all but the last piece
    run = (1 << 15) // len(piece) * len(piece)  # cut between frames
    rss_before = process_rss_bytes(pid)
    async with RawPeer(small_budget_server.port) as peer:
        await peer.send(HANDSHAKE + head + prefix)
        for number, start in enumerate(range(0, len(pieces), run), start=2):  # (the handshake's is 1)
            if not await peer.send(pieces[start : start + run] + frame(4, 0, 0)):
                break
            async with asyncio.timeout(10):
                while sum(type(f).__name__ == "SettingsFrame" and "ACK" in f.flags for f in peer.frames) < number:
                    if peer.closed.is_set():
                        break
                    await asyncio.sleep(0.001)
            if peer.closed.is_set():
                break
        growth = process_rss_bytes(pid) - rss_before
        if piece_bytes < 64:
            await peer.wait_closed()
            assert [goaway.error_code for goaway in peer.goaways] == [0xB]  # ENHANCE_YOUR_CALM
        else:
            assert not peer.goaways
    print(f"{BUDGET // 1024} KiB in {piece_bytes}-byte frames: RSS +{growth / MiB:.1f} MiB")
    assert growth < 4 * BUDGET, f"holding {BUDGET // 1024} KiB of a message grew the server by {growth / MiB:.1f} MiB"


async def test_empty_messages_a_handler_has_not_taken_hold_what_flow_control_allows(small_budget_server) -> None:  # type: ignore[no-untyped-def]
    # initial_stream_window_size "bounds what a handler that does not read can make us buffer".
    # A window's worth of empty messages (5 bytes each: a prefix and nothing) is queued as one
    # (payload, share) tuple per message on the call, ~80 bytes of heap per 5 bytes of window:
    # 2 streams of 1 MiB windows, to a handler taking one message per 0.5 s, grew the server by
    # ~35 MiB, 16 times what flow control is to bound (a connection's 16 MiB window: ~270 MiB).
    pid = small_budget_server.process.pid
    window = 1 * MiB - 5  # the default initial_stream_window_size, less one message in hand
    encoder = hpack.Encoder()
    empties = b"\x00\x00\x00\x00\x00" * (window // 5)
    attack = [HANDSHAKE]
    for stream_id in (1, 3):
        attack.append(frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, "/test.Sleeper/Hold")))
        attack += [frame(DATA, 0, stream_id, empties[start : start + 16380]) for start in range(0, len(empties), 16380)]
    data = b"".join(attack)
    rss_before = process_rss_bytes(pid)
    async with RawPeer(small_budget_server.port) as peer:
        for start in range(0, len(data), 1 << 16):
            assert await peer.send(data[start : start + (1 << 16)])
        await peer.send(frame(6, 0, 0, b"measured"))  # answered once everything before it was read
        async with asyncio.timeout(10):
            while not any(type(f).__name__ == "PingFrame" and "ACK" in f.flags for f in peer.frames):
                await asyncio.sleep(0.01)
        growth = process_rss_bytes(pid) - rss_before
        assert not peer.goaways
    print(f"2 MiB of empty messages queued: RSS +{growth / MiB:.1f} MiB")
    assert growth < 4 * 2 * MiB, f"2 MiB of window held as empty messages grew the server by {growth / MiB:.1f} MiB"


async def test_connection_window_updates_do_not_walk_every_blocked_stream(small_budget_server) -> None:  # type: ignore[no-untyped-def]
    # A client that sets SETTINGS_INITIAL_WINDOW_SIZE to 0 opens 1000 health Watch streams:
    # each one's first reply waits for its stream's window. Every connection-level WINDOW_UPDATE
    # then makes the server try each blocked stream in turn (_flush_blocked goes on while the
    # connection window is open, however shut the streams' own are). The ~3000 updates the
    # flood limit lets through (the licensed ones, then 1000 more) cost 0.45-0.7 s of server
    # CPU, for ~70 KB sent (the same updates without the zero window: 0.02 s); the client can
    # pace them under the limit, or reconnect, and repeat.
    pid = small_budget_server.process.pid
    encoder = hpack.Encoder()
    streams = 1000  # the default max_concurrent_streams
    zero_window = frame(4, 0, 0, b"\x00\x04\x00\x00\x00\x00")  # SETTINGS_INITIAL_WINDOW_SIZE = 0
    watches = b"".join(
        frame(HEADERS, END_HEADERS, 2 * n + 1, request_block(encoder, "/grpc.health.v1.Health/Watch"))
        + frame(DATA, 1, 2 * n + 1, b"\x00\x00\x00\x00\x00")  # an empty request, END_STREAM
        for n in range(streams)
    )
    update = frame(8, 0, 0, (1).to_bytes(4, "big"))  # WINDOW_UPDATE of 1 byte on the connection
    async with RawPeer(small_budget_server.port) as peer:
        await peer.send(HANDSHAKE + zero_window + watches)
        async with asyncio.timeout(5):  # every Watch answered its headers: its reply is queued
            while sum(type(f).__name__ == "HeadersFrame" for f in peer.frames) < streams:
                await asyncio.sleep(0.01)
        cpu_before = process_cpu_seconds(pid)
        for _ in range(40):  # in reads of 100: a read over the flood limit is refused unread
            if not await peer.send(update * 100):
                break
            await asyncio.sleep(0.005)
        await peer.send(frame(6, 0, 0, b"measured"))
        async with asyncio.timeout(10):  # answered (or the connection closed) once all was read
            while not peer.closed.is_set() and not any(
                type(f).__name__ == "PingFrame" and "ACK" in f.flags for f in peer.frames
            ):
                await asyncio.sleep(0.01)
        cpu = process_cpu_seconds(pid) - cpu_before
    print(f"WINDOW_UPDATEs over {streams} blocked streams: {cpu:.2f}s of server CPU")
    assert cpu < 0.2, f"4000 WINDOW_UPDATE frames cost {cpu:.2f}s of server CPU"


@pytest.fixture(scope="module")
async def default_server():  # type: ignore[no-untyped-def]
    async with AppProcess("tests.apps.lifecycle_app:app", "--port", "0", env={"APP_LOG_LEVEL": "INFO"}) as app:
        await app.ready()
        yield app


@pytest.mark.parametrize(
    "flood",
    [frame(0xFA, 0, 0), frame(4, 1, 0), frame(6, 1, 0, b"12345678")],
    ids=["unknown frame type", "SETTINGS ACK nobody asked for", "PING ACK nobody asked for"],
)
async def test_floods_of_frames_that_carry_nothing_are_cut_off(default_server, flood: bytes) -> None:  # type: ignore[no-untyped-def]
    # The guard counts empty DATA, PRIORITY, unasked-for WINDOW_UPDATEs, PINGs, SETTINGS and
    # resets (tests/test_hardening.py: 100,000 of each are cut off with ENHANCE_YOUR_CALM for
    # under 0.5 s of CPU). Frames of an unknown type (ignored, as RFC 9113 §4.1 says), SETTINGS
    # ACKs and PING ACKs that answer nothing of ours are counted nowhere: 100,000 of them
    # (9-17 bytes each) cost 0.5-0.7 s of server CPU, and the connection is never cut off.
    pid = default_server.process.pid
    attack = HANDSHAKE + flood * 100_000
    cpu_before = process_cpu_seconds(pid)
    async with RawPeer(default_server.port) as peer:
        for start in range(0, len(attack), 1 << 16):
            if not await peer.send(attack[start : start + (1 << 16)]):
                break  # the server stopped reading, as it should
        await peer.send(frame(6, 0, 0, b"measured"))
        async with asyncio.timeout(10):  # answered (or the connection closed) once all was read
            while not peer.closed.is_set() and not any(
                type(f).__name__ == "PingFrame" and "ACK" in f.flags and f.opaque_data == b"measured"
                for f in peer.frames
            ):
                await asyncio.sleep(0.01)
        cpu = process_cpu_seconds(pid) - cpu_before
    print(f"flood cost {cpu:.2f}s of server CPU; GOAWAYs: {peer.goaways}")
    assert [(g.error_code, g.additional_data) for g in peer.goaways] == [(11, b"flood")]  # ENHANCE_YOUR_CALM
    assert cpu < 0.5, f"the flood cost {cpu:.2f}s of server CPU"
