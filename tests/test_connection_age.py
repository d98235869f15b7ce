"""``max_connection_age`` / ``max_connection_age_grace`` (grpc-core's ``grpc.max_connection_age_ms``,
grpc-go's ``MaxConnectionAge``): a server closes each connection gracefully once it is that old,
so that long-lived HTTP/2 clients connect again and spread over the backends added since.

Real sockets: grpcio clients through the re-segmenting relay, our Channel on both loops, and raw
connections for the timing of each GOAWAY."""

from __future__ import annotations

import asyncio
import contextlib
import time

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Status
from app_kit.aio.client import method_for
from app_kit.app.settings import AppSettings, SettingsError, load_settings

from .conftest import running_server
from .frames import HANDSHAKE, RawPeer
from .relay import SegmentingRelay
from .services import EchoService, Sleeper, grpcio_method

pytestmark = pytest.mark.anyio


def aged(age: float, grace: float | None = None) -> Configuration:
    return Configuration(max_connection_age=age, max_connection_age_grace=grace)


@pytest.mark.parametrize("client", ["grpcio", "app_kit"])
async def test_calls_move_to_new_connections_and_none_fails_through_the_relay(client: str) -> None:
    # Calls back to back for ~1.5 s on one channel, with connections aged 0.3 s: the client is
    # moved to new connections (the relay counts them) and every call succeeds. grpcio with its
    # default options: a call it had given a connection but not yet sent when the GOAWAY came
    # is failed by grpc-core unless it may retry it (transparently: it never left).
    async with running_server([EchoService()], config=aged(0.3)) as (server, _):
        async with SegmentingRelay("127.0.0.1", server.sockets[0].getsockname()[1]) as relay:
            target = f"127.0.0.1:{relay.port}"
            async with contextlib.AsyncExitStack() as stack:
                if client == "grpcio":
                    channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
                    unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
                    stream = grpcio_method(channel, "unary_stream", "/test.Echo/ServerStream", Int64Value, Int64Value)
                else:
                    ours = await stack.enter_async_context(Channel(target))
                    unary = method_for(ours, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
                    stream = method_for(
                        ours, "/test.Echo/ServerStream", Cardinality.UNARY_STREAM, Int64Value, Int64Value
                    )
                failures: list[BaseException] = []
                calls = 0
                ended = time.monotonic() + 1.5

                async def caller(index: int) -> None:
                    nonlocal calls
                    while time.monotonic() < ended:
                        try:
                            if index % 2:
                                assert (await unary(BytesValue(value=b"x" * 3000), timeout=5)).value == b"x" * 3000
                            else:
                                replies = [m.value async for m in stream(Int64Value(value=50), timeout=5)]
                                assert replies == list(range(50))
                        except Exception as exc:  # every failure counts
                            failures.append(exc)
                        calls += 1

                await asyncio.gather(*(caller(index) for index in range(8)))
            assert not failures, (len(failures), calls, failures[0], relay.describe())
            assert calls > 100
            assert relay.connections >= 3, relay.describe()
            assert not relay.error_goaways, relay.describe()


@pytest.mark.backends
async def test_a_call_longer_than_the_age_finishes_without_a_grace_period(backend: str) -> None:
    # No grace: the old connection waits for its calls, however long they take (grpc's default),
    # while new calls go to a new connection.
    async with running_server([Sleeper()], config=aged(0.2)) as (_, target):
        async with Channel(target) as channel:
            sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            slept: list[float] = []

            async def long_call() -> None:
                slept.append((await sleep(DoubleValue(value=1.0), timeout=5)).value)

            with anyio.fail_after(10):
                async with anyio.create_task_group() as group:
                    group.start_soon(long_call)
                    await anyio.sleep(0.1)
                    old = channel._subchannels[0].protocol
                    await anyio.sleep(0.5)  # aged meanwhile: a new call takes a new connection
                    assert (await unary(BytesValue(value=b"new"), timeout=5)).value == b"new"
                    assert channel._subchannels[0].protocol is not old
                    assert old is not None and not old.is_closed  # still serving the long call
            assert slept == [1.0]


@pytest.mark.backends
async def test_the_grace_period_ends_the_calls_still_running_with_unavailable(backend: str) -> None:
    async with running_server([Sleeper()], config=aged(0.2, grace=0.3)) as (_, target):
        async with Channel(target) as channel:
            sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            started = time.monotonic()
            with pytest.raises(GRPCError) as caught:
                await sleep(DoubleValue(value=10), timeout=15)
            assert caught.value.status is Status.UNAVAILABLE
            assert 0.4 < time.monotonic() - started < 2.5
            assert (await unary(BytesValue(value=b"next"), timeout=5)).value == b"next"


async def test_each_connection_gets_its_goaway_at_its_own_age_varied_by_ten_percent() -> None:
    # Twelve connections opened together: their GOAWAYs come from 0.9 to 1.1 ages later, not
    # all at once (a fleet of clients that connected together would otherwise reconnect together).
    async with running_server([EchoService()], config=aged(1.0)) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with contextlib.AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(RawPeer(port)) for _ in range(12)]
            started = time.monotonic()
            for peer in peers:
                await peer.send(HANDSHAKE)

            async def first_goaway(peer: RawPeer) -> float:
                while not peer.goaways:
                    await asyncio.sleep(0.005)
                return time.monotonic() - started

            times = await asyncio.wait_for(asyncio.gather(*(first_goaway(peer) for peer in peers)), 5)
        assert all(0.85 < at < 1.25 for at in times), times
        assert max(times) - min(times) > 0.03, times


def test_the_settings_are_checked() -> None:
    assert Configuration().max_connection_age is None and Configuration().max_connection_age_grace is None
    for bad in ({"max_connection_age": 0}, {"max_connection_age": -1}, {"max_connection_age_grace": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Configuration(**bad)  # type: ignore[arg-type]


def test_the_app_settings_reach_the_server_and_are_checked() -> None:
    settings = load_settings(AppSettings, max_connection_age=1800, max_connection_age_grace=300)
    config = settings.server_config()
    assert (config.max_connection_age, config.max_connection_age_grace) == (1800, 300)
    assert load_settings(AppSettings).server_config().max_connection_age is None
    for bad in ({"max_connection_age": 0}, {"max_connection_age": "inf"}, {"max_connection_age_grace": -1}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            load_settings(AppSettings, **bad)
