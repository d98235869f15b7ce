"""A fresh-eyes review of this session's HTTP/2 / gRPC hot-path shortcuts (h2_internals'
remembered header lists, split stream transitions, _new_stream, _sweep; the client's call
placed at once, END_STREAM on a request's last DATA frame, the shared empty metadata).

Each test names the behaviour from before the shortcuts that must still hold; those that
fail show a defect (see the review report).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from google.protobuf.wrappers_pb2 import Int64Value

from app_kit import Cardinality, Channel, Configuration, Handler, Stream
from app_kit.aio.client import method_for

from .conftest import running_server

pytestmark = pytest.mark.anyio


class _Backend:
    """``/t.R/Hold``: counts the calls it serves; a request of 1 is held until ``release``."""

    def __init__(self) -> None:
        self.served = 0
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.R/Hold": Handler(self.hold, Cardinality.UNARY_UNARY, Int64Value, Int64Value)}

    async def hold(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.served += 1
        self.arrived.set()
        if request.value:
            await self.release.wait()
        await stream.send_message(Int64Value(value=request.value))


@contextlib.asynccontextmanager
async def _backends(count: int, streams: int) -> AsyncIterator[tuple[list[_Backend], Channel]]:
    """``count`` servers, each allowing ``streams`` concurrent streams, and a channel to them
    all, every one of its connections READY (the servers' SETTINGS in)."""
    backends = [_Backend() for _ in range(count)]
    config = Configuration(max_concurrent_streams=streams)
    async with contextlib.AsyncExitStack() as stack:
        targets = [(await stack.enter_async_context(running_server([each], config=config)))[1] for each in backends]
        channel = await stack.enter_async_context(Channel(targets))
        hold = method_for(channel, "/t.R/Hold", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        async with asyncio.timeout(3):
            while not all(each.served for each in backends) or any(
                subchannel.ready_protocol() is None for subchannel in channel._subchannels
            ):
                await hold(Int64Value(value=0), timeout=2)
                await asyncio.sleep(0.01)
        for each in backends:
            each.served = 0
        yield backends, channel


# -- round-robin: calls waiting for a stream slot are spread over the backends ------------------


async def test_calls_waiting_for_a_stream_slot_are_spread_round_robin_over_the_backends() -> None:
    # Three backends, each allowing one stream, all busy with a held call. Three more calls
    # must wait for a slot: round-robin puts one on each backend (as before the calls were
    # placed at once), so once the held calls end each backend serves one of them. Now a call
    # that finds its pick busy advances the round-robin three times (send_message's pick at
    # once, _send_request's, then _connection's), so with three backends every waiting call
    # waits on the same one: the other two backends' freed slots go unused while they wait.
    async with _backends(3, 1) as (backends, channel):
        hold = method_for(channel, "/t.R/Hold", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        async with asyncio.timeout(3):
            held = []
            for count in range(1, 4):
                held.append(asyncio.ensure_future(hold(Int64Value(value=1), timeout=3)))
                while sum(each.served for each in backends) < count:
                    await asyncio.sleep(0.005)
            assert [each.served for each in backends] == [1, 1, 1], "three free backends: one call each"
            waiting = [asyncio.ensure_future(hold(Int64Value(value=0), timeout=3)) for _ in range(3)]
            await asyncio.sleep(0.1)  # all queued for a slot
            assert not any(task.done() for task in waiting)
            for each in backends:
                each.release.set()
            await asyncio.gather(*held, *waiting)
        assert [each.served - 1 for each in backends] == [1, 1, 1], (
            f"the calls that waited for a slot went {[each.served - 1 for each in backends]} to the "
            "backends (round-robin: one each)"
        )
