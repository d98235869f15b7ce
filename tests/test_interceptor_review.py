"""Review of the interceptors, access log and logging rules (issue 15), over real sockets.

Each test states a guarantee the feature documents: that every finished call reaches
``on_call_end`` once, with the status its caller saw; that hooks never run on a call that
already ended; that a ``--log-config`` file keeps app_kit's own log lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import (
    Cardinality,
    Channel,
    ClientInterceptor,
    ClientStream,
    GRPCError,
    Handler,
    ProtocolError,
    Server,
    ServerInterceptor,
    Status,
    Stream,
)
from app_kit.aio.client import method_for
from app_kit.app.logs import JSONFormatter
from app_kit.wire.config import Configuration

from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, RawPeer, frame, request_block
from .process import AppProcess
from .services import EchoService

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(interceptors: list[ServerInterceptor], service: Any = None) -> AsyncIterator[tuple[Server, int]]:
    server = Server([service or EchoService()], interceptors=interceptors)
    await server.start("127.0.0.1", 0)
    try:
        yield server, server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=1.0)
        await server.wait_closed()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(predicate: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


class Ends(ServerInterceptor):
    """Records each call's status at on_call_end."""

    def __init__(self) -> None:
        self.statuses: list[Status | None] = []

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.statuses.append(call.status)


class ClientEnds(ClientInterceptor):
    """Records each call's (attempt's) status at on_call_end."""

    def __init__(self) -> None:
        self.statuses: list[Status | None] = []

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        self.statuses.append(call.status)


# -- client: the status on_call_end hears is the one the caller got ------------------------


async def test_client_on_call_end_hears_unavailable_when_no_backend_is_reachable() -> None:
    # ClientMetrics documents "calls that fail to connect are counted, with their status
    # (UNAVAILABLE, ...)": the caller gets UNAVAILABLE, so must the interceptors.
    ends = ClientEnds()
    async with Channel("127.0.0.1", closed_port(), interceptors=[ends]) as channel:
        unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        with pytest.raises(GRPCError) as failed:
            await unary(BytesValue(value=b"x"))
    assert failed.value.status is Status.UNAVAILABLE
    assert ends.statuses == [Status.UNAVAILABLE]


async def test_client_on_call_end_hears_resource_exhausted_for_a_request_over_the_limit() -> None:
    ends = ClientEnds()
    async with serving([]) as (_, port):
        config = Configuration(max_send_message_length=16)
        async with Channel("127.0.0.1", port, config=config, interceptors=[ends]) as channel:
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            with pytest.raises(GRPCError) as failed:
                await unary(BytesValue(value=b"x" * 100))
    assert failed.value.status is Status.RESOURCE_EXHAUSTED
    assert ends.statuses == [Status.RESOURCE_EXHAUSTED]


