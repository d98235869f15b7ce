"""Our client against a real grpc.aio server, our own server, in-memory, and scripted peers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections.abc import AsyncIterator

import grpc
import h2.events
import pytest
from google.protobuf import any_pb2
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value, StringValue
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from app_kit import Cardinality, Channel, Configuration, Deadline, GRPCError, Status
from app_kit.aio.client import method_for
from app_kit.aio.testing import ChannelFor
from examples.cafe.cafe_grpc import CoffeeMachineStub
from examples.cafe.cafe_pb2 import LatteOrder, TastingNote
from examples.cafe.service import CoffeeMachine

from .conftest import running_server
from .fake_server import FakeConnection, fake_server

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


class GrpcioEcho:
    """The test service, implemented on grpc.aio."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.time_remaining: float | None = None

    async def unary(self, request: BytesValue, context: grpc.aio.ServicerContext) -> BytesValue:
        if request.value == b"gzip-reply":
            context.set_compression(grpc.Compression.Gzip)
        echoed = tuple((k, v) for k, v in context.invocation_metadata() if k.startswith("x-"))
        await context.send_initial_metadata(echoed)
        context.set_trailing_metadata((("x-trailer", "done"), ("x-trailer-bin", b"\x00\xff")))
        return BytesValue(value=request.value)

    async def sleep(self, request: DoubleValue, context: grpc.aio.ServicerContext) -> DoubleValue:
        self.time_remaining = context.time_remaining()
        self.started.set()
        try:
            await asyncio.sleep(request.value)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return request

    async def fail(self, request: StringValue, context: grpc.aio.ServicerContext) -> StringValue:
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ResourceInfo(resource_name=request.value))
        status = status_pb2.Status(code=Status.NOT_FOUND.value, message="no such thing: ü 100%", details=[detail])
        await context.abort_with_status(rpc_status.to_status(status))
        raise AssertionError

    async def server_stream(self, request: Int64Value, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for index in range(request.value):
            yield Int64Value(value=index)

    async def client_stream(self, requests, context: grpc.aio.ServicerContext) -> Int64Value:  # type: ignore[no-untyped-def]
        total = 0
        async for message in requests:
            total += len(message.value)
        return Int64Value(value=total)

    async def bidi(self, requests, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        async for message in requests:
            yield message

    def handlers(self) -> grpc.GenericRpcHandler:
        def rpc(kind, fn, request_type, reply_type):  # type: ignore[no-untyped-def]
            return getattr(grpc, f"{kind}_rpc_method_handler")(
                fn, request_deserializer=request_type.FromString, response_serializer=reply_type.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": rpc("unary_unary", self.unary, BytesValue, BytesValue),
                "Sleep": rpc("unary_unary", self.sleep, DoubleValue, DoubleValue),
                "Fail": rpc("unary_unary", self.fail, StringValue, StringValue),
                "ServerStream": rpc("unary_stream", self.server_stream, Int64Value, Int64Value),
                "ClientStream": rpc("stream_unary", self.client_stream, BytesValue, Int64Value),
                "Bidi": rpc("stream_stream", self.bidi, BytesValue, BytesValue),
            },
        )


@contextlib.asynccontextmanager
async def grpcio_server(service: GrpcioEcho, port: int = 0, options=()) -> AsyncIterator[grpc.aio.Server]:  # type: ignore[no-untyped-def]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((service.handlers(),))
    server.bound_port = server.add_insecure_port(f"127.0.0.1:{port}")  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


def methods(channel: Channel):  # type: ignore[no-untyped-def]
    p, c = "/test.Echo/", Cardinality
    return {
        "Unary": method_for(channel, p + "Unary", c.UNARY_UNARY, BytesValue, BytesValue),
        "Sleep": method_for(channel, p + "Sleep", c.UNARY_UNARY, DoubleValue, DoubleValue),
        "Fail": method_for(channel, p + "Fail", c.UNARY_UNARY, StringValue, StringValue),
        "ServerStream": method_for(channel, p + "ServerStream", c.UNARY_STREAM, Int64Value, Int64Value),
        "ClientStream": method_for(channel, p + "ClientStream", c.STREAM_UNARY, BytesValue, Int64Value),
        "Bidi": method_for(channel, p + "Bidi", c.STREAM_STREAM, BytesValue, BytesValue),
    }


async def test_four_cardinalities_and_metadata_against_grpcio() -> None:
    service = GrpcioEcho()
    async with grpcio_server(service) as server, Channel("127.0.0.1", server.bound_port) as channel:
        m = methods(channel)
        async with m["Unary"].open(metadata={"x-text": "hi", "x-data-bin": b"\x00\x01"}) as stream:
            await stream.send_message(BytesValue(value=b"hello"), end=True)
            initial = await stream.recv_initial_metadata()
            assert (await stream.recv_message()).value == b"hello"
            assert await stream.recv_message() is None
            trailing = await stream.recv_trailing_metadata()
        assert initial["x-text"] == "hi" and initial["x-data-bin"] == b"\x00\x01"
        assert trailing["x-trailer"] == "done" and trailing["x-trailer-bin"] == b"\x00\xff"
        assert stream.initial_metadata is initial and stream.trailing_metadata is trailing

        assert [m.value for m in await m["ServerStream"](Int64Value(value=50))] == list(range(50))
        async with m["ServerStream"].open() as stream:
            await stream.send_message(Int64Value(value=3), end=True)
            assert [m.value async for m in stream] == [0, 1, 2]

        requests = [BytesValue(value=b"x" * n) for n in range(30)]
        assert (await m["ClientStream"](requests)).value == sum(range(30))
        assert (await m["ClientStream"]([])).value == 0

        async with m["Bidi"].open() as stream:
            for index in range(10):
                await stream.send_message(BytesValue(value=str(index).encode()))
                assert (await stream.recv_message()).value == str(index).encode()
            await stream.end()
            assert await stream.recv_message() is None
            await stream.recv_trailing_metadata()
        assert [r.value for r in await m["Bidi"]([BytesValue(value=b"a"), BytesValue(value=b"b")])] == [b"a", b"b"]


async def test_error_status_message_and_details() -> None:
    async with grpcio_server(GrpcioEcho()) as server, Channel("127.0.0.1", server.bound_port) as channel:
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Fail"](StringValue(value="cup-7"))
        assert info.value.status is Status.NOT_FOUND
        assert info.value.message == "no such thing: ü 100%"
        (detail,) = info.value.details or []
        assert isinstance(detail, error_details_pb2.ResourceInfo) and detail.resource_name == "cup-7"
        with pytest.raises(GRPCError) as info:
            await method_for(channel, "/test.Echo/Nope", Cardinality.UNARY_UNARY, BytesValue, BytesValue)(BytesValue())
        assert info.value.status is Status.UNIMPLEMENTED


async def test_deadline_is_sent_and_enforced() -> None:
    service = GrpcioEcho()
    async with grpcio_server(service) as server, Channel("127.0.0.1", server.bound_port) as channel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Sleep"](DoubleValue(value=5), timeout=0.3)
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert loop.time() - started < 1.5
        assert service.time_remaining is not None and 0 < service.time_remaining <= 0.3
        # A deadline handed down (as a server handler would pass stream.deadline) wins when sooner.
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Sleep"](DoubleValue(value=5), timeout=10, deadline=Deadline.from_timeout(0.2))
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert service.time_remaining <= 0.2
        assert (await methods(channel)["Sleep"](DoubleValue(value=0.01), timeout=5)).value == 0.01


async def test_cancel_reaches_the_server() -> None:
    service = GrpcioEcho()
    async with grpcio_server(service) as server, Channel("127.0.0.1", server.bound_port) as channel:
        async with methods(channel)["Sleep"].open() as stream:
            await stream.send_message(DoubleValue(value=30), end=True)
            await asyncio.wait_for(service.started.wait(), 5)
            await stream.cancel()
            with pytest.raises(GRPCError) as info:
                await stream.recv_message()
            assert info.value.status is Status.CANCELLED
        await asyncio.wait_for(service.cancelled.wait(), 5)
        # Leaving the block unfinished cancels too.
        service.started.clear()
        service.cancelled.clear()
        async with methods(channel)["Sleep"].open() as stream:
            await stream.send_message(DoubleValue(value=30), end=True)
            await asyncio.wait_for(service.started.wait(), 5)
        await asyncio.wait_for(service.cancelled.wait(), 5)


async def test_gzip_requests_and_compressed_replies() -> None:
    payload = b"compressible " * 50000
    async with grpcio_server(GrpcioEcho()) as server:
        async with Channel("127.0.0.1", server.bound_port, compression="gzip") as channel:
            unary = methods(channel)["Unary"]
            assert (await unary(BytesValue(value=b"warm-up"))).value == b"warm-up"
            transport = channel._protocol.transport  # type: ignore[union-attr]
            written = []
            original = transport.write
            transport.write = lambda data: (written.append(len(data)), original(data))[1]  # type: ignore[method-assign]
            assert (await unary(BytesValue(value=payload))).value == payload
            assert sum(written) < len(payload) // 20  # the request went out gzip-compressed
        async with Channel("127.0.0.1", server.bound_port) as channel:
            assert (await methods(channel)["Unary"](BytesValue(value=b"gzip-reply"))).value == b"gzip-reply"


async def test_sixteen_mib_messages() -> None:
    options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
    config = Configuration(max_receive_message_length=32 * MiB, max_send_message_length=32 * MiB)
    payload = os.urandom(16 * MiB)
    async with (
        grpcio_server(GrpcioEcho(), options=options) as server,
        Channel("127.0.0.1", server.bound_port, config=config) as channel,
    ):
        assert (await asyncio.wait_for(methods(channel)["Unary"](BytesValue(value=payload)), 30)).value == payload
    async with (
        grpcio_server(GrpcioEcho(), options=options) as server,
        Channel("127.0.0.1", server.bound_port) as channel,
    ):
        with pytest.raises(GRPCError) as info:  # over our default 4 MiB send limit
            await methods(channel)["Unary"](BytesValue(value=payload))
        assert info.value.status is Status.RESOURCE_EXHAUSTED


async def test_server_goaway_during_call_and_restart_between_calls() -> None:
    service = GrpcioEcho()
    async with grpcio_server(service) as server:
        port = server.bound_port
        async with Channel("127.0.0.1", port) as channel:
            call = asyncio.ensure_future(methods(channel)["Sleep"](DoubleValue(value=0.5)))
            await asyncio.wait_for(service.started.wait(), 5)
            await server.stop(grace=3)  # GOAWAY while the call is in flight
            assert (await call).value == 0.5
            with pytest.raises(GRPCError) as info:  # nobody listens now
                await methods(channel)["Unary"](BytesValue(value=b"x"))
            assert info.value.status is Status.UNAVAILABLE
            async with grpcio_server(GrpcioEcho(), port=port):
                # The failed attempt put the backend in backoff (1 s): a call that waits for
                # it to be ready gets through once the backoff is over.
                reply = await methods(channel)["Unary"](BytesValue(value=b"back"), timeout=5, wait_for_ready=True)
                assert reply.value == b"back"


async def test_bursts_over_the_stream_limit_on_fresh_channels() -> None:
    # A burst of 250 on a fresh channel to a server allowing 100 streams, 20 times in a row:
    # none may be refused (the client assumes 100 until the server's SETTINGS arrive).
    options = [("grpc.max_concurrent_streams", 100)]
    async with grpcio_server(GrpcioEcho(), options=options) as server:
        for _ in range(20):
            async with Channel("127.0.0.1", server.bound_port) as channel:
                unary = methods(channel)["Unary"]
                replies = await asyncio.wait_for(
                    asyncio.gather(*(unary(BytesValue(value=str(n).encode())) for n in range(250))), 30
                )
                assert [r.value for r in replies] == [str(n).encode() for n in range(250)]
                assert channel._protocol is not None and channel._protocol.connection.open_streams == 0


async def test_refused_and_unprocessed_calls_are_retried_transparently() -> None:
    def refuse_first(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 1:
            connection.conn.reset_stream(stream_id, 7)  # REFUSED_STREAM
        else:
            connection.reply(stream_id, BytesValue(value=b"second try").SerializeToString())

    async with fake_server(refuse_first) as (port, log), Channel("127.0.0.1", port) as channel:
        assert (await methods(channel)["Unary"](BytesValue())).value == b"second try"
        assert len(log) == 2

    def goaway_first(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 1:
            connection.conn.close_connection(last_stream_id=0)  # nothing was processed
        else:
            connection.reply(stream_id, BytesValue(value=b"new connection").SerializeToString())

    async with fake_server(goaway_first) as (port, log), Channel("127.0.0.1", port) as channel:
        assert (await methods(channel)["Unary"](BytesValue())).value == b"new connection"
        assert len(log) == 2

    def always_refuse(connection: FakeConnection, stream_id: int, number: int) -> None:
        connection.conn.reset_stream(stream_id, 7)

    async with fake_server(always_refuse) as (port, log), Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Unary"](BytesValue())
        assert info.value.status is Status.UNAVAILABLE and len(log) == 1 + Configuration().max_transparent_retries


async def test_a_call_refused_twice_is_still_answered() -> None:
    # A grpc-core server releases a finished stream's slot only once its write completed, so a
    # client filling the limit exactly can be refused again on the retry (seen: 1 burst in 700).
    def refuse_twice(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number <= 2:
            connection.conn.reset_stream(stream_id, 7)  # REFUSED_STREAM
        else:
            connection.reply(stream_id, BytesValue(value=b"third try").SerializeToString())

    async with fake_server(refuse_twice) as (port, log), Channel("127.0.0.1", port) as channel:
        assert (await methods(channel)["Unary"](BytesValue())).value == b"third try"
        assert len(log) == 3

    limited = Configuration(max_transparent_retries=0)
    async with fake_server(refuse_twice) as (port, log), Channel("127.0.0.1", port, config=limited) as channel:
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Unary"](BytesValue())
        assert info.value.status is Status.UNAVAILABLE and len(log) == 1


async def test_non_grpc_responses_and_connection_loss() -> None:
    def respond(connection: FakeConnection, stream_id: int, number: int) -> None:
        if number == 1:
            connection.conn.send_headers(stream_id, [(b":status", b"503")], end_stream=True)
        elif number == 2:
            connection.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"text/html")])
            connection.conn.send_data(stream_id, b"<html>", end_stream=True)
        elif number == 3:
            connection.conn.send_headers(stream_id, [(b":status", b"404")], end_stream=True)
        elif number == 4:
            connection.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
            connection.conn.send_headers(stream_id, [(b"x-no-status", b"1")], end_stream=True)
        else:
            connection.transport.close()  # the connection drops after the request was sent

    expected = [Status.UNAVAILABLE, Status.UNKNOWN, Status.UNIMPLEMENTED, Status.UNKNOWN, Status.UNAVAILABLE]
    async with fake_server(respond) as (port, _), Channel("127.0.0.1", port) as channel:
        for status in expected:
            with pytest.raises(GRPCError) as info:
                await methods(channel)["Unary"](BytesValue())
            assert info.value.status is status, info.value


async def test_connection_refused_is_unavailable() -> None:
    async with fake_server(lambda *_: None) as (port, _):
        pass
    async with Channel("127.0.0.1", port) as channel:
        with pytest.raises(GRPCError) as info:
            await methods(channel)["Unary"](BytesValue())
        assert info.value.status is Status.UNAVAILABLE


async def test_generated_stub_against_our_server_tcp_unix_tls() -> None:
    async def exercise(channel: Channel) -> None:
        stub = CoffeeMachineStub(channel)
        latte = await stub.MakeLatte(LatteOrder(milk_ml=200, shots=2), timeout=5, metadata={"x-table": "7"})
        assert latte.description == "2-shot latte, 200 ml milk"
        with pytest.raises(GRPCError) as info:
            await stub.MakeLatte(LatteOrder(milk_ml=1, shots=1))
        assert info.value.status is Status.INVALID_ARGUMENT
        assert [v.field for v in info.value.details[0].field_violations] == ["milk_ml"]  # type: ignore[index]
        assert len(await stub.Brew(LatteOrder(milk_ml=200, shots=1))) == 5
        summary = await stub.OrderRound([LatteOrder(milk_ml=200, shots=1)] * 4)
        assert summary.drinks == 4
        async with stub.Taste.open() as stream:
            await stream.send_message(TastingNote(text="bright"))
            assert (await stream.recv_message()).text == "agreed: bright"
            await stream.end()
            assert await stream.recv_message() is None

    async with running_server([CoffeeMachine()]) as (server, _):
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            await exercise(channel)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "cafe.sock")
        async with running_server([CoffeeMachine()], path=path), Channel(path=path) as channel:
            await exercise(channel)
    import trustme

    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2"])  # a context of the caller's: Channel does not change it
    async with running_server([CoffeeMachine()], ssl=server_context) as (server, _):
        async with Channel("localhost", server.sockets[0].getsockname()[1], ssl=client_context) as channel:
            await exercise(channel)


