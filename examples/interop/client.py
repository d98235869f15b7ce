"""gRPC's interop client cases, run by app_kit's client against any ``TestService`` server.

Each case follows the interop test descriptions step by step and raises
:class:`AssertionError` when the server (or our client) does not do what they say. Run one,
or all, against a server: ``python -m examples.interop.client --server_port 10000
--test_case all``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

from app_kit import Channel, GRPCError, Status

from .empty_pb2 import Empty
from .messages_pb2 import (
    BoolValue,
    EchoStatus,
    Payload,
    ResponseParameters,
    SimpleRequest,
    StreamingInputCallRequest,
    StreamingOutputCallRequest,
)
from .testing_grpc import TestServiceStub, UnimplementedServiceStub

Case = Callable[[Channel], Awaitable[None]]
CASES: dict[str, Case] = {}

ECHO_INITIAL = ("x-grpc-test-echo-initial", "test_initial_metadata_value")
ECHO_TRAILING = ("x-grpc-test-echo-trailing-bin", b"\xab\xab\xab")
SPECIAL_MESSAGE = "\t\ntest with whitespace\r\nand Unicode BMP \u263a and non-BMP \U0001f608\t\n"


def case(function: Case) -> Case:
    """Register an interop case under its function's name."""
    CASES[function.__name__] = function
    return function


def _large_request(**fields: object) -> SimpleRequest:
    return SimpleRequest(response_size=314159, payload=Payload(body=bytes(271828)), **fields)  # type: ignore[arg-type]


def _encoding(channel: Channel) -> str:
    """What the compressed cases compress with: the channel's encoding, else gzip."""
    return channel.compression or "gzip"


def _expect_code(error: GRPCError | None, code: Status, step: str) -> None:
    assert error is not None, f"{step}: the call succeeded; expected {code.name}"
    assert error.status is code, f"{step}: {error.status.name} ({error.message}); expected {code.name}"


@case
async def empty_unary(channel: Channel) -> None:
    """A zero-byte request and reply."""
    reply = await TestServiceStub(channel).EmptyCall(Empty())
    assert reply == Empty()


@case
async def large_unary(channel: Channel) -> None:
    """271,828 bytes out, 314,159 back."""
    reply = await TestServiceStub(channel).UnaryCall(_large_request())
    assert reply.payload.body == bytes(314159)


async def _client_compressed_unary(channel: Channel, probe: bool) -> None:
    stub = TestServiceStub(channel)
    if probe:
        # The server must tell an uncompressed message that claims to be compressed.
        error = None
        try:
            await stub.UnaryCall(_large_request(expect_compressed=BoolValue(value=True)))
        except GRPCError as exc:
            error = exc
        _expect_code(error, Status.INVALID_ARGUMENT, "the uncompressed probe")
    for compressed in (True, False):
        async with stub.UnaryCall.open(compression=_encoding(channel)) as call:
            request = _large_request(expect_compressed=BoolValue(value=compressed))
            await call.send_message(request, end=True, compress=compressed)
            reply = await call.recv_message()
            await call.recv_trailing_metadata()
            assert reply is not None and reply.payload.body == bytes(314159)


@case
async def client_compressed_unary(channel: Channel) -> None:
    """A compressed and an uncompressed request (after the probe the server must refuse)."""
    await _client_compressed_unary(channel, probe=True)


@case
async def client_compressed_unary_noprobe(channel: Channel) -> None:
    """client_compressed_unary for servers that cannot see a message's compressed flag."""
    await _client_compressed_unary(channel, probe=False)


@case
async def server_compressed_unary(channel: Channel) -> None:
    """The reply's compressed flag follows ``response_compressed``."""
    stub = TestServiceStub(channel)
    for compressed in (True, False):
        async with stub.UnaryCall.open() as call:
            await call.send_message(_large_request(response_compressed=BoolValue(value=compressed)), end=True)
            reply = await call.recv_message()
            assert reply is not None and reply.payload.body == bytes(314159)
            assert call.last_message_compressed is compressed, f"reply compressed: {call.last_message_compressed}"
            await call.recv_trailing_metadata()


@case
async def client_streaming(channel: Channel) -> None:
    """Four requests; the server adds up their sizes."""
    sizes = (27182, 8, 1828, 45904)
    requests = [StreamingInputCallRequest(payload=Payload(body=bytes(size))) for size in sizes]
    reply = await TestServiceStub(channel).StreamingInputCall(requests)
    assert reply.aggregated_payload_size == 74922


