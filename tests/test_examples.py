"""The examples beyond the cafe, each run as a user would: the chat room (bidi streaming),
notes over a connection pool (a resource with a health check), a client fanning out to two
services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app_kit import Channel, GRPCError, Status
from examples.chat.app import app as chat_app
from examples.chat.chat_grpc import ChatStub
from examples.chat.chat_pb2 import ChatMessage

pytestmark = pytest.mark.anyio


async def test_chat_room_everyone_hears_everyone() -> None:
    async with chat_app.serve(chat_app.settings_type(port=0)) as running, running.channel() as channel:
        stub = ChatStub(channel)
        said: dict[str, asyncio.Queue[str]] = {"ann": asyncio.Queue(), "bob": asyncio.Queue()}
        heard: dict[str, list[str]] = {"ann": [], "bob": []}
        joined = {"ann": asyncio.Event(), "bob": asyncio.Event()}

        async def lines(name: str) -> AsyncIterator[ChatMessage]:
            while (text := await said[name].get()) != "":
                yield ChatMessage(text=text)

        async def member(name: str) -> None:
            async with stub.Talk.open(metadata={"x-name": name}, timeout=10) as call:
                sender = asyncio.ensure_future(_send(call, lines(name)))
                joined[name].set()
                async for message in call:
                    heard[name].append(f"{message.author}: {message.text}")
                await sender

        talks = [asyncio.ensure_future(member(name)) for name in ("ann", "bob")]
        for event in joined.values():
            await event.wait()
        await asyncio.sleep(0.1)  # both are in the room
        said["ann"].put_nowait("hi")
        await _until(lambda: len(heard["bob"]) == 1)
        said["bob"].put_nowait("hello ann")
        await _until(lambda: len(heard["ann"]) == 2)
        said["ann"].put_nowait("")  # ann hangs up; bob goes on alone
        said["bob"].put_nowait("anyone?")
        await _until(lambda: len(heard["bob"]) == 3)
        said["bob"].put_nowait("")
        await asyncio.gather(*talks)
    assert heard["ann"] == ["ann: hi", "bob: hello ann"]
    assert heard["bob"] == ["ann: hi", "bob: hello ann", "bob: anyone?"]


async def _send(call, requests: AsyncIterator[ChatMessage]) -> None:  # type: ignore[no-untyped-def]
    async for request in requests:
        await call.send_message(request)
    await call.end()


async def _until(condition, timeout: float = 5) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_member_too_far_behind_is_dropped_not_buffered() -> None:
    from examples.chat.room import BACKLOG, Room

    room = Room()
    slow, fast = room.join("slow"), room.join("fast")
    for index in range(BACKLOG + 1):
        room.say(ChatMessage(text=str(index)))
        if not fast.inbox.empty():
            fast.inbox.get_nowait()
    assert slow.dropped.is_set() and slow not in room.members and fast in room.members


async def test_notes_over_a_pool_with_its_health_check() -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from examples.notes.app import app as notes_app
    from examples.notes.notes_grpc import NotesStub
    from examples.notes.notes_pb2 import NewNote, NoteId, Search
    from examples.notes.pool import Pool

    settings = notes_app.settings_type(
        port=0,
        db_url="file:test_notes?mode=memory&cache=shared",
        pool_size=2,
        health_check_ttl=0.2,
        health_check_timeout=0.5,
    )
    async with notes_app.serve(settings) as running, running.channel() as channel:
        stub = NotesStub(channel)
        ids = await asyncio.gather(*(stub.Add(NewNote(text=f"note {n}"), timeout=5) for n in range(150)))
        assert sorted(note_id.id for note_id in ids) == list(range(1, 151))
        assert (await stub.Get(ids[7], timeout=5)).text == "note 7"
        with pytest.raises(GRPCError) as info:
            await stub.Get(NoteId(id=999), timeout=5)
        assert info.value.status is Status.NOT_FOUND
        with pytest.raises(GRPCError) as info:
            await stub.Add(NewNote(text="  "), timeout=5)
        assert info.value.status is Status.INVALID_ARGUMENT
        found = [note async for note in stub.Find(Search(contains="note 1"), timeout=5)]
        expected = {"note 1", *(f"note {n}" for n in (*range(10, 20), *range(100, 150)))}
        assert {note.text for note in found} == expected and len(found) == len(expected)
        assert [note.id for note in found] == sorted(note.id for note in found)  # in order, across pages
        assert len(await stub.Find(Search(), timeout=5)) == 150

        pool = running.resource(Pool)
        target = running.address
        async with grpc.aio.insecure_channel(target) as grpcio_channel:
            health = health_pb2_grpc.HealthStub(grpcio_channel)
            check = await health.Check(health_pb2.HealthCheckRequest(service="notes.v1.Notes"))
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            # Every connection lent out (a stuck database): the check times out, NOT_SERVING.
            held = [pool.acquire() for _ in range(pool.size)]
            for lease in held:
                await lease.__aenter__()
            try:
                status = await _fresh_status(health, settings.health_check_ttl)
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            finally:
                for lease in held:
                    await lease.__aexit__(None, None, None)


async def _fresh_status(health, ttl: float) -> int:  # type: ignore[no-untyped-def]
    from grpc_health.v1 import health_pb2

    await asyncio.sleep(ttl)  # the last result is stale now
    return (await health.Check(health_pb2.HealthCheckRequest(service="notes.v1.Notes"))).status  # type: ignore[no-any-return]


async def test_fan_out_to_two_services_under_one_deadline() -> None:
    import time

    from examples.fanout.backends import InventoryService, PricingService
    from examples.fanout.client import Quote, quote
    from examples.fanout.fanout_grpc import InventoryStub, PricingStub

    from .conftest import running_server

    pricing_service = PricingService()
    async with (
        running_server([InventoryService()]) as (_, inventory_target),
        running_server([pricing_service]) as (_, pricing_target),
        Channel(inventory_target) as inventory_channel,
        Channel(pricing_target) as pricing_channel,
    ):
        inventory, pricing = InventoryStub(inventory_channel), PricingStub(pricing_channel)
        assert await quote(inventory, pricing, "mug") == Quote("mug", 12, 950)
        # One fails: its error comes back as it was, at once; the slow other is cancelled.
        pricing_service.delay = 5.0
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await quote(inventory, pricing, "teapot", timeout=3)
        assert info.value.status is Status.NOT_FOUND and time.monotonic() - started < 1
        # The slow one outlives the shared deadline: DEADLINE_EXCEEDED after it, not later.
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await quote(inventory, pricing, "mug", timeout=0.3)
        assert info.value.status is Status.DEADLINE_EXCEEDED and time.monotonic() - started < 1