async def test_channel_for_in_memory() -> None:
    async with ChannelFor([CoffeeMachine()]) as channel:
        stub = CoffeeMachineStub(channel)
        assert (await stub.MakeLatte(LatteOrder(milk_ml=150, shots=4))).order_id == 1
        with pytest.raises(GRPCError):
            await stub.MakeLatte(LatteOrder())
        replies = await stub.Taste([TastingNote(text=str(n)) for n in range(100)])
        assert [r.text for r in replies] == [f"agreed: {n}" for n in range(100)]
    async with ChannelFor([CoffeeMachine(brew_step=0.1)]) as channel:
        stages = []
        with pytest.raises(GRPCError) as info:
            async with CoffeeMachineStub(channel).Brew.open(timeout=0.25) as stream:
                await stream.send_message(LatteOrder(milk_ml=200, shots=1), end=True)
                async for status in stream:
                    stages.append(status.stage)
        assert info.value.status is Status.DEADLINE_EXCEEDED
        assert 1 <= len(stages) < 5


class _LateSettingsServer(asyncio.Protocol):
    """An h2 server that sends its SETTINGS (MAX_CONCURRENT_STREAMS 100) only after a delay
    and refuses streams over 100 as grpcio does."""

    def __init__(
        self, refused: list[int], limit: int = 100, settings_delay: float = 0.2, answer_first: bool = True
    ) -> None:
        import h2.config
        import h2.connection

        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        from app_kit.wire.h2_internals import _AdvertisedSettings  # advertised; refused by us, not h2

        self.conn.local_settings = _AdvertisedSettings(client=False, initial_values={3: limit})
        self.limit, self.settings_delay, self.answer_first = limit, settings_delay, answer_first
        self.refused = refused
        self.open: set[int] = set()
        self.settings_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        asyncio.get_running_loop().call_later(self.settings_delay, self._settings_out)  # late, like a busy server

    def _settings_out(self) -> None:
        self.settings_sent = True
        self._send()

    def _send(self) -> None:
        if self.settings_sent:
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events

        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                if len(self.open) >= self.limit:
                    self.conn.reset_stream(event.stream_id, 7)
                    self.refused.append(event.stream_id)
                else:
                    self.open.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.open.discard(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.open:
                if event.stream_id == 1 and not self.answer_first:
                    continue
                asyncio.get_running_loop().call_later(0.05, self._reply, event.stream_id)  # calls take a while
        self._send()

    def _reply(self, stream_id: int) -> None:
        self.open.discard(stream_id)
        payload = BytesValue(value=b"ok").SerializeToString()
        self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.conn.send_data(stream_id, b"\x00" + len(payload).to_bytes(4, "big") + payload)
        self.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)
        self._send()


