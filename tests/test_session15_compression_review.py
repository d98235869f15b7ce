"""A fresh-eyes review of compression, server and client, against real peers.

grpcio's client and server (``grpc.aio``, its ``compression=`` options and its
``grpc.compression_enabled_algorithms_bitset``, which removes an encoding from what it accepts
and advertises), a raw h2 client for what no real peer sends (corrupt, truncated, zero-length
and bomb messages, a compressed flag without ``grpc-encoding``), a scripted h2 server for the
same towards our client, and our own client and server on asyncio and trio. Memory is
measured on a server in its own process (``APP_COMPRESSION`` set, many connections of bombs)
and on our client's own process against a grpcio server in a subprocess.

The rules checked are gRPC's (doc/compression.md): an unsupported ``grpc-encoding`` is
UNIMPLEMENTED with ``grpc-accept-encoding``; a compressed flag without an encoding (or with
identity) is INTERNAL; a message compressed in an encoding the client does not support is
INTERNAL, naming what it supports; a server never compresses with an encoding the client did
not list; one message can be sent uncompressed.

The two defects it found are fixed (rpc/compression.py ``decompress`` checks what a registered
encoding returns): the last two tests failed before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value
from hyperframe.frame import DataFrame

from app_kit import (
    App,
    AppSettings,
    Cardinality,
    Channel,
    Configuration,
    Encoding,
    GRPCError,
    Handler,
    Server,
    ServiceLike,
    Status,
    Stream,
    register_encoding,
    registered_encodings,
    unregister_encoding,
)
from app_kit.aio.client import method_for
from app_kit.rpc.compression import DecompressedTooLarge, DecompressionError, accept_encoding, get_encoding

from .conftest import running_server
from .fake_server import FakeConnection, fake_server
from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    RawPeer,
    frame,
    process_peak_rss_bytes,
    process_rss_bytes,
    request_block,
    reset_peak_rss,
)
from .h2client import RawClient, Response
from .process import ROOT, AppProcess

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
C = Cardinality
OK, INTERNAL, UNIMPLEMENTED, RESOURCE_EXHAUSTED = 0, 13, 12, 8
#: grpc_compression_algorithm bits (grpc-core): 1 identity, 2 deflate, 4 gzip.
IDENTITY_AND_DEFLATE = 1 | 2
#: The largest BytesValue that serializes to under 4 MiB (the default message limit).
FITS = 4 * MiB - 16


# -- helpers -------------------------------------------------------------------------------------


def packed(data: bytes, wbits: int = 31) -> bytes:
    """``data`` compressed: wbits 31 is gzip, 15 deflate (zlib's format, as gRPC names it)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


def prefixed(payload: bytes, flag: int) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


@functools.cache
def bomb(inflated: int, wbits: int = 31) -> bytes:
    """A valid gzip (or zlib) stream of ``inflated`` zero bytes, ~1,000 times smaller: the
    same deflate block (1 MiB of zeros, full-flushed so that each is independent) repeated,
    then an empty final block and the real trailer. 1 GiB comes out of 1 MiB in ~0.4 s."""
    chunk = MiB
    zeros = bytes(chunk)
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    header = first[: len(first) - len(block)]
    assert first[len(header) :] == block
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # raw deflate: an empty last block
    check = 0 if wbits == 31 else 1
    step = zlib.crc32 if wbits == 31 else zlib.adler32
    for _ in range(inflated // chunk):
        check = step(zeros, check)
    trailer = struct.pack("<II", check, inflated & 0xFFFFFFFF) if wbits == 31 else struct.pack(">I", check)
    return header + block * (inflated // chunk) + final + trailer


def test_the_bombs_are_valid_streams_of_what_they_claim() -> None:
    for wbits in (31, 15):
        small = bomb(8 * MiB, wbits)
        assert zlib.decompress(small, wbits) == bytes(8 * MiB)
        assert len(small) < 8 * MiB // 900
    assert len(bomb(1024 * MiB)) < 1100 * 1024  # 1 GiB in ~1 MiB


@contextlib.contextmanager
def encodings(*, add: tuple[Encoding, ...] = (), remove: tuple[str, ...] = ()) -> Iterator[None]:
    """Change the process's registry of encodings for a while, and put it back as it was
    (the same encodings, in the same order: the order is what grpc-accept-encoding lists)."""
    saved = [get_encoding(name) for name in registered_encodings()]
    try:
        for name in remove:
            unregister_encoding(name)
        for encoding in add:
            register_encoding(encoding)
        yield
    finally:
        for name in registered_encodings():
            unregister_encoding(name)
        for encoding in saved:
            register_encoding(encoding)
        assert registered_encodings() == ("gzip", "deflate")


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


def service(mapping: dict[str, Handler]) -> ServiceLike:
    return type("Service", (), {"__mapping__": lambda self: mapping})()


class Observer:
    """A unary echo that records what its handler sees of compression, and replies in the
    encoding the request names (``set_compression``), if it names one."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {"/r.O/Echo": Handler(self.echo, C.UNARY_UNARY, BytesValue, BytesValue)}

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        seen: dict[str, Any] = {
            "request": stream.request_encoding,
            "compressed": stream.last_message_compressed,
            "accepted": stream.accepted_encodings,
            "default": stream.response_encoding,
        }
        choice = request.value.split(b":", 1)[0]
        if choice in (b"gzip", b"deflate", b"identity"):
            seen["set"] = stream.set_compression(choice.decode())
        seen["reply"] = stream.response_encoding
        self.seen.append(seen)
        await stream.send_message(BytesValue(value=request.value))


# -- 1. negotiation with grpcio -----------------------------------------------------------------


GZIP, DEFLATE = grpc.Compression.Gzip, grpc.Compression.Deflate


@pytest.mark.parametrize(
    ("server_default", "channel_compression", "call_compression", "bitset", "choice", "expected"),
    [
        # The request's own encoding, when the server and the handler say nothing.
        (None, GZIP, None, None, b"", ("gzip", True, "gzip")),
        (None, DEFLATE, None, None, b"", ("deflate", True, "deflate")),
        (None, None, GZIP, None, b"", ("gzip", True, "gzip")),  # grpcio's per-call compression
        (None, GZIP, DEFLATE, None, b"", ("deflate", True, "deflate")),  # the call's over the channel's
        # Server(compression=) over the request's encoding.
        ("gzip", None, None, None, b"", ("identity", False, "gzip")),
        ("gzip", DEFLATE, None, None, b"", ("deflate", True, "gzip")),
        ("identity", GZIP, None, None, b"", ("gzip", True, "identity")),
        # The handler's set_compression over Server(compression=).
        ("gzip", None, None, None, b"deflate", ("identity", False, "deflate")),
        ("gzip", GZIP, None, None, b"identity", ("gzip", True, "identity")),
        # Never an encoding the client did not list in grpc-accept-encoding.
        ("gzip", None, None, IDENTITY_AND_DEFLATE, b"", ("identity", False, "identity")),
        (None, DEFLATE, None, IDENTITY_AND_DEFLATE, b"gzip", ("deflate", True, "identity")),
        ("deflate", None, None, IDENTITY_AND_DEFLATE, b"", ("identity", False, "deflate")),
    ],
)
async def test_grpcio_client_negotiation_and_the_order_of_precedence(
    server_default: str | None,
    channel_compression: grpc.Compression | None,
    call_compression: grpc.Compression | None,
    bitset: int | None,
    choice: bytes,
    expected: tuple[str, bool, str],
) -> None:
    observer = Observer()
    server = Server([observer], compression=server_default)
    await server.start("127.0.0.1", 0)
    options = [("grpc.compression_enabled_algorithms_bitset", bitset)] if bitset is not None else []
    body = choice + b":" + b"compressible " * 200
    try:
        target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with grpc.aio.insecure_channel(target, options=options, compression=channel_compression) as channel:
            echo = channel.unary_unary("/r.O/Echo", BytesValue.SerializeToString, BytesValue.FromString)
            reply = await echo(BytesValue(value=body), compression=call_compression, timeout=5)
            assert reply.value == body  # grpcio read the reply, however it was compressed
    finally:
        server.close()
        await server.wait_closed()
    [seen] = observer.seen
    assert (seen["request"], seen["compressed"], seen["reply"]) == expected, seen
    if choice:
        assert seen["set"] == expected[2]  # set_compression returns the encoding in effect
    if bitset == IDENTITY_AND_DEFLATE:
        assert seen["accepted"] == frozenset({"identity", "deflate"})
    else:
        assert seen["accepted"] == frozenset({"identity", "deflate", "gzip"})


async def test_grpcio_client_compressing_with_an_encoding_the_server_lacks_gets_unimplemented() -> None:
    observer = Observer()
    with encodings(remove=("gzip",)):
        async with running_server([observer]) as (_, target):
            async with grpc.aio.insecure_channel(target, compression=GZIP) as channel:
                echo = channel.unary_unary("/r.O/Echo", BytesValue.SerializeToString, BytesValue.FromString)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await echo(BytesValue(value=b"x"), timeout=5)
                assert failed.value.code() is grpc.StatusCode.UNIMPLEMENTED
                details = failed.value.details() or ""
                assert details == "grpc-encoding gzip is not supported; accepted: deflate, identity", details
                # The channel goes on: a call in deflate is served. (grpcio's per-call
                # NoCompression is 0, which grpcio takes for "the channel's": gzip again.)
                assert (await echo(BytesValue(value=b"y"), compression=DEFLATE, timeout=5)).value == b"y"
            async with grpc.aio.insecure_channel(target) as channel:
                echo = channel.unary_unary("/r.O/Echo", BytesValue.SerializeToString, BytesValue.FromString)
                assert (await echo(BytesValue(value=b"z"), timeout=5)).value == b"z"
            # On the wire: the status comes with grpc-accept-encoding, which does not list gzip.
            async with RawClient("127.0.0.1", port_of(target)) as client:
                stream_id = await client.request(
                    "/r.O/Echo", packed(BytesValue(value=b"x").SerializeToString()), extra=[(b"grpc-encoding", b"gzip")]
                )
                response = await client.read_response(stream_id)
            assert response.grpc_status == UNIMPLEMENTED
            assert response.header(b"grpc-accept-encoding") == b"deflate,identity"
    assert [seen["request"] for seen in observer.seen] == ["deflate", "identity"]


# -- our client against grpcio's server -----------------------------------------------------------


class GrpcioReplies:
    """A grpc.aio service: Unary echoes; Stream sends four replies, the second with
    ``disable_next_message_compression``."""

    async def unary(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        return BytesValue(value=request.value * 10)

    async def stream(self, request: BytesValue, context: grpc.aio.ServicerContext) -> AsyncIterator[BytesValue]:
        for index in range(4):
            if index == 1:
                context.disable_next_message_compression()
            yield BytesValue(value=b"reply " * 200)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "g.G",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(
                    self.unary, BytesValue.FromString, BytesValue.SerializeToString
                ),
                "Stream": grpc.unary_stream_rpc_method_handler(
                    self.stream, BytesValue.FromString, BytesValue.SerializeToString
                ),
            },
        )


@contextlib.asynccontextmanager
async def grpcio_server(**options: Any) -> AsyncIterator[int]:
    server = grpc.aio.server(**options)
    server.add_generic_rpc_handlers((GrpcioReplies().handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def test_our_client_reads_how_grpcio_compressed_each_reply() -> None:
    async with grpcio_server(compression=GZIP) as port, Channel("127.0.0.1", port) as channel:
        unary = method_for(channel, "/g.G/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
        async with unary.open(timeout=5) as call:
            await call.send_message(BytesValue(value=b"ab" * 100), end=True)
            assert (await call.recv_message()) == BytesValue(value=b"ab" * 1000)
            assert (call.request_encoding, call.response_encoding, call.last_message_compressed) == (
                "identity",
                "gzip",
                True,
            )
        stream = method_for(channel, "/g.G/Stream", C.UNARY_STREAM, BytesValue, BytesValue)
        async with stream.open(timeout=5) as call:
            await call.send_message(BytesValue(), end=True)
            flags = []
            async for _ in call:
                flags.append(call.last_message_compressed)
            assert call.response_encoding == "gzip"
        assert flags == [True, False, True, True]  # grpcio's disable_next_message_compression, seen


async def test_our_client_against_a_grpcio_server_without_gzip() -> None:
    # A grpcio server that does not enable gzip answers a gzip request UNIMPLEMENTED; the
    # channel goes on, and a call compressed with deflate (which it enables) is served.
    options = [("grpc.compression_enabled_algorithms_bitset", IDENTITY_AND_DEFLATE)]
    async with (
        grpcio_server(options=options) as port,
        Channel("127.0.0.1", port, compression="gzip") as channel,
    ):
        unary = method_for(channel, "/g.G/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
        with pytest.raises(GRPCError) as failed:
            await unary(BytesValue(value=b"a"), timeout=5)
        assert failed.value.status is Status.UNIMPLEMENTED, failed.value
        assert "gzip" in (failed.value.message or "")
        assert (await unary(BytesValue(value=b"b"), compression="deflate", timeout=5)).value == b"b" * 10
        assert (await unary(BytesValue(value=b"c"), compression="identity", timeout=5)).value == b"c" * 10


async def test_a_reply_in_an_encoding_our_client_does_not_support_is_internal_naming_the_supported_ones() -> None:
    # gRPC's compression test case 5. Our client without gzip lists "deflate,identity"; grpcio's
    # server, told to compress with gzip, compresses anyway (grpc-core checks an algorithm it
    # is given against its own enabled set, not the client's list): the call fails INTERNAL,
    # saying what it lacks and what it has, and the channel goes on.
    with encodings(remove=("gzip",)):
        assert accept_encoding() == b"deflate,identity"
        async with grpcio_server(compression=GZIP) as port, Channel("127.0.0.1", port) as channel:
            unary = method_for(channel, "/g.G/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
            with pytest.raises(GRPCError) as failed:
                await unary(BytesValue(value=b"a" * 1000), timeout=5)
            assert failed.value.status is Status.INTERNAL
            assert "unsupported encoding 'gzip'; registered: deflate" in (failed.value.message or ""), failed.value
            protocol = channel._subchannels[0].protocol
            with pytest.raises(GRPCError):
                await unary(BytesValue(value=b"b" * 1000), timeout=5)
            # (grpc-core sends a reply uncompressed when gzip would not make it smaller.)
            assert (await unary(BytesValue(value=b"c"), timeout=5)).value == b"c" * 10
            assert channel._subchannels[0].protocol is protocol  # the same connection throughout
        # What our client lists, seen by a server.
        headers: list[list[tuple[bytes, bytes]]] = []

        def record(connection: FakeConnection, stream_id: int, number: int) -> None:
            headers.append(connection.request_headers[stream_id])
            connection.reply(stream_id, BytesValue().SerializeToString())

        async with fake_server(record) as (port, _), Channel("127.0.0.1", port) as channel:
            await method_for(channel, "/g.G/Unary", C.UNARY_UNARY, BytesValue, BytesValue)(BytesValue(), timeout=5)
        assert dict(headers[0])[b"grpc-accept-encoding"] == b"deflate,identity"


# -- 2. error paths: the server -------------------------------------------------------------------


class Lengths:
    """A bidi echo of lengths, one reply per request message."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/r.L/Lengths": Handler(self.lengths, C.STREAM_STREAM, BytesValue, Int64Value)}

    async def lengths(self, stream: Stream[BytesValue, Int64Value]) -> None:
        async for message in stream:
            await stream.send_message(Int64Value(value=len(message.value)))


GOOD = BytesValue(value=b"fine " * 100).SerializeToString()

SERVER_ERRORS: dict[str, tuple[bytes | None, bytes, int, str]] = {
    "corrupt gzip": (b"gzip", prefixed(b"this is not gzip at all", 1), INTERNAL, "corrupt gzip data"),
    "corrupt deflate": (b"deflate", prefixed(b"this is not zlib at all", 1), INTERNAL, "corrupt deflate data"),
    "gzip data named deflate": (b"deflate", prefixed(packed(GOOD, 31), 1), INTERNAL, "corrupt deflate data"),
    "truncated gzip": (b"gzip", prefixed(packed(GOOD)[:-6], 1), INTERNAL, "truncated or trailing gzip data"),
    "trailing bytes": (b"gzip", prefixed(packed(GOOD) + b"junk", 1), INTERNAL, "truncated or trailing gzip data"),
    "flag without grpc-encoding": (None, prefixed(packed(GOOD), 1), INTERNAL, "grpc-encoding is identity or absent"),
    "unsupported encoding": (b"br", prefixed(b"\x00", 1), UNIMPLEMENTED, "grpc-encoding br is not supported"),
}


async def test_every_bad_compressed_request_gets_its_status_and_the_connection_and_its_calls_go_on() -> None:
    async with running_server([Lengths()]) as (_, target), RawClient("127.0.0.1", port_of(target)) as client:
        # A call in progress on the same connection, compressed, answered before and after.
        extra = [(b"grpc-encoding", b"gzip"), (b"grpc-accept-encoding", b"gzip")]
        held = await client.request("/r.L/Lengths", None, extra=extra, end_stream=False)
        client.conn.send_data(held, prefixed(packed(GOOD), 1))
        client.flush()
        await client.wait_for(lambda: len(client.responses.get(held, Response()).messages()) == 1)
        outcomes: dict[str, tuple[int | None, str]] = {}
        cases = dict(SERVER_ERRORS)
        too_large = "decompressed message larger than max (4194304 bytes)"
        for name, wbits, named in (("1 GiB gzip bomb", 31, b"gzip"), ("1 GiB deflate bomb", 15, b"deflate")):
            cases[name] = (named, prefixed(bomb(1024 * MiB, wbits), 1), RESOURCE_EXHAUSTED, too_large)
        for name, (encoding, body, _, _) in cases.items():
            extra = [(b"grpc-accept-encoding", b"gzip,identity")]
            if encoding is not None:
                extra.append((b"grpc-encoding", encoding))
            stream_id = await client.request("/r.L/Lengths", None, extra=extra, end_stream=False)
            while body:  # as the windows allow (a bomb is ~1 MiB)
                await client.wait_for(lambda sid=stream_id: client.conn.local_flow_control_window(sid) > 0)
                size = min(
                    len(body), client.conn.local_flow_control_window(stream_id), client.conn.max_outbound_frame_size
                )
                client.conn.send_data(stream_id, body[:size], end_stream=size == len(body))
                client.flush()
                body = body[size:]
            response = await client.read_response(stream_id)
            outcomes[name] = (response.grpc_status, response.grpc_message or "")
            assert not response.messages(), name
            if encoding == b"br":
                assert response.header(b"grpc-accept-encoding") == b"gzip,deflate,identity"
        for name, (_, _, status, message) in cases.items():
            assert outcomes[name][0] == status and message in outcomes[name][1], (name, outcomes[name])
        # The held call goes on, compressed both ways, and ends OK; no GOAWAY came.
        client.conn.send_data(held, prefixed(packed(GOOD), 1), end_stream=True)
        client.flush()
        response = await client.read_response(held)
        assert response.grpc_status == OK
        assert [(flag, Int64Value.FromString(zlib.decompress(m, 31)).value) for flag, m in response.framed()] == [
            (1, 500),
            (1, 500),
        ]
        assert not [e for e in client.events if type(e).__name__ == "ConnectionTerminated"]


# -- 2. error paths: the client -------------------------------------------------------------------

RESPONSE_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
REPLY = BytesValue(value=b"reply " * 100).SerializeToString()

CLIENT_ERRORS: list[tuple[str, list[tuple[bytes, bytes]], bytes, Status, str]] = [
    ("flag without grpc-encoding", [], prefixed(packed(REPLY), 1), Status.INTERNAL, "identity or absent"),
    ("flag with identity", [(b"grpc-encoding", b"identity")], prefixed(packed(REPLY), 1), Status.INTERNAL, "absent"),
    ("corrupt gzip", [(b"grpc-encoding", b"gzip")], prefixed(b"garbage", 1), Status.INTERNAL, "corrupt gzip data"),
    ("trailing", [(b"grpc-encoding", b"gzip")], prefixed(packed(REPLY) + b"x", 1), Status.INTERNAL, "trailing"),
    ("unsupported", [(b"grpc-encoding", b"br")], prefixed(b"x", 1), Status.INTERNAL, "registered: gzip, deflate"),
    (
        "512 MiB bomb",
        [(b"grpc-encoding", b"gzip")],
        prefixed(bomb(512 * MiB), 1),
        Status.RESOURCE_EXHAUSTED,
        "decompressed message larger than max (4194304 bytes)",
    ),
]


async def test_every_bad_compressed_reply_fails_its_call_and_the_channel_goes_on() -> None:
    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number > len(CLIENT_ERRORS):
            head = [*RESPONSE_HEAD, (b"grpc-encoding", b"gzip")]
            connection.conn.send_headers(stream_id, head)
            connection.conn.send_data(stream_id, prefixed(packed(REPLY), 1))
        else:
            _, fields, body, _, _ = CLIENT_ERRORS[number - 1]
            connection.conn.send_headers(stream_id, [*RESPONSE_HEAD, *fields])
            connection.conn.send_data(stream_id, body)
        connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async with fake_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = method_for(channel, "/f.F/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
        assert accept_encoding() == b"gzip,deflate,identity"
        protocols = set()
        for name, _, _, status, message in CLIENT_ERRORS:
            with pytest.raises(GRPCError) as failed:
                await unary(BytesValue(), timeout=5)
            assert failed.value.status is status and message in (failed.value.message or ""), (name, failed.value)
            protocols.add(id(channel._subchannels[0].protocol))
        async with unary.open(timeout=5) as call:
            await call.send_message(BytesValue(), end=True)
            assert await call.recv_message() == BytesValue.FromString(REPLY)
            assert (call.response_encoding, call.last_message_compressed) == ("gzip", True)
        protocols.add(id(channel._subchannels[0].protocol))
    assert len(protocols) == 1  # one connection served them all


async def test_a_zero_length_message_flagged_compressed_is_an_empty_message_both_ways() -> None:
    """[compressed=1][length=0]: no compressor writes it (gzip of nothing is 20 bytes), but some
    senders flag an empty message compressed anyway; grpc-core, connect and grpc-swift read it
    as the empty message it can only be (grpc-js refuses it). It was INTERNAL "truncated or
    trailing gzip data" on our server and our client."""
    async with running_server([Lengths()]) as (_, target), RawClient("127.0.0.1", port_of(target)) as client:
        extra = [(b"grpc-encoding", b"gzip"), (b"grpc-accept-encoding", b"identity")]  # (plain replies)
        stream_id = await client.request("/r.L/Lengths", None, extra=extra, end_stream=False)
        client.conn.send_data(stream_id, prefixed(b"", 1) + prefixed(packed(GOOD), 1), end_stream=True)
        client.flush()
        response = await client.read_response(stream_id)
        assert response.grpc_status == 0, response.grpc_message
        lengths = [Int64Value.FromString(message).value for message in response.messages()]
        assert lengths == [0, len(b"fine " * 100)]

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.conn.send_headers(stream_id, [*RESPONSE_HEAD, (b"grpc-encoding", b"deflate")])
        connection.conn.send_data(stream_id, prefixed(b"", 1))
        connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async with fake_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = method_for(channel, "/f.F/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
        async with unary.open(timeout=5) as call:
            await call.send_message(BytesValue(), end=True)
            assert await call.recv_message() == BytesValue()
            assert (call.response_encoding, call.last_message_compressed) == ("deflate", True)


# -- 3. memory: many connections of bombs against a server process ---------------------------------


class Holder:
    """``/h.H/Hold`` takes its one request, says how large it was, and holds it until the call
    is cancelled (as a handler still working on it does); ``/h.H/Echo`` echoes."""

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/h.H/Hold": Handler(self.hold, C.UNARY_STREAM, BytesValue, Int64Value),
            "/h.H/Echo": Handler(self.echo, C.UNARY_UNARY, BytesValue, BytesValue),
        }

    async def hold(self, stream: Stream[BytesValue, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(Int64Value(value=len(request.value)))
        await anyio.sleep_forever()  # the request stays held

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(request)


#: The App the server process runs (``python -m app_kit run tests.<this module>:hold_app``).
hold_app = App(AppSettings, name="hold")


@hold_app.service
def holder() -> Holder:
    return Holder()


def _hold_requests(encoder: hpack.Encoder, held: int, bombs: int) -> bytes:
    """``held`` calls on /h.H/Hold of one gzip message inflating to just under 4 MiB (~4 KiB
    on the wire), then ``bombs`` of one 512 MiB gzip bomb each (~530 KiB)."""
    extra = [("grpc-encoding", "gzip")]
    fits = prefixed(packed(BytesValue(value=bytes(FITS)).SerializeToString()), 1)
    blast = prefixed(bomb(512 * MiB), 1)
    parts = []
    for index in range(held + bombs):
        stream_id = 1 + 2 * index
        body = fits if index < held else blast
        parts.append(frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, "/h.H/Hold", extra)))
        for start in range(0, len(body), 16384):
            last = start + 16384 >= len(body)
            parts.append(frame(DATA, END_STREAM if last else 0, stream_id, body[start : start + 16384]))
    return b"".join(parts)


def _answers(peer: RawPeer) -> dict[int, str]:
    """Each stream's answer so far: "held" (its reply came: the handler holds the request), or
    its grpc-status."""
    answers = {f.stream_id: "held" for f in peer.frames if isinstance(f, DataFrame)}
    answers.update({stream_id: status.decode() for stream_id, status in peer.trailer_statuses().items()})
    return answers


async def test_bombs_on_many_connections_stay_within_max_server_receive_buffer_and_app_compression_applies() -> None:
    # 16 connections, each with 8 calls holding a message that inflates to ~4 MiB (each
    # connection's max_connection_inflated_bytes, 32 MiB, fits them: 512 MiB in all) and 2
    # calls sending a 512 MiB bomb. max_server_receive_buffer (128 MiB) bounds them together:
    # at most 32 calls hold one, the others get RESOURCE_EXHAUSTED, and the server grows by
    # about what it holds. APP_COMPRESSION=deflate compresses the replies of clients that
    # accept it.
    connections, held, bombs = 16, 8, 2
    env = {"APP_LOG_LEVEL": "INFO", "APP_COMPRESSION": "deflate"}
    async with AppProcess(f"{__name__}:hold_app", "--port", "0", env=env) as app:
        port = await app.ready()
        pid = app.process.pid
        attacks = [HANDSHAKE + _hold_requests(hpack.Encoder(), held, bombs) for _ in range(connections)]
        async with Channel("127.0.0.1", port) as channel:
            echo = method_for(channel, "/h.H/Echo", C.UNARY_UNARY, BytesValue, BytesValue)
            async with echo.open(timeout=5) as call:
                await call.send_message(BytesValue(value=b"x" * 100), end=True)
                assert await call.recv_message() == BytesValue(value=b"x" * 100)
                assert (call.response_encoding, call.last_message_compressed) == ("deflate", True)
            await asyncio.sleep(0.2)
            reset_peak_rss(pid)
            rss_before = process_rss_bytes(pid)
            async with contextlib.AsyncExitStack() as stack:
                peers = [await stack.enter_async_context(RawPeer(port)) for _ in range(connections)]
                await asyncio.gather(*(peer.send(attack) for peer, attack in zip(peers, attacks, strict=True)))
                async with asyncio.timeout(20):
                    while not all(len(_answers(peer)) == held + bombs for peer in peers):
                        await asyncio.sleep(0.05)
                peak = process_peak_rss_bytes(pid) - rss_before
                answers = [_answers(peer) for peer in peers]
                assert not any(peer.goaways for peer in peers)
            # Served throughout, and after: the connections gone, what they held is free again
            # (a new connection's 8 calls hold theirs).
            assert (await echo(BytesValue(value=b"after"), timeout=5)).value == b"after"
            await asyncio.sleep(0.3)
            async with RawPeer(port) as peer:
                await peer.send(HANDSHAKE + _hold_requests(hpack.Encoder(), held, 0))
                async with asyncio.timeout(10):
                    while len(_answers(peer)) < held:
                        await asyncio.sleep(0.05)
                assert set(_answers(peer).values()) == {"held"}, _answers(peer)
    fits = [each[1 + 2 * index] for each in answers for index in range(held)]
    blasts = [each[1 + 2 * index] for each in answers for index in range(held, held + bombs)]
    served = fits.count("held")
    print(f"{served} of {connections * held} calls hold their message; peak RSS +{peak / MiB:.0f} MiB")
    assert set(blasts) == {"8"}, answers
    assert set(fits) == {"held", "8"}, answers
    assert 16 <= served <= 32, served  # 128 MiB / ~4 MiB each, less what is in flight
    assert peak < 200 * MiB, f"peak RSS grew by {peak / MiB:.0f} MiB"


# -- 3. memory: our client receiving bombs from grpcio ----------------------------------------------

_GRPCIO_BOMBS = """
import asyncio, grpc
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

async def stream(request, context):
    yield BytesValue(value=bytes(request.value))
    await asyncio.sleep(30)  # the call stays open: the client holds what it took

async def main():
    server = grpc.aio.server(compression=grpc.Compression.Gzip)
    method = grpc.unary_stream_rpc_method_handler(stream, Int64Value.FromString, BytesValue.SerializeToString)
    handlers = {"Stream": method}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("b.B", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def test_our_client_holds_bombs_from_grpcio_within_max_connection_inflated_bytes() -> None:
    # A grpcio server (in its own process) answers each call with one gzip reply and keeps the
    # call open. 20 calls take a reply inflating to ~4 MiB each and hold it: 8 fit the
    # connection's 32 MiB, the others fail RESOURCE_EXHAUSTED; 4 calls get a 32 MiB reply
    # (~32 KiB on the wire): RESOURCE_EXHAUSTED at 4 MiB. The channel goes on.
    process = subprocess.Popen(
        [sys.executable, "-c", _GRPCIO_BOMBS], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 15)
        port = int(line)
        pid = os.getpid()
        release = asyncio.Event()
        outcomes: list[tuple[int, str]] = []

        async def take(size: int) -> None:
            try:
                async with bombs.open(timeout=15) as call:
                    await call.send_message(Int64Value(value=size), end=True)
                    reply = await call.recv_message()
                    assert reply is not None and len(reply.value) == size and call.last_message_compressed
                    outcomes.append((size, "OK"))
                    await release.wait()  # held, as a handler holds its request
            except GRPCError as exc:
                outcomes.append((size, f"{exc.status.name}: {exc.message}"))

        async with Channel("127.0.0.1", port) as channel:
            bombs = method_for(channel, "/b.B/Stream", C.UNARY_STREAM, Int64Value, BytesValue)
            release.set()
            await take(1000)  # connected, and warm
            assert outcomes == [(1000, "OK")]
            outcomes.clear()
            release.clear()
            await asyncio.sleep(0.1)
            reset_peak_rss(pid)
            rss_before = process_rss_bytes(pid)
            sizes = [FITS] * 20 + [32 * MiB] * 4
            tasks = [asyncio.ensure_future(take(size)) for size in sizes]
            async with asyncio.timeout(15):
                while len(outcomes) < len(sizes):  # each holds its reply, or failed
                    await asyncio.sleep(0.05)
            peak = process_peak_rss_bytes(pid) - rss_before
            release.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)
            held = sorted(outcomes)
            # The same channel serves calls after them, and the budget is free again: 8 more
            # calls hold theirs.
            outcomes.clear()
            release.clear()
            again = [asyncio.ensure_future(take(FITS)) for _ in range(8)]
            async with asyncio.timeout(15):
                while len(outcomes) < 8:
                    await asyncio.sleep(0.05)
            release.set()
            await asyncio.wait_for(asyncio.gather(*again), 15)
            assert outcomes == [(FITS, "OK")] * 8, outcomes
    finally:
        process.kill()
        process.wait()
    print(f"client peak RSS +{peak / MiB:.0f} MiB")
    fits = [outcome for size, outcome in held if size == FITS]
    assert fits.count("OK") == 8, held
    over = "RESOURCE_EXHAUSTED: inflated messages on the connection over max_connection_inflated_bytes (33554432 bytes)"
    assert fits.count(over) == 12, held
    for size, outcome in held:
        if size != FITS:
            assert outcome.startswith("RESOURCE_EXHAUSTED: "), outcome
    assert peak < 96 * MiB, f"our client grew by {peak / MiB:.0f} MiB"


# -- 4. the per-message and per-call values, on asyncio and on trio ---------------------------------


class Recorder:
    """Bidi: records how each request came, replies in deflate, the second reply uncompressed."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bool]] = []
        self.call: dict[str, Any] = {}

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/r.R/Bidi": Handler(self.bidi, C.STREAM_STREAM, BytesValue, BytesValue),
            "/r.R/Unary": Handler(self.unary, C.UNARY_UNARY, BytesValue, BytesValue),
        }

    async def bidi(self, stream: Stream[BytesValue, BytesValue]) -> None:
        self.call = {"accepted": stream.accepted_encodings, "before": stream.response_encoding}
        self.call["set"] = stream.set_compression("deflate")
        self.call["after"] = stream.response_encoding
        index = 0
        async for message in stream:
            self.requests.append((stream.request_encoding, stream.last_message_compressed))
            await stream.send_message(message, compress=index != 1)
            index += 1

    async def unary(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.requests.append((stream.request_encoding, stream.last_message_compressed))
        await stream.send_message(request)


@pytest.mark.backends
async def test_the_compression_values_each_side_sees(backend: str) -> None:
    recorder = Recorder()
    big = BytesValue(value=b"compressible " * 100)
    async with running_server([recorder]) as (_, target), Channel(target, compression="gzip") as channel:
        bidi = method_for(channel, "/r.R/Bidi", C.STREAM_STREAM, BytesValue, BytesValue)
        replies: list[tuple[str, bool]] = []
        with anyio.fail_after(10):
            async with bidi.open() as call:
                assert call.request_encoding == "gzip"
                await call.send_message(big)
                await call.send_message(big, compress=False)
                await call.send_message(big, end=True)
                async for reply in call:
                    assert reply == big
                    replies.append((call.response_encoding, call.last_message_compressed))
            unary = method_for(channel, "/r.R/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
            # A stub's per-call compression= over the channel's.
            assert (await unary(big, compression="identity")) == big
            assert (await unary(big, compression="deflate")) == big
            async with unary.open(compression="identity") as single:
                assert single.request_encoding == "identity"
                await single.send_message(big, end=True)
                assert await single.recv_message() == big
                # Our server answers in the request's encoding: identity, not the channel's gzip.
                assert (single.response_encoding, single.last_message_compressed) == ("identity", False)
    assert recorder.call == {
        "accepted": frozenset({"gzip", "deflate", "identity"}),
        "before": "gzip",  # the request's own encoding, by default
        "set": "deflate",
        "after": "deflate",
    }
    assert recorder.requests == [
        ("gzip", True),
        ("gzip", False),
        ("gzip", True),
        ("identity", False),
        ("deflate", True),
        ("identity", False),
    ]
    assert replies == [("deflate", True), ("deflate", False), ("deflate", True)]


@pytest.mark.backends
async def test_a_bomb_from_our_client_is_resource_exhausted_and_the_channel_goes_on(backend: str) -> None:
    # Our client may send more than the server takes (its own limit raised): 64 MiB of zeros,
    # ~64 KiB in gzip. The server stops inflating at its 4 MiB; the same channel goes on.
    recorder = Recorder()
    config = Configuration(max_send_message_length=128 * MiB)
    async with (
        running_server([recorder]) as (_, target),
        Channel(target, compression="gzip", config=config) as channel,
    ):
        unary = method_for(channel, "/r.R/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
        with anyio.fail_after(10):
            with pytest.raises(GRPCError) as failed:
                await unary(BytesValue(value=bytes(64 * MiB)))
            assert failed.value.status is Status.RESOURCE_EXHAUSTED
            assert "decompressed message larger than max (4194304 bytes)" in (failed.value.message or "")
            assert (await unary(BytesValue(value=b"after"))).value == b"after"
    assert recorder.requests == [("gzip", True)]


# -- 5. a registered encoding -----------------------------------------------------------------------


def _xor(data: bytes) -> bytes:
    return bytes(byte ^ 0x5A for byte in data)


def _unxor(data: bytes, max_length: int) -> bytes:
    if len(data) > max_length:
        raise DecompressedTooLarge(f"decompressed message larger than max ({max_length} bytes)")
    return _xor(data)


XOR = Encoding("x-xor", _xor, _unxor)


async def test_a_registered_encoding_is_advertised_both_ways_and_used_both_ways() -> None:
    recorder = Recorder()
    observer = Observer()
    with encodings(add=(XOR,)):
        assert accept_encoding() == b"gzip,deflate,x-xor,identity"
        async with running_server([recorder, observer]) as (_, target):
            # The server lists it in its response headers.
            async with RawClient("127.0.0.1", port_of(target)) as client:
                stream_id = await client.request("/r.R/Unary", BytesValue(value=b"x").SerializeToString())
                response = await client.read_response(stream_id)
                assert response.header(b"grpc-accept-encoding") == b"gzip,deflate,x-xor,identity"
                # A request in it, read; the reply in it, as the client accepted it.
                xored = _xor(BytesValue(value=b"raw").SerializeToString())
                stream_id = await client.request(
                    "/r.R/Unary",
                    None,
                    extra=[(b"grpc-encoding", b"x-xor"), (b"grpc-accept-encoding", b"x-xor")],
                    end_stream=False,
                )
                client.conn.send_data(stream_id, prefixed(xored, 1), end_stream=True)
                client.flush()
                response = await client.read_response(stream_id)
                assert response.header(b"grpc-encoding") == b"x-xor"
                assert response.framed() == [(1, xored)]
            # Our client lists it, and compresses with it.
            async with Channel(target, compression="x-xor") as channel:
                unary = method_for(channel, "/r.R/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
                async with unary.open(timeout=5) as call:
                    await call.send_message(BytesValue(value=b"xor"), end=True)
                    assert await call.recv_message() == BytesValue(value=b"xor")
                    assert (call.response_encoding, call.last_message_compressed) == ("x-xor", True)
                echo = method_for(channel, "/r.O/Echo", C.UNARY_UNARY, BytesValue, BytesValue)
                assert (await echo(BytesValue(value=b"gzip:x"), timeout=5)).value == b"gzip:x"
            # grpcio knows nothing of it: its calls are served as before.
            async with grpc.aio.insecure_channel(target, compression=GZIP) as grpcio_channel:
                call = grpcio_channel.unary_unary("/r.O/Echo", BytesValue.SerializeToString, BytesValue.FromString)
                assert (await call(BytesValue(value=b"plain"), timeout=5)).value == b"plain"
    assert recorder.requests == [("identity", False), ("x-xor", True), ("x-xor", True)]
    assert "x-xor" in observer.seen[0]["accepted"] and observer.seen[0]["reply"] == "gzip"
    assert "x-xor" not in observer.seen[1]["accepted"]


def _raise_value_error(data: bytes, max_length: int) -> bytes:
    raise ValueError("the codec's own bug")


def _raise_too_large(data: bytes, max_length: int) -> bytes:
    raise DecompressedTooLarge(f"over {max_length}")


def _raise_corrupt(data: bytes, max_length: int) -> bytes:
    raise DecompressionError("bad frame")


async def test_a_decompress_that_raises_gives_a_clean_status_on_either_side() -> None:
    failing = {
        "x-bug": (_raise_value_error, Status.INTERNAL, "could not decompress x-bug message: the codec's own bug"),
        "x-big": (_raise_too_large, Status.RESOURCE_EXHAUSTED, "decompressed message larger than max (4194304 bytes)"),
        "x-bad": (_raise_corrupt, Status.INTERNAL, "bad frame"),
    }
    added = tuple(Encoding(name, _xor, decompress) for name, (decompress, _, _) in failing.items())
    recorder = Recorder()

    async def reply_in(stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        stream.set_compression(request.value.decode())
        await stream.send_message(request)

    replier = service({"/r.X/Reply": Handler(reply_in, C.UNARY_UNARY, BytesValue, BytesValue)})
    with encodings(add=added):
        async with running_server([recorder, replier]) as (_, target), Channel(target) as channel:
            unary = method_for(channel, "/r.R/Unary", C.UNARY_UNARY, BytesValue, BytesValue)
            reply = method_for(channel, "/r.X/Reply", C.UNARY_UNARY, BytesValue, BytesValue)
            for name, (_, status, message) in failing.items():
                # The server inflating our request.
                with pytest.raises(GRPCError) as failed:
                    await unary(BytesValue(value=b"x"), compression=name, timeout=5)
                assert (failed.value.status, failed.value.message) == (status, message), name
                # Our client inflating the server's reply.
                with pytest.raises(GRPCError) as failed:
                    await reply(BytesValue(value=name.encode()), timeout=5)
                assert (failed.value.status, failed.value.message) == (status, message), name
            assert (await unary(BytesValue(value=b"after"), timeout=5)).value == b"after"
            assert (await reply(BytesValue(value=b"identity"), timeout=5)).value == b"identity"


def _ignores_the_limit(data: bytes, max_length: int) -> bytes:
    return zlib.decompress(data, 31)  # the whole message, whatever max_length says


async def test_a_decompress_that_returns_more_than_max_length_is_still_capped() -> None:
    # README: a compressed message is inflated "never past max_receive_message_length". The
    # contract asks decompress to stop at max_length; one that does not (here zlib.decompress
    # without a limit; a plug-in that passes max_length to an API where 0 means "no limit"
    # does the same once a budget leaves 0) was trusted: an 8 MiB message reached the
    # handler of a server whose limit is 4 MiB, and a caller of our client. What decompress
    # returns is now compared with the limit.
    handed: list[int] = []

    async def count(stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        handed.append(len(request.value))
        stream.set_compression("x-greedy")
        await stream.send_message(BytesValue(value=bytes(8 * MiB)))

    counter = service({"/r.C/Count": Handler(count, C.UNARY_UNARY, BytesValue, BytesValue)})
    config = Configuration(max_send_message_length=64 * MiB)
    outcomes: list[Status | str] = []
    with encodings(add=(Encoding("x-greedy", lambda data: packed(data), _ignores_the_limit),)):
        async with (
            running_server([counter], config=config) as (_, target),
            Channel(target, compression="x-greedy", config=config) as channel,
        ):
            call = method_for(channel, "/r.C/Count", C.UNARY_UNARY, BytesValue, BytesValue)
            for size in (8 * MiB, 10):
                try:
                    reply = await call(BytesValue(value=bytes(size)), timeout=5)
                    outcomes.append(f"OK {len(reply.value)}")
                except GRPCError as exc:
                    outcomes.append(exc.status)
    # The server refuses the 8 MiB request; our client refuses the 8 MiB reply to the small one.
    assert outcomes == [Status.RESOURCE_EXHAUSTED, Status.RESOURCE_EXHAUSTED], (outcomes, handed)


def _returns_none(data: bytes, max_length: int) -> bytes:
    return None  # type: ignore[return-value]  # a plug-in's bug


async def test_a_decompress_that_returns_no_bytes_gives_a_clean_internal(caplog: pytest.LogCaptureFixture) -> None:
    # inflate() turns every exception decompress raises into INTERNAL "could not decompress
    # ..."; a value it returned was used unchecked (len(None) raised TypeError in inflate,
    # after the try): the handler got a TypeError (the client an UNKNOWN status, the log a
    # traceback), and our client's caller a TypeError instead of a GRPCError.
    outcomes: list[str] = []

    async def reply_none(stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value == b"reply":
            stream.set_compression("x-none")
        await stream.send_message(request)

    replier = service({"/r.N/Reply": Handler(reply_none, C.UNARY_UNARY, BytesValue, BytesValue)})
    with encodings(add=(Encoding("x-none", _xor, _returns_none),)):
        async with running_server([replier]) as (_, target), Channel(target) as channel:
            call = method_for(channel, "/r.N/Reply", C.UNARY_UNARY, BytesValue, BytesValue)
            for value, compression in ((b"request", "x-none"), (b"reply", None)):
                try:
                    await call(BytesValue(value=value), compression=compression, timeout=5)
                    outcomes.append("OK")
                except GRPCError as exc:
                    outcomes.append(exc.status.name)
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            assert (await call(BytesValue(value=b"after"), timeout=5)).value == b"after"
    assert outcomes == ["INTERNAL", "INTERNAL"], outcomes
    assert "Traceback" not in caplog.text
