"""Every call ends with a status, on every path: regressions over real sockets.

Each test drives the server the way a peer can (hand-built frames where byte placement
matters, the raw h2 client or grpcio elsewhere) and is bounded in time: a call that is
never answered, or a shutdown that never finishes, fails within seconds instead of hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

import grpc
import h2.settings
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value
from hyperframe.frame import RstStreamFrame

from app_kit import Cardinality, Configuration, GRPCError, Handler, Server, ServiceLike, Status, Stream
from app_kit.rpc.framing import frame_message

from .conftest import running_server
from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, RST_STREAM, RawPeer, frame, request_block
from .h2client import RawClient
from .services import EchoService

pytestmark = pytest.mark.anyio

CANCEL = 8
# How long a call may take to be answered: every call here is answered in milliseconds.
ANSWER_TIMEOUT = 1.5


# -- helpers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(services: Iterable[ServiceLike], config: Configuration | None = None) -> AsyncIterator[Server]:
    """A started server; closed on exit within a bounded time, whatever state a bug left it in.

    conftest's ``running_server`` awaits ``wait_closed()`` without a limit, and some of the
    bugs under test make exactly that hang.
    """
    server = Server(services, config=config)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close(grace=0.2)
        try:
            await asyncio.wait_for(server.wait_closed(), 2)
        except TimeoutError:
            for connection in list(server._connections):  # a stuck connection: cut it
                if connection.transport is not None:
                    connection.transport.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1)


def port_of(server: Server) -> int:
    return server.sockets[0].getsockname()[1]


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def answer(client: RawClient, stream_id: int, timeout: float = ANSWER_TIMEOUT):  # type: ignore[no-untyped-def]
    """The response on ``stream_id``; an AssertionError (not a hang) if it never ends."""
    try:
        return await client.read_response(stream_id, timeout)
    except TimeoutError:
        raise AssertionError(f"stream {stream_id} was never answered within {timeout}s (the call hangs)") from None


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR and above, or with a traceback, from us or from asyncio."""
    return [
        f"{record.name}: {record.getMessage()}"
        for record in caplog.records
        if record.name.startswith(("app_kit", "asyncio")) and (record.levelno >= logging.ERROR or record.exc_info)
    ]


@contextlib.contextmanager
def loop_errors() -> Iterator[list[str]]:
    """What reaches the event loop's exception handler meanwhile ("Fatal error: protocol.data_received()
    call failed", exceptions nobody retrieved...).

    Under anyio's test runner these never reach the ``asyncio`` logger (the runner installs its
    own handler and re-raises them after the test), so caplog alone would not see them.
    """
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    reported: list[str] = []
    loop.set_exception_handler(
        lambda _, context: reported.append(f"{context.get('message')}: {context.get('exception')!r}")
    )
    try:
        yield reported
    finally:
        loop.set_exception_handler(previous)


async def closes_within(server: Server, limit: float) -> bool:
    """Whether ``wait_closed()`` returns within ``limit`` seconds."""
    try:
        await asyncio.wait_for(server.wait_closed(), limit)
    except TimeoutError:
        return False
    return True


