"""``python -m app_kit run --workers N`` and ``--reload``: real processes, real grpcio clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from .process import AppProcess

pytestmark = pytest.mark.anyio

APP = "tests.apps.workers_app:app"
# Fresh connections: grpcio shares one connection between channels to the same target otherwise.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def pid_method(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    return channel.unary_unary("/workers.Pids/Pid", DoubleValue.SerializeToString, Int64Value.FromString)


async def until(condition: Callable[[], bool], app: AppProcess, timeout: float = 20) -> None:
    """Wait for ``condition`` (about the process's log), failing with the log if it never holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, app.log
        await asyncio.sleep(0.05)


def workers(app: AppProcess) -> dict[int, int]:
    """Worker number by pid, from the supervisor's "started worker N (pid P)" lines."""
    return {int(pid): int(n) for n, pid in re.findall(r"started worker (\d+) \(pid (\d+)\)", app.log)}


def serving(app: AppProcess) -> set[int]:
    """The pids whose "serving" line the supervisor relayed."""
    return {int(pid) for pid in re.findall(r"\[worker \d+ pid (\d+)\] .* serving ", app.log)}


async def channels_by_pid(target: str, wanted: set[int], attempts: int = 60) -> dict[int, grpc.aio.Channel]:
    """One open channel (its own connection) to each of the ``wanted`` pids; the others are closed."""
    found: dict[int, grpc.aio.Channel] = {}
    for _ in range(attempts):
        channel = grpc.aio.insecure_channel(target, options=OWN_CONNECTION)
        pid = (await pid_method(channel)(DoubleValue(), timeout=5)).value
        if pid in wanted and pid not in found:
            found[pid] = channel
            if set(found) == wanted:
                return found
        else:
            await channel.close()
    for channel in found.values():
        await channel.close()
    raise AssertionError(f"after {attempts} connections, answers came from {sorted(found)}, not {sorted(wanted)}")


def read_events(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("sharing", ["reuse_port", "inherit"])
async def test_two_workers_serve_one_port_and_drain_on_sigterm(tmp_path: Path, sharing: str) -> None:
    events = tmp_path / "events"
    env = {"WORKERS_EVENTS": str(events), "APP_GRACE_PERIOD": "10", "APP_WORKERS_SOCKET": sharing}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        pids = set(workers(app))
        assert serving(app) == pids and app.process.pid not in pids and len(pids) == 2
        # Every worker answers on the one port, each over its own connections.
        by_pid = await channels_by_pid(f"127.0.0.1:{port}", pids)
        try:
            slow = [pid_method(channel)(DoubleValue(value=1.5), timeout=10) for channel in by_pid.values()]
            await asyncio.sleep(0.5)  # both calls are in their workers now
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            replies = await asyncio.gather(*slow)
            assert sorted(reply.value for reply in replies) == sorted(pids)  # each drained its own call
            assert await app.wait() == 0
            assert time.monotonic() - started < 10
        finally:
            for channel in by_pid.values():
                await channel.close()
        # The port closed with the last worker.
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    lines = read_events(events)
    assert sorted(lines) == sorted([f"start {pid}" for pid in pids] + [f"stop {pid}" for pid in pids]), lines
    assert "received SIGTERM: draining every worker" in app.log
    assert "Traceback" not in app.log


@pytest.mark.parametrize("sharing", ["reuse_port", "inherit"])
async def test_connections_are_refused_until_a_worker_serves(sharing: str) -> None:
    env = {"WORKERS_START_DELAY": "2", "APP_WORKERS_SOCKET": sharing}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        await until(lambda: len(workers(app)) == 2, app)
        match = re.search(r"2 workers on 127\.0\.0\.1:(\d+)", app.log)
        assert match is not None, app.log
        port = int(match.group(1))
        # The port is bound (by the supervisor, and by each worker before its resources start)
        # but nobody listens yet: refused, not queued behind a start-up.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert not serving(app)
        await until(lambda: len(serving(app)) >= 1, app)
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0


async def test_a_killed_worker_is_replaced_and_serves(tmp_path: Path) -> None:
    env = {"APP_WORKER_RESTART_DELAY": "0.2"}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        first = set(workers(app))
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await until(lambda: len(serving(app)) == 3, app)
        assert re.search(rf"worker \d \(pid {victim}\) was killed by SIGKILL; restarting it in 0\.2s", app.log)
        (replacement,) = set(workers(app)) - first
        assert workers(app)[replacement] == workers(app)[victim]  # in the dead one's place
        # The new worker and the one that lived on both answer on the port.
        survivors = {replacement, *(first - {victim})}
        for channel in (await channels_by_pid(f"127.0.0.1:{port}", survivors)).values():
            await channel.close()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0


async def test_a_worker_start_up_failure_exits_3_without_restarts() -> None:
    started = time.monotonic()
    env = {"WORKERS_FAIL": "1", "APP_LOG_FORMAT": "json"}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        assert await app.wait() == 3
    assert time.monotonic() - started < 10
    assert "failed to start: stopping every worker" in app.log
    assert len(workers(app)) == 2  # none restarted
    assert "restarting" not in app.log
    # JSON lines stay JSON; a worker's say which worker wrote them.
    entries = [json.loads(line) for line in app.lines]
    failures = [entry for entry in entries if "database unreachable" in entry["message"]]
    # (The first failure stops the other worker: it may not have got as far as failing.)
    assert failures, app.log
    assert {(entry["worker"], entry["pid"]) for entry in failures} <= {(n, pid) for pid, n in workers(app).items()}


async def test_supervisor_start_up_failures_start_no_worker() -> None:
    blocker = socket.create_server(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    try:
        async with AppProcess(APP, "--port", str(port), "--workers", "2") as app:
            assert await app.wait() == 3
        assert f"cannot listen on 127.0.0.1:{port}" in app.log and "Address already in use" in app.log
        assert not workers(app)
    finally:
        blocker.close()

    env = {"APP_WORKER_RESTART_DELAY": "-1", "APP_WORKERS": "0"}
    async with AppProcess(APP, "--port", "0", env=env) as app:
        assert await app.wait() == 3
    assert "APP_WORKERS: must be at least 1" in app.log and "APP_WORKER_RESTART_DELAY: must be positive" in app.log
    assert not workers(app)


async def test_workers_from_the_environment_on_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "app.sock"
    async with AppProcess(APP, "--path", str(path), env={"APP_WORKERS": "2"}) as app:
        await until(lambda: len(serving(app)) == 2, app)
        assert f"on unix:{path}" in app.log
        for channel in (await channels_by_pid(f"unix:{path}", set(workers(app)))).values():
            await channel.close()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    assert not path.exists()


async def test_a_second_signal_kills_every_worker() -> None:
    env = {"APP_GRACE_PERIOD": "30"}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stuck = asyncio.ensure_future(pid_method(channel)(DoubleValue(value=60), timeout=60))
            await asyncio.sleep(0.3)
            app.signal(signal.SIGTERM)
            await until(lambda: app.log.count("received SIGTERM: shutting down gracefully") == 2, app)
            app.signal(signal.SIGTERM)
            assert await app.wait(5) == 128 + signal.SIGTERM
            with pytest.raises(grpc.aio.AioRpcError):
                await stuck
    assert "was killed by SIGKILL" in app.log


async def test_reload_with_several_workers_is_a_usage_error() -> None:
    for args, env in [(["--workers", "2"], {}), ([], {"APP_WORKERS": "3"})]:
        async with AppProcess(APP, "--reload", *args, env=env) as app:
            assert await app.wait() == 2, app.log
        assert "--reload runs one process" in app.log


RELOADED_APP = """
import asyncio

from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from app_kit import App, Cardinality, Handler, Stream

VERSION = {version}
app = App(name="reloaded")


class Version:
    def __mapping__(self) -> dict[str, Handler]:
        return {{"/workers.Pids/Pid": Handler(self.version, Cardinality.UNARY_UNARY, DoubleValue, Int64Value)}}

    async def version(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        await asyncio.sleep(request.value)
        await stream.send_message(Int64Value(value=VERSION))


@app.service
def version() -> Version:
    return Version()
"""


async def test_reload_drains_the_old_process_and_serves_the_new_code(tmp_path: Path) -> None:
    module = tmp_path / "reloaded_app.py"
    module.write_text(textwrap.dedent(RELOADED_APP.format(version=1)))
    env = {"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "APP_GRACE_PERIOD": "10"}
    async with AppProcess("reloaded_app:app", "--reload", "--reload-dir", str(tmp_path), "--port", "0", env=env) as app:
        port = await app.ready()
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
            assert (await pid_method(channel)(DoubleValue(), timeout=5)).value == 1
            slow = asyncio.ensure_future(pid_method(channel)(DoubleValue(value=1.5), timeout=10))
            await asyncio.sleep(0.3)
            module.write_text(textwrap.dedent(RELOADED_APP.format(version=2)))
            assert (await slow).value == 1  # the old process drained its call
        await until(lambda: app.log.count(" serving ") == 2, app)
        assert "reloaded_app.py changed: restarting" in app.log
        assert "drained for the restart" in app.log
        async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
            assert (await pid_method(channel)(DoubleValue(), timeout=5)).value == 2  # same port, new code

        # Broken code: the reloader waits for the next change instead of exiting.
        module.write_text("raise RuntimeError('half-written')\n")
        await until(lambda: "waiting for a file to change" in app.log, app)
        module.write_text(textwrap.dedent(RELOADED_APP.format(version=3)))
        await until(lambda: app.log.count(" serving ") == 3, app)
        async with grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as channel:
            assert (await pid_method(channel)(DoubleValue(), timeout=5)).value == 3

        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
