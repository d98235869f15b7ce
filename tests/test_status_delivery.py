"""A call's end, as the interceptors hear it (access log, metrics, spans), is the end its client
saw: a status queued behind the client's shut flow-control window has not been given yet.

Before, a handler's return queued the status and ``on_call_end`` reported it at once, so a
client that then reset the call (or a grace period that ran out, or a lost connection) left
the call recorded OK although the client never got that status. Each test holds a call's
status behind a shut window with hand-built frames over a real socket, then ends the call one
way, and checks what ``on_call_end`` heard against what went on the wire.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import anyio
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from app_kit import Cardinality, Handler, ServerInterceptor, Status, Stream

from .conftest import running_server
from .frames import (
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawPeer,
    frame,
    whole_request,
)

pytestmark = pytest.mark.anyio

_SHUT = struct.pack(">HI", 0x4, 0)  # SETTINGS_INITIAL_WINDOW_SIZE 0: every stream's window shut


def _request(path: str, value: int) -> bytes:
    return whole_request(path, Int64Value(value=value).SerializeToString())


class Replies:
    def __init__(self) -> None:
        self.returned = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/r.R/Stream": Handler(self.stream, Cardinality.UNARY_STREAM, Int64Value, BytesValue),
            "/r.R/Unary": Handler(self.unary, Cardinality.UNARY_UNARY, Int64Value, BytesValue),
        }

    async def stream(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for _ in range(request.value):
            await stream.send_message(BytesValue(value=b"r" * 100))
        self.returned.set()

    async def unary(self, stream: Stream[Int64Value, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(BytesValue(value=b"u" * request.value))
        self.returned.set()


class Ends(ServerInterceptor):
    def __init__(self) -> None:
        self.ended: list[Status | None] = []

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.ended.append(call.status)


async def _until(condition: Any, timeout: float = 3.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.005)


@pytest.mark.parametrize("path", ["/r.R/Stream", "/r.R/Unary"])
async def test_a_call_reset_while_its_status_waits_for_window_ends_cancelled(path: str) -> None:
    service, ends = Replies(), Ends()
    async with running_server([service], interceptors=[ends]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request(path, 3))
            await asyncio.wait_for(service.returned.wait(), 3)
            await asyncio.sleep(0.05)
            assert ends.ended == []  # its status has not gone: the call is not over yet
            await peer.send(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))  # CANCEL
            await _until(lambda: ends.ended)
            assert ends.ended == [Status.CANCELLED]
            assert peer.trailer_statuses() == {}  # indeed the client never got a status


async def test_a_status_that_goes_once_the_window_opens_ends_the_call_ok() -> None:
    service, ends = Replies(), Ends()
    async with running_server([service], interceptors=[ends]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Stream", 3))
            await asyncio.wait_for(service.returned.wait(), 3)
            await asyncio.sleep(0.05)
            assert ends.ended == []
            await peer.send(frame(WINDOW_UPDATE, 0, 1, (1 << 20).to_bytes(4, "big")))
            await _until(lambda: ends.ended)
            assert ends.ended == [Status.OK]
            await _until(lambda: peer.trailer_statuses())
            assert peer.trailer_statuses() == {1: b"0"}


async def test_a_status_still_waiting_for_window_when_the_grace_period_ends_ends_unavailable() -> None:
    service, ends = Replies(), Ends()
    async with running_server([service], interceptors=[ends]) as (server, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Stream", 3))
            await asyncio.wait_for(service.returned.wait(), 3)
            server.close(grace=0.2)
            with anyio.fail_after(3):
                await server.wait_closed()
            assert ends.ended == [Status.UNAVAILABLE]
            assert peer.trailer_statuses() in ({}, {1: b"14"})  # reset, or told UNAVAILABLE


async def test_a_status_waiting_for_window_when_the_connection_is_lost_ends_the_call_cancelled() -> None:
    service, ends = Replies(), Ends()
    async with running_server([service], interceptors=[ends]) as (_, target):
        async with RawPeer(int(target.rsplit(":", 1)[1])) as peer:
            await peer.send(PREFACE + frame(SETTINGS, 0, 0, _SHUT) + _request("/r.R/Stream", 3))
            await asyncio.wait_for(service.returned.wait(), 3)
            peer.writer.transport.abort()
            await _until(lambda: ends.ended)
            assert ends.ended == [Status.CANCELLED]
