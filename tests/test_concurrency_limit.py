"""``max_concurrent_calls`` (grpcio's ``maximum_concurrent_rpcs``, uvicorn's ``--limit-concurrency``):
past that many calls running across every connection of a server, a new call is answered
RESOURCE_EXHAUSTED at once instead of queueing up work the server cannot do in time."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import anyio
import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue

from app_kit import Cardinality, Channel, Configuration, GRPCError, ServerInterceptor, Status
from app_kit.aio.client import method_for
from app_kit.app.settings import AppSettings, SettingsError, load_settings

from .conftest import running_server
from .frames import HANDSHAKE, RST_STREAM, SETTINGS, WINDOW_UPDATE, RawPeer, frame, whole_request
from .services import Sleeper, grpcio_method

pytestmark = pytest.mark.anyio

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


async def test_calls_over_the_limit_across_connections_are_refused_at_once_and_the_rest_served() -> None:
    async with running_server([Sleeper()], config=Configuration(max_concurrent_calls=3)) as (_, target):
        channels = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(2)]
        try:
            sleeps = [grpcio_method(c, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue) for c in channels]
            running = [
                asyncio.ensure_future(sleeps[index % 2](DoubleValue(value=1.0), timeout=5)) for index in range(3)
            ]
            await asyncio.sleep(0.3)  # the three are running, on two connections
            for sleep in sleeps:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await sleep(DoubleValue(value=0), timeout=5)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_concurrent_calls" in (caught.value.details() or "")
                assert time.monotonic() - started < 0.5
            assert [reply.value for reply in await asyncio.gather(*running)] == [1.0, 1.0, 1.0]
            # Below the limit again: served.
            assert (await sleeps[0](DoubleValue(value=0.01), timeout=5)).value == 0.01
        finally:
            for channel in channels:
                await channel.close()


class Ends(ServerInterceptor):
    def __init__(self) -> None:
        self.statuses: list[Status] = []

    def on_call_end(self, call: Any) -> None:
        self.statuses.append(call.status)


@pytest.mark.backends
async def test_the_interceptors_see_the_refused_calls(backend: str) -> None:
    # Metrics and the access log count what was shed, not only what ran.
    ends = Ends()
    config = Configuration(max_concurrent_calls=1)
    async with running_server([Sleeper()], config=config, interceptors=[ends]) as (_, target):
        async with Channel(target) as channel:
            sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    group.start_soon(lambda: sleep(DoubleValue(value=0.5), timeout=5))
                    await anyio.sleep(0.2)
                    with pytest.raises(GRPCError) as caught:
                        await unary(BytesValue(value=b"x"), timeout=5)
                    assert caught.value.status is Status.RESOURCE_EXHAUSTED
            assert (await unary(BytesValue(value=b"y"), timeout=5)).value == b"y"
    assert sorted(status.name for status in ends.statuses) == ["OK", "OK", "RESOURCE_EXHAUSTED"]


def test_the_settings() -> None:
    assert Configuration().max_concurrent_calls is None
    with pytest.raises(ValueError, match="max_concurrent_calls"):
        Configuration(max_concurrent_calls=0)
    assert load_settings(AppSettings, max_concurrent_calls=50).server_config().max_concurrent_calls == 50
    assert load_settings(AppSettings).server_config().max_concurrent_calls is None
    with pytest.raises(SettingsError, match="max_concurrent_calls"):
        load_settings(AppSettings, max_concurrent_calls=0)


@pytest.mark.parametrize("intercepted", [False, True])
async def test_a_shed_call_reset_in_the_same_read_leaves_the_connection_serving(
    intercepted: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # At the limit, a request and its RST_STREAM in one write: the shed answer races the reset;
    # nothing is raised or logged, and the next calls on the same connection are answered.
    encoder = hpack.Encoder()
    sleep_body = DoubleValue(value=0.6).SerializeToString()
    ends = [Ends()] if intercepted else []
    config = Configuration(max_concurrent_calls=1)
    async with running_server([Sleeper()], config=config, interceptors=ends) as (server, _):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            await peer.send(HANDSHAKE + whole_request("/test.Echo/Sleep", sleep_body, 1, encoder))
            await asyncio.sleep(0.1)
            raced = whole_request("/test.Echo/Unary", b"", 3, encoder) + frame(RST_STREAM, 0, 3, b"\x00\x00\x00\x08")
            await peer.send(raced + whole_request("/test.Echo/Unary", b"", 5, encoder))
            deadline = time.monotonic() + 3
            while not {1, 5} <= set(peer.trailer_statuses()) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            statuses = peer.trailer_statuses()
            assert statuses.get(5) == b"8" and statuses.get(1) == b"0", (statuses, peer.frames)
            await peer.send(whole_request("/test.Echo/Unary", b"", 7, encoder))
            while 7 not in peer.trailer_statuses() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert peer.trailer_statuses().get(7) == b"0"
            assert not peer.goaways
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text


async def test_a_call_whose_status_waits_for_window_still_counts_until_it_is_answered() -> None:
    # grpc-core counts a call until its status goes out: a handler that returned with its reply
    # and status still queued (the client's window shut) holds what a running call holds.
    encoder = hpack.Encoder()
    config = Configuration(max_concurrent_calls=1)
    shut_window = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
    async with running_server([Sleeper()], config=config) as (server, target):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer, Channel(target) as channel:
            reply = BytesValue(value=b"x" * 100).SerializeToString()
            await peer.send(HANDSHAKE + shut_window + whole_request("/test.Echo/Unary", reply, 1, encoder))
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            await asyncio.sleep(0.2)  # its handler has returned; its reply and status wait for window
            assert not peer.trailer_statuses()
            with pytest.raises(GRPCError) as caught:
                await unary(BytesValue(value=b"y"), timeout=5)
            assert caught.value.status is Status.RESOURCE_EXHAUSTED
            await peer.send(frame(WINDOW_UPDATE, 0, 1, (1 << 16).to_bytes(4, "big")))
            deadline = time.monotonic() + 3
            while 1 not in peer.trailer_statuses() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert peer.trailer_statuses().get(1) == b"0"
            assert (await unary(BytesValue(value=b"z"), timeout=5)).value == b"z"


async def test_a_counted_call_whose_status_never_goes_ends_with_the_grace_period() -> None:
    config = Configuration(max_concurrent_calls=1)
    shut_window = frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (0).to_bytes(4, "big"))
    async with running_server([Sleeper()], config=config) as (server, _):
        async with RawPeer(server.sockets[0].getsockname()[1]) as peer:
            reply = BytesValue(value=b"x" * 100).SerializeToString()
            await peer.send(HANDSHAKE + shut_window + whole_request("/test.Echo/Unary", reply, 1))
            await asyncio.sleep(0.2)
            started = time.monotonic()
            server.close(grace=0.3)
            await asyncio.wait_for(server.wait_closed(), 3)
            await asyncio.wait_for(server.wait_calls_done(), 1)
            assert time.monotonic() - started < 1.5
            await peer.wait_closed(1)
            # Its queued reply dropped, it got UNAVAILABLE (trailers need no window).
            assert peer.goaways and peer.trailer_statuses() == {1: b"14"}, peer.frames
