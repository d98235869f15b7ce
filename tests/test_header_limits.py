"""Header lists over the advertised limit cost their own stream; only a block past the hard cap
(or one that cannot be decoded) costs the connection.

SETTINGS_MAX_HEADER_LIST_SIZE is advisory (RFC 9113 §10.5.1): a peer may send more. A request
over ``max_header_list_size`` is answered Trailers-Only RESOURCE_EXHAUSTED, as grpc-core does,
while the block is still decoded whole, so that HPACK's dynamic table stays what the peer's
encoder thinks it is ("The field block MUST be processed to ensure a consistent connection
state"). Past ``max_header_block_size`` the connection gets GOAWAY ENHANCE_YOUR_CALM.
"""

from __future__ import annotations

import asyncio

import grpc
import h2.events
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue

from app_kit import Configuration, Status
from app_kit.rpc.events import ConnectionClosed, RequestReceived
from app_kit.rpc.server import ServerConnection

from .conftest import running_server
from .frames import CONTINUATION, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, SETTINGS, RawPeer, frame
from .h2client import RawClient, Response
from .services import EchoService

pytestmark = pytest.mark.anyio

COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
LIMIT = Configuration().max_header_list_size  # 16 KiB, advertised
HARD_CAP = Configuration().max_header_block_size  # 32 KiB
RESOURCE_EXHAUSTED = Status.RESOURCE_EXHAUSTED.value
BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/test.Echo/Unary"),
    (b":authority", b"localhost"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
]


def list_size(headers: list[tuple[bytes, bytes]]) -> int:
    """RFC 9113 §6.5.2 (and gRPC's PROTOCOL-HTTP2): name + value + 32 per field."""
    return sum(len(name) + len(value) + 32 for name, value in headers)


# 20 fields of ~1 KiB (about 20.7 KiB of list), then a small one past the 16 KiB point: all
# of them enter the dynamic table, which keeps only the last few (it holds 4096 bytes).
PADS = [(f"x-pad-{index}".encode(), bytes([97 + index]) * 1000) for index in range(20)]
MARKER = (b"x-marker", b"after-the-limit")
OVERSIZED = [*PADS, MARKER]
assert LIMIT < list_size(BASE + OVERSIZED) < HARD_CAP


async def test_an_oversized_request_is_refused_alone_and_hpack_stays_in_sync() -> None:
    service = EchoService()
    async with running_server([service]) as (server, _):
        async with RawClient("127.0.0.1", server.sockets[0].getsockname()[1]) as client:

            def goaways() -> list[h2.events.ConnectionTerminated]:
                return [event for event in client.events if isinstance(event, h2.events.ConnectionTerminated)]

            sleeping = await client.request("/test.Echo/Sleep", DoubleValue(value=0.5).SerializeToString())
            await asyncio.wait_for(service.started.wait(), 5)  # in flight (our SETTINGS ACK is in, too)

            # h2's encoder is an hpack.Encoder that indexes every field: the big block inserts
            # its fields into the dynamic table, and the next block refers to them by index.
            refused = await client.request(
                "/test.Echo/Unary", BytesValue(value=b"big").SerializeToString(), extra=OVERSIZED
            )
            await client.wait_for(lambda: client.responses.get(refused, Response()).ended or bool(goaways()))
            assert not goaways(), f"the whole connection was ended: {goaways()}"
            response = client.responses[refused]
            assert (response.http_status, response.grpc_status) == (200, RESOURCE_EXHAUSTED)
            assert response.header(b"content-type") == b"application/grpc"
            assert "header list of" in (response.grpc_message or "")
            assert f"limit of {LIMIT}" in (response.grpc_message or "")
            in_flight = client.responses.get(sleeping)
            assert in_flight is None or not in_flight.ended, "the other call must still be in flight"

            # The call in flight completes normally.
            slept = await client.read_response(sleeping)
            assert slept.grpc_status == 0 and slept.reset_code is None
            assert DoubleValue.FromString(slept.messages()[0]).value == 0.5

            # The server decoded the refused block whole: a block that refers to the entries it
            # inserted last (after the 16 KiB point) decodes to the same fields on both sides.
            table = client.conn.encoder.header_table.dynamic_entries
            assert MARKER in table and PADS[-1] in table, "the next block must use indexed fields"
            extra = [MARKER, PADS[-1]]
            follow_up = await client.request(
                "/test.Echo/Unary", BytesValue(value=b"next").SerializeToString(), extra=extra
            )
            answered = await client.read_response(follow_up)
            assert answered.grpc_status == 0, answered.grpc_message
            assert BytesValue.FromString(answered.messages()[0]).value == b"next"
            echoed = [field for field in answered.headers if field[0].startswith(b"x-")]
            assert sorted(echoed) == sorted(extra)
            assert not goaways()


