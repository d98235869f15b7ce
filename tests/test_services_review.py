"""Adversarial review of the standard services and the observability interceptors.

Each test below failed when written: it shows a defect, named in its comment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue
from prometheus_client import CollectorRegistry

from app_kit import Server, ServerInterceptor, Status, Stream
from app_kit.observe.access_log import AccessLog
from app_kit.observe.prometheus import ServerMetrics
from app_kit.protos.grpc.reflection.v1 import reflection_pb2 as v1
from app_kit.services.reflection import Reflection
from examples.cafe.service import CoffeeMachine

from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, RawPeer, frame, request_block
from .services import EchoService

pytestmark = pytest.mark.anyio


class Ends(ServerInterceptor):
    """Records each call's status at on_call_end."""

    def __init__(self) -> None:
        self.statuses: list[Status | None] = []

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.statuses.append(call.status)


@contextlib.asynccontextmanager
async def serving(services: list[Any], interceptors: list[ServerInterceptor]) -> AsyncIterator[int]:
    server = Server(services, interceptors=interceptors)
    await server.start("127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=1.0)
        await server.wait_closed()


async def until(predicate: Any, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def framed(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


# -- interceptors: every call the client saw answered reaches them -------------------------


async def test_calls_the_core_ends_before_their_handler_ran_reach_the_interceptors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Defect: a call the sans-IO core ends (INTERNAL) in the same read as its request headers
    # -- two requests to a unary method, a stream that ends inside a message -- is answered,
    # but its task is cancelled before it first ran, so no interceptor hears of it: no access
    # log line, no grpc_server_handled_total{grpc_code="Internal"}, no span; the same client
    # bytes sent in two writes (handler already waiting) are heard. The docs exempt only calls
    # to a method the server does not serve.
    caplog.set_level(logging.INFO, logger="app_kit.access")
    ends = Ends()
    registry = CollectorRegistry()
    message = framed(BytesValue(value=b"x").SerializeToString())
    async with serving([EchoService()], [ServerMetrics(registry), AccessLog(), ends]) as port, RawPeer(port) as peer:
        block = request_block(path="/test.Echo/Unary")
        await peer.send(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, block)
            + frame(DATA, END_STREAM, 1, message + message)  # two requests to a unary method
            + frame(HEADERS, END_HEADERS, 3, block)
            + frame(DATA, END_STREAM, 3, message[:-1])  # ends in the middle of its message
        )
        await until(lambda: {1, 3} <= set(peer.trailer_statuses()))
        internal = str(int(Status.INTERNAL)).encode()
        assert peer.trailer_statuses() == {1: internal, 3: internal}  # what the client saw
        await asyncio.sleep(0.1)
    assert ends.statuses == [Status.INTERNAL, Status.INTERNAL]
    assert [r.grpc_status for r in caplog.records if r.name == "app_kit.access"] == ["INTERNAL", "INTERNAL"]  # type: ignore[attr-defined]
    labels = {"grpc_type": "unary", "grpc_service": "test.Echo", "grpc_method": "Unary", "grpc_code": "Internal"}
    assert registry.get_sample_value("grpc_server_handled_total", labels) == 2


# -- reflection ----------------------------------------------------------------------------


async def test_reflection_not_found_names_the_symbol_asked_for() -> None:
    # Defect: for a symbol that is not found, the method fallback (DescriptorIndex.
    # file_containing_symbol) looks its "service" part up and lets that NOT_FOUND out, so the
    # error message names a different symbol than the one asked for: "cafe.BrewStatus.Stage.DONE"
    # -> "not found: 'cafe.BrewStatus.Stage'", ".cafe.LatteOrder" -> "not found: '.cafe'".
    services = [CoffeeMachine()]
    async with serving([*services, *Reflection.for_services(services)], []) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                v1.ServerReflectionRequest.SerializeToString,
                v1.ServerReflectionResponse.FromString,
            )
            symbols = ["cafe.BrewStatus.Stage.DONE", ".cafe.LatteOrder", "cafe.CoffeeMachine.Nope"]
            requests = [v1.ServerReflectionRequest(file_containing_symbol=symbol) for symbol in symbols]
            responses = [response async for response in info(iter(requests))]
    assert [r.error_response.error_code for r in responses] == [grpc.StatusCode.NOT_FOUND.value[0]] * 3
    assert [r.error_response.error_message for r in responses] == [f"not found: {s!a}" for s in symbols]
