"""Interceptors on both sides, over real sockets: order, short-circuit, error mapping, message
hooks, and the one ``on_call_end`` each call gets with its final status.

The server's interceptors are driven by grpcio clients; the client's run against grpcio's
server; both sides also run through the segmenting relay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, StringValue

from app_kit import (
    App,
    AppSettings,
    Cardinality,
    Channel,
    ClientInterceptor,
    ClientStream,
    GRPCError,
    Server,
    ServerInterceptor,
    StartupError,
    Status,
    Stream,
)
from app_kit.aio.client import method_for
from examples.interop.messages_pb2 import SimpleRequest, SimpleResponse
from examples.interop.server import TestService

from .conftest import running_server
from .h2client import RawClient
from .interop_grpcio import grpcio_interop_server
from .relay import segmenting_relay
from .services import EchoService, grpcio_method

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(interceptors: list[ServerInterceptor], service: Any = None) -> AsyncIterator[int]:
    async with running_server([service or EchoService()], interceptors=interceptors) as (server, _):
        yield server.sockets[0].getsockname()[1]


class Recorder(ServerInterceptor):
    """Writes what it sees into a shared journal, under its own name."""

    def __init__(self, name: str, journal: list[str]) -> None:
        self.name = name
        self.journal = journal
        self.ended: list[Stream[Any, Any]] = []

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        self.journal.append(f"{self.name} enter {call.service} {call.method_name} {call.cardinality.name}")
        try:
            await proceed()
        finally:
            self.journal.append(f"{self.name} exit")

    def on_message_received(self, call: Stream[Any, Any], message: Any) -> Any:
        self.journal.append(f"{self.name} received")
        return message

    def on_message_sent(self, call: Stream[Any, Any], message: Any) -> Any:
        self.journal.append(f"{self.name} sent")
        return message

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.journal.append(f"{self.name} end {call.status.name if call.status is not None else None}")
        self.ended.append(call)


async def test_server_interceptors_nest_in_order_and_see_each_message() -> None:
    journal: list[str] = []
    outer, inner = Recorder("a", journal), Recorder("b", journal)
    async with serving([outer, inner]) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)(
            BytesValue(value=b"hi")
        )
    assert reply.value == b"hi"
    assert journal == [
        "a enter test.Echo Unary UNARY_UNARY",
        "b enter test.Echo Unary UNARY_UNARY",
        "a received",  # inward: outermost first
        "b received",
        "b sent",  # outward: innermost first
        "a sent",
        "b exit",
        "a exit",
        "b end OK",  # the status is sent before on_call_end: it knows the outcome
        "a end OK",
    ]
    call = outer.ended[0]
    assert (call.messages_received, call.messages_sent) == (1, 1)
    assert call.bytes_received == call.bytes_sent == len(BytesValue(value=b"hi").SerializeToString())
    assert call.elapsed > 0 and call.elapsed == outer.ended[0].elapsed


class RequireToken(ServerInterceptor):
    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        if call.metadata.get("authorization") != "Bearer good":
            raise GRPCError(Status.UNAUTHENTICATED, "no valid token")
        await proceed()


async def test_an_interceptor_ends_a_call_before_its_handler() -> None:
    journal: list[str] = []
    service = EchoService()
    inner = Recorder("inner", journal)
    async with serving([RequireToken(), inner], service) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await unary(BytesValue(value=b"x"))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == "no valid token"
            assert "metadata" not in service.observed  # the handler never ran
            assert journal == []  # nor the inner interceptor, not even its on_call_end
            reply = await unary(BytesValue(value=b"y"), metadata=(("authorization", "Bearer good"),))
            assert reply.value == b"y"
    assert journal[-1] == "inner end OK"


class MapErrors(ServerInterceptor):
    """Turns the handler's ValueError into INVALID_ARGUMENT, with the text it chose."""

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        try:
            await proceed()
        except ValueError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT, f"bad request: {exc}") from None