async def test_calls_before_the_servers_settings_assume_a_limit_of_100() -> None:
    # Until the server's SETTINGS arrive its limit is unknown (h2 assumes 2^32): a burst of
    # 500 calls on a fresh channel must not go past the 100 every gRPC server allows.
    refused: list[int] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _LateSettingsServer(refused), "127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            unary = methods(channel)["Unary"]
            replies = await asyncio.wait_for(asyncio.gather(*(unary(BytesValue()) for _ in range(500))), 20)
        assert all(reply.value == b"ok" for reply in replies)
        assert refused == [], len(refused)
    finally:
        server.close()


async def test_a_call_ended_by_its_deadline_frees_its_slot_for_a_waiting_call() -> None:
    # One stream allowed; the first call is never answered. When its deadline ends it, the call
    # waiting for the slot must start at once, not wait for an event from the server.
    refused: list[int] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _LateSettingsServer(refused, 1, 0.0, answer_first=False), "127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            unary = methods(channel)["Unary"]
            await channel._connection()
            await asyncio.sleep(0.1)  # the server's SETTINGS (limit 1) are in
            first = asyncio.ensure_future(unary(BytesValue(), timeout=0.3))
            await asyncio.sleep(0.05)
            assert (await unary(BytesValue(), timeout=2)).value == b"ok"
            with pytest.raises(GRPCError) as info:
                await first
            assert info.value.status is Status.DEADLINE_EXCEEDED
        assert refused == []
    finally:
        server.close()