class Trickle:
    """A server stream that sends one reply, then waits: the call runs until its client leaves."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Trickle/Replies": Handler(self.replies, Cardinality.UNARY_STREAM, Int64Value, Int64Value)}

    async def replies(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=0))
        await asyncio.sleep(30)


async def test_client_on_call_end_once_with_cancelled_when_a_reply_stream_is_left_early() -> None:
    # Pins: leaving ``async for`` early ends the running call (CANCELLED); its interceptors
    # hear it once, and so do the server's.
    ends, server_ends = ClientEnds(), Ends()
    async with serving([server_ends], Trickle()) as (_, port):
        async with Channel("127.0.0.1", port, interceptors=[ends]) as channel:
            stream = method_for(channel, "/test.Trickle/Replies", Cardinality.UNARY_STREAM, Int64Value, Int64Value)
            async for reply in stream(Int64Value(value=1)):
                assert reply.value == 0
                break
            await until(lambda: ends.statuses and server_ends.statuses)
            await asyncio.sleep(0.05)
    assert ends.statuses == [Status.CANCELLED]
    assert server_ends.statuses == [Status.CANCELLED]


# -- server: every answered call reaches on_call_end ---------------------------------------


async def test_a_call_whose_deadline_expired_on_arrival_reaches_on_call_end() -> None:
    # The call is answered DEADLINE_EXCEEDED, yet no interceptor hears of it: the access log
    # and grpc_server_handled_total miss it while the client saw it fail.
    ends = Ends()
    async with serving([ends]) as (_, port), RawPeer(port) as peer:
        block = request_block(path="/test.Echo/Unary", extra=[("grpc-timeout", "1n")])
        message = BytesValue(value=b"x").SerializeToString()
        body = b"\0" + len(message).to_bytes(4, "big") + message
        await peer.send(HANDSHAKE + frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, body))
        await until(lambda: 1 in peer.trailer_statuses())
        assert peer.trailer_statuses()[1] == str(int(Status.DEADLINE_EXCEEDED)).encode()
        await asyncio.sleep(0.05)
    assert ends.statuses == [Status.DEADLINE_EXCEEDED]


async def test_on_call_end_hears_unavailable_when_the_servers_grace_expires() -> None:
    # Pins: a call still running when close()'s grace runs out is answered UNAVAILABLE, and
    # its interceptors hear that status (not CANCELLED), once.
    ends = Ends()
    service = EchoService()
    server = Server([service], interceptors=[ends])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        sleep = channel.unary_unary(
            "/test.Echo/Sleep",
            request_serializer=DoubleValue.SerializeToString,
            response_deserializer=DoubleValue.FromString,
        )
        call = sleep(DoubleValue(value=30))
        await service.started.wait()
        server.close(grace=0.1)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        await server.wait_closed()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ends.statuses == [Status.UNAVAILABLE]


# -- server: no hook runs on a call that has ended -------------------------------------------


class PerCall(ServerInterceptor):
    """State per call in a dict, removed in on_call_end: the pattern ServerInterceptor documents."""

    def __init__(self) -> None:
        self.sent: dict[Stream[Any, Any], int] = {}
        self.late_hooks = 0

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        self.sent[call] = 0
        await proceed()

    def on_message_sent(self, call: Stream[Any, Any], message: Any) -> Any:
        if call not in self.sent:
            self.late_hooks += 1  # after on_call_end: the documented dict has no entry any more
            raise KeyError(call)
        self.sent[call] += 1
        return message

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        del self.sent[call]


class LeakyService:
    """A unary handler that replies, then hands its stream to a task that sends once more
    after the call ended (a handler's mistake, which must fail as misuse of the stream)."""

    def __init__(self) -> None:
        self.late: asyncio.Future[BaseException | None] | None = None

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Late/Send": Handler(self.send, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def send(self, stream: Stream[BytesValue, BytesValue]) -> None:
        await stream.recv_message()
        await stream.send_message(BytesValue(value=b"reply"))
        self.late = asyncio.ensure_future(self._later(stream))

    async def _later(self, stream: Stream[BytesValue, BytesValue]) -> BaseException | None:
        await asyncio.sleep(0.1)  # the call has ended and on_call_end has run by now
        try:
            await stream.send_message(BytesValue(value=b"too late"))
        except BaseException as exc:  # what a late send raises
            return exc
        return None


async def test_no_message_hook_runs_after_on_call_end() -> None:
    per_call, service = PerCall(), LeakyService()
    async with serving([per_call], service) as (_, port), grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(
            "/test.Late/Send",
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        assert (await unary(BytesValue(value=b"x"))).value == b"reply"
        await until(lambda: service.late is not None)
        assert service.late is not None
        raised = await service.late
    assert per_call.sent == {}
    assert isinstance(raised, ProtocolError | GRPCError), raised  # misuse, not the hook's KeyError
    assert per_call.late_hooks == 0


# -- logging ------------------------------------------------------------------------------------


async def test_a_log_config_with_only_a_root_handler_keeps_app_kits_lines(tmp_path: Path) -> None:
    # The most common dictConfig file configures the root logger only. app_kit's loggers exist
    # before the CLI applies it, so dictConfig's default disable_existing_loggers=True would
    # silence every app_kit line ("serving", handler errors) that the file never names.
    config = {
        "version": 1,
        "formatters": {"f": {"format": "ROOT %(name)s %(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["h"], "level": "INFO"},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    async with AppProcess("tests.apps.logging_app:app", "--port", "0", "--log-config", str(path)) as app:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(app._ready.wait(), 8)
        served = app.port is not None
        app.signal(signal.SIGTERM)
        await app.wait()
    assert served, "no 'serving' line: app_kit's loggers were disabled by the file\n" + app.log
    assert any(line.startswith("ROOT app_kit.app logging serving") for line in app.lines), app.log


async def test_the_json_formatter_writes_a_record_whose_extra_has_a_non_string_key() -> None:
    # A record the JSON formatter cannot write is lost (logging's handleError prints a
    # traceback instead): extra fields are the user's, of any type.
    record = logging.LogRecord("app", logging.INFO, __file__, 1, "counts", None, None)
    record.by_pair = {("a", 1): 2}
    line = JSONFormatter().format(record)
    assert json.loads(line)["message"] == "counts"


async def test_the_json_formatter_keeps_a_records_stack_info() -> None:
    # ``log.info(..., stack_info=True)`` asks for the stack; the text formatter prints it, the
    # JSON one drops it (stack_info is taken for a standard attribute and skipped).
    record = logging.LogRecord(
        "app", logging.INFO, __file__, 1, "where", None, None, sinfo="Stack (most recent call last):\n  here"
    )
    entry = json.loads(JSONFormatter().format(record))
    assert "Stack (most recent call last)" in json.dumps(entry)
