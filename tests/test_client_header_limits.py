"""A response header list over the client's advertised limit costs its own call only.

SETTINGS_MAX_HEADER_LIST_SIZE is advisory (RFC 9113 §10.5.1) and grpcio's server ignores the
one a client advertises. A response whose initial metadata or trailers decode to more than
``max_header_list_size`` fails that call with RESOURCE_EXHAUSTED (as grpc-core's client does) and
resets its stream with CANCEL; the block is still decoded whole, so HPACK's table stays what the
server's encoder thinks it is, and the connection and its other calls go on. Only a block past
``max_header_block_size``, as sent or decoded, still ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import Cardinality, Channel, Configuration, GRPCError, Status
from app_kit.aio.client import method_for
from app_kit.rpc.framing import frame_message

from .fake_server import FakeConnection, fake_server
from .frames import CONTINUATION, END_HEADERS, HEADERS, frame

pytestmark = pytest.mark.anyio

LIMIT = Configuration().max_header_list_size  # 16 KiB, what our client advertises
HARD_CAP = Configuration().max_header_block_size  # 32 KiB
BIG = 20 * 1024  # one metadata value: over the limit, under the hard cap
CANCEL = 8
RESPONSE_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
# As in test_header_limits: ~20.7 KiB of list whose fields all enter the server's HPACK table,
# which keeps only the last few; the next block refers to those by index.
PADS = [(f"x-pad-{index}".encode(), bytes([97 + index]) * 1000) for index in range(20)]
MARKER = (b"x-marker", b"after-the-limit")


def list_size(headers: list[tuple[bytes, bytes]]) -> int:
    """RFC 9113 §6.5.2: name + value + 32 per field."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


assert LIMIT < list_size([*RESPONSE_HEAD, *PADS, MARKER]) < HARD_CAP