class OddHandlers:
    """Handlers that end in ways the server must still answer."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        u = Cardinality.UNARY_UNARY
        return {
            "/test.Odd/StrayCancel": Handler(self.stray_cancel, u, BytesValue, BytesValue),
            "/test.Odd/DetailsObject": Handler(self.details_object, u, BytesValue, BytesValue),
            "/test.Odd/DetailsStr": Handler(self.details_str, u, BytesValue, BytesValue),
            "/test.Odd/OkWithoutReply": Handler(self.ok_without_reply, u, BytesValue, BytesValue),
            "/test.Odd/IntMessage": Handler(self.int_message, u, BytesValue, BytesValue),
            "/test.Odd/NoYield": Handler(self.no_yield, u, BytesValue, BytesValue),
        }

    async def stray_cancel(self, stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        self.entered.set()
        # A CancelledError nobody asked this call for: another task was cancelled.
        sleeper = asyncio.create_task(asyncio.sleep(10))
        sleeper.cancel()
        await sleeper

    async def details_object(self, stream: Stream[BytesValue, BytesValue]) -> None:
        raise GRPCError(Status.INVALID_ARGUMENT, "x", details=[object()])

    async def details_str(self, stream: Stream[BytesValue, BytesValue]) -> None:
        raise GRPCError(Status.INVALID_ARGUMENT, "x", details=["str"])

    async def ok_without_reply(self, stream: Stream[BytesValue, BytesValue]) -> None:
        raise GRPCError(Status.OK)

    async def int_message(self, stream: Stream[BytesValue, BytesValue]) -> None:
        raise GRPCError(Status.INVALID_ARGUMENT, 42)  # type: ignore[arg-type]

    async def no_yield(self, stream: Stream[BytesValue, BytesValue]) -> None:
        # send_message of one small reply completes without suspending: the handler never
        # gives the event loop a turn, so an asyncio timeout scope around it cannot fire.
        await stream.send_message(BytesValue(value=b"done"))


# -- 1. RST_STREAM in the same read as the stream's HEADERS -----------------------------------

UNARY = BytesValue(value=b"b").SerializeToString()
# Stream B of test 1: path, extra metadata, DATA payload. The server layer sees RequestReceived
# only after the core has already released the stream for the RST_STREAM in the same batch.
STREAM_B = {
    "known method": ("/test.Echo/Unary", [], frame_message(UNARY)),
    # Answered by the server itself in _start_call: UNIMPLEMENTED via send_status.
    "unknown method": ("/test.Nope/Nope", [], frame_message(UNARY)),
    # Answered by the server itself in _start_call: INTERNAL via send_status.
    "invalid metadata": ("/test.Echo/Unary", [("x-data-bin", "!!!")], frame_message(UNARY)),
    # Answered by the server itself from MessagesReceived (_end_call): INTERNAL.
    "two requests on a unary method": ("/test.Echo/Unary", [], frame_message(UNARY) * 2),
    # The core answers these itself, inside the read (the reset is in it too).
    "compressed flag without grpc-encoding": ("/test.Echo/Unary", [], b"\x01" + frame_message(UNARY)[1:]),
    "unsupported content-type": ("/test.Echo/Unary", [("content-type", "text/plain")], frame_message(UNARY)),
}


@pytest.mark.parametrize("case", list(STREAM_B))
async def test_reset_in_the_same_read_as_the_request_harms_no_other_call(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path, extra, payload = STREAM_B[case]
    service = EchoService()
    async with serving([service]) as server, RawPeer(port_of(server)) as peer:
        encoder = hpack.Encoder()  # HPACK state is per connection: one encoder for every block
        # Call A: a unary call that takes 0.5 s.
        await peer.send(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, request_block(encoder, "/test.Echo/Sleep"))
            + frame(DATA, END_STREAM, 1, frame_message(DoubleValue(value=0.5).SerializeToString()))
        )
        await asyncio.wait_for(service.started.wait(), 2)
        with loop_errors() as reported:
            # Stream B, whole life in one write: HEADERS, DATA with END_STREAM, RST_STREAM CANCEL.
            await peer.send(
                frame(HEADERS, END_HEADERS, 3, request_block(encoder, path, extra))
                + frame(DATA, END_STREAM, 3, payload)
                + frame(RST_STREAM, 0, 3, CANCEL.to_bytes(4, "big"))
            )
            await wait_until(lambda: 1 in peer.trailer_statuses() or peer.closed.is_set(), 3, "call A's status")
        assert not reported, f"the event loop was handed errors: {reported}"
        assert not peer.closed.is_set(), "the connection (and call A with it) was dropped"
        assert peer.trailer_statuses()[1] == b"0", "call A did not complete OK"
        assert not peer.goaways
        # The connection still serves new calls.
        await peer.send(
            frame(HEADERS, END_HEADERS, 5, request_block(encoder, "/test.Echo/Unary"))
            + frame(DATA, END_STREAM, 5, frame_message(UNARY))
        )
        await wait_until(lambda: 5 in peer.trailer_statuses() or peer.closed.is_set(), 2, "a new call's status")
        assert peer.trailer_statuses().get(5) == b"0"
    assert not errors_logged(caplog)


# -- 2. a CancelledError the handler did not ask for ------------------------------------------


async def test_stray_cancelled_error_in_handler_is_answered_unknown(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with serving([OddHandlers()]) as server:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of(server)}") as channel:
            call = channel.unary_unary("/test.Odd/StrayCancel", BytesValue.SerializeToString, BytesValue.FromString)(
                BytesValue(value=b"x")
            )  # no client deadline: the server's own answer is what ends it
            outcome: object = None
            try:
                await asyncio.wait_for(call, ANSWER_TIMEOUT)
            except TimeoutError:
                outcome = "never answered"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code()
            assert outcome == grpc.StatusCode.UNKNOWN, f"expected UNKNOWN within {ANSWER_TIMEOUT}s: {outcome or 'OK'}"
    logged = [r for r in caplog.records if r.name.startswith("app_kit") and r.levelno >= logging.WARNING]
    assert logged, "the server logged nothing about the handler's CancelledError"


async def test_close_after_stray_cancelled_error_finishes_promptly() -> None:
    service = OddHandlers()
    grace = 0.5
    config = Configuration(linger_timeout=0.3, shutdown_ping_timeout=0.3)
    async with serving([service], config=config) as server, RawClient("127.0.0.1", port_of(server)) as client:
        await client.request("/test.Odd/StrayCancel", BytesValue(value=b"x").SerializeToString())
        await asyncio.wait_for(service.entered.wait(), 2)
        await asyncio.sleep(0.1)  # the handler is over
        server.close(grace=grace)
        limit = grace + config.linger_timeout + 1.0
        assert await closes_within(server, limit), (
            f"wait_closed() did not return within {limit}s: the stream of the handler that ended in a "
            f"CancelledError is still open in the core (open_streams="
            f"{[c.connection.open_streams for c in server._connections]})"
        )


# -- 3. exceptions while sending the status --------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/test.Odd/DetailsObject", "/test.Odd/DetailsStr", "/test.Odd/OkWithoutReply", "/test.Odd/IntMessage"],
)
async def test_status_that_cannot_be_sent_as_raised_is_still_answered(path: str) -> None:
    async with serving([OddHandlers()]) as server, RawClient("127.0.0.1", port_of(server)) as client:
        stream_id = await client.request(path, BytesValue(value=b"x").SerializeToString())
        response = await answer(client, stream_id)
        assert response.grpc_status not in (None, Status.OK), response
        # The connection serves on.
        stream_id = await client.request("/test.Odd/NoYield", BytesValue(value=b"x").SerializeToString())
        assert (await answer(client, stream_id)).grpc_status == Status.OK


# -- 4. grace expiry with the stream's DATA blocked by flow control ----------------------------


async def test_grace_expiry_ends_a_stream_stalled_by_flow_control() -> None:
    service = EchoService()
    grace = 0.5
    config = Configuration(linger_timeout=0.5)
    async with serving([service], config=config) as server:
        client = RawClient("127.0.0.1", port_of(server))
        # A client that reads nothing: a 1 KiB stream window, never reopened.
        client.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1024}
        )
        client.auto_ack = False
        async with client:
            stream_id = await client.request("/test.Echo/Big", Int64Value(value=1000).SerializeToString())
            await wait_until(lambda: service.observed.get("sent", 0) >= 3, 2, "the handler to fill its buffer")
            await asyncio.sleep(0.2)
            assert service.observed["sent"] < 1000  # blocked: window and send buffer are full
            assert len(client.responses[stream_id].data) <= 1024

            server.close(grace=grace)
            limit = grace + config.linger_timeout + 1.0
            assert await closes_within(server, limit), (
                f"wait_closed() did not return within {limit}s (grace {grace}s + linger "
                f"{config.linger_timeout}s): the UNAVAILABLE status waits behind DATA the client never "
                f"has window for (open_streams={[c.connection.open_streams for c in server._connections]})"
            )
            response = client.responses[stream_id]
            assert response.reset_code is not None or response.grpc_status == Status.UNAVAILABLE, response


# -- 5. DATA the client had in flight on a stream we reset ------------------------------------


async def test_data_after_an_oversized_request_gets_one_reset_only() -> None:
    config = Configuration(max_receive_message_length=1024)
    async with serving([EchoService()], config=config) as server, RawPeer(port_of(server)) as peer:
        encoder = hpack.Encoder()
        # The first DATA frame announces a 100000-byte message: refused on its prefix, with a
        # trailers-only RESOURCE_EXHAUSTED and RST_STREAM NO_ERROR.
        await peer.send(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, request_block(encoder, "/test.Echo/ClientStream"))
            + frame(DATA, 0, 1, b"\x00" + (100000).to_bytes(4, "big") + b"x" * 995)
        )
        await wait_until(lambda: 1 in peer.trailer_statuses(), 2, "the RESOURCE_EXHAUSTED status")
        assert peer.trailer_statuses()[1] == b"8"
        # The rest of the message: DATA the client had in flight before it could see the reset
        # (they arrive in reads of their own after the reset, as a real client's do).
        await peer.send(b"".join(frame(DATA, 0, 1, b"x" * 1000) for _ in range(60)))
        # The connection serves on (and once this is answered, every frame above was read).
        await peer.send(
            frame(HEADERS, END_HEADERS, 3, request_block(encoder, "/test.Echo/Unary"))
            + frame(DATA, END_STREAM, 3, frame_message(UNARY))
        )
        await wait_until(lambda: 3 in peer.trailer_statuses() or peer.closed.is_set(), 2, "a new call's status")
        assert peer.trailer_statuses().get(3) == b"0"
        await asyncio.sleep(0.1)
        resets = [f for f in peer.frames if isinstance(f, RstStreamFrame) and f.stream_id == 1]
        assert len(resets) == 1, (
            f"{len(resets)} RST_STREAM frames for stream 1 (error codes {sorted({r.error_code for r in resets})}); "
            "RFC 9113 §5.1: frames on a stream we reset are ignored"
        )
        assert not peer.goaways and not peer.closed.is_set()


# -- 6. grpc-timeout on a handler that never yields -------------------------------------------


@pytest.mark.parametrize("timeout", [b"1n", b"1u"])
async def test_expired_deadline_is_enforced_on_a_handler_that_never_yields(timeout: bytes) -> None:
    async with serving([OddHandlers()]) as server, RawClient("127.0.0.1", port_of(server)) as client:
        stream_id = await client.request("/test.Odd/NoYield", UNARY, timeout=timeout)
        response = await answer(client, stream_id)
        assert response.grpc_status == Status.DEADLINE_EXCEEDED, response


async def test_zero_grpc_timeout_is_an_expired_deadline() -> None:
    # PROTOCOL-HTTP2 calls the value positive, but grpc-go sends "0n" for a deadline already
    # due: it is DEADLINE_EXCEEDED, never served as if no deadline were set.
    async with serving([OddHandlers()]) as server, RawClient("127.0.0.1", port_of(server)) as client:
        stream_id = await client.request("/test.Odd/NoYield", UNARY, timeout=b"0n")
        response = await answer(client, stream_id)
        assert response.grpc_status == Status.DEADLINE_EXCEEDED, response


async def test_a_returned_reply_is_sent_and_a_streams_return_value_is_said_to_be_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app_kit import Channel
    from app_kit.aio.client import method_for

    async def unary(stream: Stream[Int64Value, Int64Value]) -> Int64Value:
        request = await stream.recv_message()
        assert request is not None
        return Int64Value(value=request.value + 1)  # the grpcio habit

    async def both(stream: Stream[Int64Value, Int64Value]) -> Int64Value:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=1))
        return Int64Value(value=2)

    async def streaming(stream: Stream[Int64Value, Int64Value]) -> Int64Value:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=1))
        return Int64Value(value=2)

    c = Cardinality
    mapping = {
        "/t.R/Unary": Handler(unary, c.UNARY_UNARY, Int64Value, Int64Value),
        "/t.R/Both": Handler(both, c.UNARY_UNARY, Int64Value, Int64Value),
        "/t.R/Streaming": Handler(streaming, c.UNARY_STREAM, Int64Value, Int64Value),
    }
    service = type("R", (), {"__mapping__": lambda self: mapping})()
    async with running_server([service]) as (_, target), Channel(target) as channel:
        assert (
            await method_for(channel, "/t.R/Unary", c.UNARY_UNARY, Int64Value, Int64Value)(Int64Value(value=41))
        ).value == 42
        assert (await method_for(channel, "/t.R/Both", c.UNARY_UNARY, Int64Value, Int64Value)(Int64Value())).value == 1
        replies = await method_for(channel, "/t.R/Streaming", c.UNARY_STREAM, Int64Value, Int64Value)(Int64Value())
        assert [reply.value for reply in replies] == [1]
    messages = [record.getMessage() for record in caplog.records]
    assert any("/t.R/Both sent its reply and also returned one" in message for message in messages)
    assert any("/t.R/Streaming returned a Int64Value, which is ignored" in message for message in messages)


async def test_trailing_metadata_set_early_goes_out_with_any_end() -> None:
    from app_kit import Channel
    from app_kit.aio.client import method_for

    async def ok(stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        stream.set_trailing_metadata({"x-cost": "3"})
        await stream.send_message(Int64Value(value=1))

    async def fails(stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        stream.set_trailing_metadata({"x-cost": "5"})
        with pytest.raises(ValueError):
            stream.set_trailing_metadata({"Bad Key": "x"})  # refused at once, the earlier kept
        raise GRPCError(Status.ABORTED, "conflict", trailing_metadata={"x-retry": "later"})

    c = Cardinality
    mapping = {
        "/t.T/Ok": Handler(ok, c.UNARY_UNARY, Int64Value, Int64Value),
        "/t.T/Fails": Handler(fails, c.UNARY_UNARY, Int64Value, Int64Value),
    }
    service = type("T", (), {"__mapping__": lambda self: mapping})()
    async with running_server([service]) as (_, target), Channel(target) as channel:
        _, call = await method_for(channel, "/t.T/Ok", c.UNARY_UNARY, Int64Value, Int64Value).with_call(Int64Value())
        assert call.trailing_metadata is not None and call.trailing_metadata["x-cost"] == "3"
        with pytest.raises(GRPCError) as info:
            await method_for(channel, "/t.T/Fails", c.UNARY_UNARY, Int64Value, Int64Value)(Int64Value())
        trailers = info.value.trailing_metadata
        assert trailers is not None and (trailers["x-cost"], trailers["x-retry"]) == ("5", "later")