async def test_a_compressed_reply_with_its_trailers_in_the_same_read() -> None:
    # The message is inflated when the call takes it, which is after the trailers (same read)
    # ended the stream: it must still be read, not end the call CANCELLED.
    import zlib

    def gzip_reply(connection: FakeConnection, stream_id: int, number: int) -> None:
        packer = zlib.compressobj(6, zlib.DEFLATED, 31)
        payload = packer.compress(BytesValue(value=b"squeezed" * 100).SerializeToString()) + packer.flush()
        head = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip")]
        connection.conn.send_headers(stream_id, head)
        connection.conn.send_data(stream_id, b"\x01" + len(payload).to_bytes(4, "big") + payload)
        connection.conn.send_headers(stream_id, [(b"grpc-status", b"0")], end_stream=True)

    async with fake_server(gzip_reply) as (port, _), Channel("127.0.0.1", port) as channel:
        unary = methods(channel)["Unary"]
        for _ in range(3):
            assert (await unary(BytesValue(), timeout=5)).value == b"squeezed" * 100


async def test_a_request_over_the_send_buffer_with_end_is_not_reported_failed() -> None:
    # A 70,000-byte request with end=True waits for its bytes to leave (over the 64 KiB send
    # buffer); when the whole response comes back meanwhile, the call succeeded: the wait
    # must end with it, not raise "the call is finished".
    from .services import EchoService

    request = BytesValue(value=b"x" * 70_000)
    service = GrpcioEcho()
    async with grpcio_server(service) as grpcio, running_server([EchoService()]) as (_, target):
        for server_port in (grpcio.bound_port, int(target.rsplit(":", 1)[1])):
            async with Channel("127.0.0.1", server_port) as channel:
                unary = methods(channel)["Unary"]
                replies = await asyncio.gather(*(unary(request, timeout=10) for _ in range(40)))
                assert all(reply.value == request.value for reply in replies)
                for _ in range(10):
                    assert (await unary(request, timeout=10)).value == request.value


