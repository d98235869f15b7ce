"""HTTP/2 hardening: connection errors per RFC 9113, floods bounded in CPU and memory, timeouts."""

from __future__ import annotations

import asyncio
import logging
import socket
import zlib

import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue

from app_kit import Configuration

from .conftest import running_server
from .frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawPeer,
    flood,
    frame,
    process_cpu_seconds,
    process_peak_rss_bytes,
    process_rss_bytes,
    request_block,
    reset_peak_rss,
)
from .process import AppProcess
from .services import EchoService

pytestmark = pytest.mark.anyio

PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 1, 3, 6, 9, 11
MiB = 1024 * 1024
BLOCK = request_block(path="/test.Echo/Unary")

CONNECTION_ERRORS = {
    "bad preface": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PROTOCOL_ERROR),
    "frame larger than MAX_FRAME_SIZE": (
        HANDSHAKE + frame(DATA, 0, 1, b"x" * (Configuration().max_frame_size + 1)),
        FRAME_SIZE_ERROR,
    ),
    # Only the 9-byte header of a 16 MiB frame: answered at once, nothing buffered first.
    "frame header announcing more than MAX_FRAME_SIZE": (
        HANDSHAKE + (2**24 - 1).to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big"),
        FRAME_SIZE_ERROR,
    ),
    "DATA on stream 0": (HANDSHAKE + frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
    "HEADERS on stream 0": (HANDSHAKE + frame(HEADERS, END_HEADERS, 0, BLOCK), PROTOCOL_ERROR),
    "even (server) stream id": (HANDSHAKE + frame(HEADERS, END_HEADERS, 2, BLOCK), PROTOCOL_ERROR),
    "stream id lower than one used": (
        HANDSHAKE + frame(HEADERS, 5, 5, BLOCK) + frame(HEADERS, 5, 3, BLOCK),
        PROTOCOL_ERROR,
    ),
    "SETTINGS length not a multiple of 6": (HANDSHAKE + frame(SETTINGS, 0, 0, b"\x00\x01\x00"), FRAME_SIZE_ERROR),
    "SETTINGS window over 2^31-1": (HANDSHAKE + frame(SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"), FLOW_CONTROL_ERROR),
    "SETTINGS ENABLE_PUSH=2": (HANDSHAKE + frame(SETTINGS, 0, 0, b"\x00\x02\x00\x00\x00\x02"), PROTOCOL_ERROR),
    "SETTINGS ACK with payload": (HANDSHAKE + frame(SETTINGS, 1, 0, b"\x00\x02\x00\x00\x00\x00"), FRAME_SIZE_ERROR),
    "PING of 7 bytes": (HANDSHAKE + frame(PING, 0, 0, b"1234567"), FRAME_SIZE_ERROR),
    "PING on a stream": (HANDSHAKE + frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
    "WINDOW_UPDATE of 3 bytes": (HANDSHAKE + frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"), FRAME_SIZE_ERROR),
    "WINDOW_UPDATE of 0 on the connection": (HANDSHAKE + frame(WINDOW_UPDATE, 0, 0, b"\x00" * 4), PROTOCOL_ERROR),
    "window overflow past 2^31-1": (HANDSHAKE + frame(WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), FLOW_CONTROL_ERROR),
    "interleaved CONTINUATION": (
        HANDSHAKE + frame(HEADERS, 0, 1, BLOCK[:4]) + frame(PING, 0, 0, b"12345678"),
        PROTOCOL_ERROR,
    ),
    "CONTINUATION without HEADERS": (HANDSHAKE + frame(CONTINUATION, END_HEADERS, 1, BLOCK), PROTOCOL_ERROR),
    "RST_STREAM on an idle stream": (HANDSHAKE + frame(RST_STREAM, 0, 9, b"\x00\x00\x00\x08"), PROTOCOL_ERROR),
    "DATA on an idle stream": (HANDSHAKE + frame(DATA, 0, 9, b"x"), PROTOCOL_ERROR),
    "undecodable header block": (HANDSHAKE + frame(HEADERS, 5, 1, b"\xff\xff\xff\xff\xff"), COMPRESSION_ERROR),
}


async def _call_succeeds(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
        assert (await unary(BytesValue(value=b"still fine"), timeout=5)).value == b"still fine"


@pytest.mark.parametrize("case", list(CONNECTION_ERRORS))
async def test_connection_errors_get_goaway_with_the_right_code(case: str) -> None:
    data, code = CONNECTION_ERRORS[case]
    async with running_server([EchoService()]) as (server, target):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            await peer.send(data)
            await peer.wait_closed()
        assert [g.error_code for g in peer.goaways] == [code], case
        await _call_succeeds(target)


async def test_unknown_frames_and_extension_settings_are_ignored() -> None:
    async with running_server([EchoService()]) as (server, _):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            await peer.send(
                HANDSHAKE + frame(0xFA, 0xFF, 7, b"whatever") + frame(SETTINGS, 0, 0, b"\x00\xaa\x00\x00\x00\x01")
            )
            await peer.send(frame(PING, 0, 0, b"12345678"))
            async with asyncio.timeout(2):
                while not any(type(f).__name__ == "PingFrame" for f in peer.frames):
                    await asyncio.sleep(0.01)
            assert not peer.goaways and not peer.closed.is_set()


# -- floods, against a server process whose CPU time and memory are measured ------------------


@pytest.fixture(scope="module")
async def server_process():  # type: ignore[no-untyped-def]
    async with AppProcess("tests.apps.lifecycle_app:app", "--port", "0", env={"APP_LOG_LEVEL": "INFO"}) as app:
        await app.ready()
        yield app


@pytest.mark.parametrize(
    ("kind", "count", "debug"),
    [
        ("rapid reset", 20000, b"flood"),
        ("malformed requests", 20000, b"flood"),
        ("PING", 100000, b"too_many_pings"),
        ("SETTINGS", 50000, b"flood"),
        ("empty DATA", 100000, b"flood"),
        ("WINDOW_UPDATE", 100000, b"flood"),
        ("PRIORITY", 100000, b"flood"),
        ("padded empty DATA", 100000, b"flood"),
    ],
)
async def test_floods_are_cut_off_cheaply(server_process, kind: str, count: int, debug: bytes) -> None:  # type: ignore[no-untyped-def]
    pid = server_process.process.pid
    attack = flood(kind, count)
    cpu_before, rss_before = process_cpu_seconds(pid), process_rss_bytes(pid)
    async with RawPeer(server_process.port) as peer:
        for start in range(0, len(attack), 1 << 16):
            if not await peer.send(attack[start : start + (1 << 16)]):
                break  # the server stopped reading, as it should
        await peer.wait_closed()
    await asyncio.sleep(0.1)
    cpu = process_cpu_seconds(pid) - cpu_before
    growth = process_rss_bytes(pid) - rss_before
    assert [(g.error_code, g.additional_data) for g in peer.goaways] == [(ENHANCE_YOUR_CALM, debug)]
    assert cpu < 0.5, f"{kind} flood cost {cpu:.2f}s of server CPU"
    assert growth < 64 * MiB, f"{kind} flood grew the server by {growth / MiB:.1f} MiB"
    await _sleeper_call_succeeds(server_process.port)


async def test_continuation_flood_is_cut_off_at_the_header_limit(server_process) -> None:  # type: ignore[no-untyped-def]
    pid = server_process.process.pid
    cpu_before = process_cpu_seconds(pid)
    sent = 0
    async with RawPeer(server_process.port) as peer:
        await peer.send(HANDSHAKE + frame(HEADERS, 0, 1, request_block()))
        chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 16
        # Send until the GOAWAY arrives; what the server discards while lingering is never parsed.
        while sent < 64 * MiB and not peer.goaways and await peer.send(chunk):
            sent += len(chunk)
            await asyncio.sleep(0)  # let our reader see the GOAWAY as soon as it arrives
        await peer.wait_closed()
    assert [g.error_code for g in peer.goaways] == [ENHANCE_YOUR_CALM]
    # Socket buffers on both ends hold a few MiB in flight; the block itself is cut at 32 KiB.
    assert sent < 16 * MiB, f"the GOAWAY came only after {sent / MiB:.0f} MiB of header block"
    assert process_cpu_seconds(pid) - cpu_before < 0.5
    await _sleeper_call_succeeds(server_process.port)


async def test_rejected_peers_are_logged_once_each_without_tracebacks(server_process) -> None:  # type: ignore[no-untyped-def]
    async with RawPeer(server_process.port) as peer:
        await peer.send(flood("PING", 2000))
        await peer.wait_closed()
    await asyncio.sleep(0.2)
    lines = [line for line in server_process.lines if "PINGs sooner than the permitted interval" in line]
    assert len(lines) >= 1 and "closing connection from ('127.0.0.1'" in lines[-1]
    assert "Traceback" not in server_process.log


async def _sleeper_call_succeeds(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sleep = channel.unary_unary("/test.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
        assert (await sleep(DoubleValue(value=0.0), timeout=5)).value == 0.0


# -- slow and idle peers -------------------------------------------------------------------------


async def test_handshake_timeout_closes_silent_and_slow_peers() -> None:
    config = Configuration(handshake_timeout=0.3)
    async with running_server([EchoService()], config=config) as (server, target):
        port = server.sockets[0].getsockname()[1]
        for opening in (b"", HANDSHAKE[:10]):  # nothing at all; half a preface
            async with RawPeer(port) as peer:
                await peer.send(opening)
                await peer.wait_closed(2)
        await _call_succeeds(target)  # a real client is well within the timeout


async def test_idle_connection_is_closed_gracefully() -> None:
    config = Configuration(idle_timeout=0.3, shutdown_ping_timeout=0.3)  # the raw peer never answers PINGs
    async with running_server([EchoService()], config=config) as (server, _):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            from .h2client import RawClient

            async with RawClient("127.0.0.1", server.sockets[0].getsockname()[1]) as client:
                stream_id = await client.request("/test.Echo/Unary", BytesValue(value=b"x").SerializeToString())
                assert (await client.read_response(stream_id)).grpc_status == 0
                await client.wait_for(lambda: client.closed.is_set(), timeout=3)
                terminated = [e for e in client.events if type(e).__name__ == "ConnectionTerminated"]
                assert [e.error_code for e in terminated] == [0, 0]  # graceful: the two GOAWAYs
            await peer.send(HANDSHAKE)
            await peer.wait_closed(3)  # never made a call: closed too


async def test_peer_errors_log_no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_server([EchoService()]) as (server, _):
        for data, _ in CONNECTION_ERRORS.values():
            async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
                await peer.send(data)
                await peer.wait_closed()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_incomplete_messages_are_capped_per_connection() -> None:
    # Bytes of an incomplete message are acknowledged as they come, so only the connection
    # cap bounds how much of them a peer can park across its streams.
    config = Configuration(max_receive_message_length=1 * MiB, max_connection_receive_buffer=4 * MiB)
    async with running_server([EchoService()], config=config) as (server, target):
        connection_of = lambda: next(iter(server._connections)).connection  # noqa: E731
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            encoder = hpack.Encoder()
            await peer.send(HANDSHAKE)
            for stream_id in range(1, 41, 2):  # 20 streams, each 900 KB into a 1 MiB message
                head = frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, "/test.Echo/ClientStream"))
                body = b"\x00" + (MiB).to_bytes(4, "big") + b"x" * (900 * 1024)
                parts = [frame(DATA, 0, stream_id, body[start : start + 16384]) for start in range(0, len(body), 16384)]
                await peer.send(head + b"".join(parts))
            async with asyncio.timeout(5):
                while len(peer.trailer_statuses()) < 16:
                    await asyncio.sleep(0.01)
                    assert connection_of()._partial_bytes <= 4 * MiB + 16384
            statuses = peer.trailer_statuses()
            # The first four fit; every later one went over and was answered on its own stream.
            assert sorted(statuses) == list(range(9, 41, 2))
            assert set(statuses.values()) == {b"8"}  # RESOURCE_EXHAUSTED
            assert not peer.goaways and not peer.closed.is_set()
        async with grpc.aio.insecure_channel(target) as channel:  # the server serves on
            unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
            assert (await unary(BytesValue(value=b"still here"))).value == b"still here"


async def test_a_flood_of_refused_streams_is_cut_off(server_process) -> None:  # type: ignore[no-untyped-def]
    # 200,000 requests of 15 bytes (HPACK-indexed) to an unknown method, without reading: the
    # server used to answer them all and queue the answers without bound. Streams over the
    # concurrency limit are refused, and a refusal costs the peer's reset budget like a reset
    # it sends ("MadeYouReset"): the connection is closed within the first reads.
    pid = server_process.process.pid
    encoder = hpack.Encoder()
    block = b"".join(
        frame(HEADERS, END_HEADERS | END_STREAM, 2 * n + 1, request_block(encoder, path="/x.y/z"))
        for n in range(200000)
    )
    cpu_before, rss_before = process_cpu_seconds(pid), process_rss_bytes(pid)
    async with RawPeer(server_process.port) as peer:
        await peer.send(HANDSHAKE)
        for start in range(0, len(block), 1 << 16):
            if not await peer.send(block[start : start + (1 << 16)]):
                break
        await peer.wait_closed()
    await asyncio.sleep(0.1)
    assert [(g.error_code, g.additional_data) for g in peer.goaways] == [(ENHANCE_YOUR_CALM, b"flood")]
    assert process_cpu_seconds(pid) - cpu_before < 0.5
    assert process_rss_bytes(pid) - rss_before < 24 * MiB
    await _sleeper_call_succeeds(server_process.port)


async def test_a_peer_that_never_reads_is_no_longer_read_from() -> None:
    # Requests answered at once (trailers-only), sent in batches the concurrency limit allows,
    # by a peer that reads nothing: over max_connection_send_buffer of answers queued, the
    # server stops reading it (and its requests wait in TCP) instead of answering on.
    # (No refusals here: the concurrency limit is out of the way, the send buffer is small.)
    config = Configuration(max_connection_send_buffer=64 * 1024, max_concurrent_streams=10**6)
    async with asyncio.timeout(30):  # without the limit the peer is read on and on
        async with running_server([EchoService()], config=config) as (server, target):
            port = server.sockets[0].getsockname()[1]
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a peer that takes nothing
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            _, writer = await asyncio.open_connection(sock=sock)
            encoder, stream_id, held_back = hpack.Encoder(), 1, False
            writer.write(HANDSHAKE)
            for _ in range(2000):
                batch = []
                for _ in range(200):
                    batch.append(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, request_block(encoder, "/x.y/z")))
                    stream_id += 2
                writer.write(b"".join(batch))
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except TimeoutError:
                    held_back = True
                    break
            (protocol,) = server._connections
            assert held_back and protocol.transport is not None and not protocol.transport.is_reading()
            assert protocol.transport.get_write_buffer_size() < 2 * config.max_connection_send_buffer
            await _call_succeeds(target)  # everyone else is served meanwhile
            # Shutdown is not held by it either: within grace + linger the connection is gone.
            server.close(grace=0.2)
            await asyncio.wait_for(server.wait_closed(), 0.2 + config.linger_timeout + 2)
            writer.transport.abort()


async def test_answers_do_not_echo_unbounded_peer_input() -> None:
    async with running_server([EchoService()]) as (server, _):
        from .h2client import RawClient

        async with RawClient("127.0.0.1", server.sockets[0].getsockname()[1]) as client:
            path = "/x." + "\u00e9" * 3000 + "/z"
            response = await client.read_response(await client.request(path, b""))
    assert response.grpc_status == 12
    message = response.header(b"grpc-message")
    assert message is not None and len(message) < 400, len(message or b"")
    assert response.grpc_message is not None and response.grpc_message.startswith("Method not found: /x.")


async def test_a_client_cancelling_its_own_calls_keeps_its_connection() -> None:
    # Deadline-cancelled calls (each reset by the client once its handler runs) at 300 a second,
    # mixed with long calls on one connection: far past the rapid-reset budget of 1000 resets in
    # 10 s, yet every one of them cancels a call that was served, so none counts against it.
    from app_kit import Channel, GRPCError, Status

    from .test_client import methods

    async with running_server([EchoService()]) as (_, target), Channel(*target.rsplit(":", 1)) as channel:
        sleep = methods(channel)["Sleep"]
        first = await channel._connection()
        cancelled = 0

        async def impatient() -> None:
            nonlocal cancelled
            for _ in range(300):
                with pytest.raises(GRPCError) as info:
                    await sleep(DoubleValue(value=1.0), timeout=0.02)
                assert info.value.status is Status.DEADLINE_EXCEEDED
                cancelled += 1

        async def patient() -> None:
            for _ in range(5):
                assert (await sleep(DoubleValue(value=0.5), timeout=5)).value == 0.5

        await asyncio.wait_for(asyncio.gather(*(impatient() for _ in range(6)), patient(), patient()), 30)
        assert cancelled == 1800
        assert channel._protocol is first and not first.is_closed  # the same connection throughout


def _gzip_bomb_request(encoder: hpack.Encoder, stream_id: int, messages: int) -> bytes:
    """A request on /test.Sleeper/Hold: ``messages`` gzip messages of ~4 KiB that inflate to 4 MiB."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = bomb.compress(BytesValue(value=bytes(4 * MiB - 16)).SerializeToString()) + bomb.flush()
    block = request_block(encoder, path="/test.Sleeper/Hold", extra=[("grpc-encoding", "gzip")])
    body = (b"\x01" + len(payload).to_bytes(4, "big") + payload) * messages
    return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, body)


@pytest.mark.parametrize(("streams", "per_stream"), [(60, 1), (1, 60)])
async def test_gzip_bombs_are_inflated_on_demand_within_the_budget(
    server_process, streams: int, per_stream: int
) -> None:  # type: ignore[no-untyped-def]
    # 60 messages of ~4 KiB inflating to 4 MiB each: on 60 calls at once, or queued on one call
    # whose handler takes one every 0.5 s. Inflated as they arrived they cost ~244 MiB; inflated
    # when a handler takes them, and counted against max_connection_inflated_bytes (32 MiB) while
    # its call holds them, the calls over the budget get RESOURCE_EXHAUSTED instead: ~40 MiB at
    # the peak (the held messages, and one more being inflated and parsed), ~16 MiB for one call.
    pid = server_process.process.pid
    encoder = hpack.Encoder()
    attack = HANDSHAKE + b"".join(_gzip_bomb_request(encoder, 2 * n + 1, per_stream) for n in range(streams))
    reset_peak_rss(pid)
    rss_before = process_rss_bytes(pid)
    async with RawPeer(server_process.port) as peer:
        await peer.send(attack)
        await asyncio.sleep(1.5)
        peak = process_peak_rss_bytes(pid) - rss_before
        await _sleeper_call_succeeds(server_process.port)
        assert not peer.goaways, peer.goaways  # the connection itself is fine
        if streams > 1:  # each call answered: served, or over the budget
            statuses = list(peer.trailer_statuses().values())
            assert len(statuses) == streams and set(statuses) == {b"0", b"8"}, statuses
            assert statuses.count(b"0") >= 8  # the budget's worth of them was served
    print(f"gzip bombs {streams}x{per_stream}: peak RSS +{peak / MiB:.0f} MiB")
    assert peak < 48 * MiB, f"peak RSS grew by {peak / MiB:.0f} MiB"


@pytest.mark.parametrize(
    ("config", "fit"),
    [(Configuration(), 8), (Configuration(max_connection_inflated_bytes=8 * MiB), 2)],
    ids=["32", "8"],
)
async def test_calls_on_one_connection_hold_inflated_messages_up_to_the_budget(config: Configuration, fit: int) -> None:
    # gzip messages of the largest size (4 MiB), one per call on one connection, each held by
    # its handler: the default max_connection_inflated_bytes (32 MiB) holds 8 of them at once.
    # The next call to take one meanwhile is refused; once they are done, calls go on.
    from app_kit import Channel, GRPCError, Handler, Status
    from app_kit.aio.client import method_for
    from app_kit.rpc.handlers import Cardinality

    held: list[int] = []
    release = asyncio.Event()

    async def hold(stream):  # type: ignore[no-untyped-def]
        request = await stream.recv_message()
        held.append(len(request.value))
        await release.wait()
        await stream.send_message(BytesValue(value=b"done"))

    mapping = {"/t.H/Hold": Handler(hold, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}
    service = type("Hold", (), {"__mapping__": lambda self: mapping})()
    request = BytesValue(value=bytes(4 * MiB - 5))  # 4 MiB exactly, serialized
    assert request.ByteSize() == config.max_receive_message_length
    async with (
        running_server([service], config=config) as (_, target),
        Channel(*target.rsplit(":", 1), compression="gzip") as channel,
    ):
        call = method_for(channel, "/t.H/Hold", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        calls = [asyncio.create_task(call(request, timeout=10)) for _ in range(fit)]
        async with asyncio.timeout(5):
            while len(held) < fit:
                await asyncio.sleep(0.01)
        with pytest.raises(GRPCError) as refused:
            await call(request, timeout=5)
        assert refused.value.status is Status.RESOURCE_EXHAUSTED
        assert "over max_connection_inflated_bytes" in (refused.value.message or ""), refused.value.message
        release.set()
        assert [reply.value for reply in await asyncio.gather(*calls)] == [b"done"] * fit
        assert (await call(request, timeout=5)).value == b"done"  # the budget is free again
    assert held == [4 * MiB - 5] * (fit + 1)


async def test_rapid_reset_spread_over_many_connections_is_cut_off(server_process) -> None:  # type: ignore[no-untyped-def]
    # 25 connections x 800 rapid resets: each under max_resets_per_window (1000), together far
    # over max_resets_per_window_per_address (4000), which every connection from 127.0.0.1 shares.
    pid = server_process.process.pid
    cpu_before = process_cpu_seconds(pid)
    peers = [RawPeer(server_process.port) for _ in range(25)]
    for peer in peers:
        await peer.__aenter__()
    try:
        for peer in peers:
            await peer.send(flood("rapid reset", 800))
        await asyncio.sleep(1.0)
        cut = [peer for peer in peers if [g.additional_data for g in peer.goaways] == [b"flood"]]
        await _sleeper_call_succeeds(server_process.port)  # a new connection is served meanwhile
    finally:
        for peer in peers:
            await peer.__aexit__(None, None, None)
    assert len(cut) >= 19, f"only {len(cut)} of 25 connections were cut off"
    assert process_cpu_seconds(pid) - cpu_before < 2.5


async def test_a_reset_that_arrives_after_the_answer_is_not_a_rapid_reset() -> None:
    # A client's deadline and the server's fire together: the server answers DEADLINE_EXCEEDED
    # while the client's RST_STREAM CANCEL is on its way, and it arrives for a stream the server
    # had finished. Such late resets were counted as rapid resets, never forgiven: a client with
    # short deadlines lost its connection ("flood") on a loaded CI run. Each finished stream
    # licenses one late reset; resets for streams never opened still count.
    config = Configuration(max_resets_per_window=50)
    async with running_server([EchoService()], config=config) as (_, target):
        port = int(target.rsplit(":", 1)[1])
        encoder = hpack.Encoder()
        async with RawPeer(port) as peer:
            await peer.send(HANDSHAKE)
            for stream_id in range(1, 2 * 120, 2):  # 120 calls, each answered, then reset
                request = frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, "/test.Echo/Unary"))
                body = frame(DATA, END_STREAM, stream_id, b"\x00\x00\x00\x00\x02\x0a\x00")
                await peer.send(request + body)
                for _ in range(200):
                    if stream_id in peer.trailer_statuses():
                        break
                    await asyncio.sleep(0.005)
                assert peer.trailer_statuses().get(stream_id) == b"0"
                await peer.send(frame(RST_STREAM, 0, stream_id, (8).to_bytes(4, "big")))  # CANCEL
            await asyncio.sleep(0.1)
            assert not peer.goaways and not peer.closed.is_set()
            # Resets of streams that never were still count: over the budget, cut off.
            await peer.send(b"".join(frame(RST_STREAM, 0, 2 * n + 1001, (8).to_bytes(4, "big")) for n in range(60)))
            await peer.wait_closed()
            assert peer.goaways and peer.goaways[0].error_code == 0xB
