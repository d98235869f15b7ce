"""Session 15: a fresh-eyes review of the client (``Channel`` and its calls) against hostile and
broken servers: raw HTTP/2 servers speaking hand-built frames over real sockets (and through
tests/relay.py's segmenting relay), as a third-party server or proxy might.

What must hold: every call ends with a status on every path, by its deadline (and without one,
once the connection is dead or the server breaks the protocol); nothing but GRPCError reaches
the caller; what the client holds per connection stays bounded; one bad stream costs its own
call only, and a connection error costs only the calls on that connection.

Three defects it found are fixed (the tests at the end of the file failed before):

- frames the client must send in answer to the server's (PING ACKs; RST_STREAM STREAM_CLOSED for
  each frame on a stream the server reset) queue without bound while the server does not
  read: its memory grew with what the server sends (the second kind under no flood limit);
- the client's TLS handshake was not bounded by ``handshake_timeout``, as documented;
- a response whose content-type only begins with ``application/grpc`` (``application/grpc-web``,
  ``application/grpcx``) was taken for gRPC.

The other tests are regression guards for behaviour found correct: some cases overlap earlier
reviews' (session 12's resets and malformed trailers), here all on one connection at once, under
a call that must survive them, through the relay; the rest (keepalive on a dead server, bounded
inflation and buffering, the connection errors' GOAWAY codes, floods under and over the limits,
GOAWAY ids raised, refusals without end, HPACK table sizes) are new.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import socket
import struct
import termios
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, Status
from app_kit.aio.client import ClientProtocol, method_for

from .frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    PREFACE,
    PRIORITY,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)
from .relay import segmenting_relay

pytestmark = pytest.mark.anyio

C = Cardinality
MiB = 1024 * 1024
PUSH_PROMISE, ACK = 5, 0x1
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
REPLY = BytesValue(value=b"hi")
# RST_STREAM / GOAWAY error codes
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0, 1, 2, 3, 6
STREAM_CLOSED, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM, INADEQUATE_SECURITY = 5, 7, 8, 9, 11, 12


def prefixed(payload: bytes, flag: int = 0) -> bytes:
    """One gRPC message: its 5-byte prefix, then ``payload``."""
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


@functools.cache
def gzip_bomb(inflated: int = 64 * MiB) -> bytes:
    """~64 KiB of gzip that inflates to ``inflated`` zero bytes (made a MiB at a time)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(MiB)
    parts = [compressor.compress(chunk) for _ in range(inflated // MiB)]
    return b"".join(parts) + compressor.flush()


def setting(code: int, value: int) -> bytes:
    return code.to_bytes(2, "big") + value.to_bytes(4, "big")


# -- a raw HTTP/2 server, scripted per connection -----------------------------------------------


class Peer:
    """The server's end of one connection: every frame the client sends is parsed and kept
    (its SETTINGS acknowledged, its PINGs too unless ``answer_pings`` is False; its request
    heads decoded, in order, with ``decoder``); the script writes whatever bytes it likes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, answer_pings: bool) -> None:
        self.reader, self.writer = reader, writer
        self.answer_pings = answer_pings
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.seen: list[Frame] = []
        self.requests: asyncio.Queue[tuple[int, dict[bytes, bytes]] | None] = asyncio.Queue()
        self.request_count = 0
        self.settings_acked = 0
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
                    self._take(parsed)
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                buffer += chunk
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.requests.put_nowait(None)

    def _take(self, parsed: Frame) -> None:
        self.seen.append(parsed)
        if isinstance(parsed, SettingsFrame):
            if "ACK" in parsed.flags:
                self.settings_acked += 1
            else:
                self.write(frame(SETTINGS, ACK, 0))
        elif isinstance(parsed, PingFrame) and "ACK" not in parsed.flags and self.answer_pings:
            self.write(frame(PING, ACK, 0, parsed.opaque_data))
        elif isinstance(parsed, HeadersFrame):
            fields = dict(self.decoder.decode(parsed.data, raw=True))
            self.request_count += 1
            self.requests.put_nowait((parsed.stream_id, fields))

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def request(self) -> tuple[int, dict[bytes, bytes]]:
        """The next request's stream id and header fields (ConnectionError once the client left)."""
        got = await self.requests.get()
        if got is None:
            self.requests.put_nowait(None)
            raise ConnectionError("the client closed the connection")
        return got

    def headers(self, stream_id: int, fields: list[tuple[bytes, bytes]], end: bool = False) -> None:
        self.write(frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream_id, self.encoder.encode(fields)))

    def data(self, stream_id: int, payload: bytes, end: bool = False) -> None:
        self.write(frame(DATA, END_STREAM if end else 0, stream_id, payload))

    def message(self, stream_id: int, payload: bytes = b"", flag: int = 0) -> None:
        self.data(stream_id, prefixed(payload, flag))

    def trailers(self, stream_id: int, fields: list[tuple[bytes, bytes]] | None = None) -> None:
        self.headers(stream_id, fields if fields is not None else [(b"grpc-status", b"0")], end=True)

    def answer(self, stream_id: int, reply: BytesValue = REPLY) -> None:
        self.headers(stream_id, RESPONSE)
        self.message(stream_id, reply.SerializeToString())
        self.trailers(stream_id)

    def reset(self, stream_id: int, code: int) -> None:
        self.write(frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big")))

    def goaway(self, last_stream_id: int, code: int = NO_ERROR) -> None:
        self.write(frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big")))

    def goaways(self) -> list[GoAwayFrame]:
        """The client's GOAWAY frames so far."""
        return [f for f in self.seen if isinstance(f, GoAwayFrame)]


Script = Callable[[Peer, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(
    script: Script, *, answer_pings: bool = True, settings: bytes = b""
) -> AsyncIterator[tuple[int, list[Peer]]]:
    """Serve ``script(peer, connection_number)`` on each connection (its SETTINGS, carrying
    ``settings``, go out as it accepts); yield the port and the peers so far."""
    peers: list[Peer] = []
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer, answer_pings=answer_pings)
        peers.append(peer)
        peer.write(frame(SETTINGS, 0, 0, settings))
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


async def answer_every_call(peer: Peer) -> None:
    while True:
        stream_id, _ = await peer.request()
        peer.answer(stream_id)


def unary(channel: Channel, path: str = "/t.S/M") -> Any:
    return method_for(channel, path, C.UNARY_UNARY, BytesValue, BytesValue)


def server_streaming(channel: Channel, path: str = "/t.S/M") -> Any:
    return method_for(channel, path, C.UNARY_STREAM, BytesValue, BytesValue)


async def ended(awaitable: Awaitable[Any], timeout: float = 5.0) -> tuple[Status | str, str | None, float]:
    """How a call ended: its status ("OK" if it returned), message and how long it took. Any
    exception but GRPCError is raised; a call still running after ``timeout`` fails the test."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(awaitable, timeout)
    except GRPCError as exc:
        assert not exc.details, exc.details  # nothing here sends valid details
        return exc.status, exc.message, time.monotonic() - started
    except TimeoutError:
        pytest.fail(f"the call did not end (nothing after {timeout} s)")
    return "OK", None, time.monotonic() - started


async def until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)


def connection_of(channel: Channel) -> ClientProtocol:
    protocol = channel._protocol
    assert protocol is not None
    return protocol


# -- a response left open --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["deadline", "keepalive", "keepalive, mid-message", "server half-closes TCP", "server resets TCP"]
)
async def test_a_response_that_never_ends_ends_by_deadline_keepalive_or_the_connections_end(case: str) -> None:
    # Headers and a reply (or half a reply), then no trailers: the call ends at its deadline;
    # without one, when keepalive finds the server dead (it no longer answers PINGs), or at
    # once when the server closes or resets the connection.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, RESPONSE)
        if case.endswith("mid-message"):
            peer.data(stream_id, b"\x00\x00\x00\x00\x10half")
        else:
            peer.message(stream_id, REPLY.SerializeToString())
        await asyncio.sleep(0.05)
        if case == "server half-closes TCP":
            peer.writer.write_eof()
        elif case == "server resets TCP":
            peer.writer.transport.abort()

    config = Configuration(keepalive_time=0.2, keepalive_timeout=0.2) if case.startswith("keepalive") else None
    timeout = 0.3 if case == "deadline" else None
    async with (
        raw_server(script, answer_pings=not case.startswith("keepalive")) as (port, _),
        Channel("127.0.0.1", port, config=config) as channel,
    ):
        status, message, elapsed = await ended(unary(channel)(BytesValue(), timeout=timeout))
    expected = Status.DEADLINE_EXCEEDED if case == "deadline" else Status.UNAVAILABLE
    assert status is expected, (status, message)
    if case.startswith("keepalive"):
        assert "keepalive" in (message or ""), message
    assert elapsed < 1.5, elapsed


async def test_keepalive_keeps_a_slow_call_to_a_server_that_answers_its_pings() -> None:
    # The other side of the above: a server that is slow but alive (it answers the PINGs) keeps
    # its call, however long it takes; keepalive did probe it meanwhile.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, RESPONSE)
        peer.message(stream_id, REPLY.SerializeToString())
        await asyncio.sleep(1.0)
        peer.trailers(stream_id)

    config = Configuration(keepalive_time=0.15, keepalive_timeout=0.3)
    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port, config=config) as channel:
        status, message, _ = await ended(unary(channel)(BytesValue()))
        assert status == "OK", (status, message)
        pings = [f for f in peers[0].seen if isinstance(f, PingFrame) and "ACK" not in f.flags]
        assert len(pings) >= 2, pings


# -- one bad stream costs its own call only --------------------------------------------------------


@dataclass(frozen=True)
class Case:
    act: Callable[[Peer, int], Awaitable[None]]
    status: Status | str  # "OK": the call returns
    says: str | None = None  # in the status message
    timeout: float = 3.0


def acting(fn: Callable[[Peer, int], None]) -> Callable[[Peer, int], Awaitable[None]]:
    async def act(peer: Peer, stream_id: int) -> None:
        fn(peer, stream_id)

    return act


def heads(fields: list[tuple[bytes, bytes]], *, end: bool = False) -> Callable[[Peer, int], Awaitable[None]]:
    """Response headers ``fields``; unless they end the stream, a reply and an OK status after."""

    def act(peer: Peer, stream_id: int) -> None:
        peer.headers(stream_id, fields, end=end)
        if not end:
            peer.message(stream_id, REPLY.SerializeToString())
            peer.trailers(stream_id)

    return acting(act)


def body(
    fields: list[tuple[bytes, bytes]], *data: bytes, trailers: bool = True
) -> Callable[[Peer, int], Awaitable[None]]:
    """Response headers ``fields``, DATA frames ``data`` as given, then an OK status."""

    def act(peer: Peer, stream_id: int) -> None:
        peer.headers(stream_id, fields)
        for payload in data:
            peer.data(stream_id, payload)
        if trailers:
            peer.trailers(stream_id)

    return acting(act)


def reset(
    code: int, *, after_headers: bool = True, half_message: bool = False, reply: bool = False
) -> Callable[[Peer, int], Awaitable[None]]:
    def act(peer: Peer, stream_id: int) -> None:
        if after_headers:
            peer.headers(stream_id, RESPONSE)
        if half_message:
            peer.data(stream_id, b"\x00\x00\x00\x00\x10half")
        if reply:
            peer.message(stream_id, REPLY_BYTES)
        peer.reset(stream_id, code)

    return acting(act)


def html_page(status: bytes) -> Callable[[Peer, int], Awaitable[None]]:
    def act(peer: Peer, stream_id: int) -> None:
        peer.headers(stream_id, [(b":status", status), (b"content-type", b"text/html")])
        peer.data(stream_id, b"<html><body>Bad Gateway</body></html>", end=True)

    return acting(act)


def ends_on_data(peer: Peer, stream_id: int) -> None:
    peer.headers(stream_id, RESPONSE)
    peer.data(stream_id, prefixed(REPLY_BYTES), end=True)


def data_after_the_status(peer: Peer, stream_id: int) -> None:
    peer.answer(stream_id)
    peer.message(stream_id, REPLY_BYTES)


async def dribbled_oversized_message(peer: Peer, stream_id: int) -> None:
    peer.headers(stream_id, RESPONSE)
    peer.data(stream_id, b"\x00" + (5 * MiB).to_bytes(4, "big"))
    for _ in range(3):
        await asyncio.sleep(0.01)
        peer.data(stream_id, b"x")


def frames_after_its_own_reset(peer: Peer, stream_id: int) -> None:
    peer.headers(stream_id, RESPONSE)
    peer.reset(stream_id, CANCEL)
    peer.message(stream_id, REPLY.SerializeToString())
    peer.trailers(stream_id)


GZIP = [*RESPONSE, (b"grpc-encoding", b"gzip")]
REPLY_BYTES = REPLY.SerializeToString()

CASES: dict[str, Case] = {
    # response heads
    # Malformed (RFC 9113 §8.3.2): a stream error, INTERNAL as grpc-go says (it was UNKNOWN).
    "no :status": Case(heads([(b"content-type", b"application/grpc")]), Status.INTERNAL, "no :status pseudo-header"),
    "HTTP status 2000": Case(heads([(b":status", b"2000")], end=True), Status.UNKNOWN, "HTTP status"),
    "HTTP 502 with an HTML body": Case(html_page(b"502"), Status.UNAVAILABLE, "HTTP status 502"),
    "HTTP 200 text/html with a body": Case(html_page(b"200"), Status.UNKNOWN, "content-type"),
    "metadata name not ASCII": Case(
        heads([*RESPONSE, (b"x-\xff", b"1")]), Status.INTERNAL, "malformed response from the server: invalid field"
    ),
    "-bin metadata not base64": Case(heads([*RESPONSE, (b"x-b-bin", b"!!!!")]), Status.INTERNAL, "not valid base64"),
    "grpc-status of 5,000 digits": Case(heads([*RESPONSE, (b"grpc-status", b"9" * 5000)], end=True), Status.UNKNOWN),
    "9 KB of grpc-status-details-bin that is no Status": Case(
        heads(
            [*RESPONSE, (b"grpc-status", b"3"), (b"grpc-status-details-bin", base64.b64encode(b"\xff" * 9000))],
            end=True,
        ),
        Status.INVALID_ARGUMENT,
    ),
    "grpc-message badly percent-encoded": Case(
        heads([*RESPONSE, (b"grpc-status", b"5"), (b"grpc-message", b"%%%4%zz%e2%28")], end=True), Status.NOT_FOUND
    ),
    "response metadata over the advertised limit": Case(
        heads([*RESPONSE, (b"x-big", b"b" * (20 * 1024))]), Status.RESOURCE_EXHAUSTED, "header list"
    ),
    "1xx, then nothing": Case(
        acting(lambda p, s: p.headers(s, [(b":status", b"103")])), Status.DEADLINE_EXCEEDED, None, 0.3
    ),
    # messages
    "4 GiB length prefix": Case(body(RESPONSE, b"\x00\xff\xff\xff\xff"), Status.RESOURCE_EXHAUSTED, "larger than max"),
    "5 MiB length prefix, then dribbled": Case(
        dribbled_oversized_message, Status.RESOURCE_EXHAUSTED, "larger than max"
    ),
    "compressed flag without grpc-encoding": Case(
        body(RESPONSE, prefixed(gzip(REPLY_BYTES), 1)), Status.INTERNAL, "grpc-encoding"
    ),
    "compressed flag 2": Case(body(RESPONSE, prefixed(REPLY_BYTES, 2)), Status.INTERNAL, "flag"),
    "unregistered grpc-encoding": Case(
        body([*RESPONSE, (b"grpc-encoding", b"snappy")], prefixed(b"xyz", 1)), Status.INTERNAL, "snappy"
    ),
    "corrupt gzip": Case(body(GZIP, prefixed(b"\x1f\x8b\x08junkjunk", 1)), Status.INTERNAL, "gzip"),
    "gzip of 64 KiB inflating to 64 MiB": Case(
        body(GZIP, prefixed(gzip_bomb(), 1)), Status.RESOURCE_EXHAUSTED, "larger than max"
    ),
    "trailers in the middle of a message": Case(
        body(RESPONSE, b"\x00\x00\x00\x00\x10half"), Status.INTERNAL, "middle of a message"
    ),
    "END_STREAM on DATA, no trailers": Case(acting(ends_on_data), Status.INTERNAL, "without sending trailers"),
    "two replies to a unary call": Case(
        body(RESPONSE, prefixed(REPLY_BYTES), prefixed(REPLY_BYTES)), Status.INTERNAL, "cardinality"
    ),
    "a reply that does not decode": Case(body(RESPONSE, prefixed(b"\xff\xff\xff")), Status.INTERNAL, "decode"),
    # resets (PROTOCOL-HTTP2.md's mapping)
    "REFUSED_STREAM on every attempt": Case(reset(REFUSED_STREAM, after_headers=False), Status.UNAVAILABLE),
    "NO_ERROR after the reply, before the status": Case(reset(NO_ERROR, reply=True), Status.INTERNAL),
    "CANCEL mid-message": Case(reset(CANCEL, half_message=True), Status.CANCELLED),
    "ENHANCE_YOUR_CALM": Case(reset(ENHANCE_YOUR_CALM), Status.RESOURCE_EXHAUSTED),
    "INADEQUATE_SECURITY before headers": Case(
        reset(INADEQUATE_SECURITY, after_headers=False), Status.PERMISSION_DENIED
    ),
    "INTERNAL_ERROR mid-message": Case(reset(INTERNAL_ERROR, half_message=True), Status.INTERNAL),
    "an error code of its own": Case(reset(0xDEAD), Status.INTERNAL),
    "frames after its own RST_STREAM": Case(acting(frames_after_its_own_reset), Status.CANCELLED),
    # (RFC 9113 §5.1 allows a connection error; the client resets that stream alone, STREAM_CLOSED)
    "DATA after the status": Case(acting(data_after_the_status), "OK"),
}


async def test_each_hostile_response_fails_its_own_call_and_no_other_through_a_segmenting_relay() -> None:
    # One connection, through the relay: a server-streaming call runs throughout, and after each
    # bad response the server sends it a reply naming the case. Every bad call ends with the
    # status gRPC gives it; the long call gets every reply and ends OK; the connection stays.
    async def script(peer: Peer, number: int) -> None:
        long_call = 0
        while True:
            stream_id, fields = await peer.request()
            path = fields[b":path"]
            if path == b"/t.S/Long":
                long_call = stream_id
                peer.headers(stream_id, RESPONSE)
            elif path == b"/t.S/End":
                peer.answer(stream_id)
                peer.trailers(long_call)
            else:
                name = fields[b"x-case"].decode()
                await CASES[name].act(peer, stream_id)
                peer.message(long_call, BytesValue(value=name.encode()).SerializeToString())

    received: list[str] = []
    async with (
        raw_server(script) as (port, peers),
        segmenting_relay("127.0.0.1", port) as relay_port,
        Channel("127.0.0.1", relay_port) as channel,
    ):

        async def long_call() -> None:
            async for reply in server_streaming(channel, "/t.S/Long")(BytesValue(), timeout=20):
                received.append(reply.value.decode())

        long_task = asyncio.ensure_future(long_call())
        try:
            for name, case in CASES.items():
                call = unary(channel)(BytesValue(), timeout=case.timeout, metadata=[("x-case", name)])
                status, message, _ = await ended(call)
                assert status == case.status, (name, status, message)
                if case.says is not None:
                    assert case.says in (message or ""), (name, message)
                await until(lambda name=name: bool(received) and received[-1] == name, what=f"{name}: long call")  # type: ignore[misc]
            assert await unary(channel, "/t.S/End")(BytesValue(), timeout=3) == REPLY
            await asyncio.wait_for(long_task, 3)
        finally:
            long_task.cancel()
        assert list(dict.fromkeys(received)) == list(CASES)
        assert len(peers) == 1 and not peers[0].goaways(), "a bad stream cost the connection"


# -- memory stays bounded --------------------------------------------------------------------------


async def test_compressed_replies_are_inflated_within_bounds() -> None:
    # A gzip bomb (64 KiB inflating to 64 MiB), and a stream of 20 replies each inflating to
    # nearly 4 MiB (80 MiB in all, read one at a time): what Python allocates stays a few
    # times max_receive_message_length (traced by tracemalloc), not what the server chose.
    almost_4_mib = BytesValue(value=bytes(4 * MiB - 16)).SerializeToString()
    big = gzip(almost_4_mib)

    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, GZIP)
        peer.message(stream_id, gzip_bomb(), flag=1)
        peer.trailers(stream_id)
        stream_id, _ = await peer.request()
        peer.headers(stream_id, GZIP)
        for _ in range(20):
            peer.message(stream_id, big, flag=1)
        peer.trailers(stream_id)

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        gzip_bomb()  # (made before tracing)
        tracemalloc.start()
        try:
            status, message, _ = await ended(unary(channel)(BytesValue(), timeout=5))
            assert status is Status.RESOURCE_EXHAUSTED, (status, message)
            bomb_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            count = 0
            async for reply in server_streaming(channel)(BytesValue(), timeout=10):
                assert len(reply.value) == 4 * MiB - 16
                count += 1
                del reply
            stream_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert count == 20
    assert bomb_peak < 16 * MiB, bomb_peak
    assert stream_peak < 32 * MiB, stream_peak


async def test_incomplete_and_unread_replies_are_bounded_per_connection() -> None:
    # Three calls each sent 3 MiB of a 4 MiB reply (never finished), against a connection
    # budget of 6 MiB: those that would go over fail RESOURCE_EXHAUSTED. Then a reply stream
    # of 200,000 empty messages the caller does not read: it fails when what they cost passes
    # the budget (flow control counts bytes, not messages). The connection serves on.
    config = Configuration(max_connection_receive_buffer=6 * MiB)
    incomplete = b"\x00" + (4 * MiB).to_bytes(4, "big") + bytes(3 * MiB)

    async def script(peer: Peer, number: int) -> None:
        for _ in range(3):
            stream_id, _ = await peer.request()
            peer.headers(stream_id, RESPONSE)
            for offset in range(0, len(incomplete), 256 * 1024):
                peer.data(stream_id, incomplete[offset : offset + 256 * 1024])
            await asyncio.sleep(0.05)
        stream_id, _ = await peer.request()
        peer.headers(stream_id, RESPONSE)
        empties = bytes(5) * 3000
        for _ in range(65):  # just under the stream's 1 MiB window
            peer.data(stream_id, empties)
        await answer_every_call(peer)

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port, config=config) as channel:
        calls = []
        for _ in range(3):
            calls.append(asyncio.ensure_future(ended(unary(channel)(BytesValue(), timeout=1.5))))
            await asyncio.sleep(0.02)
        statuses = [(await call)[0] for call in calls]
        assert statuses == [Status.DEADLINE_EXCEEDED, Status.RESOURCE_EXHAUSTED, Status.RESOURCE_EXHAUSTED]
        async with channel.request("/t.S/M", C.UNARY_STREAM, BytesValue, BytesValue, timeout=5) as call:
            await call.send_message(BytesValue(), end=True)
            await call.recv_initial_metadata()
            await until(lambda: call.status is not None, what="the unread replies' call ending")
            assert call.status is Status.RESOURCE_EXHAUSTED, call.status_message
            assert "unread" in (call.status_message or "")
        assert await unary(channel)(BytesValue(), timeout=3) == REPLY
        assert len(peers) == 1


# -- connection errors: the connection's calls end at once, the next call gets a new one ---------


def _setting_frame(code: int, value: int) -> Callable[[Peer, int], bytes]:
    return lambda peer, sid: frame(SETTINGS, 0, 0, setting(code, value))


PUSH_BLOCK = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"x")]
VIOLATIONS: dict[str, tuple[Callable[[Peer, int], bytes], int]] = {
    "SETTINGS x101": (lambda p, s: frame(SETTINGS, 0, 0, setting(3, 100)) * 101, ENHANCE_YOUR_CALM),
    "empty DATA x1001": (lambda p, s: frame(DATA, 0, s) * 1001, ENHANCE_YOUR_CALM),
    "frames of an unknown type x1001": (lambda p, s: frame(0x20, 0, 0) * 1001, ENHANCE_YOUR_CALM),
    "PRIORITY x1001": (lambda p, s: frame(PRIORITY, 0, s, b"\x00\x00\x00\x00\x10") * 1001, ENHANCE_YOUR_CALM),
    "PING ACKs answering nothing x1001": (lambda p, s: frame(PING, ACK, 0, bytes(8)) * 1001, ENHANCE_YOUR_CALM),
    "a header block in 64 CONTINUATION frames": (
        lambda p, s: frame(HEADERS, 0, s, p.encoder.encode([(b"grpc-status", b"0")])) + frame(CONTINUATION, 0, s) * 64,
        ENHANCE_YOUR_CALM,
    ),
    "a header block over 32 KiB": (
        lambda p, s: frame(HEADERS, 0, s) + frame(CONTINUATION, 0, s, bytes(16384)) * 3,
        ENHANCE_YOUR_CALM,
    ),
    "a frame over SETTINGS_MAX_FRAME_SIZE (its header only)": (
        lambda p, s: (MiB + 1).to_bytes(3, "big") + bytes([DATA, 0]) + s.to_bytes(4, "big"),
        FRAME_SIZE_ERROR,
    ),
    "PUSH_PROMISE": (
        lambda p, s: frame(PUSH_PROMISE, END_HEADERS, s, (2).to_bytes(4, "big") + p.encoder.encode(PUSH_BLOCK)),
        PROTOCOL_ERROR,
    ),
    "SETTINGS_ENABLE_PUSH 1": (_setting_frame(2, 1), PROTOCOL_ERROR),
    "SETTINGS_INITIAL_WINDOW_SIZE 2^31": (_setting_frame(4, 2**31), FLOW_CONTROL_ERROR),
    "SETTINGS_MAX_FRAME_SIZE 100": (_setting_frame(5, 100), PROTOCOL_ERROR),
    "connection window past 2^31-1": (
        lambda p, s: frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")),
        FLOW_CONTROL_ERROR,
    ),
    "WINDOW_UPDATE on an idle stream": (
        lambda p, s: frame(WINDOW_UPDATE, 0, s + 2, (1).to_bytes(4, "big")),
        PROTOCOL_ERROR,
    ),
    "RST_STREAM on stream 0": (lambda p, s: frame(RST_STREAM, 0, 0, bytes(4)), PROTOCOL_ERROR),
    "DATA on a stream the server would open": (lambda p, s: frame(DATA, 0, 2, b"x"), PROTOCOL_ERROR),
    "HEADERS after END_STREAM": (
        lambda p, s: (
            frame(HEADERS, END_HEADERS | END_STREAM, s, p.encoder.encode([*RESPONSE, (b"grpc-status", b"0")]))
            + frame(HEADERS, END_HEADERS | END_STREAM, s, p.encoder.encode([(b"grpc-status", b"0")]))
        ),
        STREAM_CLOSED,
    ),
    "an undecodable header block": (
        lambda p, s: frame(HEADERS, END_HEADERS, s, b"\xff\xff\xff\xff\xff"),
        COMPRESSION_ERROR,
    ),
    "an HPACK table size update past SETTINGS_HEADER_TABLE_SIZE": (
        lambda p, s: frame(HEADERS, END_HEADERS, s, b"\x3f\xe1\x7f"),
        COMPRESSION_ERROR,
    ),
}


@pytest.mark.parametrize("violation", list(VIOLATIONS))
async def test_a_connection_error_ends_its_calls_at_once_and_the_next_call_gets_a_new_connection(
    violation: str,
) -> None:
    # A call in progress (A) and a second one (B) whose stream the violation is on: A, which
    # has no deadline, ends UNAVAILABLE at once; B ends too; the client says GOAWAY with the
    # right code; the next call goes to a new connection. Nothing but GRPCError is raised.
    build, code = VIOLATIONS[violation]

    async def script(peer: Peer, number: int) -> None:
        if number > 1:
            await answer_every_call(peer)
        first, _ = await peer.request()
        peer.headers(first, RESPONSE)
        peer.message(first, REPLY_BYTES)
        second, _ = await peer.request()
        peer.write(build(peer, second))

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port) as channel:
        call_a = asyncio.ensure_future(ended(server_streaming(channel)(BytesValue())))
        await until(lambda: bool(peers) and peers[0].request_count == 1, what="call A placed")
        call_b = asyncio.ensure_future(ended(unary(channel)(BytesValue())))
        status, message, elapsed = await call_a
        assert status is Status.UNAVAILABLE and "connection closed" in (message or ""), (status, message)
        assert elapsed < 2.0
        await call_b
        await until(lambda: bool(peers[0].goaways()), what="the client's GOAWAY")
        assert peers[0].goaways()[0].error_code == code, peers[0].goaways()
        assert await unary(channel)(BytesValue(), timeout=3) == REPLY
        assert len(peers) == 2


async def test_noise_under_the_flood_limits_harms_no_call() -> None:
    # 5,000 PINGs (each answered), 90 SETTINGS, 400 WINDOW_UPDATEs and 400 PRIORITY frames
    # in the middle of a reply stream: under every limit, so the call goes on and ends OK.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, RESPONSE)
        peer.message(stream_id, REPLY_BYTES)
        peer.write(b"".join(frame(PING, 0, 0, index.to_bytes(8, "big")) for index in range(5000)))
        peer.write(frame(SETTINGS, 0, 0, setting(3, 100)) * 90)
        peer.write(frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big")) * 400)
        peer.write(frame(PRIORITY, 0, stream_id, b"\x00\x00\x00\x00\x10") * 400)
        peer.message(stream_id, REPLY_BYTES)
        peer.trailers(stream_id)

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port) as channel:
        replies = await asyncio.wait_for(server_streaming(channel)(BytesValue()), 5)
        assert replies == [REPLY, REPLY]
        await until(
            lambda: sum(isinstance(f, PingFrame) and "ACK" in f.flags for f in peers[0].seen) == 5000,
            what="every PING answered",
        )
        assert not peers[0].goaways()


# -- GOAWAY and REFUSED_STREAM games ---------------------------------------------------------------


async def test_goaway_raised_and_repeated_finishes_the_calls_it_covers_and_retries_the_others() -> None:
    # GOAWAY(last 1) with streams 1 and 3 open: 3 is retried, transparently, on a new connection.
    # Then GOAWAYs with ids above the first (RFC 9113 forbids raising it) and 50 repeats: stream 1
    # still finishes OK; the old connection closes once idle; later calls use the new one.
    async def script(peer: Peer, number: int) -> None:
        if number > 1:
            await answer_every_call(peer)
        first, _ = await peer.request()
        await peer.request()
        peer.headers(first, RESPONSE)
        peer.goaway(1)
        await asyncio.sleep(0.1)
        for last in (101, 2**31 - 1, *([1] * 50)):
            peer.goaway(last)
        await asyncio.sleep(0.1)
        peer.message(first, REPLY_BYTES)
        peer.trailers(first)

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port) as channel:
        call_1 = asyncio.ensure_future(ended(unary(channel)(BytesValue())))
        await until(lambda: bool(peers) and peers[0].request_count == 1, what="call 1 placed")
        call_3 = asyncio.ensure_future(ended(unary(channel)(BytesValue())))
        assert (await call_3)[0] == "OK"
        assert (await call_1)[0] == "OK"
        await asyncio.wait_for(peers[0].closed.wait(), 3)
        assert await unary(channel)(BytesValue(), timeout=3) == REPLY
        assert len(peers) == 2
        assert not peers[0].goaways() or peers[0].goaways()[0].error_code == NO_ERROR


@pytest.mark.parametrize("refusal", ["REFUSED_STREAM", "GOAWAY last-stream-id 0", "GOAWAY INTERNAL_ERROR, id 0"])
@pytest.mark.parametrize("times", ["once", "always"])
async def test_a_refused_call_is_retried_transparently_a_bounded_number_of_times(refusal: str, times: str) -> None:
    # Refused once, the call is sent again and succeeds; refused every time, it ends UNAVAILABLE
    # after max_transparent_retries more attempts (no loop, no hang).
    attempts: list[int] = []

    async def script(peer: Peer, number: int) -> None:
        while True:
            stream_id, _ = await peer.request()
            attempts.append(stream_id)
            if times == "once" and len(attempts) > 1:
                peer.answer(stream_id)
            elif refusal == "REFUSED_STREAM":
                peer.reset(stream_id, REFUSED_STREAM)
            else:
                peer.goaway(0, INTERNAL_ERROR if "INTERNAL" in refusal else NO_ERROR)

    config = Configuration(max_transparent_retries=3)
    async with raw_server(script) as (port, _), Channel("127.0.0.1", port, config=config) as channel:
        status, message, elapsed = await ended(unary(channel)(BytesValue()))
    if times == "once":
        assert status == "OK" and len(attempts) == 2, (status, message, attempts)
    else:
        assert status is Status.UNAVAILABLE and len(attempts) == 4, (status, message, attempts)
    assert elapsed < 2.0


# -- the connection lost mid-frame -----------------------------------------------------------------


@pytest.mark.parametrize(
    "cut", ["in a frame header", "in a HEADERS payload", "in a DATA payload", "after a DATA frame's header", "TCP RST"]
)
async def test_a_connection_lost_mid_frame_ends_its_calls_at_once(cut: str) -> None:
    async def script(peer: Peer, number: int) -> None:
        if number > 1:
            await answer_every_call(peer)
        stream_id, _ = await peer.request()
        head = frame(HEADERS, END_HEADERS, stream_id, peer.encoder.encode(RESPONSE))
        data = frame(DATA, 0, stream_id, prefixed(REPLY_BYTES))
        peer.write(
            {
                "in a frame header": head[:5],
                "in a HEADERS payload": head[:11],
                "in a DATA payload": head + data[:12],
                "after a DATA frame's header": head + data[:9],
                "TCP RST": head + data,
            }[cut]
        )
        await asyncio.sleep(0.05)
        if cut == "TCP RST":
            peer.writer.transport.abort()
        else:
            peer.writer.close()

    async with raw_server(script) as (port, peers), Channel("127.0.0.1", port) as channel:
        status, message, elapsed = await ended(server_streaming(channel)(BytesValue()))
        assert status is Status.UNAVAILABLE, (status, message)
        assert elapsed < 1.0
        assert await unary(channel)(BytesValue(), timeout=3) == REPLY
        assert len(peers) == 2


# -- HPACK: the table size the server allows -------------------------------------------------------


@pytest.mark.parametrize(("initial", "later"), [(0, None), (64, None), (4096, 0), (100, 50)])
async def test_request_heads_keep_to_the_servers_header_table_size(initial: int, later: int | None) -> None:
    # The server's SETTINGS_HEADER_TABLE_SIZE, at first and lowered mid-connection: every request
    # head decodes with a decoder that allows no more (the client sent the size update first).
    heads_seen: list[tuple[bytes, bytes, int]] = []

    async def script(peer: Peer, number: int) -> None:
        peer.decoder.max_allowed_table_size = initial
        limit = initial
        while True:
            stream_id, fields = await peer.request()
            heads_seen.append((fields[b":path"], fields.get(b"x-n", b""), peer.decoder.header_table_size))
            assert peer.decoder.header_table_size <= limit
            if len(heads_seen) == 2 and later is not None:
                acked = peer.settings_acked
                peer.write(frame(SETTINGS, 0, 0, setting(1, later)))
                await until(lambda acked=acked: peer.settings_acked > acked, what="SETTINGS ACK")  # type: ignore[misc]
                peer.decoder.max_allowed_table_size = limit = later
            peer.answer(stream_id)

    async with (
        raw_server(script, settings=setting(1, initial)) as (port, peers),
        Channel("127.0.0.1", port) as channel,
    ):
        for index in range(5):
            reply = await unary(channel)(BytesValue(), timeout=3, metadata=[("x-n", str(index))])
            assert reply == REPLY
        assert [(path, n) for path, n, _ in heads_seen] == [(b"/t.S/M", str(i).encode()) for i in range(5)]
        assert heads_seen[-1][2] <= (later if later is not None else initial)
        assert len(peers) == 1


# -- defects ---------------------------------------------------------------------------------------


def _pending_bytes(sock: socket.socket, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])


@pytest.mark.parametrize("flood", ["PINGs", "DATA frames on a stream the server reset"])
async def test_what_the_client_owes_a_server_that_does_not_read_stays_bounded(flood: str) -> None:
    # The server sends a flood of frames each of which the client must answer, and never reads
    # again. The answers can only queue: past max_connection_send_buffer (documented as where
    # "the peer is no longer read from") the client must stop reading, or close the connection,
    # as grpc-core (max_pending_induced_frames) and nghttp2 (its outbound queue limit) do. It
    # read on and queued: 90,000 PINGs (under the default limit of 100,000 per 10 s, which
    # allows as many again every 10 s) left ~1.4 MB queued; 150,000 10-byte DATA frames on a
    # stream the server reset left ~1.7 MB of RST_STREAM STREAM_CLOSED, one per frame, under
    # no limit at all. Now past Configuration.max_pending_induced_frames the connection is
    # closed, and a stream the peer reset is answered once. (Up to 3 times the limit passes.)
    # The client's SO_SNDBUF is made small, as on a slow path: else the kernel's autotuned
    # buffers (4 MiB here) take the first few MB.
    limit = 256 * 1024
    config = Configuration(max_connection_send_buffer=limit)
    go = asyncio.Event()
    done = asyncio.Event()
    server_socket: list[socket.socket] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_socket.append(writer.get_extra_info("socket"))
        encoder = hpack.Encoder()
        writer.write(frame(SETTINGS, 0, 0))
        received = b""
        while b"\x01\x04\x00\x00\x00\x01" not in received and b"\x01\x05\x00\x00\x00\x01" not in received:
            chunk = await reader.read(65536)  # until the call's HEADERS (stream 1), roughly
            if not chunk:
                return
            received += chunk
        writer.write(frame(SETTINGS, ACK, 0) + frame(HEADERS, END_HEADERS, 1, encoder.encode(RESPONSE)))
        await go.wait()
        if flood == "PINGs":
            writer.write(b"".join(frame(PING, 0, 0, index.to_bytes(8, "big")) for index in range(90_000)))
        else:
            writer.write(frame(RST_STREAM, 0, 1, INTERNAL_ERROR.to_bytes(4, "big")) + frame(DATA, 0, 1, b"x") * 150_000)
        await writer.drain()
        await done.wait()  # and never reads again
        writer.transport.abort()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = await asyncio.start_server(handle, sock=listener)
    try:
        async with Channel("127.0.0.1", listener.getsockname()[1], config=config) as channel:
            call = asyncio.ensure_future(ended(server_streaming(channel)(BytesValue(), timeout=10), 15))
            await until(lambda: channel._protocol is not None and bool(server_socket), what="the call placed")
            protocol = connection_of(channel)
            assert protocol.transport is not None
            client_socket = protocol.transport.get_extra_info("socket")
            client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
            go.set()
            # Until the client has read all of it (or stopped reading: then for 5 s).
            deadline = time.monotonic() + 5
            await asyncio.sleep(0.2)
            while time.monotonic() < deadline and not protocol.is_closed:
                if not _pending_bytes(server_socket[0], termios.TIOCOUTQ) and not _pending_bytes(
                    client_socket, termios.FIONREAD
                ):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.1)
            queued = protocol.transport.get_write_buffer_size() if not protocol.is_closed else 0
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
            assert queued <= 3 * limit, f"{queued} bytes queued for a server that does not read"
    finally:
        done.set()
        server.close()
        await server.wait_closed()


@pytest.mark.backends
async def test_a_tls_handshake_that_never_completes_is_bounded_by_handshake_timeout(backend: str) -> None:
    # Configuration.handshake_timeout (README: "close a connection that has not completed the
    # HTTP/2 (and TLS) handshake") bounded the server's TLS handshakes (ssl_handshake_timeout)
    # and the client's HTTP/2 one (no SETTINGS in time: probed in session 12), but not the
    # client's TLS handshake: a server (a stalled TLS proxy) that accepts and says nothing
    # held a call without a deadline until the connection attempt's own timeout, the larger
    # of the backoff and connect_min_timeout (20 s by default, twice handshake_timeout).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepted by the kernel, never answered
    config = Configuration(handshake_timeout=0.3, connect_min_timeout=2.0)
    try:
        async with Channel("127.0.0.1", listener.getsockname()[1], ssl=True, config=config) as channel:
            started = time.monotonic()
            with pytest.raises(GRPCError) as failed:
                with anyio.fail_after(6):
                    await unary(channel)(BytesValue())
            elapsed = time.monotonic() - started
        assert failed.value.status is Status.UNAVAILABLE, failed.value
        assert elapsed < 1.2, f"the TLS handshake was given {elapsed:.1f} s ({failed.value.message})"
    finally:
        listener.close()


@pytest.mark.parametrize("content_type", [b"application/grpc-web", b"application/grpcx"])
async def test_a_response_content_type_that_only_begins_with_application_grpc_is_not_grpc(content_type: bytes) -> None:
    # PROTOCOL-HTTP2.md: Content-Type is "application/grpc" [("+proto" / "+json" / {custom})]
    # (grpc-go also takes ";" parameters); a 200 response of another content-type is UNKNOWN
    # (http-grpc-status-mapping.md). The client checked startswith(b"application/grpc")
    # (rpc/client.py, _on_response): a grpc-web proxy's response was read as gRPC.
    async def script(peer: Peer, number: int) -> None:
        stream_id, _ = await peer.request()
        peer.headers(stream_id, [(b":status", b"200"), (b"content-type", content_type)])
        peer.message(stream_id, REPLY_BYTES)
        peer.trailers(stream_id)

    async with raw_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        status, message, _ = await ended(unary(channel)(BytesValue(), timeout=3))
    assert status is Status.UNKNOWN, (status, message)
    assert "content-type" in (message or "")
