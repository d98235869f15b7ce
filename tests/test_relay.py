"""Our server (and our client) with every read cut at random, through a re-segmenting TCP relay.

Loopback hands a peer's write over as one read; a network does not. Each test here relays the
connection through :class:`tests.relay.SegmentingRelay`, which cuts both directions into writes
of 1 to 1448 bytes (many of 1 to 9 bytes, splitting frame headers and message prefixes at every
offset). Every call must succeed on the one connection the channel opened, with no GOAWAY
carrying an error. The relay's seed is printed; ``RELAY_SEED=<seed>`` repeats its cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from app_kit import Channel, GRPCError, Status

from .conftest import running_server
from .relay import MSS, SegmentingRelay, segmenting_relay
from .services import EchoService
from .test_client import methods

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
KiB = 1024
# No retries: a call the client silently re-ran after a GOAWAY would hide the failure.
GRPCIO_OPTIONS = [("grpc.enable_retries", 0)]
ASCII_VALUE = "plain value, " * 120 + "end"  # ~1.5 KB: the header block spans many pieces
BINARY_VALUE = bytes(range(256)) * 4


@contextlib.asynccontextmanager
async def relayed_server(service: EchoService | None = None) -> AsyncIterator[tuple[SegmentingRelay, str]]:
    """Our server with the echo service, behind a relay; yield the relay and its target."""
    async with running_server([service or EchoService()]) as (server, _):
        async with SegmentingRelay("127.0.0.1", server.sockets[0].getsockname()[1]) as relay:
            yield relay, f"127.0.0.1:{relay.port}"


def assert_one_clean_connection(relay: SegmentingRelay) -> None:
    """The channel kept its one connection, and nobody sent a GOAWAY with an error."""
    assert relay.connections == 1 and not relay.error_goaways, relay.describe()


def _method(channel: grpc.aio.Channel, kind: str, path: str, request_type, reply_type):  # type: ignore[no-untyped-def]
    return getattr(channel, kind)(
        path, request_serializer=request_type.SerializeToString, response_deserializer=reply_type.FromString
    )


def _describe_failures(failures: list[BaseException], total: int, relay: SegmentingRelay) -> str:
    first = failures[0]
    what = f"{first.code()}: {first.details()}" if isinstance(first, grpc.aio.AioRpcError) else repr(first)
    return f"{len(failures)} of {total} calls failed; first: {what}; {relay.describe()}"


# The relay itself.


async def test_relay_cuts_every_way_keeps_every_byte_and_forwards_half_close() -> None:
    reads: list[int] = []

    async def echo_then_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(64 * KiB):
            reads.append(len(chunk))
            writer.write(chunk)
            await writer.drain()
        writer.write(b"bye")  # after the client's EOF: the other direction still works
        await writer.drain()
        writer.close()

    payload = os.urandom(256 * KiB)
    upstream = await asyncio.start_server(echo_then_bye, "127.0.0.1", 0)
    try:
        async with SegmentingRelay("127.0.0.1", upstream.sockets[0].getsockname()[1]) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            try:
                with anyio.fail_after(10):
                    writer.write(payload)
                    writer.write_eof()
                    received = await reader.read()  # up to EOF
            finally:
                writer.close()
        assert received == payload + b"bye", relay.describe()
        assert relay.connections == 1 and relay.resets == 0, relay.describe()
        assert relay.bytes == {"client->upstream": len(payload), "upstream->client": len(payload) + 3}
        assert all(relay.small_pieces.values()), relay.small_pieces  # every size from 1 to 9 was written
        # The cuts reach the reader: it reads (nearly) each piece alone, the small ones too.
        assert max(reads) <= 2 * MSS and len(reads) >= 0.9 * relay.pieces["client->upstream"], reads
        assert sum(size < 10 for size in reads) >= 20, reads
    finally:
        upstream.close()
        await upstream.wait_closed()


async def test_relay_forwards_a_reset_and_leaves_nothing_behind_on_exit() -> None:
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readexactly(5)  # all of it, so the reset comes on a read, not on a send
        except (
            ConnectionResetError,
            asyncio.IncompleteReadError,
        ):  # the idle connection below, reset by the relay's exit
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    tasks_before = asyncio.all_tasks()
    upstream = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
    try:
        async with segmenting_relay("127.0.0.1", upstream.sockets[0].getsockname()[1]) as relay_port:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay_port)
            writer.write(b"hello")
            with anyio.fail_after(5), pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
            # A connection still open when the relay exits is reset, not left behind.
            idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", relay_port)
            await asyncio.sleep(0.05)
        with anyio.fail_after(5), pytest.raises(ConnectionResetError):
            await idle_reader.read()
        idle_writer.close()
    finally:
        upstream.close()
        await upstream.wait_closed()
    await asyncio.sleep(0)
    leftover = {t for t in asyncio.all_tasks() - tasks_before if "relay" in repr(t.get_coro())}
    assert not leftover


# grpcio clients through the relay.


async def test_four_cardinalities() -> None:
    async with relayed_server() as (relay, target), grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch:
        with anyio.fail_after(15):
            server_stream = _method(ch, "unary_stream", "/test.Echo/ServerStream", Int64Value, Int64Value)
            assert [m.value async for m in server_stream(Int64Value(value=500))] == list(range(500))
            big = _method(ch, "unary_stream", "/test.Echo/Big", Int64Value, BytesValue)
            assert [len(m.value) async for m in big(Int64Value(value=64))] == [16 * KiB] * 64

            client_stream = _method(ch, "stream_unary", "/test.Echo/ClientStream", BytesValue, Int64Value)
            sizes = [(n * 389) % 3000 for n in range(300)]
            reply = await client_stream(iter([BytesValue(value=b"c" * n) for n in sizes]))
            assert reply.value == sum(sizes)
            assert (await client_stream(iter([]))).value == 0

            bidi = _method(ch, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)
            call = bidi()
            for index in range(50):  # strict ping-pong: each reply arrives before the next request
                message = str(index).encode() * index
                await call.write(BytesValue(value=message))
                assert (await call.read()).value == message
            await call.done_writing()
            assert await call.read() == grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            payloads = [bytes([n]) * (n * 97) for n in range(200)]
            assert [m.value async for m in bidi(iter([BytesValue(value=p) for p in payloads]))] == payloads
    assert_one_clean_connection(relay)


async def test_metadata_both_ways() -> None:
    service = EchoService()
    async with (
        relayed_server(service) as (relay, target),
        grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch,
    ):
        unary = _method(ch, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
        with anyio.fail_after(10):
            for round_ in range(20):  # a new header block each time, cut elsewhere each time
                call = unary(
                    BytesValue(value=b"hello"),
                    metadata=(("x-text", ASCII_VALUE), ("x-data-bin", BINARY_VALUE), ("x-round", str(round_))),
                )
                assert (await call).value == b"hello"
                initial = list(await call.initial_metadata())
                trailing = list(await call.trailing_metadata())
                assert ("x-text", ASCII_VALUE) in initial and ("x-data-bin", BINARY_VALUE) in initial
                assert ("x-round", str(round_)) in initial
                assert ("x-trailer", "done") in trailing and ("x-trailer-bin", b"\x00\xff") in trailing
    seen = service.observed["metadata"]
    assert seen["x-text"] == ASCII_VALUE and seen["x-data-bin"] == BINARY_VALUE  # type: ignore[index]
    assert_one_clean_connection(relay)


async def test_error_status_with_message_and_rich_details() -> None:
    async with relayed_server() as (relay, target), grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch:
        fail = _method(ch, "unary_unary", "/test.Echo/Fail", StringValue, StringValue)
        with anyio.fail_after(10):
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await fail(StringValue(value="grpc"))
                error = info.value
                assert error.code() == grpc.StatusCode.NOT_FOUND, relay.describe()
                assert error.details() == "no such thing: ünïcode 100%"
                status = rpc_status.from_call(error)
                assert status is not None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
                bad_request = error_details_pb2.BadRequest()
                assert status.details[0].Unpack(bad_request)
                assert bad_request.field_violations[0].field == "value"

                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await fail(StringValue(value="status-with-metadata"))
                assert info.value.code() == grpc.StatusCode.ABORTED, relay.describe()
                assert ("x-why", "because") in list(info.value.trailing_metadata())
    assert_one_clean_connection(relay)


async def test_one_mebibyte_each_way() -> None:
    async with relayed_server() as (relay, target), grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch:
        unary = _method(ch, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
        payloads = [os.urandom(MiB) for _ in range(3)]
        with anyio.fail_after(15):
            for payload in payloads:
                assert (await unary(BytesValue(value=payload))).value == payload
            replies = await asyncio.gather(*(unary(BytesValue(value=p)) for p in payloads))
            assert [r.value for r in replies] == payloads
    assert_one_clean_connection(relay)


async def test_two_hundred_concurrent_unary_calls_on_one_channel() -> None:
    async with relayed_server() as (relay, target), grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch:
        unary = _method(ch, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
        payloads = [n.to_bytes(2, "big") * (n * 13) for n in range(200)]
        with anyio.fail_after(15):
            replies = await asyncio.gather(*(unary(BytesValue(value=p)) for p in payloads), return_exceptions=True)
        failures = [r for r in replies if isinstance(r, BaseException)]
        assert not failures, _describe_failures(failures, len(payloads), relay)
        assert [r.value for r in replies] == payloads  # type: ignore[union-attr]
    assert_one_clean_connection(relay)


async def test_two_thousand_20k_unary_calls_fifty_in_flight() -> None:
    calls, in_flight, size = 2000, 50, 20 * KiB
    base = os.urandom(size)
    failures: list[BaseException] = []
    async with relayed_server() as (relay, target), grpc.aio.insecure_channel(target, options=GRPCIO_OPTIONS) as ch:
        unary = _method(ch, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)

        async def worker(first: int) -> None:
            for index in range(first, calls, in_flight):
                payload = index.to_bytes(4, "big") + base[4:]
                try:
                    reply = await unary(BytesValue(value=payload))
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc)
                else:
                    assert reply.value == payload

        with anyio.fail_after(25):
            await asyncio.gather(*(worker(first) for first in range(in_flight)))
    assert not failures, _describe_failures(failures, calls, relay)
    assert_one_clean_connection(relay)
    assert relay.bytes["client->upstream"] > calls * size and relay.bytes["upstream->client"] > calls * size


# Our own client through the relay: both directions cut for our code.


async def test_our_channel_through_the_relay() -> None:
    async with relayed_server() as (relay, _), Channel("127.0.0.1", relay.port) as channel:
        m = methods(channel)
        with anyio.fail_after(20):
            async with m["Unary"].open(metadata={"x-text": ASCII_VALUE, "x-data-bin": BINARY_VALUE}) as stream:
                await stream.send_message(BytesValue(value=b"hello"), end=True)
                initial = await stream.recv_initial_metadata()
                assert (await stream.recv_message()).value == b"hello"
                assert await stream.recv_message() is None
                trailing = await stream.recv_trailing_metadata()
            assert initial["x-text"] == ASCII_VALUE and initial["x-data-bin"] == BINARY_VALUE
            assert trailing["x-trailer"] == "done" and trailing["x-trailer-bin"] == b"\x00\xff"

            assert [r.value for r in await m["ServerStream"](Int64Value(value=500))] == list(range(500))
            sizes = [(n * 389) % 3000 for n in range(300)]
            assert (await m["ClientStream"]([BytesValue(value=b"c" * n) for n in sizes])).value == sum(sizes)
            async with m["Bidi"].open() as stream:
                for index in range(50):
                    message = str(index).encode() * index
                    await stream.send_message(BytesValue(value=message))
                    assert (await stream.recv_message()).value == message
                await stream.end()
                assert await stream.recv_message() is None
                await stream.recv_trailing_metadata()

            with pytest.raises(GRPCError) as info:
                await m["Fail"](StringValue(value="grpc"))
            assert info.value.status is Status.NOT_FOUND, relay.describe()
            assert info.value.message == "no such thing: ünïcode 100%"
            (detail,) = info.value.details or []
            assert isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations[0].field == "value"

            big = os.urandom(MiB)
            assert (await m["Unary"](BytesValue(value=big))).value == big

            payloads = [n.to_bytes(4, "big") + os.urandom(20 * KiB - 4) for n in range(300)]
            replies = await asyncio.gather(*(m["Unary"](BytesValue(value=p)) for p in payloads), return_exceptions=True)
            failures = [r for r in replies if isinstance(r, BaseException)]
            assert not failures, _describe_failures(failures, len(payloads), relay)
            assert [r.value for r in replies] == payloads  # type: ignore[union-attr]
    assert_one_clean_connection(relay)
