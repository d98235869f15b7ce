"""Compression under the caller's control, checked on the wire.

A raw h2 client reads each message's compressed flag and the ``grpc-encoding`` headers as
they are sent, and sends hand-built messages with the flag set or clear; grpcio's client and
server are the reference peers for gzip and deflate; a custom encoding is registered to show
the set is pluggable.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import (
    AppSettings,
    Channel,
    Encoding,
    GRPCError,
    ProtocolError,
    Server,
    SettingsError,
    Status,
    Stream,
    register_encoding,
    registered_encodings,
    unregister_encoding,
)
from app_kit.app.settings import load_settings
from app_kit.rpc.compression import DecompressedTooLarge, DecompressionError
from app_kit.rpc.handlers import Cardinality, Handler
from examples.interop.client import CASES
from examples.interop.messages_pb2 import (
    BoolValue,
    Payload,
    ResponseParameters,
    SimpleRequest,
    SimpleResponse,
    StreamingOutputCallRequest,
    StreamingOutputCallResponse,
)
from examples.interop.server import TestService as InteropService

from .conftest import running_server
from .h2client import RawClient
from .interop_grpcio import grpcio_interop_server

pytestmark = pytest.mark.anyio

UNARY = "/grpc.testing.TestService/UnaryCall"
STREAMING_OUTPUT = "/grpc.testing.TestService/StreamingOutputCall"


def gzip(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    return packer.compress(data) + packer.flush()


def framed(payload: bytes, flag: int) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


async def raw_call(
    port: int, path: str, body: bytes, *, encoding: bytes | None = None, accept: bytes | None = b"gzip,identity"
):  # type: ignore[no-untyped-def]
    """One call from a raw h2 client; ``body`` is sent as framed (flags and all)."""
    extra = [(b"grpc-encoding", encoding)] if encoding else []
    if accept is not None:
        extra.append((b"grpc-accept-encoding", accept))
    async with RawClient("127.0.0.1", port) as client:
        stream_id = await client.request(path, None, extra=extra, end_stream=False)
        while True:  # as flow control allows
            await client.wait_for(lambda: client.conn.local_flow_control_window(stream_id) > 0)
            size = min(len(body), client.conn.local_flow_control_window(stream_id), client.conn.max_outbound_frame_size)
            client.conn.send_data(stream_id, body[:size], end_stream=size == len(body))
            client.flush()
            body = body[size:]
            if not body:
                return await client.read_response(stream_id)


def port_of(target: str) -> int:
    return int(target.rsplit(":", 1)[1])


# -- the interop compression cases, on the wire ---------------------------------------


async def test_server_compressed_unary_sets_the_flag_as_asked() -> None:
    async with running_server([InteropService()]) as (_, target):
        for asked, flag in ((True, 1), (False, 0)):
            request = SimpleRequest(response_size=314159, response_compressed=BoolValue(value=asked))
            response = await raw_call(port_of(target), UNARY, framed(request.SerializeToString(), 0))
            assert response.grpc_status == 0
            [(sent_flag, payload)] = response.framed()
            assert sent_flag == flag
            assert response.header(b"grpc-encoding") == (b"gzip" if asked else None)
            data = zlib.decompress(payload, 31) if flag else payload
            assert len(SimpleResponse.FromString(data).payload.body) == 314159


async def test_server_compressed_streaming_clears_the_flag_of_one_message() -> None:
    request = StreamingOutputCallRequest(
        response_parameters=[
            ResponseParameters(size=31415, compressed=BoolValue(value=True)),
            ResponseParameters(size=92653, compressed=BoolValue(value=False)),
        ]
    )
    async with running_server([InteropService()]) as (_, target):
        response = await raw_call(port_of(target), STREAMING_OUTPUT, framed(request.SerializeToString(), 0))
    assert response.grpc_status == 0 and response.header(b"grpc-encoding") == b"gzip"
    (first_flag, first), (second_flag, second) = response.framed()
    assert (first_flag, second_flag) == (1, 0)
    assert len(StreamingOutputCallResponse.FromString(zlib.decompress(first, 31)).payload.body) == 31415
    assert len(StreamingOutputCallResponse.FromString(second).payload.body) == 92653


async def test_client_compressed_unary_on_the_wire_probe_compressed_and_plain() -> None:
    def request(expect: bool) -> bytes:
        body = Payload(body=bytes(271828))
        return SimpleRequest(
            response_size=314159, payload=body, expect_compressed=BoolValue(value=expect)
        ).SerializeToString()

    async with running_server([InteropService()]) as (_, target):
        port = port_of(target)
        # The probe: claims to be compressed, is not (flag 0, in a gzip call).
        probe = await raw_call(port, UNARY, framed(request(True), 0), encoding=b"gzip")
        assert probe.grpc_status == Status.INVALID_ARGUMENT.value
        compressed = await raw_call(port, UNARY, framed(gzip(request(True)), 1), encoding=b"gzip")
        assert compressed.grpc_status == 0
        plain = await raw_call(port, UNARY, framed(request(False), 0), encoding=b"gzip")
        assert plain.grpc_status == 0
        # And a compressed message that says it is not.
        liar = await raw_call(port, UNARY, framed(gzip(request(False)), 1), encoding=b"gzip")
        assert liar.grpc_status == Status.INVALID_ARGUMENT.value


async def test_our_client_sends_the_flag_per_message() -> None:
    # What client_compressed_streaming asks of our client, seen by the handler: the first
    # message compressed, the second not, in one gzip call.
    seen: list[tuple[str, bool]] = []

    async def collect(stream: Stream[BytesValue, BytesValue]) -> None:
        async for _ in stream:
            seen.append((stream.request_encoding, stream.last_message_compressed))
        await stream.send_message(BytesValue())

    handler = Handler(collect, Cardinality.STREAM_UNARY, BytesValue, BytesValue)
    service = type("Collect", (), {"__mapping__": lambda self: {"/t.C/Collect": handler}})()
    async with running_server([service]) as (_, target), Channel("127.0.0.1", port_of(target)) as channel:
        async with channel.request(
            "/t.C/Collect", Cardinality.STREAM_UNARY, BytesValue, BytesValue, compression="gzip"
        ) as call:
            await call.send_message(BytesValue(value=b"a" * 1000))
            await call.send_message(BytesValue(value=b"b" * 1000), compress=False, end=True)
            await call.recv_message()
            await call.recv_trailing_metadata()
            assert call.request_encoding == "gzip"
    assert seen == [("gzip", True), ("gzip", False)]


# -- choosing the reply encoding -------------------------------------------------------


async def echo_compressed(stream: Stream[BytesValue, BytesValue]) -> None:
    """Echo, compressing the reply with the encoding named in the request (if any)."""
    request = await stream.recv_message()
    assert request is not None
    if request.value:
        stream.set_compression(request.value.decode())
    await stream.send_message(BytesValue(value=b"reply " * 100))


ECHO = {"/t.E/Echo": Handler(echo_compressed, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}


def echo_service() -> object:
    return type("Echo", (), {"__mapping__": lambda self: ECHO})()


async def test_a_reply_encoding_the_client_does_not_accept_is_not_used() -> None:
    async with running_server([echo_service()]) as (_, target):
        request = framed(BytesValue(value=b"gzip").SerializeToString(), 0)
        accepted = await raw_call(port_of(target), "/t.E/Echo", request, accept=b"gzip")
        assert accepted.header(b"grpc-encoding") == b"gzip" and accepted.framed()[0][0] == 1
        for accept in (b"identity", None):
            refused = await raw_call(port_of(target), "/t.E/Echo", request, accept=accept)
            assert refused.grpc_status == 0
            assert refused.header(b"grpc-encoding") is None and refused.framed()[0][0] == 0


async def test_set_compression_is_checked_and_only_before_the_headers() -> None:
    outcomes: list[str] = []

    async def misuse(stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        try:
            stream.set_compression("snappy-not-registered")
        except ValueError as exc:
            outcomes.append(f"ValueError: {exc}")
        assert stream.set_compression("identity") == "identity"
        await stream.send_initial_metadata()
        try:
            stream.set_compression("gzip")
        except ProtocolError as exc:
            outcomes.append(f"ProtocolError: {exc}")
        await stream.send_message(BytesValue())

    mapping = {"/t.M/Misuse": Handler(misuse, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}
    service = type("Misuse", (), {"__mapping__": lambda self: mapping})()
    async with running_server([service]) as (_, target), Channel("127.0.0.1", port_of(target)) as channel:
        async with channel.request("/t.M/Misuse", Cardinality.UNARY_UNARY, BytesValue, BytesValue) as call:
            await call.send_message(BytesValue(), end=True)
            assert await call.recv_message() == BytesValue()
    assert outcomes[0].startswith("ValueError: unsupported encoding 'snappy-not-registered'")
    assert outcomes[1] == "ProtocolError: cannot send headers: the response headers were sent already"


@pytest.mark.parametrize("accept", [b"gzip,deflate", b"identity,deflate,gzip"])
@pytest.mark.parametrize(
    ("default", "request_encoding", "reply_flag"),
    [(None, None, 0), (None, b"gzip", 1), ("gzip", None, 1), ("identity", b"gzip", 0), ("deflate", None, 1)],
)
async def test_the_servers_default_reply_encoding(
    default: str | None, request_encoding: bytes | None, reply_flag: int, accept: bytes
) -> None:
    server = Server([echo_service()], compression=default)
    await server.start("127.0.0.1", 0)
    try:
        message = BytesValue().SerializeToString()
        body = framed(gzip(message), 1) if request_encoding else framed(message, 0)
        response = await raw_call(
            server.sockets[0].getsockname()[1], "/t.E/Echo", body, encoding=request_encoding, accept=accept
        )
        assert response.grpc_status == 0
        assert response.framed()[0][0] == reply_flag
        expected = None if not reply_flag else (default or "gzip").encode()
        assert response.header(b"grpc-encoding") == expected
    finally:
        server.close()
        await server.wait_closed()


async def test_the_default_reply_encoding_is_checked_when_configured() -> None:
    with pytest.raises(ValueError, match="unsupported encoding 'brotli'"):
        Server([], compression="brotli")
    with pytest.raises(SettingsError, match="compression 'brotli' is not a registered encoding"):
        load_settings(AppSettings, compression="brotli")
    assert load_settings(AppSettings, compression="deflate").compression == "deflate"


# -- the client's choices ----------------------------------------------------------------


async def test_one_uncompressed_call_on_a_gzip_channel() -> None:
    seen: list[str] = []

    async def record(stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        seen.append(stream.request_encoding)
        await stream.send_message(BytesValue())

    mapping = {"/t.R/Record": Handler(record, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}
    service = type("Record", (), {"__mapping__": lambda self: mapping})()
    async with running_server([service]) as (_, target):
        async with Channel("127.0.0.1", port_of(target), compression="gzip") as channel:
            for compression in (None, "identity", "deflate"):
                async with channel.request(
                    "/t.R/Record", Cardinality.UNARY_UNARY, BytesValue, BytesValue, compression=compression
                ) as call:
                    await call.send_message(BytesValue(value=b"x"), end=True)
                    await call.recv_trailing_metadata()
            with pytest.raises(ValueError, match="unsupported encoding 'lz4'"):
                channel.request("/t.R/Record", Cardinality.UNARY_UNARY, BytesValue, BytesValue, compression="lz4")
    assert seen == ["gzip", "identity", "deflate"]
    with pytest.raises(ValueError, match="unsupported encoding 'lz4'"):
        Channel("127.0.0.1", 1, compression="lz4")


async def test_deflate_both_ways_with_grpcio() -> None:
    # Our client compressing with deflate against grpcio's server, and grpcio's client
    # compressing with deflate against ours.
    async with grpcio_interop_server() as port, Channel("127.0.0.1", port, compression="deflate") as channel:
        await CASES["large_unary"](channel)
        await CASES["client_compressed_streaming_noprobe"](channel)
    async with running_server([InteropService()]) as (_, target):
        async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Deflate) as grpcio_channel:
            unary = grpcio_channel.unary_unary(
                UNARY,
                request_serializer=SimpleRequest.SerializeToString,
                response_deserializer=SimpleResponse.FromString,
            )
            request = SimpleRequest(
                response_size=1000, payload=Payload(body=bytes(50000)), expect_compressed=BoolValue(value=True)
            )
            assert len((await unary(request)).payload.body) == 1000


# -- a registered encoding ---------------------------------------------------------------


def _xz_decompress(data: bytes, max_length: int) -> bytes:
    inflater = lzma.LZMADecompressor(lzma.FORMAT_XZ)
    try:
        out = inflater.decompress(data, max_length + 1)
    except lzma.LZMAError as exc:
        raise DecompressionError(str(exc)) from None
    if len(out) > max_length:
        raise DecompressedTooLarge(f"decompressed message larger than max ({max_length} bytes)")
    if not inflater.eof:
        raise DecompressionError("truncated xz data")
    return out


@pytest.fixture
def xz() -> Iterator[None]:
    register_encoding(Encoding("xz", lambda data: lzma.compress(data, lzma.FORMAT_XZ), _xz_decompress))
    try:
        yield
    finally:
        unregister_encoding("xz")


async def test_a_registered_encoding_works_end_to_end(xz: None) -> None:
    assert registered_encodings() == ("gzip", "deflate", "xz")
    async with running_server([echo_service()]) as (_, target):
        async with Channel("127.0.0.1", port_of(target), compression="xz") as channel:
            async with channel.request("/t.E/Echo", Cardinality.UNARY_UNARY, BytesValue, BytesValue) as call:
                await call.send_message(BytesValue(value=b"xz"), end=True)
                assert (await call.recv_message()) == BytesValue(value=b"reply " * 100)
                assert call.response_encoding == "xz" and call.last_message_compressed
        # A bomb in the new encoding is capped like gzip's.
        bomb = lzma.compress(BytesValue(value=bytes(8 * 1024 * 1024)).SerializeToString(), lzma.FORMAT_XZ)
        response = await raw_call(port_of(target), "/t.E/Echo", framed(bomb, 1), encoding=b"xz")
        assert response.grpc_status == Status.RESOURCE_EXHAUSTED.value
        assert "decompressed message larger than max" in (response.grpc_message or "")


async def test_an_unknown_request_encoding_is_unimplemented_with_the_accepted_list(xz: None) -> None:
    async with running_server([echo_service()]) as (_, target):
        response = await raw_call(port_of(target), "/t.E/Echo", framed(b"", 1), encoding=b"br")
    assert response.grpc_status == Status.UNIMPLEMENTED.value
    assert response.header(b"grpc-accept-encoding") == b"gzip,deflate,xz,identity"
    assert response.grpc_message == "grpc-encoding br is not supported; accepted: gzip, deflate, xz, identity"


async def test_encoding_names_are_tokens() -> None:
    noop = Encoding("x", bytes, lambda data, limit: data)
    for name in ("", "Gzip", "a,b", " x", "identity", "a b", "x\x01", "zstd;q=1", "snäppy"):
        with pytest.raises(ValueError):
            register_encoding(Encoding(name, noop.compress, noop.decompress))


async def test_an_encoding_that_fails_to_compress_ends_the_call_internal_both_ways() -> None:
    def failing(data: bytes) -> bytes:
        raise RuntimeError("compressor bug")

    register_encoding(Encoding("failing", failing, lambda data, limit: data))
    try:
        caught: list[str] = []

        async def reply_failing(stream: Stream[BytesValue, BytesValue]) -> None:
            await stream.recv_message()
            stream.set_compression("failing")
            try:
                await stream.send_message(BytesValue(value=b"x"))
            except GRPCError as exc:
                caught.append(str(exc))  # the call is over; returning does not make it OK

        mapping = {"/t.F/Fail": Handler(reply_failing, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}
        service = type("F", (), {"__mapping__": lambda self: mapping})()
        async with running_server([service]) as (_, target):
            response = await raw_call(port_of(target), "/t.F/Fail", framed(b"", 0), accept=b"failing")
            assert response.grpc_status == Status.INTERNAL.value
            assert response.grpc_message == "could not compress the message with failing: compressor bug"
            assert caught == ["INTERNAL: could not compress the message with failing: compressor bug"]
            async with Channel("127.0.0.1", port_of(target), compression="failing") as channel:
                async with channel.request("/t.F/Fail", Cardinality.UNARY_UNARY, BytesValue, BytesValue) as call:
                    with pytest.raises(GRPCError) as info:
                        await call.send_message(BytesValue(value=b"x"), end=True)
                    assert info.value.status is Status.INTERNAL
                    with pytest.raises(GRPCError):
                        await call.recv_trailing_metadata()
    finally:
        unregister_encoding("failing")


async def test_a_failing_encoding_fails_the_call_not_the_connection() -> None:
    def broken(data: bytes, max_length: int) -> bytes:
        raise RuntimeError("codec bug")

    register_encoding(Encoding("broken", lambda data: data, broken))
    try:
        async with running_server([echo_service()]) as (_, target):
            response = await raw_call(port_of(target), "/t.E/Echo", framed(b"\x0a\x00", 1), encoding=b"broken")
            assert response.grpc_status == Status.INTERNAL.value
            assert response.grpc_message == "could not decompress broken message: codec bug"
            async with Channel("127.0.0.1", port_of(target)) as channel:
                async with channel.request("/t.E/Echo", Cardinality.UNARY_UNARY, BytesValue, BytesValue) as call:
                    await call.send_message(BytesValue(), end=True)
                    assert await call.recv_message() is not None
    finally:
        unregister_encoding("broken")
