"""Session 13 review of worker liveness (APP_WORKER_TIMEOUT), max_connection_age and
max_concurrent_calls, with real peers: grpcio clients, our Channel, real worker processes.

Each failed before its fix: a shed call counted as running while its interceptors ran; health
checks were shed; a stuck worker's stacks broke the JSON log lines; a huge timeout crashed every
worker (faulthandler's timer overflowed). The busy-worker test states what the timeout bounds."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, ServerInterceptor, Status
from app_kit.aio.client import method_for
from app_kit.app.settings import AppSettings, SettingsError, load_settings
from app_kit.protos.grpc.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from app_kit.services.health import Health

from .conftest import running_server
from .process import AppProcess
from .services import Sleeper
from .test_workers import OWN_CONNECTION, serving, until

pytestmark = pytest.mark.anyio


# -- max_concurrent_calls ----------------------------------------------------------------------


class HeldAuth(ServerInterceptor):
    """An interceptor that awaits something before it proceeds (a token lookup, say): a call
    sent with ``hold: NAME`` waits in it until the test releases NAME."""

    def __init__(self) -> None:
        self.entered: dict[str, anyio.Event] = {}
        self.release: dict[str, anyio.Event] = {}

    def gate(self, name: str) -> None:
        self.entered[name] = anyio.Event()
        self.release[name] = anyio.Event()

    async def intercept(self, call: Any, proceed: Any) -> None:
        name = call.metadata.get("hold")
        if name is not None:
            self.entered[name].set()
            await self.release[name].wait()
        await proceed()


@pytest.mark.backends
async def test_a_call_shed_while_in_its_interceptors_does_not_count_as_running(backend: str) -> None:
    auth = HeldAuth()
    for name in ("a", "b"):
        auth.gate(name)
    config = Configuration(max_concurrent_calls=1)
    async with running_server([Sleeper()], config=config, interceptors=[auth]) as (_, target):
        async with Channel(target) as channel:
            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            outcomes: dict[str, object] = {}

            async def call(name: str) -> None:
                try:
                    outcomes[name] = (await unary(BytesValue(value=b"x"), timeout=5, metadata={"hold": name})).value
                except GRPCError as exc:
                    outcomes[name] = exc.status

            with anyio.fail_after(5):
                async with anyio.create_task_group() as group:
                    group.start_soon(call, "a")  # runs: the one call the limit allows
                    await auth.entered["a"].wait()
                    group.start_soon(call, "b")  # shed, but its interceptor still runs
                    await auth.entered["b"].wait()
                    auth.release["a"].set()
                    while "a" not in outcomes:
                        await anyio.sleep(0.01)
                    await anyio.sleep(0.1)  # (its task ends just after its reply went)
                    # No call is running now (b was refused): a new one is served.
                    try:
                        fresh: object = (await unary(BytesValue(value=b"c"), timeout=5)).value
                    except GRPCError as exc:
                        fresh = exc.status
                    auth.release["b"].set()
    assert outcomes == {"a": b"x", "b": Status.RESOURCE_EXHAUSTED}
    assert fresh == b"c"


async def test_health_checks_are_answered_at_the_concurrency_limit() -> None:
    health = Health()
    health.set_status("", HealthCheckResponse.SERVING)
    config = Configuration(max_concurrent_calls=1)
    async with running_server([Sleeper(), health], config=config) as (server, target):
        async with grpc.aio.insecure_channel(target) as channel:
            sleep = channel.unary_unary("/test.Echo/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                HealthCheckRequest.SerializeToString,
                HealthCheckResponse.FromString,
            )
            busy = asyncio.ensure_future(sleep(DoubleValue(value=0.6), timeout=5))
            while not server.stats().calls:  # the one call the limit allows is running
                await asyncio.sleep(0.01)
            try:
                status: object = (await check(HealthCheckRequest(), timeout=2)).status
            except grpc.aio.AioRpcError as exc:
                status = exc.code()
            assert (await busy).value == 0.6
    assert status == HealthCheckResponse.SERVING


@pytest.mark.backends
async def test_cancelled_and_expired_calls_give_their_place_back(backend: str) -> None:
    # Calls cancelled by their client, and calls past their deadline, stop counting: the next
    # calls are served (with interceptors, whose calls end through them, and without).
    for interceptors in ([], [HeldAuth()]):
        config = Configuration(max_concurrent_calls=2)
        async with running_server([Sleeper()], config=config, interceptors=interceptors) as (server, target):
            async with Channel(target) as channel:
                sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
                unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
                with anyio.fail_after(5):
                    async with anyio.create_task_group() as group:
                        group.start_soon(functools.partial(sleep, DoubleValue(value=30), timeout=30))
                        await anyio.sleep(0.1)
                        group.cancel_scope.cancel()  # the client cancels it
                    with pytest.raises(GRPCError) as caught:
                        await sleep(DoubleValue(value=30), timeout=0.1)
                    assert caught.value.status is Status.DEADLINE_EXCEEDED
                    while server.stats().calls:
                        await anyio.sleep(0.01)
                    async with anyio.create_task_group() as group:
                        for _ in range(2):
                            group.start_soon(functools.partial(sleep, DoubleValue(value=0.05), timeout=5))
                        await anyio.sleep(0.01)
                    assert (await unary(BytesValue(value=b"y"), timeout=5)).value == b"y"


# -- APP_WORKER_TIMEOUT ------------------------------------------------------------------------

LIVENESS_APP = "tests.apps.liveness_app:app"

CHUNKY_APP = """
import os
import time