class BigMetadata:
    """grpc.aio handlers: two send metadata over our client's limit, one waits to be released."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def unary(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        return request

    async def wait(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        self.waiting.set()
        await asyncio.wait_for(self.release.wait(), 10)
        return request

    async def big_trailers(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        context.set_trailing_metadata((("x-big", "t" * BIG),))
        return request

    async def big_headers(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        await context.send_initial_metadata((("x-big", "h" * BIG),))
        try:
            await asyncio.sleep(10)  # until the client's RST_STREAM cancels it
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return request

    def handlers(self) -> grpc.GenericRpcHandler:
        def rpc(fn):  # type: ignore[no-untyped-def]
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=BytesValue.FromString, response_serializer=BytesValue.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            "test.Big",
            {
                "Unary": rpc(self.unary),
                "Wait": rpc(self.wait),
                "BigTrailers": rpc(self.big_trailers),
                "BigHeaders": rpc(self.big_headers),
            },
        )


@contextlib.asynccontextmanager
async def grpcio_server(service: BigMetadata) -> AsyncIterator[int]:
    # grpcio's own limits are on what it receives; raised anyway, so nothing of grpcio's stands
    # between the handler's metadata and the wire.
    server = grpc.aio.server(options=[("grpc.max_metadata_size", 64 * 1024)])
    server.add_generic_rpc_handlers((service.handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


def method(channel: Channel, name: str, service: str = "test.Big"):  # type: ignore[no-untyped-def]
    return method_for(channel, f"/{service}/{name}", Cardinality.UNARY_UNARY, BytesValue, BytesValue)


@pytest.mark.parametrize("where", ["BigTrailers", "BigHeaders"])
async def test_an_oversized_response_fails_its_call_alone(where: str) -> None:
    service = BigMetadata()
    async with grpcio_server(service) as port, Channel("127.0.0.1", port) as channel:
        assert (await method(channel, "Unary")(BytesValue(value=b"first"), timeout=5)).value == b"first"
        protocol = channel._protocol
        assert protocol is not None

        waiting = asyncio.ensure_future(method(channel, "Wait")(BytesValue(value=b"waited"), timeout=10))
        await asyncio.wait_for(service.waiting.wait(), 5)
        with pytest.raises(GRPCError) as info:
            await asyncio.wait_for(method(channel, where)(BytesValue(value=b"big"), timeout=5), 10)
        assert info.value.status is Status.RESOURCE_EXHAUSTED, info.value
        message = info.value.message or ""
        assert "header list of" in message and f"over the limit of {LIMIT}" in message, message
        assert not waiting.done(), "the call in flight must not be touched"
        assert not protocol.connection.closed, "the connection must go on"
        if where == "BigHeaders":
            # The server had more to send: the client's RST_STREAM CANCEL reached its handler.
            await asyncio.wait_for(service.cancelled.wait(), 5)

        service.release.set()
        assert (await asyncio.wait_for(waiting, 10)).value == b"waited"
        assert (await method(channel, "Unary")(BytesValue(value=b"after"), timeout=5)).value == b"after"
        assert channel._protocol is protocol and not protocol.connection.closed  # the same connection


async def test_hpack_stays_in_sync_after_an_oversized_response() -> None:
    # A scripted server (h2, whose HPACK encoder indexes every field): call 1 waits, call 2 gets
    # oversized initial metadata and nothing else, call 3 gets fields that call 2's block put
    # into the table, sent as indices: they decode right only if that block was decoded whole.
    peers: list[FakeConnection] = []
    held: list[int] = []
    payload = BytesValue(value=b"ok").SerializeToString()

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        peers.append(connection)
        if number == 1:
            held.append(stream_id)
        elif number == 2:
            connection.conn.send_headers(stream_id, [*RESPONSE_HEAD, *PADS, MARKER])
        else:
            table = connection.conn.encoder.header_table.dynamic_entries
            assert MARKER in table and PADS[-1] in table, "the block must use indexed fields"
            connection.conn.send_headers(stream_id, [*RESPONSE_HEAD, MARKER, PADS[-1]])
            connection.conn.send_data(stream_id, frame_message(payload))
            connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
            connection.reply(held[0], BytesValue(value=b"held").SerializeToString())

    async with fake_server(script) as (port, log), Channel("127.0.0.1", port) as channel:
        unary = method(channel, "Unary", "test.Echo")
        first = asyncio.ensure_future(unary(BytesValue(), timeout=10))
        async with asyncio.timeout(5):
            while not log:
                await asyncio.sleep(0.01)
        with pytest.raises(GRPCError) as info:
            await asyncio.wait_for(unary(BytesValue(), timeout=5), 10)
        assert info.value.status is Status.RESOURCE_EXHAUSTED, info.value
        size = list_size([*RESPONSE_HEAD, *PADS, MARKER])
        assert info.value.message == (
            f"response header list of {size} bytes is over the limit of {LIMIT} (SETTINGS_MAX_HEADER_LIST_SIZE)"
        )
        async with asyncio.timeout(5):
            while not peers[0].resets:
                await asyncio.sleep(0.01)
        assert peers[0].resets == [(log[1], CANCEL)]
        assert not first.done()

        async with unary.open() as stream:
            await stream.send_message(BytesValue(value=b"third"), end=True)
            initial = await asyncio.wait_for(stream.recv_initial_metadata(), 5)
            assert (await stream.recv_message()).value == b"ok"
        assert initial["x-marker"] == MARKER[1].decode()
        assert initial["x-pad-19"] == PADS[-1][1].decode()
        assert (await asyncio.wait_for(first, 5)).value == b"held"
        assert len({id(peer) for peer in peers}) == 1  # one connection throughout


def _past_the_cap_as_sent(stream_id: int) -> bytes:
    # 40 KiB of block in HEADERS + CONTINUATION frames: refused from the frame headers.
    block = hpack.Encoder().encode([*RESPONSE_HEAD, (b"x-big", b"a" * 40_000)], huffman=False)
    assert len(block) > HARD_CAP
    chunk = 16_384
    parts = [frame(HEADERS, 0, stream_id, block[:chunk])]
    for start in range(chunk, len(block), chunk):
        last = start + chunk >= len(block)
        parts.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start : start + chunk]))
    return b"".join(parts)


def _past_the_cap_decoded(stream_id: int) -> bytes:
    # An HPACK bomb: one 4 KiB entry enters the table, eight 1-byte references repeat it.
    bomb = (b"x-bomb", b"z" * 4000)
    block = hpack.Encoder().encode([*RESPONSE_HEAD, *[bomb] * 9])
    assert len(block) < LIMIT and list_size([bomb] * 9) > HARD_CAP
    return frame(HEADERS, END_HEADERS, stream_id, block)


@pytest.mark.parametrize("build", [_past_the_cap_as_sent, _past_the_cap_decoded])
async def test_a_block_past_the_hard_cap_still_ends_the_connection(build) -> None:  # type: ignore[no-untyped-def]
    # The first headers the server sends on the connection: a fresh encoder is in step with
    # the client's decoder.
    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 2:
            connection.flush()
            connection.transport.write(build(stream_id))  # type: ignore[attr-defined]

    async with fake_server(script) as (port, log), Channel("127.0.0.1", port) as channel:
        unary = method(channel, "Unary", "test.Echo")
        first = asyncio.ensure_future(unary(BytesValue(), timeout=10))
        async with asyncio.timeout(5):
            while not log:
                await asyncio.sleep(0.01)
        second = asyncio.ensure_future(unary(BytesValue(), timeout=10))
        outcomes = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5)
        for outcome in outcomes:
            assert isinstance(outcome, GRPCError) and outcome.status is Status.UNAVAILABLE, outcome
            assert "connection closed" in (outcome.message or ""), outcome


async def test_a_message_over_the_limit_with_its_trailers_in_the_same_read_fails_its_call_alone() -> None:
    # The stream is closed in h2 by the time the message is refused (the trailers came in the
    # same read): the call fails on its own, without a reset on the closed stream (h2 raised,
    # and the whole connection went down with INTERNAL_ERROR).
    held: list[int] = []

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 1:
            held.append(stream_id)
        elif number == 2:
            connection.reply(stream_id, BytesValue(value=b"x" * 100).SerializeToString())  # one write
        else:
            connection.reply(stream_id, BytesValue(value=b"ok").SerializeToString())
            connection.reply(held[0], BytesValue(value=b"held").SerializeToString())

    config = Configuration(max_receive_message_length=64)
    async with fake_server(script) as (port, log), Channel("127.0.0.1", port, config=config) as channel:
        unary = method(channel, "Unary", "test.Echo")
        first = asyncio.ensure_future(unary(BytesValue(), timeout=10))
        async with asyncio.timeout(5):
            while not log:
                await asyncio.sleep(0.01)
        protocol = channel._protocol
        with pytest.raises(GRPCError) as info:
            await asyncio.wait_for(unary(BytesValue(), timeout=5), 10)
        assert info.value.status is Status.RESOURCE_EXHAUSTED, info.value
        assert (await asyncio.wait_for(unary(BytesValue(), timeout=5), 10)).value == b"ok"
        assert (await asyncio.wait_for(first, 5)).value == b"held"
        assert channel._protocol is protocol and protocol is not None and not protocol.connection.closed
