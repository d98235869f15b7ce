"""What a newcomer's first half hour with app_kit found (a fresh-eyes trial of the product),
each over real sockets: what the server records for a call whose deadline passed, ...
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit import Cardinality, Channel, GRPCError, Handler, ServerInterceptor, Status, Stream
from app_kit.aio.client import method_for

from .conftest import running_server
from .services import grpcio_method

pytestmark = pytest.mark.anyio


class Ends(ServerInterceptor):
    """Records the status each call ended with, as access logs and metrics see it."""

    def __init__(self) -> None:
        self.statuses: list[Status | None] = []

    def on_call_end(self, call: Stream[object, object]) -> None:
        self.statuses.append(call.status)


class Busy:
    """A handler that keeps the event loop busy past its call's deadline, then waits."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Busy/Work": Handler(self.work, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)}

    async def work(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        time.sleep(request.value)  # the deadline passes, the client's reset arrives meanwhile
        await asyncio.sleep(5)


async def _until(condition: object, count: int) -> None:
    for _ in range(200):
        if len(condition) >= count:  # type: ignore[arg-type]
            return
        await asyncio.sleep(0.01)


async def test_a_call_past_its_deadline_is_recorded_as_deadline_exceeded_whoever_ends_it() -> None:
    # The client resets a call at its deadline; its RST_STREAM often reached the server just
    # before the server's own timer fired (under uvloop, whose timers tick in milliseconds,
    # in 4 of 5 calls from app_kit's Channel): the call was recorded CANCELLED (access log,
    # metrics, on_call_end) while its caller got DEADLINE_EXCEEDED. Here the handler keeps
    # the loop busy past the deadline, so the reset is read before the timer runs.
    ends = Ends()
    async with running_server([Busy()], interceptors=[ends]) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port)) as channel:
            work = method_for(channel, "/test.Busy/Work", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
            for _ in range(2):
                with pytest.raises(GRPCError) as raised:
                    await work(DoubleValue(value=0.3), timeout=0.1)
                assert raised.value.status is Status.DEADLINE_EXCEEDED
        async with grpc.aio.insecure_channel(target) as grpcio_channel:
            grpcio_work = grpcio_method(grpcio_channel, "unary_unary", "/test.Busy/Work", DoubleValue, DoubleValue)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await grpcio_work(DoubleValue(value=0.3), timeout=0.1)
                assert failed.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(ends.statuses, 4)
    assert ends.statuses == [Status.DEADLINE_EXCEEDED] * 4


async def test_closing_again_with_a_shorter_grace_cuts_the_grace_period_short() -> None:
    # What a forced exit does (a second SIGTERM): the calls still running are answered
    # UNAVAILABLE at once rather than at the end of the first close's grace period, and
    # wait_calls_done() returns once their handlers have unwound.
    from app_kit import Server

    from .services import EchoService

    service = EchoService()
    server = Server([service])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            sleep = grpcio_method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)
            call = sleep(DoubleValue(value=30))
            await asyncio.wait_for(service.started.wait(), 5)
            server.close(grace=30)
            await asyncio.sleep(0.1)
            assert not service.cancelled.is_set()
            server.close(grace=60)  # a later end changes nothing
            began = time.monotonic()
            server.close(grace=0.2)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await call
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            await asyncio.wait_for(server.wait_calls_done(), 2)
            assert service.cancelled.is_set()
            assert 0.15 < time.monotonic() - began < 2
    finally:
        server.close(grace=0)
        await asyncio.wait_for(server.wait_closed(), 5)


async def test_a_client_interceptor_reads_the_method_as_a_server_interceptor_does() -> None:
    # The server's call has .method; the client's had only .path (AttributeError).
    from app_kit import ClientInterceptor

    from .services import EchoService

    seen: list[str] = []

    class Methods(ClientInterceptor):
        async def start(self, call: object) -> None:
            seen.append(call.method)  # type: ignore[attr-defined]

    async with running_server([EchoService()]) as (_, target):
        host, port = target.rsplit(":", 1)
        async with Channel(host, int(port), interceptors=[Methods()]) as channel:
            sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
            assert (await sleep(DoubleValue(value=0))).value == 0
    assert seen == ["/test.Echo/Sleep"]
