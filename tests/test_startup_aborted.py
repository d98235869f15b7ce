"""A stop requested during start-up: what is starting is cancelled, what started is torn down,
and ``serve`` raises the public :class:`app_kit.StartupAborted` (in-process and through the CLI)."""

from __future__ import annotations

import asyncio
import signal
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import app_kit
from app_kit import App, AppSettings

from .process import AppProcess
from .services import EchoService

pytestmark = pytest.mark.anyio

#: Seconds a start-up may take to notice the stop; a stop that interrupted nothing would wait
#: out the slow resources' hour, so the tests fail at this limit instead.
LIMIT = 10


def settings() -> AppSettings:
    return AppSettings(port=0, grace_period=1)


def slow_app(events: list[str], starting: asyncio.Event) -> App[AppSettings]:
    app = App(AppSettings)

    @app.resource
    async def fast(settings: AppSettings) -> AsyncIterator[int]:
        events.append("fast up")
        try:
            yield 1
        finally:
            events.append("fast down")

    @app.resource
    async def slow(fast: int) -> AsyncIterator[float]:
        events.append("slow starting")
        starting.set()
        try:
            await asyncio.sleep(3600)  # a database that does not answer
        except asyncio.CancelledError:
            events.append("slow cancelled")
            raise
        yield 1.0

    @app.service
    def echo(slow: float) -> EchoService:
        events.append("service built")
        return EchoService()

    return app


async def stop_when(starting: asyncio.Event, stop: asyncio.Event) -> None:
    await starting.wait()
    stop.set()


async def test_stop_during_a_slow_resource_cancels_it_and_unwinds() -> None:
    events: list[str] = []
    starting, stop = asyncio.Event(), asyncio.Event()
    stopper = asyncio.create_task(stop_when(starting, stop))
    began = time.monotonic()
    task = asyncio.current_task()
    assert task is not None
    pending = task.cancelling()  # (the test runner's task may carry some from before)
    with pytest.raises(app_kit.StartupAborted) as info:
        async with asyncio.timeout(LIMIT), slow_app(events, starting).serve(settings(), stop=stop):
            pytest.fail("must not serve")
    assert time.monotonic() - began < 5  # not the resource's hour
    assert events == ["fast up", "slow starting", "slow cancelled", "fast down"]
    assert isinstance(info.value, app_kit.StartupError)  # so `except StartupError` sees it too
    assert task.cancelling() == pending  # the cancellation it used is not left behind
    await stopper


async def test_stop_while_a_service_is_built_asynchronously() -> None:
    events: list[str] = []
    starting, stop = asyncio.Event(), asyncio.Event()
    app = App(AppSettings)

    @app.resource
    async def pool(settings: AppSettings) -> AsyncIterator[int]:
        events.append("pool up")
        try:
            yield 1
        finally:
            events.append("pool down")

    @app.service
    async def echo(pool: int) -> EchoService:
        starting.set()
        await asyncio.sleep(3600)
        return EchoService()

    stopper = asyncio.create_task(stop_when(starting, stop))
    with pytest.raises(app_kit.StartupAborted):
        async with asyncio.timeout(LIMIT), app.serve(settings(), stop=stop):
            pytest.fail("must not serve")
    assert events == ["pool up", "pool down"]
    await stopper


async def test_a_resource_that_turns_cancellation_into_its_own_error_is_still_aborted() -> None:
    starting, stop = asyncio.Event(), asyncio.Event()
    app = App(AppSettings)

    @app.resource
    async def client(settings: AppSettings) -> AsyncIterator[int]:
        starting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("connect interrupted") from None
        yield 1

    stopper = asyncio.create_task(stop_when(starting, stop))
    with pytest.raises(app_kit.StartupAborted) as info:
        async with asyncio.timeout(LIMIT), app.serve(settings(), stop=stop):
            pytest.fail("must not serve")
    assert isinstance(info.value.__cause__, ConnectionError)  # not reported as a failed resource
    await stopper


async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    events: list[str] = []
    starting = asyncio.Event()
    app = slow_app(events, starting)

    async def serve() -> None:
        async with app.serve(settings(), stop=asyncio.Event()):
            pytest.fail("must not serve")

    task = asyncio.create_task(serve())
    await starting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, LIMIT)
    assert events == ["fast up", "slow starting", "slow cancelled", "fast down"]


SLOW_APP = """
import asyncio
import sys
from collections.abc import AsyncIterator

from app_kit import App, AppSettings

app = App(AppSettings, name="slow")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@app.resource
async def fast(settings: AppSettings) -> AsyncIterator[int]:
    say("fast up")
    try:
        yield 1
    finally:
        say("fast down")


@app.resource
async def slow(fast: int) -> AsyncIterator[float]:
    say("slow starting")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        say("slow cancelled")
        raise
    yield 1.0
"""


async def test_sigterm_during_startup_exits_cleanly_without_a_second_signal(tmp_path: Path) -> None:
    (tmp_path / "slow_app.py").write_text(textwrap.dedent(SLOW_APP))
    async with AppProcess("slow_app:app", "--port", "0", env={"PYTHONPATH": str(tmp_path)}) as app:
        deadline = time.monotonic() + 15
        while "slow starting" not in app.lines:
            assert time.monotonic() < deadline and app.process.returncode is None, app.log
            await asyncio.sleep(0.02)
        app.signal(signal.SIGTERM)
        assert await app.wait(5) == 0, app.log
    said = [line for line in app.lines if line in ("fast up", "slow starting", "slow cancelled", "fast down")]
    assert said == ["fast up", "slow starting", "slow cancelled", "fast down"], app.log
    assert "shutdown requested during start-up" in app.log and "Traceback" not in app.log