async def test_a_call_answered_while_its_request_waits_for_window_succeeds() -> None:
    # The server answers (OK, with trailers) as soon as it sees the request's headers, and
    # grants window in the same write: the sender, still waiting for that window, wakes to
    # a finished call. That call succeeded; send_message must not raise.
    class AnswerAtOnce(FakeConnection):
        def data_received(self, data: bytes) -> None:
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    self.reply(event.stream_id, BytesValue(value=b"early").SerializeToString())
                elif isinstance(event, h2.events.DataReceived) and event.stream_id in self.conn.streams:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: AnswerAtOnce(lambda *_: None, []), "127.0.0.1", 0)
    try:
        async with Channel("127.0.0.1", server.sockets[0].getsockname()[1]) as channel:
            unary = methods(channel)["Unary"]
            for _ in range(5):
                reply = await unary(BytesValue(value=b"x" * 200_000), timeout=5)
                assert reply.value == b"early"
    finally:
        server.close()


async def test_close_during_connect_does_not_leak_the_new_connection() -> None:
    from .services import EchoService

    async with running_server([EchoService()]) as (server, target):
        channel = Channel("127.0.0.1", int(target.rsplit(":", 1)[1]))
        opened = asyncio.Event()
        real_open = channel._open_transport

        async def slow_open(factory, address):  # type: ignore[no-untyped-def]
            # The connect is under way (the server accepts it) when close() is called.
            protocol = await real_open(factory, address)
            opened.set()
            await asyncio.sleep(0.1)
            return protocol

        channel._open_transport = slow_open  # type: ignore[method-assign]
        call = asyncio.ensure_future(methods(channel)["Unary"](BytesValue(value=b"x"), timeout=5))
        await opened.wait()
        channel.close()
        with pytest.raises(GRPCError) as info:
            await call
        assert info.value.status is Status.UNAVAILABLE
        for _ in range(100):  # the server sees the connection go
            if not server._connections:
                break
            await asyncio.sleep(0.01)
        assert not server._connections


