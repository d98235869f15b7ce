"""A fresh-eyes review of ``--workers`` and ``--reload`` as an operator of a uvicorn/gunicorn
fleet would probe them: crash loops and their backoff, every stop signal with calls in flight,
a supervisor killed outright, one worker leaving, settings errors, and the relay of the
workers' output (``[worker N pid P]``, JSON lines). Real processes, real grpcio clients.

The scratch app each test runs is written under /tmp/review_workers/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from .process import ROOT, AppProcess
from .test_app_review import running
from .test_workers import OWN_CONNECTION, channels_by_pid, serving, until, workers

pytestmark = pytest.mark.anyio

SCRATCH = "/tmp/review_workers"

# Behaviours a worker (never the supervisor, which imports the App too) takes from RW_*
# variables. A worker is the command line with "--no-reload" added (workers.child_command).
APP = '''
from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator

from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from app_kit import App, Cardinality, Handler, Stream

WORKER = "--no-reload" in sys.argv

if WORKER and os.environ.get("RW_PARTIAL_LINE"):
    # A last line without its newline (a crash message, a progress bar), then the end.
    sys.stderr.write(os.environ["RW_PARTIAL_LINE"])
    sys.stderr.flush()
    os._exit(1)
if WORKER and os.environ.get("RW_LONG_JSON_LINE"):
    # One JSON log line longer than the relay reads at once (1 MiB).
    sys.stderr.write(json.dumps({"level": "INFO", "message": "x" * int(os.environ["RW_LONG_JSON_LINE"])}) + "\\n")
    sys.stderr.flush()
if WORKER and os.environ.get("RW_SURROGATE"):
    # A JSON log line as json.dumps writes a file name os.fsdecode() gave (a lone surrogate,
    # escaped), then more output than the relay buffers (asyncio pauses reading at 2 MiB).
    sys.stderr.write(json.dumps({"level": "WARNING", "message": "skipping " + os.fsdecode(b"bad\\xff.txt")}) + "\\n")
    for _ in range(int(os.environ["RW_SURROGATE"])):
        sys.stderr.write("y" * 1023 + "\\n")
    sys.stderr.flush()
if WORKER and os.environ.get("RW_DEEP_JSON"):
    # A line that begins as JSON nested deeper than json.loads recurses (a payload printed
    # as it came), then more output than the relay buffers.
    depth = int(os.environ["RW_DEEP_JSON"])
    sys.stderr.write('{"payload": ' + "[" * depth + "]" * depth + "}\\n")
    for _ in range(2500):
        sys.stderr.write("y" * 1023 + "\\n")
    sys.stderr.flush()
if WORKER and os.environ.get("RW_EXIT_AT_IMPORT"):
    os._exit(int(os.environ["RW_EXIT_AT_IMPORT"]))

app = App(name="rw")


class Pids:
    def __mapping__(self):
        return {
            "/workers.Pids/Pid": Handler(self.pid, Cardinality.UNARY_UNARY, DoubleValue, Int64Value),
            "/workers.Pids/Print": Handler(self.print, Cardinality.UNARY_UNARY, DoubleValue, Int64Value),
        }

    async def pid(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        await asyncio.sleep(request.value)
        await stream.send_message(Int64Value(value=os.getpid()))

    async def print(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        """As Pid, saying so with print() first (ordinary handler code)."""
        request = await stream.recv_message()
        await asyncio.sleep(request.value)
        print("answering", request.value)
        await stream.send_message(Int64Value(value=os.getpid()))


@app.service
def pids() -> Pids:
    return Pids()
'''


@pytest.fixture
def scratch() -> Iterator[Path]:
    os.makedirs(SCRATCH, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="workers12_", dir=SCRATCH))
    (directory / "rw12_app.py").write_text(textwrap.dedent(APP))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(scratch: Path, *args: str, env: dict[str, str] | None = None) -> AppProcess:
    environment = {"PYTHONPATH": f"{ROOT}{os.pathsep}{scratch}", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    return AppProcess("rw12_app:app", "--port", "0", *args, env=environment, cwd=str(scratch))


def method(channel: grpc.aio.Channel, name: str = "Pid") -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(f"/workers.Pids/{name}", DoubleValue.SerializeToString, Int64Value.FromString)


def supervisor_port(app: AppProcess) -> int:
    match = re.search(r"workers on 127\.0\.0\.1:(\d+)", app.log)
    assert match is not None, app.log
    return int(match.group(1))


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- restarts --------------------------------------------------------------------------------


async def test_a_worker_crashing_at_start_is_restarted_with_the_documented_backoff(scratch: Path) -> None:
    """deploy.md: "a worker that dies is restarted after APP_WORKER_RESTART_DELAY seconds,
    doubled for each death in a row up to APP_WORKER_RESTART_MAX_DELAY". A worker that dies
    (not exit 3) at every start: the delays logged double and stop at the maximum, each is
    waited, the supervisor never gives up, and a SIGTERM in the loop still exits 0."""
    # (A maximum well above a worker's start-up: one that ran longer than it would start the
    # count again, and a loaded machine can take over a second to start one.)
    env = {"RW_EXIT_AT_IMPORT": "1", "APP_WORKER_RESTART_DELAY": "0.05", "APP_WORKER_RESTART_MAX_DELAY": "3.2"}
    async with run(scratch, "--workers", "2", env=env) as app:
        restarts = r"worker 1 \(pid \d+\) exited with code 1; restarting it in ([\d.]+)s"
        await until(lambda: len(re.findall(restarts, app.log)) >= 6, app, timeout=20)
        assert re.findall(restarts, app.log)[:6] == ["0.05", "0.1", "0.2", "0.4", "0.8", "1.6"], app.log
        # Each delay was waited: a start follows its death no sooner than the delay said.
        stamps = re.findall(r"(\d\d:\d\d:\d\d,\d{3}) \S+ +app_kit\.workers: (started worker 1|worker 1 \(pid)", app.log)

        def seconds(stamp: str) -> float:
            hours, minutes, rest = stamp.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(rest.replace(",", "."))

        kinds = [(seconds(stamp), kind.startswith("started")) for stamp, kind in stamps]
        gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(kinds) if not earlier[1] and later[1]]
        for gap, delay in zip(gaps, [0.05, 0.1, 0.2, 0.4, 0.8], strict=False):
            assert gap >= delay - 0.01, (gaps, app.log)
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    assert "failed to start" not in app.log  # exit 1 is a death, not a start-up failure (exit 3)


async def test_the_logged_restart_delay_is_the_one_waited(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: The restart delay is logged with one
    decimal (%.1f): APP_WORKER_RESTART_DELAY=0.25 is logged as 'restarting it in 0.2s' while 0.25 s
    is waited."""
    env = {"RW_EXIT_AT_IMPORT": "1", "APP_WORKER_RESTART_DELAY": "0.25", "APP_WORKER_RESTART_MAX_DELAY": "10"}
    async with run(scratch, "--workers", "2", env=env) as app:
        await until(lambda: "restarting it in" in app.log, app)
        app.signal(signal.SIGTERM)
        # (0, or 1 when the other worker's own death at import crosses the signal: not the point)
        assert await app.wait() in (0, 1), app.log
    assert re.search(r"exited with code 1; restarting it in 0\.25s", app.log), app.log