async def test_the_limit_is_the_advertised_one_to_the_byte() -> None:
    async with running_server([EchoService()]) as (server, _):
        async with RawClient("127.0.0.1", server.sockets[0].getsockname()[1]) as client:
            name = b"x-fill"
            filler = LIMIT - list_size([*BASE, (name, b"")])
            payload = BytesValue(value=b"v").SerializeToString()
            at_limit = await client.request("/test.Echo/Unary", payload, extra=[(name, b"a" * filler)])
            over = await client.request("/test.Echo/Unary", payload, extra=[(name, b"b" * (filler + 1))])
            assert (await client.read_response(at_limit)).grpc_status == 0
            assert (await client.read_response(over)).grpc_status == RESOURCE_EXHAUSTED


async def test_grpcio_gets_resource_exhausted_and_its_channel_keeps_working() -> None:
    service = EchoService()
    async with running_server([service]) as (_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
            sleep = channel.unary_unary("/test.Echo/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
            assert (await unary(BytesValue(value=b"first"), timeout=5)).value == b"first"
            first_peer = service.observed["peer"]

            sleeping = asyncio.ensure_future(sleep(DoubleValue(value=0.5), timeout=5))
            await asyncio.wait_for(service.started.wait(), 5)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await unary(BytesValue(value=b"big"), metadata=[("x-big", "a" * (20 * 1024))], timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"over the limit of {LIMIT}" in (caught.value.details() or "")

            assert (await sleeping).value == 0.5  # the call in flight was not touched
            assert (await unary(BytesValue(value=b"after"), timeout=5)).value == b"after"
            assert service.observed["peer"] == first_peer  # on the same connection


def _oversized_block(encoder: hpack.Encoder) -> bytes:
    return encoder.encode([*BASE, *OVERSIZED])


def _past_the_cap_as_sent() -> bytes:
    # 40 KiB of block in HEADERS + CONTINUATION frames: cut off from the frame headers.
    block = hpack.Encoder().encode([*BASE, (b"x-big", b"a" * 40_000)], huffman=False)
    assert len(block) > HARD_CAP
    chunk = 16_384
    parts = [frame(HEADERS, END_STREAM, 1, block[:chunk])]
    for start in range(chunk, len(block), chunk):
        parts.append(
            frame(CONTINUATION, END_HEADERS if start + chunk >= len(block) else 0, 1, block[start : start + chunk])
        )
    return HANDSHAKE + b"".join(parts)


def _past_the_cap_decoded() -> bytes:
    # An HPACK bomb: one 4 KiB entry enters the table, eight 1-byte references repeat it.
    # About 5 KiB on the wire, over 36 KiB decoded.
    bomb = (b"x-bomb", b"z" * 4000)
    block = hpack.Encoder().encode([*BASE, *[bomb] * 9])
    assert len(block) < LIMIT and list_size([bomb] * 9) > HARD_CAP
    return HANDSHAKE + frame(HEADERS, END_HEADERS | END_STREAM, 1, block)


def _oversized_and_undecodable() -> bytes:
    block = _oversized_block(hpack.Encoder()) + b"\xff\xff\xff\xff\xff"  # an index far past the table
    return HANDSHAKE + frame(HEADERS, END_HEADERS | END_STREAM, 1, block)


@pytest.mark.parametrize(
    ("case", "code", "debug"),
    [
        ("past the hard cap as sent", ENHANCE_YOUR_CALM, b"header_block_too_large"),
        ("past the hard cap decoded", ENHANCE_YOUR_CALM, None),
        ("oversized and undecodable", COMPRESSION_ERROR, None),
    ],
)
async def test_blocks_past_the_hard_cap_or_undecodable_end_the_connection(
    case: str, code: int, debug: bytes | None
) -> None:
    data = {
        "past the hard cap as sent": _past_the_cap_as_sent,
        "past the hard cap decoded": _past_the_cap_decoded,
        "oversized and undecodable": _oversized_and_undecodable,
    }[case]()
    async with running_server([EchoService()]) as (server, target):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            await peer.send(data)
            await peer.wait_closed()
        assert [goaway.error_code for goaway in peer.goaways] == [code], case
        if debug is not None:
            assert peer.goaways[0].additional_data == debug
        async with grpc.aio.insecure_channel(target) as channel:  # the server itself is fine
            unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
            assert (await unary(BytesValue(value=b"ok"), timeout=5)).value == b"ok"


async def test_refusals_count_towards_the_reset_budget() -> None:
    # Each refusal is the peer ignoring a limit it was told of, like a malformed request
    # ("MadeYouReset"): a peer that keeps doing it loses the connection.
    config = Configuration(max_resets_per_window=3)
    encoder = hpack.Encoder()
    async with running_server([EchoService()], config=config) as (server, _):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            await peer.send(HANDSHAKE)
            for stream_id in (1, 3, 5):
                await peer.send(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, _oversized_block(encoder)))
            async with asyncio.timeout(5):
                while len(peer.trailer_statuses()) < 3:
                    await asyncio.sleep(0.01)
            assert peer.trailer_statuses() == {1: b"8", 3: b"8", 5: b"8"}
            assert not peer.goaways
            await peer.send(frame(HEADERS, END_HEADERS | END_STREAM, 7, _oversized_block(encoder)))
            await peer.wait_closed()
        assert [(g.error_code, g.additional_data) for g in peer.goaways] == [(ENHANCE_YOUR_CALM, b"flood")]


def test_the_core_keeps_hpack_in_sync_after_our_settings_are_acknowledged() -> None:
    # Sans-IO, deterministic: h2 writes the advertised limit into the decoder when the peer
    # ACKs our SETTINGS; the decoder must keep decoding up to the hard cap all the same.
    connection = ServerConnection(Configuration())
    connection.initiate()
    encoder = hpack.Encoder()
    events = connection.receive_data(
        HANDSHAKE
        + frame(SETTINGS, 0x1, 0)  # ACK
        + frame(HEADERS, END_HEADERS | END_STREAM, 1, _oversized_block(encoder))
        + frame(HEADERS, END_HEADERS | END_STREAM, 3, encoder.encode([*BASE, MARKER, PADS[-1]]))
    )
    assert not [event for event in events if isinstance(event, ConnectionClosed)]
    received = [event for event in events if isinstance(event, RequestReceived)]
    assert [event.stream_id for event in received] == [3]
    assert list(received[0].head.headers) == [MARKER, PADS[-1]]
    output = bytes(connection.data_to_send())
    decoder, statuses = hpack.Decoder(), {}
    while output:
        length, kind, stream_id = int.from_bytes(output[:3], "big"), output[3], int.from_bytes(output[5:9], "big")
        if kind == HEADERS:
            for name, value in decoder.decode(output[9 : 9 + length], raw=True):
                if name == b"grpc-status":
                    statuses[stream_id] = value
        output = output[9 + length :]
    assert statuses == {1: b"8"}


def test_the_hard_cap_is_a_setting_at_least_the_list_limit() -> None:
    assert (LIMIT, HARD_CAP) == (16 * 1024, 32 * 1024)
    with pytest.raises(ValueError, match="max_header_block_size"):
        Configuration(max_header_list_size=64 * 1024)
    assert Configuration(max_header_list_size=64 * 1024, max_header_block_size=128 * 1024).max_header_block_size
