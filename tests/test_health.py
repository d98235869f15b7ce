"""grpc.health.v1 against grpcio-health-checking's own client stubs."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app_kit import Health

from .conftest import running_server

pytestmark = pytest.mark.anyio

Response = health_pb2.HealthCheckResponse
SERVING, NOT_SERVING, SERVICE_UNKNOWN = Response.SERVING, Response.NOT_SERVING, Response.SERVICE_UNKNOWN


async def test_check_and_list() -> None:
    health = Health()
    health.set_status("", True)
    health.set_status("cafe.CoffeeMachine", False)
    async with running_server([health]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert (await stub.Check(health_pb2.HealthCheckRequest())).status == SERVING
        request = health_pb2.HealthCheckRequest(service="cafe.CoffeeMachine")
        assert (await stub.Check(request)).status == NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.Such"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await stub.List(health_pb2.HealthListRequest())
        assert {name: value.status for name, value in listed.statuses.items()} == {
            "": SERVING,
            "cafe.CoffeeMachine": NOT_SERVING,
        }


async def test_watch_pushes_changes_unknown_services_and_shutdown() -> None:
    health = Health()
    health.set_status("", True)
    async with running_server([health]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        overall = stub.Watch(health_pb2.HealthCheckRequest())
        later = stub.Watch(health_pb2.HealthCheckRequest(service="orders.Orders"))
        assert (await overall.read()).status == SERVING
        assert (await later.read()).status == SERVICE_UNKNOWN  # the stream stays open

        health.set_status("orders.Orders", True)
        assert (await later.read()).status == SERVING
        health.set_status("", False)
        assert (await overall.read()).status == NOT_SERVING
        health.set_status("", True)
        assert (await overall.read()).status == SERVING

        # Many changes faster than the client reads: the latest state always arrives.
        for index in range(50):
            health.set_status("orders.Orders", index % 2 == 0)
        health.set_status("orders.Orders", False)
        seen = []
        while not seen or seen[-1] != NOT_SERVING:
            seen.append((await asyncio.wait_for(later.read(), 2)).status)
        assert seen[-1] == NOT_SERVING

        health.enter_graceful_shutdown()
        assert (await overall.read()).status == NOT_SERVING
        health.set_status("", True)  # ignored from now on
        assert (await stub.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
        health.close()  # the watches end cleanly, so the server can drain
        assert await overall.read() == grpc.aio.EOF
        assert await overall.code() == grpc.StatusCode.OK
        assert await later.read() == grpc.aio.EOF


async def test_check_functions_ttl_timeout_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="app_kit.health")
    calls = {"ok": 0}

    async def ok() -> bool:
        calls["ok"] += 1
        return True

    async def broken() -> bool:
        raise ConnectionError("database down")

    async def slow() -> bool:
        await asyncio.sleep(10)
        return True

    health = Health()
    health.add_check("ok", ok, ttl=0.2)
    health.add_check("broken", broken)
    health.add_check("slow", slow, timeout=0.1)
    async with running_server([health]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def check(service: str) -> int:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status  # type: ignore[no-any-return]

        assert [await check("ok") for _ in range(5)] == [SERVING] * 5
        assert calls["ok"] == 1  # reused within the TTL
        await asyncio.sleep(0.25)
        assert await check("ok") == SERVING and calls["ok"] == 2
        assert await check("broken") == NOT_SERVING
        started = asyncio.get_running_loop().time()
        assert await check("slow") == NOT_SERVING
        assert asyncio.get_running_loop().time() - started < 1

        # A watched service with a check is re-checked as its result goes stale.
        state = {"up": True}

        async def flaky() -> bool:
            return state["up"]

        health.add_check("flaky", flaky, ttl=0.1)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="flaky"))
        assert (await watch.read()).status == SERVING
        state["up"] = False
        assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
        state["up"] = True
        assert (await asyncio.wait_for(watch.read(), 2)).status == SERVING
        watch.cancel()
    # Each change of a check's verdict is logged once, with its cause.
    changes = [r.getMessage() for r in caplog.records if "SERVING" in r.getMessage()]
    assert changes == [
        "'broken' now NOT_SERVING: its check raised ConnectionError: database down",
        "'slow' now NOT_SERVING: its check took longer than 0.1s",
        "'flaky' now NOT_SERVING: its check returned false",
        "'flaky' SERVING again: its check passed",
    ]


async def test_watchers_of_a_service_hear_of_a_check_added_later_once_it_ran() -> None:
    runs = 0

    async def ok() -> bool:
        nonlocal runs
        runs += 1
        return True

    health = Health()
    async with running_server([health]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="late.Service"))
        assert (await watch.read()).status == SERVICE_UNKNOWN
        health.add_check("late.Service", ok, ttl=60)
        # Straight to the check's result: no NOT_SERVING while the first run is under way.
        assert (await asyncio.wait_for(watch.read(), 2)).status == SERVING
        assert runs == 1
        watch.cancel()
        health.close()


async def test_a_check_that_keeps_failing_is_logged_once_with_its_traceback_not_per_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A check that raised logged a WARNING with its traceback at every run (every TTL while
    # probed or watched: an outage's log filled with the same traceback), besides the one line
    # per change the README promises. Now the change's line carries the traceback, once.
    import logging

    runs = 0

    async def broken() -> bool:
        nonlocal runs
        runs += 1
        raise ConnectionError("database down")

    health = Health()
    health.add_check("db", broken, ttl=0.01)
    caplog.set_level(logging.INFO, logger="app_kit")
    async with running_server([health]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(20):
            assert (await stub.Check(health_pb2.HealthCheckRequest(service="db"))).status == NOT_SERVING
            await asyncio.sleep(0.015)
    assert runs >= 10
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "'db' now NOT_SERVING: its check raised ConnectionError: database down"
    ]
    assert warnings[0].exc_info is not None and warnings[0].exc_info[0] is ConnectionError
