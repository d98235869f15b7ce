"""A second adversarial review of the App layer (lifecycle, CLI, settings, workers, reload,
metrics), probed as a uvicorn user would: real processes, real grpcio clients, real sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import textwrap
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.settings
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit import App, AppSettings
from app_kit.app.lifecycle import StartupError
from app_kit.app.settings import SettingsError, load_settings
from app_kit.rpc.framing import frame_message
from examples.interop.messages_pb2 import ResponseParameters, StreamingOutputCallRequest
from examples.interop.server import TestService

from .process import AppProcess
from .test_workers import OWN_CONNECTION, RELOADED_APP, pid_method, until

WORKERS_APP = "tests.apps.workers_app:app"
REVIEW_APP = "tests.apps.review_app:app"


def serving_workers(app: AppProcess) -> set[int]:
    return {int(pid) for pid in re.findall(r"\[worker \d+ pid (\d+)\] .* serving ", app.log)}


def started_children(app: AppProcess) -> set[int]:
    """Pids of every child the supervisor or the reloader started."""
    return {int(pid) for pid in re.findall(r"started (?:worker \d+|the app) \(pid (\d+)\)", app.log)}


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- supervisor and reloader ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["workers", "reload"])
async def test_children_do_not_outlive_a_killed_supervisor(mode: str, tmp_path: Path) -> None:
    """A supervisor (or reloader) that dies without passing a signal on (SIGKILL, the OOM
    killer, a crash) must not leave its children serving the port: they are in process groups
    of their own, so nothing else stops them, and with SO_REUSEPORT a supervisor started again
    would share the port with the orphans' old code."""
    args = ["--workers", "2"] if mode == "workers" else ["--reload", "--reload-dir", str(tmp_path)]
    async with AppProcess(WORKERS_APP, "--port", "0", *args) as app:
        port = await app.ready()
        wanted = 2 if mode == "workers" else 1
        await until(lambda: app.log.count(" serving ") >= wanted, app)
        children = started_children(app)
        assert len(children) == wanted, app.log
        app.process.kill()
        await app.process.wait()
        try:
            deadline = time.monotonic() + 3
            while any(running(pid) for pid in children) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            orphans = sorted(pid for pid in children if running(pid))
            still_served = True
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                still_served = False
            assert not orphans, f"3 s after the supervisor died, {orphans} still run (port served: {still_served})"
        finally:
            for pid in children:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.anyio
async def test_a_sigterm_during_a_workers_restart_delay_still_exits_0() -> None:
    """README: the supervisor "passes SIGTERM/SIGINT to every worker and exits 0 once all have
    drained". A worker that died earlier and waits for its restart must not turn that clean
    shutdown into the exit code of its old death (137 for a SIGKILL)."""
    env = {"APP_WORKER_RESTART_DELAY": "5"}
    async with AppProcess(WORKERS_APP, "--port", "0", "--workers", "2", env=env) as app:
        await app.ready()
        await until(lambda: len(serving_workers(app)) == 2, app)
        victim = min(serving_workers(app))
        os.kill(victim, signal.SIGKILL)
        await until(lambda: "restarting it in 5s" in app.log, app)
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log


@pytest.mark.anyio
async def test_app_metrics_port_with_workers_does_not_fail_start_up() -> None:
    """APP_METRICS_PORT and --workers are both documented, with no word against using them
    together; today every worker binds the same metrics port, the second fails start-up and the
    supervisor stops everything with exit 3. Acceptable: the workers serve (metrics reachable),
    or the supervisor refuses the combination at once, naming it, before starting any worker."""
    metrics_port = free_port()
    env = {"APP_METRICS_PORT": str(metrics_port)}
    async with AppProcess(WORKERS_APP, "--port", "0", "--workers", "2", env=env) as app:
        await until(lambda: app.process.returncode is not None or len(serving_workers(app)) == 2, app)
        if app.process.returncode is not None:
            # Refused up front: no worker started, and the message says why.
            assert "started worker" not in app.log, f"workers started, then failed on the shared port:\n{app.log}"
            assert "APP_METRICS_PORT" in app.log or "metrics_port" in app.log, app.log
            return
        await asyncio.sleep(0.5)  # a worker that fails late would exit by now
        assert app.process.returncode is None, app.log
        socket.create_connection(("127.0.0.1", metrics_port), timeout=1).close()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log


@pytest.mark.anyio
async def test_one_ctrl_c_during_a_reloads_drain_does_not_force_the_exit(tmp_path: Path) -> None:
    """A file changed: the reloader sent the app SIGTERM and it drains a call. One Ctrl-C to the
    reloader then must let that drain finish (a graceful stop), not send the app a second signal
    that kills it at once (its calls cut, its resources not closed, exit 130)."""
    module = tmp_path / "review_reloaded.py"
    module.write_text(textwrap.dedent(RELOADED_APP.format(version=1)))
    env = {"PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1", "APP_GRACE_PERIOD": "10"}
    args = ["--reload", "--reload-dir", str(tmp_path), "--port", "0"]
    async with AppProcess("review_reloaded:app", *args, env=env) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            slow = asyncio.ensure_future(pid_method(channel)(DoubleValue(value=1.5), timeout=10))
            await asyncio.sleep(0.3)
            module.write_text(textwrap.dedent(RELOADED_APP.format(version=2)))
            await until(lambda: "received SIGTERM: shutting down gracefully" in app.log, app)
            app.signal(signal.SIGINT)
            assert (await slow).value == 1, app.log  # drained, not cut
        assert await app.wait() == 0, app.log
    assert "exiting now" not in app.log