async def _client_compressed_streaming(channel: Channel, probe: bool) -> None:
    stub = TestServiceStub(channel)
    if probe:
        error = None
        try:
            async with stub.StreamingInputCall.open() as call:
                await call.send_message(
                    StreamingInputCallRequest(
                        payload=Payload(body=bytes(27182)), expect_compressed=BoolValue(value=True)
                    ),
                    end=True,
                )
                await call.recv_message()
        except GRPCError as exc:
            error = exc
        _expect_code(error, Status.INVALID_ARGUMENT, "the uncompressed probe")
    async with stub.StreamingInputCall.open(compression=_encoding(channel)) as call:
        first = StreamingInputCallRequest(payload=Payload(body=bytes(27182)), expect_compressed=BoolValue(value=True))
        await call.send_message(first, compress=True)
        second = StreamingInputCallRequest(payload=Payload(body=bytes(45904)), expect_compressed=BoolValue(value=False))
        await call.send_message(second, compress=False, end=True)
        reply = await call.recv_message()
        await call.recv_trailing_metadata()
        assert reply is not None and reply.aggregated_payload_size == 73086


@case
async def client_compressed_streaming(channel: Channel) -> None:
    """A compressed then an uncompressed message in one call (after the probe)."""
    await _client_compressed_streaming(channel, probe=True)


@case
async def client_compressed_streaming_noprobe(channel: Channel) -> None:
    """client_compressed_streaming for servers that cannot see a message's compressed flag."""
    await _client_compressed_streaming(channel, probe=False)


@case
async def server_streaming(channel: Channel) -> None:
    """Four replies of the sizes asked for."""
    sizes = [31415, 9, 2653, 58979]
    request = StreamingOutputCallRequest(response_parameters=[ResponseParameters(size=size) for size in sizes])
    replies = await TestServiceStub(channel).StreamingOutputCall(request)
    assert [len(reply.payload.body) for reply in replies] == sizes


@case
async def server_compressed_streaming(channel: Channel) -> None:
    """A compressed reply, then one sent uncompressed in the same call."""
    request = StreamingOutputCallRequest(
        response_parameters=[
            ResponseParameters(size=31415, compressed=BoolValue(value=True)),
            ResponseParameters(size=92653, compressed=BoolValue(value=False)),
        ]
    )
    async with TestServiceStub(channel).StreamingOutputCall.open() as call:
        await call.send_message(request, end=True)
        flags, sizes = [], []
        async for reply in call:
            flags.append(call.last_message_compressed)
            sizes.append(len(reply.payload.body))
        await call.recv_trailing_metadata()
    assert sizes == [31415, 92653], sizes
    assert flags == [True, False], f"compressed flags {flags}"


def _ping_pong_request(response_size: int, payload_size: int) -> StreamingOutputCallRequest:
    return StreamingOutputCallRequest(
        response_parameters=[ResponseParameters(size=response_size)], payload=Payload(body=bytes(payload_size))
    )


@case
async def ping_pong(channel: Channel) -> None:
    """Four requests, each sent after the reply to the one before."""
    pairs = [(31415, 27182), (9, 8), (2653, 1828), (58979, 45904)]
    async with TestServiceStub(channel).FullDuplexCall.open() as call:
        for response_size, payload_size in pairs:
            await call.send_message(_ping_pong_request(response_size, payload_size))
            reply = await call.recv_message()
            assert reply is not None and len(reply.payload.body) == response_size
        await call.end()
        assert await call.recv_message() is None
        await call.recv_trailing_metadata()


@case
async def empty_stream(channel: Channel) -> None:
    """A bidi call without messages either way."""
    replies = await TestServiceStub(channel).FullDuplexCall([])
    assert replies == []


@case
async def custom_metadata(channel: Channel) -> None:
    """Metadata echoed as initial and trailing metadata, in a unary and a bidi call."""
    stub = TestServiceStub(channel)
    metadata = [ECHO_INITIAL, ECHO_TRAILING]
    async with stub.UnaryCall.open(metadata=metadata) as call:
        await call.send_message(_large_request(), end=True)
        initial = await call.recv_initial_metadata()
        reply = await call.recv_message()
        trailing = await call.recv_trailing_metadata()
    assert reply is not None and len(reply.payload.body) == 314159
    assert initial.getall(ECHO_INITIAL[0]) == [ECHO_INITIAL[1]], initial
    assert trailing.getall(ECHO_TRAILING[0]) == [ECHO_TRAILING[1]], trailing
    async with stub.FullDuplexCall.open(metadata=metadata) as duplex:
        await duplex.send_message(_ping_pong_request(314159, 271828), end=True)
        initial = await duplex.recv_initial_metadata()
        replies = [reply async for reply in duplex]
        trailing = await duplex.recv_trailing_metadata()
    assert [len(reply.payload.body) for reply in replies] == [314159]
    assert initial.getall(ECHO_INITIAL[0]) == [ECHO_INITIAL[1]], initial
    assert trailing.getall(ECHO_TRAILING[0]) == [ECHO_TRAILING[1]], trailing