async def test_one_worker_leaving_never_touches_the_others_calls_and_the_port_keeps_serving(scratch: Path) -> None:
    """A worker told to stop from outside (SIGTERM: it drains and exits 0 on its own) and a
    worker killed (SIGKILL) are both restarted in their place; the other worker's call in
    flight is unaffected, and while the dead one waits for its restart every new connection
    is served by the survivor (none refused: with SO_REUSEPORT the supervisor's socket, bound
    but not listening, takes none)."""
    env = {"APP_WORKER_RESTART_DELAY": "1", "APP_GRACE_PERIOD": "10"}
    async with run(scratch, "--workers", "2", env=env) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        first = set(workers(app))
        by_pid = await channels_by_pid(f"127.0.0.1:{port}", first)
        try:
            leaving, staying = sorted(first)
            own = asyncio.ensure_future(method(by_pid[leaving])(DoubleValue(value=1), timeout=10))
            other = asyncio.ensure_future(method(by_pid[staying])(DoubleValue(value=4), timeout=10))
            await asyncio.sleep(0.3)
            os.kill(leaving, signal.SIGTERM)
            assert (await own).value == leaving  # drained
            restarting = rf"\(pid {leaving}\) exited with code 0; restarting it in 1(\.0*)?s"
            await until(lambda: re.search(restarting, app.log) is not None, app)
            await until(lambda: len(serving(app)) == 3, app)
            (replacement,) = set(workers(app)) - first
            assert workers(app)[replacement] == workers(app)[leaving]
            os.kill(replacement, signal.SIGKILL)
            await until(lambda: f"(pid {replacement}) was killed by SIGKILL; restarting it in" in app.log, app)
            answered: list[int] = []
            for _ in range(10):  # new connections while only the survivor serves
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
                    answered.append((await method(channel)(DoubleValue(), timeout=2)).value)
            assert set(answered) == {staying}
            assert (await other).value == staying  # the survivor's call never noticed
        finally:
            for channel in by_pid.values():
                await channel.close()
        app.signal(signal.SIGTERM)  # (the killed one's place waits for its restart: still 0)
        assert await app.wait() == 0, app.log