import anyio
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from app_kit import App, AppSettings, Cardinality, Handler

app = App(AppSettings, name="chunky")


class Chunky:
    def __mapping__(self):
        return {"/chunky.Chunky/Work": Handler(self.work, Cardinality.UNARY_UNARY, DoubleValue, Int64Value)}

    async def work(self, stream):
        request = await stream.recv_message()
        end = time.monotonic() + request.value
        while time.monotonic() < end:
            time.sleep(float(os.environ["CHUNKY_BLOCK"]))  # sync work, never longer than this at once
            await anyio.sleep(0)  # the event loop turns between two pieces
        await stream.send_message(Int64Value(value=os.getpid()))


@app.service
def chunky() -> Chunky:
    return Chunky()
"""


def pid_method(channel: grpc.aio.Channel, path: str = "/liveness.Pids/Pid") -> Any:
    return channel.unary_unary(path, DoubleValue.SerializeToString, Int64Value.FromString)


async def test_a_busy_worker_whose_loop_turns_within_the_timeout_is_not_killed(tmp_path: Path) -> None:
    (tmp_path / "chunky_app.py").write_text(CHUNKY_APP)
    env = {
        "PYTHONPATH": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "APP_WORKER_TIMEOUT": "1",
        "APP_LOOP": "asyncio",
        # The loop turns at least every 0.1 s: a beat due waits two or three turns, far below
        # the timeout. (The timeout bounds how long a beat waits for the loop, turns included:
        # with turns of half the timeout, a beat waits about as long as the timeout, and the
        # worker, serving every call that late, is killed as stuck.)
        "CHUNKY_BLOCK": "0.1",
    }
    async with AppProcess("chunky_app:app", "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            try:
                outcome: object = (
                    await pid_method(channel, "/chunky.Chunky/Work")(DoubleValue(value=2), timeout=20)
                ).value
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code()
        app.signal()
        await app.wait()
    assert "has not answered" not in app.log, app.log
    assert isinstance(outcome, int), outcome


async def test_the_stacks_of_a_blocked_worker_stay_json_lines() -> None:
    env = {"APP_WORKER_TIMEOUT": "1", "APP_LOG_FORMAT": "json"}
    async with AppProcess(LIVENESS_APP, "--port", "0", "--workers", "2", env=env) as app:
        await until(lambda: app.log.count(" serving ") >= 2, app)
        found = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", app.log)
        assert found is not None, app.log
        async with grpc.aio.insecure_channel(f"127.0.0.1:{found[1]}", options=OWN_CONNECTION) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await pid_method(channel)(DoubleValue(value=-60), timeout=20)
        await until(lambda: "liveness_app.py" in app.log and "has not answered" in app.log, app)
        app.signal()
        await app.wait()
    not_json = []
    for line in app.lines:
        try:
            json.loads(line)
        except ValueError:
            not_json.append(line)
    assert not not_json, "\n".join(not_json)


async def test_a_huge_worker_timeout_does_not_crash_the_workers() -> None:
    try:
        load_settings(AppSettings, worker_timeout=1e10)
    except SettingsError:
        return  # refused up front, with the other bad settings: as good
    env = {"APP_WORKER_TIMEOUT": "1e10"}
    async with AppProcess(LIVENESS_APP, "--port", "0", "--workers", "2", env=env) as app:
        await app.ready()
        await asyncio.sleep(1)
        app.signal()
        await app.wait()
    assert "OverflowError" not in app.log and "exited with code 1" not in app.log, app.log


# -- max_connection_age ------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [None, 0.2])
async def test_a_grpcio_call_longer_than_the_age_finishes_or_ends_at_the_grace(grace: float | None) -> None:
    # grpcio with its default options: an aged connection keeps its long call (no grace) or
    # ends it with UNAVAILABLE once the grace is over, while new calls go to a new connection.
    config = Configuration(max_connection_age=0.2, max_connection_age_grace=grace)
    async with running_server([Sleeper()], config=config) as (_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            sleep = channel.unary_unary("/test.Echo/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
            unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
            started = time.monotonic()
            long_call = asyncio.ensure_future(sleep(DoubleValue(value=1.0 if grace is None else 5.0), timeout=10))
            await asyncio.sleep(0.4)  # aged: a new call is still served (on a new connection)
            assert (await unary(BytesValue(value=b"new"), timeout=5)).value == b"new"
            if grace is None:
                assert (await long_call).value == 1.0
            else:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await long_call
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 1.5
