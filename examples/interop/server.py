"""gRPC's interop ``TestService`` served by app_kit: every server feature of the interop
test descriptions (compressed requests and replies, echoed status and metadata, reply
intervals), so any gRPC implementation's interop client can test against us.

Run it with ``python -m examples.interop.server --port 10000``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from app_kit import GRPCError, Server, Status, Stream, graceful_exit

from .empty_pb2 import Empty
from .messages_pb2 import (
    BoolValue,
    EchoStatus,
    Payload,
    ResponseParameters,
    SimpleRequest,
    SimpleResponse,
    StreamingInputCallRequest,
    StreamingInputCallResponse,
    StreamingOutputCallRequest,
    StreamingOutputCallResponse,
)
from .testing_grpc import TestServiceBase

ECHO_INITIAL = "x-grpc-test-echo-initial"
ECHO_TRAILING = "x-grpc-test-echo-trailing-bin"
#: What the server compresses with when a request asks for compressed replies.
REPLY_ENCODING = "gzip"

AnyStream = Stream[object, object]


def _check_compressed(expect: BoolValue | None, stream: AnyStream) -> None:
    """CompressedRequest: a request that says how it arrived must have arrived that way."""
    if expect is not None and expect.value and not stream.last_message_compressed:
        raise GRPCError(Status.INVALID_ARGUMENT, "expected a compressed request message")
    if expect is not None and not expect.value and stream.last_message_compressed:
        raise GRPCError(Status.INVALID_ARGUMENT, "expected an uncompressed request message")


def _echoed_trailers(stream: AnyStream) -> list[tuple[str, str | bytes]]:
    return [(ECHO_TRAILING, value) for value in stream.metadata.getall(ECHO_TRAILING, [])]


async def _echo_initial(stream: AnyStream) -> None:
    """Echo Metadata: the initial-metadata half (sent before anything else)."""
    values = stream.metadata.getall(ECHO_INITIAL, [])
    if values:
        await stream.send_initial_metadata(metadata=[(ECHO_INITIAL, value) for value in values])


async def _end(stream: AnyStream, status: EchoStatus | None = None) -> None:
    """End the call: with the echoed status (Echo Status), and the echoed trailers."""
    code = Status(status.code) if status is not None and status.code else Status.OK
    await stream.send_trailing_metadata(
        status=code,
        status_message=status.message if status is not None and code is not Status.OK else None,
        metadata=_echoed_trailers(stream),
    )


def _reply(size: int) -> StreamingOutputCallResponse:
    return StreamingOutputCallResponse(payload=Payload(body=bytes(size)))


async def _send_replies(
    stream: Stream[StreamingOutputCallRequest, StreamingOutputCallResponse],
    parameters: list[ResponseParameters],
) -> None:
    """One reply per parameters entry, each after its interval, compressed as it asks."""
    for entry in parameters:
        if entry.interval_us:
            await asyncio.sleep(entry.interval_us / 1e6)
        compress = entry.compressed.value if entry.HasField("compressed") else True
        await stream.send_message(_reply(entry.size), compress=compress)


def _compress_if_asked(stream: AnyStream, parameters: list[ResponseParameters]) -> None:
    """CompressedResponse for streams: compress the call if any reply must be compressed."""
    if any(entry.compressed.value for entry in parameters):
        stream.set_compression(REPLY_ENCODING)


class TestService(TestServiceBase):
    """The interop test service."""

    async def EmptyCall(self, stream: Stream[Empty, Empty]) -> None:
        """Empty in, empty out."""
        await stream.recv_message()
        await _echo_initial(stream)  # type: ignore[arg-type]
        await stream.send_message(Empty())
        await _end(stream)  # type: ignore[arg-type]

    async def UnaryCall(self, stream: Stream[SimpleRequest, SimpleResponse]) -> None:
        """A reply of ``response_size`` bytes, compressed, failed or echoed as asked."""
        request = await stream.recv_message()
        assert request is not None  # a unary method's first recv_message returns its request
        _check_compressed(request.expect_compressed if request.HasField("expect_compressed") else None, stream)  # type: ignore[arg-type]
        await _echo_initial(stream)  # type: ignore[arg-type]
        if request.response_status.code:
            await _end(stream, request.response_status)  # type: ignore[arg-type]
            return
        if request.HasField("response_compressed"):
            stream.set_compression(REPLY_ENCODING if request.response_compressed.value else None)
        await stream.send_message(SimpleResponse(payload=Payload(body=bytes(request.response_size))))
        await _end(stream)  # type: ignore[arg-type]

    async def CacheableUnaryCall(self, stream: Stream[SimpleRequest, SimpleResponse]) -> None:
        """The current time in nanoseconds as the payload, marked cacheable for 60 s."""
        await stream.recv_message()
        await stream.send_initial_metadata(metadata={"cache-control": "max-age=60, public"})
        await stream.send_message(SimpleResponse(payload=Payload(body=str(time.time_ns()).encode())))

    async def StreamingOutputCall(
        self, stream: Stream[StreamingOutputCallRequest, StreamingOutputCallResponse]
    ) -> None:
        """One reply per ``response_parameters`` entry."""
        request = await stream.recv_message()
        assert request is not None
        await _echo_initial(stream)  # type: ignore[arg-type]
        parameters = list(request.response_parameters)
        _compress_if_asked(stream, parameters)  # type: ignore[arg-type]
        await _send_replies(stream, parameters)
        await _end(stream, request.response_status if request.HasField("response_status") else None)  # type: ignore[arg-type]

    async def StreamingInputCall(self, stream: Stream[StreamingInputCallRequest, StreamingInputCallResponse]) -> None:
        """The sum of the request payload sizes, once the client half-closed."""
        total = 0
        async for request in stream:
            _check_compressed(request.expect_compressed if request.HasField("expect_compressed") else None, stream)  # type: ignore[arg-type]
            total += len(request.payload.body)
        await _echo_initial(stream)  # type: ignore[arg-type]
        await stream.send_message(StreamingInputCallResponse(aggregated_payload_size=total))
        await _end(stream)  # type: ignore[arg-type]

    async def FullDuplexCall(self, stream: Stream[StreamingOutputCallRequest, StreamingOutputCallResponse]) -> None:
        """Replies to each request as it arrives; a ``response_status`` ends the call at once
        (Echo Status: nothing more of the stream is processed)."""
        await _echo_initial(stream)  # type: ignore[arg-type]
        async for request in stream:
            if request.response_status.code:
                await _end(stream, request.response_status)  # type: ignore[arg-type]
                return
            await _send_replies(stream, list(request.response_parameters))
        await _end(stream)  # type: ignore[arg-type]

    async def HalfDuplexCall(self, stream: Stream[StreamingOutputCallRequest, StreamingOutputCallResponse]) -> None:
        """Replies to every request, in order, once the client half-closed."""
        requests = [request async for request in stream]
        await _echo_initial(stream)  # type: ignore[arg-type]
        for request in requests:
            if request.response_status.code:
                await _end(stream, request.response_status)  # type: ignore[arg-type]
                return
            await _send_replies(stream, list(request.response_parameters))
        await _end(stream)  # type: ignore[arg-type]

    async def UnimplementedCall(self, stream: Stream[Empty, Empty]) -> None:
        """Not implemented, as every interop server does it."""
        raise GRPCError(Status.UNIMPLEMENTED, "UnimplementedCall is never implemented")


async def serve(port: int, host: str = "127.0.0.1") -> None:
    """Serve :class:`TestService` until SIGINT or SIGTERM."""
    server = Server([TestService()])
    with graceful_exit([server]):
        await server.start(host, port)
        print(f"interop TestService on {host}:{port}", flush=True)
        await server.wait_closed()


def main() -> None:
    """``python -m examples.interop.server --port PORT``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument("--host", default="127.0.0.1")
    arguments = parser.parse_args()
    asyncio.run(serve(arguments.port, arguments.host))


if __name__ == "__main__":
    main()