# -- stop signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
async def test_sigint_and_sighup_drain_a_call_in_every_worker_and_exit_0(scratch: Path, signum: int) -> None:
    """README: the supervisor "stops every worker with SIGTERM on SIGTERM, SIGINT or SIGHUP and
    exits 0 once all have drained" (test_workers covers SIGTERM)."""
    async with run(scratch, "--workers", "2", env={"APP_GRACE_PERIOD": "10"}) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        pids = set(workers(app))
        by_pid = await channels_by_pid(f"127.0.0.1:{port}", pids)
        try:
            calls = [method(channel)(DoubleValue(value=1.2), timeout=10) for channel in by_pid.values()]
            await asyncio.sleep(0.3)
            app.signal(signum)
            replies = await asyncio.gather(*calls)
            assert sorted(reply.value for reply in replies) == sorted(pids)
            assert await app.wait() == 0, app.log
        finally:
            for channel in by_pid.values():
                await channel.close()
    assert f"received {signal.Signals(signum).name}: draining every worker" in app.log
    assert app.log.count("received SIGTERM: shutting down gracefully") == 2  # passed on as SIGTERM
    assert "Traceback" not in app.log


async def _one_call_each_as_the_supervisor_is_killed(
    app: AppProcess, port: int, pids: set[int], name: str, value: float
) -> list[Any]:
    """A call of ``name`` (``value`` seconds) in flight on each worker, then the supervisor
    killed (SIGKILL): each call's reply, or what it raised."""
    by_pid = await channels_by_pid(f"127.0.0.1:{port}", pids)
    try:
        calls = [method(channel, name)(DoubleValue(value=value), timeout=10) for channel in by_pid.values()]
        await asyncio.sleep(0.3)
        app.process.kill()
        return await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for channel in by_pid.values():
            await channel.close()


async def test_a_killed_supervisors_workers_finish_their_calls_in_flight(scratch: Path) -> None:
    """deploy.md: a supervisor that dies (SIGKILL, the OOM killer) "leaves no worker behind:
    each ... drains, as on SIGTERM": the calls each worker is serving are answered, then the
    workers end (test_app_review checks only that they end)."""
    async with run(scratch, "--workers", "2", env={"APP_GRACE_PERIOD": "10"}) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        pids = set(workers(app))
        try:
            replies = await _one_call_each_as_the_supervisor_is_killed(app, port, pids, "Pid", 1.2)
            assert not [reply for reply in replies if isinstance(reply, BaseException)], replies
            assert sorted(reply.value for reply in replies) == sorted(pids)
            deadline = time.monotonic() + 5
            while any(running(pid) for pid in pids) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not any(running(pid) for pid in pids)
        finally:
            kill_all(pids)