class ValueErrorService:
    def __mapping__(self) -> dict[str, Any]:
        from app_kit import Handler

        return {"/test.Bad/Call": Handler(self.call, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def call(self, stream: Stream[StringValue, StringValue]) -> StringValue:
        request = await stream.recv_message()
        assert request is not None
        raise ValueError(request.value)


async def test_an_interceptor_maps_a_handlers_error_to_a_status() -> None:
    journal: list[str] = []
    async with serving([Recorder("log", journal), MapErrors()], ValueErrorService()) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await grpcio_method(channel, "unary_unary", "/test.Bad/Call", StringValue, StringValue)(
                    StringValue(value="no name")
                )
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert failed.value.details() == "bad request: no name"
    assert journal[-1] == "log end INVALID_ARGUMENT"


class Uppercase(ServerInterceptor):
    """Replaces messages both ways: requests upper-cased, replies with a suffix."""

    def on_message_received(self, call: Stream[Any, Any], message: Any) -> Any:
        return BytesValue(value=message.value.upper())

    def on_message_sent(self, call: Stream[Any, Any], message: Any) -> Any:
        return BytesValue(value=message.value + b"!")


async def test_message_hooks_replace_messages_in_a_bidi_call_through_the_relay() -> None:
    journal: list[str] = []
    recorder = Recorder("count", journal)
    async with serving([recorder, Uppercase()]) as port, segmenting_relay("127.0.0.1", port) as relay_port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{relay_port}") as channel:
            bidi = grpcio_method(channel, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)
            replies = [reply.value async for reply in bidi(BytesValue(value=b"ab" * n) for n in range(1, 40))]
    assert replies == [b"AB" * n + b"!" for n in range(1, 40)]
    call = recorder.ended[0]
    assert call.status is Status.OK and call.cardinality is Cardinality.STREAM_STREAM
    assert (call.messages_received, call.messages_sent) == (39, 39)
    # Bytes are counted as encoded: after the hooks replaced the replies.
    assert call.bytes_sent == sum(len(BytesValue(value=b"AB" * n + b"!").SerializeToString()) for n in range(1, 40))


async def test_on_call_end_hears_cancellation_and_deadline() -> None:
    journal: list[str] = []
    recorder = Recorder("r", journal)
    service = EchoService()
    async with serving([recorder], service) as port, grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sleep = grpcio_method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)
        # A raw client, which never resets at its deadline: the server's own deadline ends the
        # call (grpcio's client would race it with RST_STREAM, making it CANCELLED at times).
        async with RawClient("127.0.0.1", port) as raw:
            stream_id = await raw.request("/test.Echo/Sleep", DoubleValue(value=5).SerializeToString(), timeout=b"200m")
            response = await raw.read_response(stream_id)
        assert response.grpc_status == Status.DEADLINE_EXCEEDED
        service.started.clear()
        call = sleep(DoubleValue(value=5))
        await service.started.wait()
        call.cancel()
        await asyncio.wait_for(service.cancelled.wait(), 5)
        for _ in range(100):
            if len(recorder.ended) == 2:
                break
            await asyncio.sleep(0.01)
    assert [c.status for c in recorder.ended] == [Status.DEADLINE_EXCEEDED, Status.CANCELLED]
    assert journal.count("r exit") == 2


class Broken(ServerInterceptor):
    def on_call_end(self, call: Stream[Any, Any]) -> None:
        raise RuntimeError("bug in a metrics exporter")


async def test_a_failing_on_call_end_is_logged_and_the_others_still_run(caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []
    async with serving([Recorder("outer", journal), Broken()]) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            assert (await unary(BytesValue(value=b"x"))).value == b"x"
    assert journal[-1] == "outer end OK"
    assert "failed in on_call_end of /test.Echo/Unary" in caplog.text


async def test_only_interceptors_are_accepted() -> None:
    with pytest.raises(TypeError, match="is not a ServerInterceptor"):
        Server([EchoService()], interceptors=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="is not a ClientInterceptor"):
        Channel("127.0.0.1", 1, interceptors=[Recorder("server-side", [])])  # type: ignore[list-item]


# -- client ----------------------------------------------------------------------------


class ClientRecorder(ClientInterceptor):
    def __init__(self, name: str, journal: list[str], *, token: str | None = None) -> None:
        self.name = name
        self.journal = journal
        self.token = token
        self.ended: list[ClientStream[Any, Any]] = []

    async def start(self, call: ClientStream[Any, Any]) -> None:
        self.journal.append(f"{self.name} start {call.service} {call.method_name}")
        if self.token is not None:
            call.add_metadata("x-grpc-test-echo-initial", self.token)

    def on_message_sent(self, call: ClientStream[Any, Any], message: Any) -> Any:
        self.journal.append(f"{self.name} sent")
        return message

    def on_message_received(self, call: ClientStream[Any, Any], message: Any) -> Any:
        self.journal.append(f"{self.name} received")
        return message

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        self.journal.append(f"{self.name} end {call.status.name if call.status is not None else None}")
        self.ended.append(call)


UNARY_CALL = "/grpc.testing.TestService/UnaryCall"


async def test_client_interceptors_against_grpcio_through_the_relay() -> None:
    journal: list[str] = []
    outer = ClientRecorder("a", journal, token="from-interceptor")
    inner = ClientRecorder("b", journal)
    async with grpcio_interop_server() as port, segmenting_relay("127.0.0.1", port) as relay_port:
        async with Channel("127.0.0.1", relay_port, interceptors=[outer, inner]) as channel:
            unary = method_for(channel, UNARY_CALL, Cardinality.UNARY_UNARY, SimpleRequest, SimpleResponse)
            request = SimpleRequest(response_size=10)
            reply, call = await unary.with_call(request)
    assert len(reply.payload.body) == 10
    # grpcio's interop server echoes x-grpc-test-echo-initial: the interceptor's metadata went out.
    assert call.initial_metadata is not None
    assert call.initial_metadata["x-grpc-test-echo-initial"] == "from-interceptor"
    assert journal == [
        "a start grpc.testing.TestService UnaryCall",
        "b start grpc.testing.TestService UnaryCall",
        "a sent",  # outward: outermost first
        "b sent",
        "b received",  # inward: innermost first
        "a received",
        "b end OK",
        "a end OK",
    ]
    assert (call.messages_sent, call.messages_received) == (1, 1)
    assert call.bytes_sent == len(request.SerializeToString()) and call.elapsed > 0


class NoCredentials(ClientInterceptor):
    async def start(self, call: ClientStream[Any, Any]) -> None:
        raise GRPCError(Status.UNAUTHENTICATED, "no credentials configured")


async def test_a_client_interceptor_fails_a_call_before_it_connects() -> None:
    journal: list[str] = []
    recorder = ClientRecorder("r", journal)
    # Nothing listens on the port: the call must fail without trying to connect.
    async with Channel("127.0.0.1", 9, interceptors=[recorder, NoCredentials()]) as channel:
        unary = method_for(channel, UNARY_CALL, Cardinality.UNARY_UNARY, SimpleRequest, SimpleResponse)
        with pytest.raises(GRPCError) as failed:
            await unary(SimpleRequest())
    assert failed.value.status is Status.UNAUTHENTICATED
    assert journal == ["r start grpc.testing.TestService UnaryCall", "r end UNAUTHENTICATED"]


async def test_client_on_call_end_sees_failures_and_streams() -> None:
    journal: list[str] = []
    recorder = ClientRecorder("r", journal)
    async with grpcio_interop_server() as port, Channel("127.0.0.1", port, interceptors=[recorder]) as channel:
        unknown = method_for(
            channel, "/grpc.testing.TestService/Nope", Cardinality.UNARY_UNARY, SimpleRequest, SimpleResponse
        )
        with pytest.raises(GRPCError):
            await unknown(SimpleRequest())
        from examples.interop.messages_pb2 import (
            ResponseParameters,
            StreamingOutputCallRequest,
            StreamingOutputCallResponse,
        )

        streaming = method_for(
            channel,
            "/grpc.testing.TestService/StreamingOutputCall",
            Cardinality.UNARY_STREAM,
            StreamingOutputCallRequest,
            StreamingOutputCallResponse,
        )
        request = StreamingOutputCallRequest(response_parameters=[ResponseParameters(size=5)] * 4)
        replies = await streaming(request)
        assert len(replies) == 4
    assert [(c.status, c.messages_received) for c in recorder.ended] == [(Status.UNIMPLEMENTED, 0), (Status.OK, 4)]


# -- the App ---------------------------------------------------------------------------


class Tokens:
    """A resource: the tokens an interceptor accepts."""

    def __init__(self, *valid: str) -> None:
        self.valid = set(valid)


class CheckToken(ServerInterceptor):
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        if call.metadata.get("x-token") not in self.tokens.valid:
            raise GRPCError(Status.PERMISSION_DENIED, "unknown token")
        await proceed()


def token_app() -> Any:
    app: App[AppSettings] = App(AppSettings, name="tokens")

    @app.resource
    async def tokens() -> AsyncIterator[Tokens]:
        yield Tokens("t1")

    @app.interceptor
    def check_token(tokens: Tokens) -> CheckToken:
        return CheckToken(tokens)

    @app.service
    def interop() -> TestService:
        return TestService()

    return app


async def test_app_interceptors_get_resources_injected_and_run_with_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="app_kit.access")
    settings = AppSettings(host="127.0.0.1", port=0, access_log=True)
    async with token_app().serve(settings) as running:
        async with Channel("127.0.0.1", running.server.sockets[0].getsockname()[1]) as channel:
            unary = method_for(channel, UNARY_CALL, Cardinality.UNARY_UNARY, SimpleRequest, SimpleResponse)
            with pytest.raises(GRPCError) as denied:
                await unary(SimpleRequest())
            assert denied.value.status is Status.PERMISSION_DENIED
            await unary(SimpleRequest(response_size=1), metadata={"x-token": "t1"})
    lines = [r.getMessage() for r in caplog.records if r.name == "app_kit.access"]
    # The access log is outermost: it logs the call the App's interceptor refused too.
    assert len(lines) == 2
    assert '"/grpc.testing.TestService/UnaryCall" PERMISSION_DENIED ' in lines[0]
    assert '"/grpc.testing.TestService/UnaryCall" OK ' in lines[1] and "in=1/" in lines[1]


async def test_an_app_interceptor_that_is_not_one_fails_start_up() -> None:
    app: App[AppSettings] = App(AppSettings)

    @app.interceptor  # type: ignore[type-var]
    def wrong() -> object:
        return object()

    with pytest.raises(StartupError, match="interceptor wrong returned object, not a ServerInterceptor"):
        async with app.serve(AppSettings(host="127.0.0.1", port=0)):
            pass
