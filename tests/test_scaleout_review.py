"""A fresh-eyes review of running an App as a uvicorn/grpcio user shipping to Kubernetes would:
``--workers``, ``--reload``, logging, settings and signals, over real processes and sockets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, StringValue

from .process import ROOT, AppProcess
from .test_workers import channels_by_pid, pid_method, serving, until, workers

WORKERS_APP = "tests.apps.workers_app:app"
APP = "tests.apps.scaleout_review_app:app"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_socket(path: Path, app: AppProcess) -> None:
    await until(lambda: path.exists() or app.process.returncode is not None, app, timeout=10)
    assert path.exists(), app.log


# -- workers ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_worker_signalled_with_its_supervisor_still_drains() -> None:
    """systemd's default ``KillMode=control-group`` (and ``kill`` of every pid of the service)
    sends SIGTERM to every process of the service, the workers too. Each worker then gets one
    SIGTERM from outside and one passed on by the supervisor: the second is taken as "exit at
    once", so its calls are cut, its resources never close and the supervisor exits 143 — for
    a single, ordinary SIGTERM."""
    env = {"APP_GRACE_PERIOD": "10"}
    async with AppProcess(WORKERS_APP, "--port", "0", "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        pids = set(workers(app))
        by_pid = await channels_by_pid(f"127.0.0.1:{port}", pids)
        try:
            victim = min(pids)
            call = asyncio.ensure_future(pid_method(by_pid[victim])(DoubleValue(value=1.5), timeout=10))
            await asyncio.sleep(0.3)  # the call is in the worker now
            os.kill(victim, signal.SIGTERM)  # the service manager's SIGTERM reaches the worker...
            draining = rf"pid {victim}\] .*received SIGTERM: shutting down"
            await until(lambda: re.search(draining, app.log) is not None, app)
            app.signal(signal.SIGTERM)  # ...and the supervisor's, which passes it on
            try:
                reply = await call
            except grpc.aio.AioRpcError as exc:
                pytest.fail(f"the call was cut ({exc.code().name}):\n{app.log}")
            assert reply.value == victim
            assert await app.wait() == 0, app.log
        finally:
            for channel in by_pid.values():
                await channel.close()
    assert "exiting now" not in app.log


@pytest.mark.anyio
async def test_a_worker_log_handler_on_stdout_still_says_which_worker_wrote(tmp_path: Path) -> None:
    """README: "Each worker's log lines are relayed with ``[worker N pid P]`` in front", and a
    logging configuration the module makes at import is kept. Many such configurations log to
    stdout (uvicorn's own default does, for its access log; so do most container setups): the
    workers' stdout is not relayed but inherited, so their lines come out unlabelled and two
    workers cannot be told apart."""
    sock = tmp_path / "app.sock"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SCALEOUT_USER_LOG": "stdout"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app_kit",
        "run",
        APP,
        "--path",
        str(sock),
        "--workers",
        "2",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 15
        while sum(" serving " in line for line in lines) < 2:
            line = await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - time.monotonic()))
            assert line, "\n".join(lines)
            lines.append(line.decode().rstrip())
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 15)
        lines.extend(rest.decode().splitlines())
        assert process.returncode == 0, "\n".join(lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    served = [line for line in lines if " serving " in line]
    assert len(served) == 2 and all(re.match(r"\[worker \d pid \d+\] ", line) for line in served), "\n".join(lines)


@pytest.mark.anyio
async def test_ctrl_c_while_the_workers_import_the_app_stops_without_tracebacks() -> None:
    """A Ctrl-C soon after starting (the workers still importing a large app): the supervisor
    passes SIGINT on, the workers have no handler yet, and each prints a KeyboardInterrupt
    traceback. uvicorn's supervisor stops its workers with SIGTERM; the single-process server
    would need a Ctrl-C during its own import for that."""
    env = {"SCALEOUT_IMPORT_DELAY": "1"}
    async with AppProcess(APP, "--port", "0", "--workers", "2", env=env) as app:
        await until(lambda: len(workers(app)) == 2, app)
        await asyncio.sleep(0.2)  # the workers are importing the app
        app.signal(signal.SIGINT)
        assert await app.wait() == 0, app.log
    assert "Traceback" not in app.log and "KeyboardInterrupt" not in app.log, app.log


# -- reload ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_reload_serves_on_the_settings_subclass_default_port(tmp_path: Path) -> None:
    """``class Settings(AppSettings): port: int = 8080`` serves on 8080, but under ``--reload``
    the reloader reads plain ``AppSettings`` (it never imports the App), binds their default
    50051 and passes ``--port 50051`` to the App, overriding the user's default."""
    port = free_port()
    env = {"SCALEOUT_DEFAULT_PORT": str(port)}
    async with AppProcess(APP, env=env) as app:  # without --reload: the subclass's default
        assert await app.ready() == port, app.log
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    async with AppProcess(APP, "--reload", "--reload-dir", str(tmp_path), env=env) as app:
        served = await app.ready()
        app.signal(signal.SIGTERM)
        await app.wait()
        assert served == port, app.log


# -- logging ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_log_level_leaves_the_users_own_loggers_alone(tmp_path: Path) -> None:
    """README: "``--log-level``/``--debug`` set app_kit's own loggers only". ``--log-level ERROR``
    (to quiet app_kit) also raises the root logger to ERROR, so the app's own warnings vanish."""
    sock = tmp_path / "app.sock"
    async with AppProcess(APP, "--path", str(sock), "--log-level", "ERROR") as app:
        await wait_for_socket(sock, app)
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            say = channel.unary_unary("/scaleout.Probe/Log", StringValue.SerializeToString, StringValue.FromString)
            assert (await say(StringValue(value="disk almost full"), timeout=5, wait_for_ready=True)).value
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    assert "serving" not in app.log  # app_kit's INFO lines are quiet, as asked
    assert "user says disk almost full" in app.log, app.log


# -- start-up failures --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_missing_tls_file_is_named_and_fails_before_any_resource_starts(tmp_path: Path) -> None:
    """A wrong Secret mount path: ``APP_TLS_CERT_FILE`` names no file. Start-up fails (exit 3),
    but only after every resource started (the database pool opened and closed for nothing),
    and the one line says "cannot listen: FileNotFoundError: [Errno 2] No such file or
    directory" — not which file, nor that it is a TLS setting."""
    events = tmp_path / "events"
    env = {
        "APP_TLS_CERT_FILE": str(tmp_path / "tls.crt"),
        "APP_TLS_KEY_FILE": str(tmp_path / "tls.key"),
        "SCALEOUT_EVENTS": str(events),
    }
    async with AppProcess(APP, "--port", "0", env=env) as app:
        assert await app.wait() == 3, app.log
    assert "tls.crt" in app.log or "tls_cert_file" in app.log, app.log
    assert not events.exists(), f"resources started: {events.read_text()!r}\n{app.log}"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("import os\nDATABASE_URL = os.environ['SCALEOUT_MISSING_DATABASE_URL']\n", id="key-error"),
        pytest.param("app = (\n", id="syntax-error"),
    ],
)
def test_an_app_module_that_fails_to_import_exits_3(tmp_path: Path, body: str) -> None:
    """README: "Exit codes: 0 after a clean shutdown, 3 when start-up failed". A module that
    cannot be imported for a missing dependency exits 3, but one that raises while importing (a
    missing environment variable read at import, a syntax error) exits 1, a code the README does
    not list."""
    (tmp_path / "broken_app.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", "broken_app:app", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 3, result.stderr