async def test_a_killed_supervisors_workers_finish_calls_whose_handlers_print(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: Once the supervisor is killed, a worker's
    stdout/stderr are pipes nobody reads: a handler that print()s during the drain raises
    BrokenPipeError and its call fails UNKNOWN (gunicorn/uvicorn workers inherit the terminal's
    stdout; the worker could point fds 1 and 2 at /dev/null when its lifeline closes)."""
    async with run(scratch, "--workers", "2", env={"APP_GRACE_PERIOD": "10"}) as app:
        port = await app.ready()
        await until(lambda: len(serving(app)) == 2, app)
        pids = set(workers(app))
        try:
            results = await _one_call_each_as_the_supervisor_is_killed(app, port, pids, "Print", 1)
            failed = [f"{exc.code().name}: {exc.details()}" for exc in results if isinstance(exc, grpc.aio.AioRpcError)]
            assert not failed, failed
        finally:
            kill_all(pids)


# -- settings --------------------------------------------------------------------------------


async def test_workers_from_an_env_file_with_a_bad_setting_exit_3_at_once_without_a_worker(scratch: Path) -> None:
    """README: --env-file loads the file before anything else; a worker's settings error would
    be a start-up failure (exit 3, no restarts). The supervisor checks the App's own settings
    class first: exit 3 at once, said as JSON when the file asks for JSON, and no worker runs."""
    for line in ("APP_GRACE_PERIOD=soon", "APP_WORKER_RESTART_MAX_DELAY=0"):
        (scratch / "bad.env").write_text(f"APP_WORKERS=2\nAPP_LOG_FORMAT=json\n{line}\n")
        started = time.monotonic()
        async with run(scratch, "--env-file", "bad.env") as app:
            assert await app.wait() == 3, app.log
        assert time.monotonic() - started < 5
        assert "started worker" not in app.log, app.log
        entries = [json.loads(text) for text in app.lines]
        assert [entry["level"] for entry in entries] == ["ERROR"], app.log
        assert line.split("=")[0] in entries[0]["message"], app.log


# -- the relay of the workers' output --------------------------------------------------------


async def a_worker_answers(app: AppProcess) -> bool:
    """Whether one of the workers answers a call on the supervisor's port within 6 s."""
    port = supervisor_port(app)
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                if (await method(channel)(DoubleValue(), timeout=1)).value in workers(app):
                    return True
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    return False


async def test_a_json_line_with_an_escaped_surrogate_does_not_stop_the_relay(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: A worker's JSON line holding an escaped
    lone surrogate (json.dumps of a name os.fsdecode gave) makes _label_json's .encode() raise
    UnicodeEncodeError: the relay task dies, nothing that worker writes is relayed again, once 2 MiB
    more are unread the worker blocks on its stderr (it never serves), and the supervisor then never
    exits (asyncio's Process.wait() waits for the pipe nobody reads): not on SIGTERM, not on a
    second one."""
    env = {"RW_SURROGATE": "2500", "APP_LOG_FORMAT": "json"}
    async with run(scratch, "--workers", "2", env=env) as app:
        await until(lambda: len(workers(app)) == 2, app)
        answered = await a_worker_answers(app)
        tail = "\n".join(line for line in app.lines if not line.startswith("[worker"))
        assert answered, f"no worker serves:\n{tail}"
        await until(lambda: app.log.count(" serving ") == 2, app, timeout=3)  # relayed: JSON lines
        app.signal(signal.SIGTERM)
        assert await app.wait(10) == 0, tail
    assert "Task exception was never retrieved" not in app.log


async def test_a_deeply_nested_json_line_does_not_stop_the_relay(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: a line that begins with '{' and nests deeper than
    json.loads recurses (RecursionError) killed the relay task: the worker then blocked on its
    unread stderr and the supervisor never exited."""
    env = {"RW_DEEP_JSON": "5000", "APP_LOG_FORMAT": "json"}
    async with run(scratch, "--workers", "2", env=env) as app:
        await until(lambda: len(workers(app)) == 2, app)
        answered = await a_worker_answers(app)
        tail = "\n".join(line for line in app.lines if not line.startswith(("[worker", "y")))
        assert answered, f"no worker serves:\n{tail}"
        await until(lambda: app.log.count(" serving ") == 2, app, timeout=3)
        app.signal(signal.SIGTERM)
        assert await app.wait(10) == 0, tail
    assert "Task exception was never retrieved" not in app.log


async def test_a_workers_last_line_without_a_newline_does_not_swallow_the_next_line(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: A worker's last line without a newline is
    relayed as it is: the next line written (here the supervisor's own JSON record of that worker's
    death) runs on after it, so it is no longer a JSON line."""
    env = {"RW_PARTIAL_LINE": "fatal: out of luck", "APP_LOG_FORMAT": "json", "APP_WORKER_RESTART_DELAY": "30"}
    async with run(scratch, "--workers", "2", env=env) as app:
        await until(lambda: app.log.count("exited with code 1; restarting") == 2, app)
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    # Every record of the supervisor's (and a relabelled worker's) is a line of its own.
    glued = [text for text in app.lines if '{"time"' in text and not text.startswith('{"time"')]
    assert not glued, app.log


async def test_a_json_log_line_over_a_mebibyte_stays_one_json_line(scratch: Path) -> None:
    """Failed at 6fb52ac, fixed since: A JSON line longer than the relay's 1 MiB
    limit is relabelled, then its newline, read apart, is relayed as a line of its own: '[worker N
    pid P] ', not JSON."""
    # (Its own process, its stderr to a file: AppProcess reads lines of 64 KiB at most.)
    log_file = scratch / "stderr.log"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{scratch}",
        "PYTHONUNBUFFERED": "1",
        "RW_LONG_JSON_LINE": str(1_100_000),
        "APP_LOG_FORMAT": "json",
    }
    with open(log_file, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "app_kit", "run", "rw12_app:app", "--port", "0", "--workers", "2"),
            cwd=str(scratch),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 15
        while log_file.read_bytes().count(b" serving ") < 2:
            assert time.monotonic() < deadline and process.returncode is None, log_file.read_text()[-2000:]
            await asyncio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    not_json = []
    for text in log_file.read_text().splitlines():
        try:
            json.loads(text)
        except ValueError:
            not_json.append(text[:80])
    assert not not_json, not_json