async def _status_echoed(channel: Channel, code: int, message: str) -> None:
    stub = TestServiceStub(channel)
    status = EchoStatus(code=code, message=message)
    calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("UnaryCall", lambda: stub.UnaryCall(SimpleRequest(response_status=status))),
        ("FullDuplexCall", lambda: stub.FullDuplexCall([StreamingOutputCallRequest(response_status=status)])),
    ]
    for step, call in calls:
        error = None
        try:
            await call()
        except GRPCError as exc:
            error = exc
        _expect_code(error, Status(code), step)
        assert error is not None and error.message == message, f"{step}: message {error.message!r}"


@case
async def status_code_and_message(channel: Channel) -> None:
    """A status code and message the server is asked to end with come back as sent."""
    await _status_echoed(channel, 2, "test status message")


@case
async def special_status_message(channel: Channel) -> None:
    """A status message with whitespace and non-ASCII characters comes back unchanged."""
    await _status_echoed(channel, 2, SPECIAL_MESSAGE)


@case
async def unimplemented_method(channel: Channel) -> None:
    """UnimplementedCall: UNIMPLEMENTED."""
    error = None
    try:
        await TestServiceStub(channel).UnimplementedCall(Empty())
    except GRPCError as exc:
        error = exc
    _expect_code(error, Status.UNIMPLEMENTED, "UnimplementedCall")


@case
async def unimplemented_service(channel: Channel) -> None:
    """A service the server does not have: UNIMPLEMENTED."""
    error = None
    try:
        await UnimplementedServiceStub(channel).UnimplementedCall(Empty())
    except GRPCError as exc:
        error = exc
    _expect_code(error, Status.UNIMPLEMENTED, "UnimplementedService")


@case
async def cancel_after_begin(channel: Channel) -> None:
    """A call cancelled before it sent a message ends CANCELLED."""
    async with TestServiceStub(channel).StreamingInputCall.open() as call:
        await call.send_request()
        await call.cancel()
        error = None
        try:
            await call.recv_trailing_metadata()
        except GRPCError as exc:
            error = exc
    _expect_code(error, Status.CANCELLED, "after cancel")


@case
async def cancel_after_first_response(channel: Channel) -> None:
    """A call cancelled after its first reply ends CANCELLED."""
    async with TestServiceStub(channel).FullDuplexCall.open() as call:
        await call.send_message(_ping_pong_request(31415, 27182))
        reply = await call.recv_message()
        assert reply is not None and len(reply.payload.body) == 31415
        await call.cancel()
        error = None
        try:
            await call.recv_message()
        except GRPCError as exc:
            error = exc
    _expect_code(error, Status.CANCELLED, "after cancel")


@case
async def timeout_on_sleeping_server(channel: Channel) -> None:
    """A 1 ms deadline on a call the server does not answer: DEADLINE_EXCEEDED."""
    error = None
    try:
        async with TestServiceStub(channel).FullDuplexCall.open(timeout=0.001) as call:
            await call.send_message(StreamingOutputCallRequest(payload=Payload(body=bytes(27182))))
            await call.recv_message()
    except GRPCError as exc:
        error = exc
    _expect_code(error, Status.DEADLINE_EXCEEDED, "the sleeping call")


#: The cases a server that sees each message's compressed flag passes (the standard set).
STANDARD_CASES = [name for name in CASES if not name.endswith("_noprobe")]


async def run(host: str, port: int, names: list[str]) -> int:
    """Run ``names`` in order on one channel; print each result; the number that failed."""
    failed = 0
    async with Channel(host, port) as channel:
        for name in names:
            try:
                await CASES[name](channel)
            except Exception as exc:  # a failed case, whatever it raised; the next one runs
                failed += 1
                print(f"FAIL {name}: {exc!r}", flush=True)
            else:
                print(f"PASS {name}", flush=True)
    return failed


def main() -> None:
    """``python -m examples.interop.client --server_port PORT --test_case NAME|all``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server_host", default="127.0.0.1")
    parser.add_argument("--server_port", type=int, default=10000)
    parser.add_argument("--test_case", default="all", help="a case name, or all: " + ", ".join(CASES))
    arguments = parser.parse_args()
    names = STANDARD_CASES if arguments.test_case == "all" else [arguments.test_case]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown test case {unknown[0]!r}")
    sys.exit(1 if asyncio.run(run(arguments.server_host, arguments.server_port, names)) else 0)


if __name__ == "__main__":
    main()
