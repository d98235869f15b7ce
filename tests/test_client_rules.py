"""The client's retry and stream-end rules, over real sockets, each with a test that fails when it is broken.

- no transparent retry once response headers arrived;
- a graceful GOAWAY refuses (and the client retries) only the streams above its last-stream-id;
  the others complete on the old connection;
- a retried call still ends by its original deadline;
- a client deadline resets the stream (RST_STREAM CANCEL) and so cancels the server's handler;
- a stream that ends with unread data gives its share of the connection window back;
- a response that ends without trailers fails at once (INTERNAL), not at the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import h2.errors
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Status
from app_kit.aio.client import method_for
from app_kit.rpc.client import ClientConnection
from app_kit.rpc.deadline import parse_grpc_timeout
from app_kit.rpc.framing import frame_message

from .fake_server import FakeConnection, fake_server
from .frames import END_HEADERS, END_STREAM, HEADERS, RST_STREAM, frame
from .test_client import GrpcioEcho, grpcio_server, methods

pytestmark = pytest.mark.anyio

REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
CANCEL = int(h2.errors.ErrorCodes.CANCEL)
T = TypeVar("T")
RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def request_value(connection: FakeConnection, stream_id: int) -> bytes:
    """The BytesValue a unary request carried on ``stream_id``."""
    return BytesValue.FromString(bytes(connection.request_data[stream_id][5:])).value


async def bounded(awaitable: Awaitable[T], timeout: float, failure: str) -> T:
    """``awaitable``'s result; if it takes longer than ``timeout``, the test fails saying ``failure``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"{failure} (nothing after {timeout} s)")


async def wait_until(predicate: Callable[[], Any], timeout: float, failure: str) -> None:
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.01)

    await bounded(poll(), timeout, failure)


# -- (a) no transparent retry once response headers arrived ----------------------------


