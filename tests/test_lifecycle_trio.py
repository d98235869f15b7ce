"""The App's lifecycle on anyio: the same on asyncio, uvloop and trio (issue 17).

In-process, ``App.serve`` with an :class:`anyio.Event` or an :class:`asyncio.Event` as ``stop``;
through the CLI, ``--loop`` / ``APP_LOOP`` and the signals (a graceful drain, then a forced exit)
on each loop, with grpcio's synchronous client as the peer.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue
from grpc_health.v1 import health_pb2, health_pb2_grpc

import app_kit
from app_kit import App, AppSettings, graceful_exit
from app_kit.aio import eventloop
from examples.cafe import cafe_pb2

from .process import ROOT, AppProcess

#: Seconds start-up may take to notice a stop; the slow resources below take an hour otherwise.
LIMIT = 10

# -- in-process: App.serve and its stop event ----------------------------------------------------


def settings() -> AppSettings:
    return AppSettings(port=0, grace_period=1, reflection=False)


class Pool:
    """A resource that keeps a task group of its own while it is entered (a pool's refresher)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events


def _with_pool(app: App[AppSettings], events: list[str]) -> None:
    """Declare a Pool resource that keeps an anyio task group open for its whole life."""

    @app.resource
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
        async with anyio.create_task_group() as group:
            group.start_soon(anyio.sleep_forever)
            events.append("pool up")
            try:
                yield Pool(events)
            finally:
                await anyio.sleep(0.01)  # a teardown that awaits is not cut short by the stop
                events.append("pool down")
                group.cancel_scope.cancel()


def slow_app(events: list[str], starting: anyio.Event | asyncio.Event) -> App[AppSettings]:
    app = App(AppSettings)

    _with_pool(app, events)

    @app.resource
    async def slow(pool: Pool) -> AsyncIterator[float]:
        events.append("slow starting")
        starting.set()
        try:
            await anyio.sleep(3600)  # a database that does not answer
        except anyio.get_cancelled_exc_class():
            events.append("slow cancelled")
            raise
        yield 1.0

    return app


@pytest.mark.anyio
@pytest.mark.backends
async def test_anyio_event_stop_during_startup_cancels_and_unwinds(backend: str) -> None:
    events: list[str] = []
    starting, stop = anyio.Event(), anyio.Event()
    began = time.monotonic()
    async with anyio.create_task_group() as group:

        async def stop_when_starting() -> None:
            await starting.wait()
            stop.set()

        group.start_soon(stop_when_starting)
        with pytest.raises(app_kit.StartupAborted), anyio.fail_after(LIMIT):
            async with slow_app(events, starting).serve(settings(), stop=stop):
                pytest.fail("must not serve")
    assert time.monotonic() - began < LIMIT / 2
    assert events == ["pool up", "slow starting", "slow cancelled", "pool down"]


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_resource_that_swallows_the_stop_is_aborted_and_torn_down(backend: str) -> None:
    events: list[str] = []
    starting, stop = anyio.Event(), anyio.Event()
    app = App(AppSettings)

    @app.resource
    async def stubborn(settings: AppSettings) -> AsyncIterator[Pool]:
        starting.set()
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            events.append("swallowed")  # and starts anyway
        try:
            yield Pool(events)
        finally:
            await anyio.sleep(0.01)  # not cancelled again by the stop it swallowed
            events.append("stubborn down")

    async with anyio.create_task_group() as group:

        async def stop_when_starting() -> None:
            await starting.wait()
            stop.set()

        group.start_soon(stop_when_starting)
        with pytest.raises(app_kit.StartupAborted), anyio.fail_after(LIMIT):
            async with app.serve(settings(), stop=stop):
                pytest.fail("must not serve")
    assert events == ["swallowed", "stubborn down"]


@pytest.mark.anyio
async def test_asyncio_event_stop_during_startup() -> None:
    events: list[str] = []
    starting, stop = asyncio.Event(), asyncio.Event()

    async def stop_when_starting() -> None:
        await starting.wait()
        stop.set()

    stopper = asyncio.create_task(stop_when_starting())
    with pytest.raises(app_kit.StartupAborted):
        async with asyncio.timeout(LIMIT), slow_app(events, starting).serve(settings(), stop=stop):
            pytest.fail("must not serve")
    await stopper
    assert events == ["pool up", "slow starting", "slow cancelled", "pool down"]


async def _serve_until_stopped(stop: anyio.Event | asyncio.Event, events: list[str]) -> None:
    """Serve the slow app's quick half until ``stop``, checking health from grpcio meanwhile."""
    app = App(AppSettings)

    _with_pool(app, events)

    def check(address: str) -> int:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return int(reply.status)

    async def stop_soon() -> None:
        await anyio.sleep(0.05)
        stop.set()  # as a signal would

    with anyio.fail_after(LIMIT):
        async with app.serve(settings(), stop=stop) as running:
            assert await anyio.to_thread.run_sync(check, running.address) == health_pb2.HealthCheckResponse.SERVING
            async with anyio.create_task_group() as group:
                group.start_soon(stop_soon)
                await stop.wait()
            events.append("stopped")


@pytest.mark.anyio
@pytest.mark.backends
async def test_serve_with_an_anyio_event(backend: str) -> None:
    events: list[str] = []
    await _serve_until_stopped(anyio.Event(), events)
    assert events == ["pool up", "stopped", "pool down"]


@pytest.mark.anyio
async def test_serve_with_an_asyncio_event() -> None:
    events: list[str] = []
    await _serve_until_stopped(asyncio.Event(), events)
    assert events == ["pool up", "stopped", "pool down"]


@pytest.mark.anyio
@pytest.mark.backends
async def test_graceful_exit_is_for_asyncio(backend: str) -> None:
    if backend == "trio":
        with pytest.raises(RuntimeError, match="running asyncio event loop"), graceful_exit([]):
            pass
    else:
        with graceful_exit([]):
            pass


# -- eventloop.run --------------------------------------------------------------------------------


async def _which(offset: int) -> tuple[str, int]:
    await anyio.sleep(0)
    return eventloop.current_loop(), offset + 1


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_eventloop_run_on_each_loop(loop: str) -> None:
    assert eventloop.run(_which, 41, loop=loop) == (loop, 42)
    assert eventloop.run(_which(1), loop=loop) == (loop, 2)  # a coroutine, as callers made it before


def test_eventloop_run_auto_and_unknown() -> None:
    assert eventloop.run(_which(0))[0] == "uvloop"  # installed here: auto picks it
    with pytest.raises(ValueError, match="unknown loop 'curio'"):
        eventloop.run(_which, 0, loop="curio")


# -- through the CLI -------------------------------------------------------------------------------

#: Written with anyio only, so that it runs on every loop. ``SLOW_START`` makes its resource hang.
ANY_LOOP_APP = """
import os
import sys
from collections.abc import AsyncIterator

import anyio
from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit import App, AppSettings, Cardinality, Handler, Stream

app = App(AppSettings, name="anyloop")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Journal:
    pass


@app.resource
async def journal(settings: AppSettings) -> AsyncIterator[Journal]:
    say("journal starting")
    if os.environ.get("SLOW_START"):
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            say("journal cancelled")
            raise
    try:
        yield Journal()
    finally:
        await anyio.sleep(0.05)
        say("journal closed")


class Sleeper:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/test.Sleeper/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)}

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        say(f"sleeping {request.value}")
        await anyio.sleep(request.value)
        await stream.send_message(request)


@app.service
def sleeper(journal: Journal) -> Sleeper:
    return Sleeper()
"""

LOOPS = ["asyncio", "uvloop", "trio"]


def any_loop_app(tmp_path: Path, **env: str) -> tuple[str, dict[str, str]]:
    (tmp_path / "any_loop_app.py").write_text(textwrap.dedent(ANY_LOOP_APP))
    return "any_loop_app:app", {"PYTHONPATH": str(tmp_path), **env}


def sleep_call(address: str, seconds: float) -> grpc.Future:
    """A grpcio (synchronous API) call in flight; its channel closes with the process."""
    channel = grpc.insecure_channel(address)
    method = channel.unary_unary("/test.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
    return method.future(DoubleValue(value=seconds), timeout=60)


async def result(call: grpc.Future, timeout: float = 15) -> object:
    return await anyio.to_thread.run_sync(lambda: call.result(timeout=timeout))


async def wait_for_line(app: AppProcess, text: str) -> None:
    deadline = time.monotonic() + 15
    while not any(text in line for line in app.lines):
        assert time.monotonic() < deadline and app.process.returncode is None, app.log
        await asyncio.sleep(0.02)


@pytest.mark.anyio
@pytest.mark.parametrize("loop", LOOPS)
async def test_sigterm_drains_the_calls_in_flight_within_the_grace(loop: str, tmp_path: Path) -> None:
    target, env = any_loop_app(tmp_path, APP_GRACE_PERIOD="5")
    async with AppProcess(target, "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        assert f"({loop})" in app.log
        call = sleep_call(f"127.0.0.1:{port}", 1.0)
        await wait_for_line(app, "sleeping 1.0")  # in the server now
        started = time.monotonic()
        app.signal(signal.SIGTERM)
        assert (await result(call)).value == 1.0  # type: ignore[attr-defined]
        assert await app.wait() == 0, app.log
        assert time.monotonic() - started < 5  # the call's second and the teardown, not the grace
    assert "received SIGTERM" in app.log and "journal closed" in app.log and "Traceback" not in app.log


@pytest.mark.anyio
@pytest.mark.parametrize("loop", LOOPS)
async def test_a_call_longer_than_the_grace_is_cut_short(loop: str, tmp_path: Path) -> None:
    target, env = any_loop_app(tmp_path, APP_GRACE_PERIOD="0.5")
    async with AppProcess(target, "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        call = sleep_call(f"127.0.0.1:{port}", 30)
        await wait_for_line(app, "sleeping 30.0")  # else UNAVAILABLE could be a refused connection
        started = time.monotonic()
        app.signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as info:
            await result(call)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert await app.wait() == 0, app.log
        assert time.monotonic() - started < 0.5 + 3
    assert "journal closed" in app.log and "Traceback" not in app.log


@pytest.mark.anyio
@pytest.mark.parametrize("loop", LOOPS)
async def test_a_second_signal_exits_at_once(loop: str, tmp_path: Path) -> None:
    target, env = any_loop_app(tmp_path, APP_GRACE_PERIOD="30")
    async with AppProcess(target, "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        call = sleep_call(f"127.0.0.1:{port}", 30)
        await wait_for_line(app, "sleeping 30.0")
        app.signal(signal.SIGTERM)
        await wait_for_line(app, "received SIGTERM")
        started = time.monotonic()
        app.signal(signal.SIGINT)
        assert await app.wait(10) == 128 + signal.SIGINT, app.log
        assert time.monotonic() - started < 3  # not the grace's 30 s
        call.cancel()
    assert "received SIGINT again: exiting now" in app.log and "Traceback" not in app.log


@pytest.mark.anyio
@pytest.mark.parametrize("loop", LOOPS)
async def test_sigterm_during_startup_exits_cleanly(loop: str, tmp_path: Path) -> None:
    target, env = any_loop_app(tmp_path, SLOW_START="1")
    async with AppProcess(target, "--port", "0", "--loop", loop, env=env) as app:
        await wait_for_line(app, "journal starting")
        app.signal(signal.SIGTERM)
        assert await app.wait(LIMIT) == 0, app.log
    said = [line for line in app.lines if line.startswith("journal ")]
    assert said == ["journal starting", "journal cancelled"], app.log
    assert "shutdown requested during start-up" in app.log and "Traceback" not in app.log


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="cafe.CoffeeMachine"), timeout=5
        )
        return int(reply.status)


def _latte(address: str) -> cafe_pb2.Latte:
    with grpc.insecure_channel(address) as channel:
        make = channel.unary_unary(
            "/cafe.CoffeeMachine/MakeLatte", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.Latte.FromString
        )
        return make(cafe_pb2.LatteOrder(milk_ml=200, shots=2, name="Ann"), timeout=5)


def _brew(address: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        brew = channel.unary_stream(
            "/cafe.CoffeeMachine/Brew", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.BrewStatus.FromString
        )
        return [status.stage for status in brew(cafe_pb2.LatteOrder(milk_ml=200, shots=1), timeout=30)]


@pytest.mark.anyio
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_the_cafe_app_on_each_loop(loop: str, tmp_path: Path) -> None:
    env = {"CAFE_DB_PATH": str(tmp_path / "orders.sqlite3"), "CAFE_BREW_STEP": "0.3", "APP_GRACE_PERIOD": "5"}
    async with AppProcess("examples.cafe.app:app", "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        address = f"127.0.0.1:{port}"
        assert f"({loop})" in app.log
        assert await anyio.to_thread.run_sync(_health, address) == health_pb2.HealthCheckResponse.SERVING
        latte = await anyio.to_thread.run_sync(_latte, address)
        assert latte.order_id == 1 and latte.description.endswith("for Ann")
        async with anyio.create_task_group() as group:
            stages: list[int] = []

            async def brew() -> None:
                stages.extend(await anyio.to_thread.run_sync(_brew, address))

            group.start_soon(brew)
            await asyncio.sleep(0.4)  # brewing (five steps of 0.3 s)
            started = time.monotonic()
            app.signal(signal.SIGTERM)
        assert stages[-1] == cafe_pb2.BrewStatus.DONE and len(stages) == 5  # finished in the drain
        assert await app.wait() == 0, app.log
        assert time.monotonic() - started < 5
    assert "order store closed" in app.log and "Traceback" not in app.log


@pytest.mark.anyio
async def test_workers_and_reload_run_on_the_loop_asked_for(tmp_path: Path) -> None:
    # uvloop is installed, so that without the choice passed on the children would say "(uvloop)".
    target, env = any_loop_app(tmp_path)
    for args, extra in [
        (["--workers", "2", "--loop", "asyncio"], {}),
        (["--workers", "2"], {"APP_LOOP": "asyncio"}),
        (["--reload", "--reload-dir", str(tmp_path), "--loop", "asyncio"], {}),
    ]:
        async with AppProcess(target, "--port", "0", *args, env={**env, **extra}) as app:
            await app.ready()
            await wait_for_line(app, "(asyncio)")
            app.signal(signal.SIGTERM)
            assert await app.wait() == 0, app.log
        serving = [line for line in app.lines if " serving " in line]
        assert serving and all(line.endswith("(asyncio)") for line in serving), app.log


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app_kit", "run", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_an_unknown_loop_is_refused() -> None:
    done = run_cli("tests.apps.lifecycle_app:app", "--port", "0", "--loop", "curio")
    assert done.returncode == 2  # argparse's usage error
    assert "--loop: invalid choice: 'curio'" in done.stderr and "trio" in done.stderr

    done = run_cli("tests.apps.lifecycle_app:app", "--port", "0", APP_LOOP="curio")
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("app_kit: invalid settings: APP_LOOP: ") and "'trio'" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_loop_that_is_not_installed_is_one_clear_line(workers: str) -> None:
    # "Not installed": the import system is told trio is absent (a None entry in sys.modules).
    argv = ["run", "tests.apps.lifecycle_app:app", "--port", "0", "--loop", "trio", "--workers", workers]
    code = f"import sys; sys.modules['trio'] = None\nfrom app_kit.app.cli import main\nsys.exit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.splitlines()
    assert line == "app_kit: APP_LOOP / --loop: the trio loop is not installed: pip install 'app_kit[trio]'"
