"""``APP_WORKER_TIMEOUT``: a ``--workers`` worker whose event loop is blocked, or whose shutdown
overruns its grace period, is killed and (when serving) replaced. Real processes, grpcio clients."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from app_kit import AppSettings
from app_kit.app.settings import SettingsError, load_settings

from .process import AppProcess
from .test_workers import OWN_CONNECTION, serving, until, workers

pytestmark = pytest.mark.anyio

APP = "tests.apps.liveness_app:app"


def pid_method(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    return channel.unary_unary("/liveness.Pids/Pid", DoubleValue.SerializeToString, Int64Value.FromString)


async def answering_pids(port: int, count: int) -> set[int]:
    """The pids that answer ``count`` calls, each on a connection of its own."""
    pids = set()
    for _ in range(count):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            pids.add((await pid_method(channel)(DoubleValue(), timeout=5)).value)
    return pids


@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_a_worker_whose_event_loop_is_blocked_is_killed_with_its_stacks_and_replaced(loop: str) -> None:
    # A handler that blocks the loop (sync I/O, a CPU loop) silences the whole worker: its
    # connections hang, and with SO_REUSEPORT a share of the new ones too, while the other
    # workers answer every health probe. The supervisor notices the missing heartbeat.
    env = {"APP_WORKER_TIMEOUT": "1", "APP_LOOP": loop}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pid_method(channel)(DoubleValue(value=-60), timeout=20)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, app.log
            assert time.monotonic() - started < 8, app.log
        blocked = re.search(r"worker (\d) \(pid (\d+)\) has not answered for [\d.]+s", app.log)
        assert blocked is not None, app.log
        # Its stacks, printed by the worker itself when the beats stopped: where it is stuck.
        assert re.search(rf"\[worker {blocked[1]} pid {blocked[2]}\] .*liveness_app\.py.* in pid", app.log), app.log
        await until(lambda: len(workers(app)) == 3 and len(serving(app)) == 3, app)
        alive = set(workers(app)) - {int(blocked[2])}
        assert await answering_pids(port, 12) <= alive
        app.signal()
        assert await app.wait() == 0, app.log


@pytest.mark.parametrize("stop", ["hang", "block"])
async def test_a_worker_whose_shutdown_overruns_is_killed(stop: str) -> None:
    # A resource whose close awaits for ever (the loop still turning) or blocks the loop: the
    # supervisor waits drain delay + grace period + APP_WORKER_TIMEOUT for it, not for ever,
    # and says so with its exit code.
    env = {"APP_WORKER_TIMEOUT": "1", "APP_GRACE_PERIOD": "1", "LIVENESS_STOP": stop}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        started = time.monotonic()
        app.signal()
        code = await app.wait(timeout=20)
        assert time.monotonic() - started < 6, app.log
        assert code == 137, app.log  # 128 + SIGKILL: not a clean shutdown
        # A loop still turning is given the whole shutdown bound; a blocked one only the timeout.
        why = "is still shutting down [\\d.]+s after SIGTERM" if stop == "hang" else "has not answered for"
        assert len(re.findall(rf"worker \d \(pid \d+\) {why}", app.log)) == 2, app.log


async def test_start_up_is_not_bounded_and_0_turns_the_check_off() -> None:
    # The heartbeat starts once the worker serves: a slow start-up is not a blocked loop.
    env = {"APP_WORKER_TIMEOUT": "1", "LIVENESS_START_DELAY": "1.6"}  # (a blocked loop: caught by 1.5 s)
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready(timeout=20)
        await until(lambda: len(serving(app)) == 2, app)
        assert len(await answering_pids(port, 4)) >= 1
        assert "has not answered" not in app.log and len(workers(app)) == 2, app.log
    async with AppProcess(APP, "--port", "0", "--workers", "2", env={"APP_WORKER_TIMEOUT": "0"}) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            pid = (await pid_method(channel)(DoubleValue(value=-1.6), timeout=10)).value
        assert pid in workers(app) and "has not answered" not in app.log, app.log


def test_the_timeout_is_not_negative() -> None:
    assert load_settings(AppSettings).worker_timeout == 30
    with pytest.raises(SettingsError, match="worker_timeout"):
        load_settings(AppSettings, worker_timeout=-1)


@pytest.mark.parametrize("how", ["SIGTERM", "a worker's death"])
async def test_a_worker_that_left_a_child_holding_its_output_is_still_seen_to_exit(how: str) -> None:
    # A worker's own subprocess inherits its stdout and stderr: the pipes to the supervisor stay
    # open after the worker exits. Its exit must still count (asyncio's Process.wait() on
    # Python 3.11 waits for the pipes too): the supervisor stops, or restarts it, at once.
    child = ["sleep", "61.25"]  # (a duration no other process here sleeps: found and killed below)
    env = {"LIVENESS_CHILD": " ".join(child)}
    try:
        async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
            await app.ready()
            await until(lambda: len(serving(app)) == 2, app)
            if how == "SIGTERM":
                app.signal()
                assert await app.wait(timeout=10) == 0, app.log
            else:
                pid = next(iter(workers(app)))
                os.kill(pid, signal.SIGKILL)
                await until(lambda: f"(pid {pid}) was killed by SIGKILL; restarting it" in app.log, app, timeout=10)
                await until(lambda: len(workers(app)) == 3, app, timeout=10)
    finally:
        subprocess.run(["pkill", "-f", " ".join(child)], check=False)


async def test_a_second_signal_kills_the_workers_with_what_they_started() -> None:
    # The second signal means "now": a worker's own subprocesses (its process group) go with it,
    # as they do when the supervisor kills a stuck worker, not left running as orphans.
    child = ["sleep", "61.37"]  # (a duration no other process here sleeps)
    env = {"LIVENESS_CHILD": " ".join(child), "LIVENESS_STOP": "hang", "APP_GRACE_PERIOD": "30"}
    try:
        async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
            await app.ready()
            await until(lambda: len(serving(app)) == 2, app)
            assert running(child) == 2
            app.signal()
            await until(lambda: "draining every worker" in app.log, app)
            app.signal()
            assert await app.wait(timeout=10) == 128 + signal.SIGTERM, app.log
            deadline = time.monotonic() + 2
            while running(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running(child), "a worker's child survived"
    finally:
        subprocess.run(["pkill", "-f", " ".join(child)], check=False)


def running(command: list[str]) -> int:
    """How many processes run ``command``."""
    return len(subprocess.run(["pgrep", "-f", " ".join(command)], capture_output=True).stdout.split())