async def test_grpc_error_carries_trailing_metadata_both_ways() -> None:
    # A handler raises GRPCError with trailing metadata: grpcio's client and ours see it,
    # ours on the GRPCError it raises.
    from .services import EchoService

    async with running_server([EchoService()]) as (_, target):
        async with Channel("127.0.0.1", int(target.rsplit(":", 1)[1])) as channel:
            with pytest.raises(GRPCError) as info:
                await methods(channel)["Fail"](StringValue(value="grpc-with-trailers"))
        assert info.value.status is Status.FAILED_PRECONDITION and info.value.message == "stale"
        trailers = info.value.trailing_metadata
        assert trailers is not None and trailers["x-retry-after"] == "5" and trailers["x-why-bin"] == b"\x00"
        assert repr(info.value) == "GRPCError(Status.FAILED_PRECONDITION, 'stale', None)"
        async with grpc.aio.insecure_channel(target) as grpcio_channel:
            fail = grpcio_channel.unary_unary(
                "/test.Echo/Fail",
                request_serializer=StringValue.SerializeToString,
                response_deserializer=StringValue.FromString,
            )
            call = fail(StringValue(value="grpc-with-trailers"))
            with pytest.raises(grpc.aio.AioRpcError):
                await call
            assert ("x-retry-after", "5") in list(await call.trailing_metadata())