@pytest.mark.parametrize("cardinality", ["Unary", "ServerStream"])
@pytest.mark.parametrize("refusal", ["REFUSED_STREAM", "GOAWAY"])
async def test_no_transparent_retry_once_response_headers_arrived(refusal: str, cardinality: str) -> None:
    # The server answered (headers, even a message) and then refused the stream: it may have run
    # the call, so running it again would run it twice. The call fails instead.
    def answer_then_refuse(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number > 1:  # a retry: it must not happen
            connection.reply(stream_id, Int64Value(value=2).SerializeToString())
            return
        connection.conn.send_headers(stream_id, RESPONSE_HEADERS)
        if cardinality == "ServerStream":
            connection.conn.send_data(stream_id, frame_message(Int64Value(value=1).SerializeToString()))
        if refusal == "REFUSED_STREAM":
            connection.conn.reset_stream(stream_id, REFUSED_STREAM)
        else:
            connection.send_goaway(0)  # "never processed", though it answered

    async with fake_server(answer_then_refuse) as (port, log), Channel("127.0.0.1", port) as channel:
        method = methods(channel)[cardinality]
        request = BytesValue(value=b"once") if cardinality == "Unary" else Int64Value(value=1)
        with pytest.raises(GRPCError) as info:
            await bounded(method(request), 5, "the call did not end")
        assert info.value.status is Status.UNAVAILABLE, info.value
        assert log == [1], "the call was sent again after the server had answered it"


# -- (b) a graceful GOAWAY refuses only the streams above its last-stream-id -------------


@pytest.mark.parametrize("two_phase", [False, True], ids=["one-goaway", "two-phase-goaway"])
async def test_graceful_goaway_refuses_and_retries_only_the_streams_above_its_last_id(two_phase: bool) -> None:
    # Four calls on the first connection (streams 1, 3, 5, 7), then GOAWAY last-stream-id 3 (after
    # one with 2^31-1 first, as grpc-go and grpcio shut down). 1 and 3 complete on the old
    # connection, answered after the GOAWAY; 5 and 7 are retried, on a new connection, once.
    loop = asyncio.get_running_loop()
    connections: list[FakeConnection] = []
    ended: dict[int, list[int]] = {}

    def answer(connection: FakeConnection, stream_id: int) -> None:
        value = request_value(connection, stream_id) + b"@%d" % connections.index(connection)
        connection.reply(stream_id, BytesValue(value=value).SerializeToString())
        connection.flush()

    def script(connection: FakeConnection, stream_id: int, number: int) -> None:
        if connection not in connections:
            connections.append(connection)
        index = connections.index(connection)
        ended.setdefault(index, []).append(stream_id)
        if index > 0:
            answer(connection, stream_id)
        elif len(ended[0]) == 4:
            if two_phase:
                connection.send_goaway(2**31 - 1)
            connection.send_goaway(3)
            for processed in (1, 3):
                loop.call_later(0.05, answer, connection, processed)

    async with fake_server(script) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = methods(channel)["Unary"]
        calls = [unary(BytesValue(value=b"call-%d" % n)) for n in range(4)]
        replies = [reply.value for reply in await bounded(asyncio.gather(*calls), 5, "the calls did not all end")]

    first = connections[0]
    assert sorted(ended[0]) == [1, 3, 5, 7]
    kept = {request_value(first, sid) for sid in (1, 3)}
    refused = {request_value(first, sid) for sid in (5, 7)}
    assert len(connections) == 2 and len(ended[1]) == 2, ended
    assert {request_value(connections[1], sid) for sid in ended[1]} == refused  # only those, once
    assert sorted(replies) == sorted([value + b"@0" for value in kept] + [value + b"@1" for value in refused])


# -- a retried call keeps its original deadline -------------------------------------------


async def test_a_retried_call_still_ends_by_its_original_deadline() -> None:
    # Refused after 0.6 s of a 1 s deadline: the retry gets the 0.4 s left, not a fresh second.
    loop = asyncio.get_running_loop()
    connections: list[FakeConnection] = []

    def refuse_late_then_hang(connection: FakeConnection, stream_id: int, number: int) -> None:
        connections.append(connection)
        if number == 1:

            def refuse() -> None:
                connection.conn.reset_stream(stream_id, REFUSED_STREAM)
                connection.flush()

            loop.call_later(0.6, refuse)
        # The retry is never answered.

    async with fake_server(refuse_late_then_hang) as (port, log), Channel("127.0.0.1", port) as channel:
        started = loop.time()
        with pytest.raises(GRPCError) as info:
            await bounded(methods(channel)["Unary"](BytesValue(), timeout=1.0), 5, "the deadline did not end the call")
        elapsed = loop.time() - started
    assert info.value.status is Status.DEADLINE_EXCEEDED, info.value
    assert len(log) == 2  # it was retried
    assert 0.9 < elapsed < 1.4, f"timeout=1.0 ended after {elapsed:.2f} s"
    retry_timeout = dict(connections[-1].request_headers[log[-1]])[b"grpc-timeout"]
    assert parse_grpc_timeout(retry_timeout) <= 0.45, retry_timeout  # what is left, told to the server


# -- (c) a client deadline resets the stream and cancels the server's handler -----------


async def test_a_client_deadline_sends_rst_stream_cancel() -> None:
    connections: list[FakeConnection] = []

    def never_answer(connection: FakeConnection, stream_id: int, number: int) -> None:
        connections.append(connection)

    loop = asyncio.get_running_loop()
    async with fake_server(never_answer) as (port, _), Channel("127.0.0.1", port) as channel:
        started = loop.time()
        with pytest.raises(GRPCError) as info:
            await bounded(methods(channel)["Unary"](BytesValue(), timeout=0.3), 5, "the deadline did not end the call")
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert loop.time() - started < 1.0
        await wait_until(lambda: connections and connections[0].resets, 2, "no RST_STREAM reached the server")
        assert connections[0].resets == [(1, CANCEL)]
        assert channel._protocol is not None and channel._protocol.connection.open_streams == 0


async def test_the_client_ignores_frames_on_a_stream_it_reset() -> None:
    # RFC 9113 §5.1: after sending RST_STREAM, ignore the frames that arrive on that stream (the
    # server's answer crossed the reset). A second RST_STREAM in reply would count against the
    # server's rapid-reset budget: a client with short deadlines got cut off for it.
    connections: list[FakeConnection] = []

    def answer_later_calls(connection: FakeConnection, stream_id: int, number: int) -> None:
        connections.append(connection)
        if number > 1:
            connection.reply(stream_id, BytesValue(value=b"ok").SerializeToString())

    async with fake_server(answer_later_calls) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = methods(channel)["Unary"]
        with pytest.raises(GRPCError):
            await unary(BytesValue(), timeout=0.2)
        await wait_until(lambda: connections and connections[0].resets, 2, "no RST_STREAM reached the server")
        server = connections[0]
        encode = server.conn.encoder.encode  # the server's own encoder: HPACK stays in step
        server.transport.write(  # type: ignore[attr-defined]
            frame(HEADERS, END_HEADERS, 1, encode(RESPONSE_HEADERS))
            + frame(HEADERS, END_HEADERS | END_STREAM, 1, encode([(b"grpc-status", b"4")]))
        )
        # Two calls after it on the same connection: the second is sent after the client read
        # the late frames, so anything it wrote in reply has reached the server by then.
        for _ in range(2):
            assert (await bounded(unary(BytesValue(), timeout=5), 6, "a later call failed")).value == b"ok"
        assert len(connections) == 3 and all(connection is server for connection in connections)
        resets_of_stream_1 = [item for item in server.frames_on_wire() if item == (RST_STREAM, 1)]
        assert resets_of_stream_1 == [(RST_STREAM, 1)], "the client answered its own reset stream's frames"


async def test_a_client_deadline_cancels_the_servers_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server enforces grpc-timeout itself, which would hide a client that never resets the
    # stream. So the request goes without it (as through a proxy that drops it): only the
    # client's RST_STREAM can end the handler.
    start_call = ClientConnection.start_call

    def without_grpc_timeout(self: ClientConnection, path: str, metadata: Any, **options: Any) -> int:
        return start_call(self, path, metadata, **{**options, "timeout": None})

    monkeypatch.setattr(ClientConnection, "start_call", without_grpc_timeout)
    service = GrpcioEcho()
    async with grpcio_server(service) as server, Channel("127.0.0.1", server.bound_port) as channel:
        sleep = methods(channel)["Sleep"]
        with pytest.raises(GRPCError) as info:
            await bounded(sleep(DoubleValue(value=30), timeout=0.3), 5, "the deadline did not end the call")
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert service.time_remaining is None or service.time_remaining > 60  # no deadline of its own
        await bounded(service.cancelled.wait(), 3, "the server's handler was not cancelled")
        # The same for a call in the middle of its replies, opened as a stream.
        service.started.clear()
        service.cancelled.clear()
        with pytest.raises(GRPCError) as info:
            async with sleep.open(timeout=0.3) as stream:
                await stream.send_message(DoubleValue(value=30), end=True)
                await bounded(stream.recv_message(), 5, "the deadline did not end the call")
        assert info.value.status is Status.DEADLINE_EXCEEDED
        await bounded(service.cancelled.wait(), 3, "the server's handler was not cancelled")


# -- (d) a stream that ends with unread data gives the connection window back -----------

BLOB = b"\xab" * 1000


class Blobs:
    """``Stream(Int64Value(n))`` answers n messages of 1000 bytes.

    Small messages: the window share of a message is held until it is read, but the bytes of
    one still incomplete at the end of a DATA frame are given back at once (see ``_on_data``),
    so messages larger than a frame would hold little of the window while unread.
    """

    async def stream(self, request: Int64Value, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for _ in range(request.value):
            yield BytesValue(value=BLOB)

    def handlers(self) -> grpc.GenericRpcHandler:
        handler = grpc.unary_stream_rpc_method_handler(
            self.stream, request_deserializer=Int64Value.FromString, response_serializer=BytesValue.SerializeToString
        )
        return grpc.method_handlers_generic_handler("test.Blobs", {"Stream": handler})


async def test_streams_ending_with_unread_data_give_the_connection_window_back() -> None:
    # Windows of 64 KiB, the least HTTP/2 allows: the second call whose unread replies kept
    # their share of the connection window would stall the connection for good. Twenty of each
    # way to end with unread replies run through one connection.
    small = Configuration(initial_connection_window_size=65535, initial_stream_window_size=65535)
    async with grpcio_server(Blobs()) as server, Channel("127.0.0.1", server.bound_port, config=small) as channel:  # type: ignore[arg-type]
        blobs = method_for(channel, "/test.Blobs/Stream", Cardinality.UNARY_STREAM, Int64Value, BytesValue)

        async def ended_unread() -> None:
            # The server's status arrives after 50 kB of replies that are never read.
            async with blobs.open() as stream:
                await stream.send_message(Int64Value(value=50), end=True)
                await stream.recv_trailing_metadata()

        async def left_unread() -> None:
            # The client leaves (cancels the call) after the first of 500 replies; the server
            # sent as many as the windows allowed.
            async with blobs.open() as stream:
                await stream.send_message(Int64Value(value=500), end=True)
                assert (await stream.recv_message()).value == BLOB  # type: ignore[union-attr]
                await asyncio.sleep(0.005)  # the windows fill up

        assert len(await bounded(blobs(Int64Value(value=3)), 5, "the first call did not end")) == 3
        protocol = channel._protocol
        for run in (ended_unread, left_unread):
            for number in range(1, 21):
                await bounded(run(), 2, f"{run.__name__} call {number} stalled: the connection window is used up")
        assert len(await bounded(blobs(Int64Value(value=100)), 2, "the last call stalled")) == 100
        assert channel._protocol is protocol  # all on one connection
        assert protocol is not None and protocol.connection.open_streams == 0


# -- found meanwhile: a response that ends without trailers -------------------------------


async def test_a_response_ending_without_trailers_fails_at_once() -> None:
    # END_STREAM on DATA, no trailers: no status will come. The call ends at once with INTERNAL
    # (as grpc-go does), not at its deadline, and its stream is forgotten.
    def no_trailers(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 3:
            connection.reply(stream_id, BytesValue(value=b"fine").SerializeToString())
            return
        connection.conn.send_headers(stream_id, RESPONSE_HEADERS)
        reply = Int64Value(value=1) if number == 2 else BytesValue(value=b"x")
        connection.conn.send_data(stream_id, frame_message(reply.SerializeToString()), end_stream=True)

    loop = asyncio.get_running_loop()
    async with fake_server(no_trailers) as (port, _), Channel("127.0.0.1", port) as channel:
        m = methods(channel)
        for method, request in ((m["Unary"], BytesValue()), (m["ServerStream"], Int64Value(value=1))):
            started = loop.time()
            with pytest.raises(GRPCError) as info:
                await bounded(method(request, timeout=2), 5, "the call did not end")
            assert info.value.status is Status.INTERNAL, info.value
            assert loop.time() - started < 1.0
        assert (await bounded(m["Unary"](BytesValue(), timeout=2), 5, "the call did not end")).value == b"fine"
        assert channel._protocol is not None and channel._protocol.connection.open_streams == 0


@pytest.mark.parametrize("window", [65_535, 1 << 20])
async def test_a_request_ends_with_its_last_data_frame_not_an_empty_one(window: int) -> None:
    # A unary request is HEADERS + DATA(END_STREAM): no third, empty DATA frame to end it. A
    # request larger than a frame ends with its last piece: queued behind the window (h2's
    # default), or written at once when the windows hold it (a server's 1 MiB, as ours).
    frames: list[tuple[int, int, bool]] = []

    class Recording(FakeConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.conn.local_settings = h2.settings.Settings(client=False, initial_values={4: window})
            super().connection_made(transport)
            if window > 65_535:
                self.conn.increment_flow_control_window(window)
                self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    frames.append((event.stream_id, len(event.data or b""), event.stream_ended is not None))
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamEnded):
                    self.reply(event.stream_id, BytesValue().SerializeToString())
            self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Recording(lambda *_: None, []), "127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            unary = methods(channel)["Unary"]
            await unary(BytesValue(value=b"small"), timeout=5)
            [(_, size, ended)] = frames
            assert ended and size > 0
            frames.clear()
            await unary(BytesValue(value=b"x" * 100_000), timeout=5)  # over the 16 KiB frame size
            assert len(frames) > 1 and all(size > 0 for _, size, _ in frames)
            assert [ended for _, _, ended in frames] == [False] * (len(frames) - 1) + [True]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("raw", "shown"), [(b"17", "17"), (b"99999999999999999999", "99999999999999999999"), (b"x", "'x'")]
)
async def test_a_status_code_outside_the_known_ones_is_unknown_keeping_code_and_message(raw: bytes, shown: str) -> None:
    def reply(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.conn.send_headers(stream_id, RESPONSE_HEADERS)
        trailers = [(b"grpc-status", raw), (b"grpc-message", b"from a newer server")]
        connection.conn.send_headers(stream_id, trailers, end_stream=True)

    async with fake_server(reply) as (port, _), Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Unary"](BytesValue(), timeout=5)
    assert info.value.status is Status.UNKNOWN
    assert info.value.message == f"grpc-status {shown} from the server: from a newer server"