# -- lifecycle -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_teardown_awaiting_its_cancelled_task_is_logged_and_the_exit_is_clean(tmp_path: Path) -> None:
    """``task.cancel(); await task`` in a resource's teardown re-raises CancelledError: the
    most common asyncio teardown. README: "a resource that raises while exiting is logged and
    the others still exit" and, after a SIGTERM, "the process exits 0"; today the
    CancelledError escapes the guard (it catches Exception only) and the process dies with an
    unhandled-exception traceback, exit code 1."""
    events = tmp_path / "events"
    env = {"REVIEW_EVENTS": str(events), "REVIEW_TEARDOWN": "cancelled-task"}
    async with AppProcess(REVIEW_APP, "--port", "0", env=env) as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        code = await app.wait()
    assert events.read_text().splitlines() == ["enter journal", "enter poller", "exit poller", "exit journal"]
    assert code == 0, app.log


@pytest.mark.anyio
async def test_a_metrics_port_in_use_leaves_no_grpc_server_behind(tmp_path: Path) -> None:
    """The metrics endpoint starts after the gRPC server; when its port is taken, start-up
    fails (StartupError) and everything started must be stopped. Today the server's drain is
    pushed on the exit stack only after the metrics endpoint: the gRPC server keeps listening
    (on a Unix socket: its file stays, and calls are served by services whose resources are
    already closed)."""
    app: App[AppSettings] = App(AppSettings, name="review")
    app.service(lambda: TestService())
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        path = str(tmp_path / "grpc.sock")
        settings = AppSettings(path=path, metrics_port=blocker.getsockname()[1])
        with pytest.raises(StartupError, match="cannot serve metrics"):
            async with app.serve(settings):
                pass
    await asyncio.sleep(0.1)
    connected = True
    try:
        _, writer = await asyncio.open_unix_connection(path)
        writer.close()
    except OSError:
        connected = False
    assert not connected, "the gRPC server still accepts connections after its start-up failed"
    assert not os.path.exists(path)


def _stalled_stream_request(port: int) -> socket.socket:
    """A client asking for 50 MiB in one server stream, with HTTP/2 windows wide open, that
    never reads its socket: the server's writes back up at the TCP level."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    connection.initiate_connection()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    connection.increment_flow_control_window(2**30)
    request = StreamingOutputCallRequest(response_parameters=[ResponseParameters(size=1 << 20)] * 50)
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/grpc.testing.TestService/StreamingOutputCall"),
        (b":authority", b"review"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    connection.send_headers(1, headers)
    connection.send_data(1, frame_message(request.SerializeToString()), end_stream=True)
    sock.sendall(connection.data_to_send())
    return sock


@pytest.mark.anyio
async def test_a_client_that_never_reads_does_not_stretch_the_shutdown_past_its_grace() -> None:
    """Pins what works: a handler blocked on a client that reads nothing is cut at the grace
    period, and the connection is aborted after the linger time, so the process still exits
    within grace + linger (not when the client decides to read)."""
    async with AppProcess(REVIEW_APP, "--port", "0", env={"APP_GRACE_PERIOD": "0.5"}) as app:
        port = await app.ready()
        sock = _stalled_stream_request(port)
        try:
            await asyncio.sleep(0.5)  # the server's writes are backed up by now
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            assert await app.wait(10) == 0, app.log
            assert time.monotonic() - started < 0.5 + 1 + 1.5, app.log
        finally:
            sock.close()


# -- settings --------------------------------------------------------------------------------

DURATIONS = [
    "APP_GRACE_PERIOD",
    "APP_DRAIN_DELAY",
    "APP_HEALTH_CHECK_TTL",
    "APP_HEALTH_CHECK_TIMEOUT",
    "APP_WORKER_RESTART_DELAY",
    "APP_WORKER_RESTART_MAX_DELAY",
]


def test_nan_durations_are_invalid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """``nan`` passes "cannot be negative" and "must be positive" (every comparison with NaN is
    false). APP_DRAIN_DELAY=nan starts fine, then the first SIGTERM crashes the drain before the
    server is closed (anyio.sleep raises ValueError): calls are not drained, exit code 1."""
    accepted = []
    for name in DURATIONS:
        monkeypatch.setenv(name, "nan")
        try:
            load_settings(AppSettings)
        except SettingsError:
            pass
        else:
            accepted.append(name)
        monkeypatch.delenv(name)
    assert not accepted, f"accepted as nan: {accepted}"


def test_an_empty_app_path_is_unset_or_an_invalid_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """``APP_PATH=`` (an empty value, as compose files and .env templates leave it) is taken as
    a Unix socket at ""; start-up then fails after every resource started with
    "cannot listen: IndexError: index out of range". Either it means unset (TCP), or it is
    reported as a bad setting naming the field."""
    monkeypatch.setenv("APP_PATH", "")
    try:
        settings = load_settings(AppSettings)
    except SettingsError as exc:
        assert "APP_PATH" in str(exc)
    else:
        assert settings.path is None, f"APP_PATH= gave path={settings.path!r}"


LIMITS = [
    "APP_MAX_RECEIVE_MESSAGE_LENGTH",
    "APP_MAX_SEND_MESSAGE_LENGTH",
    "APP_MAX_CONNECTION_RECEIVE_BUFFER",
    "APP_MAX_CONNECTION_INFLATED_BYTES",
]


def test_server_limits_are_checked_with_the_other_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "Invalid settings are listed field by field, exit code 3". A limit of 0 passes
    the settings and fails only when the Server is built, after every resource has started (a
    database pool opened and closed for nothing), as "cannot serve the services: ..."."""
    accepted = []
    for name in LIMITS:
        monkeypatch.setenv(name, "0")
        try:
            load_settings(AppSettings)
        except SettingsError as exc:
            assert name in str(exc)
        else:
            accepted.append(name)
        monkeypatch.delenv(name)
    assert not accepted, f"accepted as 0: {accepted}"
