"""Services the tests serve: hand-written mappings over well-known wrapper messages."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value, StringValue
from google.rpc import error_details_pb2

from app_kit import Cardinality, GRPCError, Handler, Status, Stream


def grpcio_method(channel: Any, kind: str, path: str, request_type: Any, reply_type: Any) -> Any:
    """A grpcio stub method (``kind``: ``unary_unary``...) for ``path`` with protobuf types."""
    return getattr(channel, kind)(
        path, request_serializer=request_type.SerializeToString, response_deserializer=reply_type.FromString
    )


class EchoService:
    """One method per behaviour under test; records what handlers observed."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.observed: dict[str, object] = {}

    def __mapping__(self) -> dict[str, Handler]:
        u, us, su, ss = (
            Cardinality.UNARY_UNARY,
            Cardinality.UNARY_STREAM,
            Cardinality.STREAM_UNARY,
            Cardinality.STREAM_STREAM,
        )
        return {
            "/test.Echo/Unary": Handler(self.unary, u, BytesValue, BytesValue),
            "/test.Echo/Sleep": Handler(self.sleep, u, DoubleValue, DoubleValue),
            "/test.Echo/Fail": Handler(self.fail, u, StringValue, StringValue),
            "/test.Echo/ServerStream": Handler(self.server_stream, us, Int64Value, Int64Value),
            "/test.Echo/StreamThenStatus": Handler(self.stream_then_status, us, Int64Value, Int64Value),
            "/test.Echo/ClientStream": Handler(self.client_stream, su, BytesValue, Int64Value),
            "/test.Echo/Bidi": Handler(self.bidi, ss, BytesValue, BytesValue),
            "/test.Echo/Hold": Handler(self.hold, su, BytesValue, Int64Value),
            "/test.Echo/Big": Handler(self.big_stream, us, Int64Value, BytesValue),
        }

    async def unary(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.observed["metadata"] = stream.metadata
        self.observed["user_agent"] = stream.user_agent
        self.observed["peer"] = stream.peer.addr()
        self.observed["peer_cert"] = stream.peer.cert()
        echoed = [(key, value) for key, value in stream.metadata.items() if key.startswith("x-")]
        await stream.send_initial_metadata(metadata=echoed)
        await stream.send_message(BytesValue(value=request.value))
        await stream.send_trailing_metadata(metadata={"x-trailer": "done", "x-trailer-bin": b"\x00\xff"})

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.observed["deadline_remaining"] = stream.deadline.time_remaining() if stream.deadline else None
        self.started.set()
        try:
            await asyncio.sleep(request.value)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        await stream.send_message(DoubleValue(value=request.value))

    async def fail(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        how = request.value
        if how == "grpc":
            detail = error_details_pb2.BadRequest(
                field_violations=[error_details_pb2.BadRequest.FieldViolation(field="value", description="bad")]
            )
            raise GRPCError(Status.NOT_FOUND, "no such thing: ünïcode 100%", [detail])
        if how == "grpc-with-trailers":
            raise GRPCError(
                Status.FAILED_PRECONDITION, "stale", trailing_metadata={"x-retry-after": "5", "x-why-bin": b"\x00"}
            )
        if how == "unimplemented":
            raise NotImplementedError
        if how == "crash":
            raise RuntimeError("secret internals")
        if how == "double-send":
            await stream.send_message(StringValue(value="one"))
            await stream.send_message(StringValue(value="two"))
        if how == "explicit-ok-without-reply":
            await stream.send_trailing_metadata(status=Status.OK)
        if how == "status-with-metadata":
            await stream.send_trailing_metadata(
                status=Status.ABORTED, status_message="aborted", metadata={"x-why": "because"}
            )
        if how == "big-reply":
            await stream.send_message(StringValue(value="x" * (5 * 1024 * 1024)))
        # "no-reply": return without a reply

    async def server_stream(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))

    async def stream_then_status(self, stream: Stream[Int64Value, Int64Value]) -> None:
        """Streams, ends with a status of its own, then (wrongly) tries to send once more."""
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))
        await stream.send_trailing_metadata(status=Status.OK)
        try:
            await stream.send_message(Int64Value(value=-1))
        except Exception as exc:
            self.observed["late_send"] = exc

    async def client_stream(self, stream: Stream[BytesValue, Int64Value]) -> None:
        total = 0
        async for message in stream:
            total += len(message.value)
        await stream.send_message(Int64Value(value=total))

    async def bidi(self, stream: Stream[BytesValue, BytesValue]) -> None:
        async for message in stream:
            await stream.send_message(BytesValue(value=message.value))

    async def big_stream(self, stream: Stream[Int64Value, BytesValue]) -> None:
        """Sends ``value`` messages of 16 KiB, counting them as they are handed over."""
        request = await stream.recv_message()
        assert request is not None
        self.observed["sent"] = 0
        for _ in range(request.value):
            await stream.send_message(BytesValue(value=b"b" * 16384))
            self.observed["sent"] += 1  # type: ignore[operator]

    async def hold(self, stream: Stream[BytesValue, Int64Value]) -> None:
        """Reads nothing until released: the client must be held back by flow control."""
        self.started.set()
        await self.release.wait()
        total = 0
        async for message in stream:
            total += len(message.value)
        await stream.send_message(Int64Value(value=total))


class CancellingService:
    """Cancels its own call after one reply message."""

    def __init__(self) -> None:
        self.after_cancel: BaseException | None = None

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Cancel/Stream": Handler(self.stream, Cardinality.UNARY_STREAM, Int64Value, Int64Value)}

    async def stream(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=1))
        await stream.cancel()
        try:
            await stream.send_message(Int64Value(value=2))
        except GRPCError as exc:
            self.after_cancel = exc


class ByteCounter:
    """``/r.R/Count``: a client-streaming call that answers how many bytes of BytesValue it got."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/r.R/Count": Handler(self.count, Cardinality.STREAM_UNARY, BytesValue, Int64Value)}

    async def count(self, stream: Stream[BytesValue, Int64Value]) -> None:
        total = 0
        async for message in stream:
            total += len(message.value)
        await stream.send_message(Int64Value(value=total))


class Sleeper:
    """``/test.Echo/Sleep`` on either loop (EchoService's sleeps with asyncio), and Unary."""

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/test.Echo/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
            "/test.Echo/Unary": Handler(self.unary, Cardinality.UNARY_UNARY, BytesValue, BytesValue),
        }

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await anyio.sleep(request.value)
        await stream.send_message(request)

    async def unary(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(request)