async def test_standard_error_details_decode_without_importing_their_module() -> None:
    # A fresh interpreter decodes a BadRequest detail that it never imported the type of.
    import subprocess
    import sys

    from app_kit.rpc.codecs import ProtoStatusDetailsCodec

    data = ProtoStatusDetailsCodec().encode(
        Status.INVALID_ARGUMENT,
        "bad",
        [error_details_pb2.BadRequest(field_violations=[error_details_pb2.BadRequest.FieldViolation(field="f")])],
    )
    script = (
        "import sys\n"
        "from app_kit.rpc.codecs import ProtoStatusDetailsCodec\n"
        "from app_kit import Status\n"
        "assert 'google.rpc.error_details_pb2' not in sys.modules\n"
        f"(detail,) = ProtoStatusDetailsCodec().decode(Status.INVALID_ARGUMENT, 'bad', {data!r})\n"
        "print(type(detail).__name__, detail.field_violations[0].field)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["BadRequest", "f"]


async def test_the_sender_of_a_large_last_message_wakes_when_it_left_not_at_the_reply() -> None:
    # send_message(70 KB, end=True) waits for its bytes to leave (over the 64 KiB send
    # buffer); it must return once they left, while the server still holds its reply.
    from app_kit import Handler, Stream

    release = asyncio.Event()

    async def hold_reply(stream: Stream[BytesValue, Int64Value]) -> None:
        size = sum([len(message.value) async for message in stream])
        await release.wait()
        await stream.send_message(Int64Value(value=size))

    mapping = {"/t.H/Hold": Handler(hold_reply, Cardinality.STREAM_UNARY, BytesValue, Int64Value)}
    service = type("H", (), {"__mapping__": lambda self: mapping})()
    async with running_server([service]) as (_, target):
        async with Channel("127.0.0.1", int(target.rsplit(":", 1)[1])) as channel:
            async with channel.request("/t.H/Hold", Cardinality.STREAM_UNARY, BytesValue, Int64Value) as call:
                await asyncio.wait_for(call.send_message(BytesValue(value=b"x" * 70_000), end=True), 5)
                release.set()
                assert (await call.recv_message()) == Int64Value(value=70_000)
