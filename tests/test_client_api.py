"""Calls that fit how people write code: a unary reply with its metadata, replies taken as
they arrive, requests from async iterables; over real sockets, against our server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from google.protobuf.wrappers_pb2 import Int64Value, StringValue

from app_kit import Cardinality, Channel, CodecBase, GRPCError, Handler, Server, Status, Stream
from app_kit.aio.client import method_for

from .conftest import running_server

pytestmark = pytest.mark.anyio


class Paced:
    """Handlers that wait for the test between replies, so "as they arrive" can be seen."""

    def __init__(self) -> None:
        self.go_on = asyncio.Event()
        self.cancelled = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        c = Cardinality
        return {
            "/t.P/Count": Handler(self.count, c.UNARY_STREAM, Int64Value, Int64Value),
            "/t.P/Unary": Handler(self.unary, c.UNARY_UNARY, Int64Value, Int64Value),
            "/t.P/Echo": Handler(self.echo, c.STREAM_STREAM, Int64Value, Int64Value),
            "/t.P/Sum": Handler(self.sum, c.STREAM_UNARY, Int64Value, Int64Value),
        }

    async def count(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        try:
            await stream.send_message(Int64Value(value=0))
            await self.go_on.wait()  # the client has the first reply before the second exists
            for index in range(1, request.value):
                await stream.send_message(Int64Value(value=index))
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_initial_metadata(metadata={"x-initial": "i"})
        await stream.send_message(Int64Value(value=request.value + 1))
        await stream.send_trailing_metadata(metadata={"x-trailing": "t"})

    async def echo(self, stream: Stream[Int64Value, Int64Value]) -> None:
        async for request in stream:
            await stream.send_message(request)

    async def sum(self, stream: Stream[Int64Value, Int64Value]) -> None:
        total = sum([request.value async for request in stream])
        await stream.send_message(Int64Value(value=total))


def method(channel: Channel, name: str, cardinality: Cardinality):  # type: ignore[no-untyped-def]
    return method_for(channel, f"/t.P/{name}", cardinality, Int64Value, Int64Value)


async def test_with_call_returns_the_reply_and_the_finished_call() -> None:
    async with running_server([Paced()]) as (_, target), Channel(*_split(target)) as channel:
        reply, call = await method(channel, "Unary", Cardinality.UNARY_UNARY).with_call(Int64Value(value=41))
    assert reply.value == 42
    assert call.initial_metadata is not None and call.initial_metadata["x-initial"] == "i"
    assert call.trailing_metadata is not None and call.trailing_metadata["x-trailing"] == "t"


async def test_server_streaming_replies_arrive_one_by_one_and_await_collects() -> None:
    service = Paced()
    async with running_server([service]) as (_, target), Channel(*_split(target)) as channel:
        count = method(channel, "Count", Cardinality.UNARY_STREAM)
        replies = count(Int64Value(value=5), timeout=10)
        seen = []
        async for reply in replies:
            seen.append(reply.value)
            if reply.value == 0:
                assert not service.go_on.is_set()  # taken before the server sent the next
                service.go_on.set()
        assert seen == [0, 1, 2, 3, 4]
        assert replies.call is not None and replies.call.trailing_metadata is not None
        assert [reply.value for reply in await count(Int64Value(value=3), timeout=10)] == [0, 1, 2]


async def test_leaving_the_loop_early_cancels_the_call() -> None:
    service = Paced()
    service.go_on.set()
    async with running_server([service]) as (_, target), Channel(*_split(target)) as channel:
        async for reply in method(channel, "Count", Cardinality.UNARY_STREAM)(Int64Value(value=10_000)):
            if reply.value == 3:
                break
        await asyncio.wait_for(service.cancelled.wait(), 5)


async def test_requests_from_async_iterables_interleave_with_replies() -> None:
    async with running_server([Paced()]) as (_, target), Channel(*_split(target)) as channel:
        echo = method(channel, "Echo", Cardinality.STREAM_STREAM)
        answered = asyncio.Queue[int]()

        async def ping_pong() -> AsyncIterator[Int64Value]:
            # Each request waits for the reply to the one before: only works if the call
            # sends while it receives.
            for index in range(5):
                yield Int64Value(value=index)
                assert await asyncio.wait_for(answered.get(), 5) == index

        async for reply in echo(ping_pong(), timeout=10):
            answered.put_nowait(reply.value)
        assert [reply.value for reply in await echo([Int64Value(value=7)], timeout=10)] == [7]

        async def numbers() -> AsyncIterator[Int64Value]:
            for index in range(4):
                await asyncio.sleep(0)
                yield Int64Value(value=index)

        total = await method(channel, "Sum", Cardinality.STREAM_UNARY)(numbers(), timeout=10)
        assert total.value == 6


async def test_a_failing_request_iterator_cancels_the_call_and_raises() -> None:
    async with running_server([Paced()]) as (_, target), Channel(*_split(target)) as channel:

        async def broken() -> AsyncIterator[Int64Value]:
            yield Int64Value(value=1)
            await asyncio.sleep(0.05)
            raise LookupError("the source of requests failed")

        replies = method(channel, "Echo", Cardinality.STREAM_STREAM)(broken(), timeout=10)
        with pytest.raises(LookupError, match="the source of requests failed"):
            async for _ in replies:
                pass
        with pytest.raises(Exception, match="read once"):
            async for _ in replies:
                pass


def _split(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


class _JsonCodec(CodecBase):
    """A codec of our own: dicts as JSON (``application/grpc+json``)."""

    content_subtype = "json"

    def encode(self, message: object, message_type: object) -> bytes:
        if not isinstance(message, dict):
            raise TypeError(f"dict expected, got {type(message).__name__}")
        return json.dumps(message).encode()

    def decode(self, data: bytes, message_type: object) -> object:
        value = json.loads(data)
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value


async def test_a_codec_of_ones_own_serves_and_calls_both_ways() -> None:
    # The codec's decode runs per message on both sides (through CodecBase.decoder's default),
    # a request it cannot parse answers INTERNAL, and the content-type names its subtype.
    async def double(stream: Stream[dict[str, int], dict[str, int]]) -> None:
        async for request in stream:
            await stream.send_message({"n": request["n"] * 2})

    class Doubler:
        def __mapping__(self) -> dict[str, Handler]:
            return {"/t.J/Double": Handler(double, Cardinality.STREAM_STREAM, dict, dict)}

    server = Server([Doubler()], codec=_JsonCodec())
    await server.start("127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        async with Channel("127.0.0.1", port, codec=_JsonCodec()) as channel:
            stub = method_for(channel, "/t.J/Double", Cardinality.STREAM_STREAM, dict, dict)
            assert await stub([{"n": 1}, {"n": 20}]) == [{"n": 2}, {"n": 40}]
            async with stub.open() as call:
                await call.send_message({"n": 3})
                assert await call.recv_message() == {"n": 6}
                call._put(b"[1, 2]", False)  # a message the codec refuses (sent as is): INTERNAL
                with pytest.raises(GRPCError) as info:
                    await call.recv_message()
                assert info.value.status is Status.INTERNAL
    finally:
        server.close()
        await server.wait_closed()


class _SendsTheWrongType:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.W/Unary": Handler(self.unary, Cardinality.UNARY_UNARY, Int64Value, Int64Value)}

    async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_message(StringValue(value="not an Int64Value"))  # type: ignore[arg-type]


async def test_a_message_of_another_type_is_refused_on_both_sides() -> None:
    # The codec's fast serializer is for messages of exactly the method's type; any other
    # still goes through ProtoCodec.encode, which refuses it (it would serialize as garbage).
    async with running_server([_SendsTheWrongType()]) as (_, target), Channel(target) as channel:
        unary = method_for(channel, "/t.W/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        with pytest.raises(TypeError, match="Int64Value expected, got StringValue"):
            await unary(StringValue(value="x"))  # type: ignore[arg-type]
        with pytest.raises(GRPCError) as info:
            await unary(Int64Value(value=1), timeout=5)  # the handler's reply is refused
        assert info.value.status is Status.UNKNOWN
