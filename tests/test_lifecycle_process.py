"""``python -m app_kit run`` as a real process, driven by signals and grpcio clients."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time

import grpc
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .h2client import RawClient
from .process import AppProcess

pytestmark = pytest.mark.anyio

APP = "tests.apps.lifecycle_app:app"


def sleeper(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    return channel.unary_unary("/test.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)


@pytest.fixture
def events_file():  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as directory:
        yield os.path.join(directory, "events")


def read_events(path: str) -> list[str]:
    with open(path) as file:
        return file.read().splitlines()


async def test_sigterm_drains_in_flight_calls_and_unwinds_in_reverse(events_file: str) -> None:
    env = {"LIFECYCLE_EVENTS": events_file, "APP_GRACE_PERIOD": "5"}
    async with AppProcess(APP, "--port", "0", env=env) as app:
        port = await app.ready()
        target = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(target) as channel, grpc.aio.insecure_channel(target) as watcher:
            health = health_pb2_grpc.HealthStub(channel)
            assert (
                await health.Check(health_pb2.HealthCheckRequest())
            ).status == health_pb2.HealthCheckResponse.SERVING
            watch = health_pb2_grpc.HealthStub(watcher).Watch(health_pb2.HealthCheckRequest(service="test.Sleeper"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            calls = [sleeper(channel)(DoubleValue(value=1.0)) for _ in range(20)]
            await asyncio.sleep(0.3)  # all twenty are in the server now
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            # A call started on the existing connection in the moment of the SIGTERM.
            late = sleeper(channel)(DoubleValue(value=0.2))

            assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            replies = await asyncio.gather(*calls, late)
            assert [r.value for r in replies] == [1.0] * 20 + [0.2]

            # New connections are refused at once (the listener closed with the signal).
            with pytest.raises(OSError):
                await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
            assert await app.wait() == 0
            assert time.monotonic() - started < 5 + 1
    assert read_events(events_file) == [
        "enter journal",
        "enter database",
        "enter cache",
        "exit cache",
        "exit database",
        "exit journal",
    ]
    assert "received SIGTERM" in app.log and "Traceback" not in app.log


async def test_goaway_frames_on_the_wire() -> None:
    async with AppProcess(APP, "--port", "0") as app:
        port = await app.ready()
        async with RawClient("127.0.0.1", port) as client:
            stream_id = await client.request("/test.Sleeper/Sleep", DoubleValue(value=0.5).SerializeToString())
            await asyncio.sleep(0.2)
            app.signal(signal.SIGTERM)
            response = await client.read_response(stream_id)
            assert response.grpc_status == 0
            await client.wait_for(lambda: client.closed.is_set())
        goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        assert [(g.last_stream_id, g.error_code) for g in goaways] == [(2**31 - 1, 0), (stream_id, 0)]
        assert any(isinstance(e, h2.events.PingReceived) for e in client.events)
        assert await app.wait() == 0


async def test_call_longer_than_grace_gets_unavailable() -> None:
    async with AppProcess(APP, "--port", "0", env={"APP_GRACE_PERIOD": "0.5"}) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = sleeper(channel)(DoubleValue(value=30))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert await app.wait() == 0
            assert time.monotonic() - started < 0.5 + 1


async def test_second_signal_exits_at_once() -> None:
    async with AppProcess(APP, "--port", "0", env={"APP_GRACE_PERIOD": "30"}) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = sleeper(channel)(DoubleValue(value=30))
            await asyncio.sleep(0.3)
            app.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            app.signal(signal.SIGINT)
            assert await app.wait(5) == 128 + signal.SIGINT
            assert time.monotonic() - started < 2
            call.cancel()


async def test_second_signal_cancels_the_handlers_before_the_resources_close(events_file: str) -> None:
    # The forced exit cut the drain short and closed the resources while handlers still ran
    # (a handler in the middle of a query met a closed pool); they were cancelled only after.
    env = {"APP_GRACE_PERIOD": "30", "LIFECYCLE_EVENTS": events_file}
    async with AppProcess(APP, "--port", "0", env=env) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = channel.unary_unary(
                "/test.Sleeper/Watch",
                request_serializer=DoubleValue.SerializeToString,
                response_deserializer=DoubleValue.FromString,
            )
            call = watch(DoubleValue(value=30))
            await asyncio.sleep(0.3)
            app.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            assert await app.wait(5) == 128 + signal.SIGTERM
            assert time.monotonic() - started < 2
            call.cancel()
    events = read_events(events_file)
    assert "watch cancelled" in events, events
    assert events.index("watch cancelled") < events.index("exit cache"), events
    assert events[-1] == "exit journal"


async def test_failing_resource_unwinds_and_exits_3(events_file: str) -> None:
    env = {"LIFECYCLE_EVENTS": events_file, "LIFECYCLE_FAIL": "cache"}
    async with AppProcess(APP, "--port", "0", env=env) as app:
        assert await app.wait() == 3
    assert read_events(events_file) == ["enter journal", "enter database", "exit database", "exit journal"]
    errors = [line for line in app.lines if "ERROR" in line]
    assert len(errors) == 1, app.log
    assert "resource cache failed to start: ConnectionRefusedError: cache server unreachable" in errors[0]
    assert "Traceback" not in app.log
    async with AppProcess(APP, "--port", "0", "--debug", env=env) as app:
        assert await app.wait() == 3
    assert "Traceback" in app.log  # --debug shows the whole story


async def test_failing_teardown_is_logged_and_the_rest_still_run(events_file: str) -> None:
    env = {"LIFECYCLE_EVENTS": events_file, "LIFECYCLE_FAIL": "cache-exit"}
    async with AppProcess(APP, "--port", "0", env=env) as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    assert read_events(events_file)[-3:] == ["exit cache", "exit database", "exit journal"]
    assert "resource cache failed to shut down" in app.log


async def test_bad_settings_and_overrides() -> None:
    env = {"APP_PORT": "not-a-port", "APP_GRACE_PERIOD": "soon"}
    async with AppProcess(APP, env=env) as app:
        assert await app.wait() == 3
    assert "invalid settings" in app.log and "APP_PORT" in app.log and "APP_GRACE_PERIOD" in app.log
    assert "Traceback" not in app.log

    async with AppProcess(APP, "--port", "0", env={"APP_PORT": "1"}) as app:  # --port wins over APP_PORT
        assert await app.ready() > 1
        app.signal(signal.SIGINT)
        assert await app.wait() == 0

    async with AppProcess("tests.apps.lifecycle_app:create_app()", "--port", "0") as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0

    for target, message in [
        ("tests.apps.lifecycle_app:nope", "has no attribute"),
        ("tests.apps.lifecycle_app:__import__('os')", "invalid target"),
        ("tests.apps.no_such_module:app", "cannot import"),
        ("tests.apps.lifecycle_app:Journal", "not an app_kit.App"),
    ]:
        async with AppProcess(target) as app:
            assert await app.wait() == 3, target
        assert message in app.log, (target, app.log)


async def test_port_in_use_is_a_startup_failure(events_file: str) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        async with AppProcess(APP, "--port", str(port), env={"LIFECYCLE_EVENTS": events_file}) as app:
            assert await app.wait() == 3
        assert f"cannot listen on 127.0.0.1:{port}: OSError" in app.log, app.log  # (which address: it says)
        # The port is bound before the first resource starts: none started.
        assert not os.path.exists(events_file)
    finally:
        blocker.close()


async def test_cafe_app_process_serves_and_reflects() -> None:
    with tempfile.TemporaryDirectory() as directory:
        env = {"CAFE_DB_PATH": os.path.join(directory, "orders.sqlite3"), "CAFE_BREW_STEP": "0"}
        async with AppProcess("examples.cafe.app:app", "--port", "0", env=env) as app:
            port = await app.ready()
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                check = await health.Check(health_pb2.HealthCheckRequest(service="cafe.CoffeeMachine"))
                assert check.status == health_pb2.HealthCheckResponse.SERVING
            app.signal(signal.SIGTERM)
            assert await app.wait() == 0
        assert "order store closed" in app.log


async def test_env_file_sets_the_environment_as_uvicorn_does(tmp_path, events_file: str) -> None:  # type: ignore[no-untyped-def]
    # --env-file fed the settings only: code reading os.environ (at import, in a resource)
    # did not see the file's variables, where uvicorn's --env-file sets the environment.
    # Variables already set still win over the file, as they do for the settings.
    env_file = tmp_path / "app.env"
    env_file.write_text(f"LIFECYCLE_EVENTS={events_file}\nLIFECYCLE_PROBE='from the file'\n")
    async with AppProcess(APP, "--port", "0", "--env-file", str(env_file)) as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    assert read_events(events_file)[0] == "probe at import from the file, at start from the file"
    os.unlink(events_file)
    async with AppProcess(APP, "--port", "0", "--env-file", str(env_file), env={"LIFECYCLE_PROBE": "set"}) as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    assert read_events(events_file)[0] == "probe at import set, at start set"


async def test_env_file_and_help(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env_file = tmp_path / "settings.env"
    env_file.write_text("APP_GRACE_PERIOD=soon\nAPP_LOG_LEVEL=INFO\n")
    async with AppProcess(APP, "--port", "0", "--env-file", str(env_file)) as app:
        assert await app.wait() == 3
    assert "APP_GRACE_PERIOD" in app.log  # read from the file, and reported per variable

    env_file.write_text("APP_PORT=1\n")  # the command line still wins
    async with AppProcess(APP, "--port", "0", "--env-file", str(env_file)) as app:
        assert await app.ready() > 1
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0

    import subprocess
    import sys

    from .process import ROOT

    for args in (["--help"], ["run", "--help"]):
        shown = subprocess.run(
            [sys.executable, "-m", "app_kit", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
        assert shown.returncode == 0
        assert ("run" in shown.stdout) and ("module:app" in shown.stdout or "COMMAND" in shown.stdout)
    shown = subprocess.run([sys.executable, "-m", "app_kit", "run", "--help"], capture_output=True, text=True, cwd=ROOT)
    for option in ("--host", "--port", "--path", "--env-file", "--log-level", "--debug", "128+N"):
        assert option in shown.stdout, option


async def test_version_and_the_console_script() -> None:
    import shutil
    import subprocess
    import sys
    import sysconfig

    from app_kit import __version__

    out = subprocess.run([sys.executable, "-m", "app_kit", "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"app_kit {__version__}"
    # Installed beside this interpreter's scripts (where pip puts console scripts).
    script = os.path.join(sysconfig.get_path("scripts"), "app_kit")
    if not os.path.exists(script):  # some distributions' pip writes scripts elsewhere on PATH
        script = shutil.which("app_kit") or script
    assert os.path.exists(script), "the app_kit console script is installed with the package"
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"app_kit {__version__}"
