"""A fresh-eyes review of session 11's changes, over real sockets and real processes:

- 090d39e: a connection that ends with an error ends its server calls at once;
- a620688: a call reset by its client once its deadline passed is recorded DEADLINE_EXCEEDED;
- b357e1c: a forced exit (second signal) cuts the grace period short (Server.close(grace=0))
  and lets the handlers unwind (Server.wait_calls_done(), up to 1 s) before the resources close;
- 9034ea4, 5b0609b: --env-file loaded into the environment, settings errors naming the variable;
- 9a1f473: the metrics endpoint's write_timeout and max_connections;
- e99acc2: a missing module the app imports shows its traceback.

Tests marked ``backends`` run on asyncio and on trio (tests/conftest.py). The app these
processes run is tests/apps/session11_app.py (its handlers use anyio, so it runs on both).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue
from hyperframe.frame import Frame, HeadersFrame
from prometheus_client import CollectorRegistry

from app_kit import Cardinality, Configuration, Handler, Server, ServerInterceptor, Status, Stream
from app_kit.app.settings import AppSettings, SettingsError, load_settings
from app_kit.observe.prometheus import serve_metrics

from .frames import DATA, END_HEADERS, END_STREAM, HEADERS, PREFACE, RST_STREAM, SETTINGS, frame, request_block
from .process import ROOT, AppProcess, run_app_cli

APP = "tests.apps.session11_app:app"
_CANCEL = 0x8


# -- helpers --------------------------------------------------------------------------------


def _events(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return file.read().splitlines()


async def _until(condition: Callable[[], bool], timeout: float = 5) -> None:
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


def _wait_method(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary("/s11.Slow/Wait", DoubleValue.SerializeToString, DoubleValue.FromString)


async def _forced_exit(
    events: str, loop: str, env: dict[str, str], *signals: float
) -> tuple[int, grpc.StatusCode | None, str | None]:
    """Run the app on ``loop``, start a 30 s call, then send SIGTERM after each delay in
    ``signals`` (seconds after the one before); returns (exit code, the call's code and details)."""
    async with AppProcess(APP, "--port", "0", "--loop", loop, env={"S11_EVENTS": events, **env}) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = _wait_method(channel)(DoubleValue(value=30))
            await _until(lambda: "waiting" in _events(events))
            for delay in signals:
                await anyio.sleep(delay)
                app.signal(signal.SIGTERM)
            code = await app.wait(5)
            try:
                await call
            except grpc.aio.AioRpcError as error:
                return code, error.code(), error.details()
            return code, None, None


class _Slow:
    """``/s11.Slow/Wait`` sleeps for the request's seconds (anyio: either loop) and answers;
    ``/s11.Slow/Answer`` answers at once, then blocks the loop for 0.3 s (its deadline passes,
    the client's reset arrives meanwhile) and waits 0.5 s more (clean-up after answering)."""

    def __init__(self) -> None:
        self.started = 0
        self.ended: BaseException | None = None

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/s11.Slow/Wait": Handler(self.wait, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
            "/s11.Slow/Answer": Handler(self.answer, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
        }

    async def wait(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.started += 1
        try:
            await anyio.sleep(request.value)
            await stream.send_message(request)
        except BaseException as exc:
            self.ended = exc
            raise

    async def answer(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(request)
        await stream.send_trailing_metadata()
        time.sleep(0.3)
        await anyio.sleep(0.5)


class _Ends(ServerInterceptor):
    """The status each call ended with, as on_call_end (access log, metrics) sees it."""

    def __init__(self) -> None:
        self.statuses: list[Status | None] = []

    def on_call_end(self, call: Stream[object, object]) -> None:
        self.statuses.append(call.status)


def _request(path: str, value: float, *, window: int | None = None, timeout: str | None = None) -> bytes:
    """A client's first bytes: preface, SETTINGS (``window``: its initial stream window), the
    request's HEADERS and its one message (the stream left open when there is a timeout, as
    grpc-go leaves a call it has not half-closed yet)."""
    settings = struct.pack(">HI", 0x4, window) if window is not None else b""
    body = DoubleValue(value=value).SerializeToString()
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    extra = [("grpc-timeout", timeout)] if timeout is not None else None
    return (
        PREFACE
        + frame(SETTINGS, 0, 0, settings)
        + frame(HEADERS, END_HEADERS, 1, request_block(hpack.Encoder(), path, extra))
        + frame(DATA, 0 if timeout is not None else END_STREAM, 1, message)
    )


def _grpc_statuses(data: bytes) -> dict[int, bytes]:
    """The grpc-status each stream was ended with in ``data`` (frames the server sent)."""
    decoder, statuses, position = hpack.Decoder(), {}, 0
    while len(data) - position >= 9:
        parsed, length = Frame.parse_frame_header(memoryview(data[position : position + 9]))
        if len(data) - position < 9 + length:
            break
        parsed.parse_body(memoryview(data[position + 9 : position + 9 + length]))
        position += 9 + length
        if isinstance(parsed, HeadersFrame):
            for name, value in decoder.decode(parsed.data, raw=True):
                if name == b"grpc-status":
                    statuses[parsed.stream_id] = value
    return statuses


def _received(sock: socket.socket) -> bytes:
    """What the server has sent so far (without waiting for more)."""
    sock.setblocking(False)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except (BlockingIOError, ConnectionError):
        pass
    sock.setblocking(True)
    return data


# -- b357e1c: a forced exit -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_a_forced_exit_during_the_drain_delay_lets_the_handlers_unwind_before_the_resources_close(
    tmp_path: Any, loop: str
) -> None:
    # Failed before its fix: A second signal during the drain delay (the server still serves then) cancels
    # _drain in its anyio.sleep, before server.close: the except clause that b357e1c added
    # around wait_closed() is never reached. _close_unless_drained then runs close(grace=0)
    # and awaits wait_closed() in the cancelled scope (cancelled at once), and the resources
    # close under the handlers still running: the handler's clean-up meets a closed cache
    # (asyncio: the process exits before it is done; trio: it ends after "exit journal").
    events = str(tmp_path / "events")
    code, status, _ = await _forced_exit(events, loop, {"APP_DRAIN_DELAY": "10"}, 0.1, 0.3)
    assert code == 128 + signal.SIGTERM
    assert status is grpc.StatusCode.UNAVAILABLE
    journal = _events(events)
    assert "unwound" in journal and journal.index("unwound") < journal.index("exit cache"), journal


@pytest.mark.anyio
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_a_third_signal_while_the_handlers_unwind_does_not_cut_the_exit_short(tmp_path: Any, loop: str) -> None:
    # Failed before its fix: once the second signal had forced the exit, the signal listener
    # was cancelled with the rest and put back the default handlers, while the exit still
    # waited (up to 1 s) for the handlers to unwind. A third SIGTERM then (an impatient
    # operator, a script repeating its kill) killed the process by the default action: no
    # resource closed, no on_call_end. Now it is logged and changes nothing.
    events = str(tmp_path / "events")
    code, status, _ = await _forced_exit(events, loop, {"APP_GRACE_PERIOD": "30"}, 0.1, 0.2, 0.1)
    assert code == 128 + signal.SIGTERM, code
    assert status is grpc.StatusCode.UNAVAILABLE
    journal = _events(events)
    assert journal.index("unwound") < journal.index("exit cache"), journal
    assert journal[-1] == "exit journal", journal


@pytest.mark.anyio
async def test_a_forced_exit_on_trio_lets_the_handlers_unwind_and_records_what_the_client_got(tmp_path: Any) -> None:
    # Passes: wait_calls_done() on trio (--loop trio) waits for the cancelled handler's
    # shielded clean-up before the resources close, and on_call_end records UNAVAILABLE, as
    # the client got it. (tests/test_lifecycle_process.py covers asyncio only: its app's
    # handlers use asyncio.sleep.)
    events = str(tmp_path / "events")
    code, status, details = await _forced_exit(events, "trio", {"APP_GRACE_PERIOD": "30"}, 0.1, 0.3)
    assert code == 128 + signal.SIGTERM
    assert status is grpc.StatusCode.UNAVAILABLE and details == "the server is shutting down"
    journal = _events(events)
    assert journal.index("unwound") < journal.index("end UNAVAILABLE") < journal.index("exit cache"), journal
    assert journal[-1] == "exit journal", journal


@pytest.mark.anyio
@pytest.mark.backends
async def test_close_with_no_grace_ends_the_calls_on_connections_taken_from_the_backlog(backend: str) -> None:
    # Failed before its fix: close(grace=0) ends the grace period inside close() itself (_schedule_grace_end
    # -> _grace_expired), before the connections close() took from the listen backlog are
    # served (asyncio: _serve_queued tasks; trio: once the accept loops end). Those get the
    # two-phase GOAWAY only, so a call on them runs to its end, however long: wait_closed()
    # does not return. The App closes with grace 0 on a forced exit during the drain delay and
    # on a failed start-up (_close_unless_drained), and APP_GRACE_PERIOD=0 is valid.
    service = _Slow()
    server = Server([service])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)  # completed in the backlog
    try:
        client.sendall(_request("/s11.Slow/Wait", 30))
        server.close(grace=0)  # nothing is to run past now (no await since the connect)
        with anyio.move_on_after(2):
            await server.wait_closed()
        assert server.stats().calls == 0, (service.started, server.stats())
    finally:
        client.close()
        with anyio.fail_after(5):
            await server.wait_closed()


# -- 090d39e: a connection's end ends its calls at once -------------------------------------


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_keepalive_timeout_ends_the_connections_calls_at_once(backend: str, caplog: Any) -> None:
    # Failed before its fix: 090d39e ends the calls of a connection at once when the core reports
    # ConnectionClosed. A keepalive PING that is not answered ends the connection another way
    # (ConnectionProtocol._keepalive_check: connection.close() drops the ConnectionClosed
    # event it makes, then close_transport()), and the server has no close_transport of its
    # own to tell its calls (the client's has): they go on until the linger ends. Meanwhile a
    # handler's send raises app_kit's internal StreamGone, logged as the handler's own error
    # ("error in handler of /s11.Slow/Wait" with a traceback), as 090d39e's message describes.
    # (transport.py's "internal error" close drops its event the same way.)
    service = _Slow()
    config = Configuration(keepalive_time=0.2, keepalive_timeout=0.2, linger_timeout=3)
    server = Server([service], config=config)
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client.sendall(_request("/s11.Slow/Wait", 1.0))  # then silent: it answers no PING
        await _until(lambda: service.ended is not None, 3)
        assert isinstance(service.ended, anyio.get_cancelled_exc_class()), repr(service.ended)
        assert "error in handler" not in caplog.text
    finally:
        client.close()
        server.close(grace=0)
        with anyio.fail_after(5):
            await server.wait_closed()


# -- a620688: a reset past the deadline -----------------------------------------------------


async def _reset_past_the_deadline(window: int) -> tuple[dict[int, bytes], list[Status | None]]:
    """/s11.Slow/Answer with grpc-timeout 200m from a client whose streams' window is
    ``window``; the client resets the call at 0.25 s (past its deadline, while the handler
    still runs). Returns the statuses the client got before its reset, and what the server
    recorded."""
    ends = _Ends()
    server = Server([_Slow()], interceptors=[ends])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        client.sendall(_request("/s11.Slow/Answer", 1.0, window=window, timeout="200m"))
        # The handler blocks the loop from its answer on for 0.3 s: sleep here, off the loop.
        await anyio.to_thread.run_sync(time.sleep, 0.25)
        got = _grpc_statuses(_received(client))
        client.sendall(frame(RST_STREAM, 0, 1, _CANCEL.to_bytes(4, "big")))
        await _until(lambda: bool(ends.statuses), 3)
        return got, ends.statuses
    finally:
        client.close()
        server.close(grace=0)
        with anyio.fail_after(5):
            await server.wait_closed()


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_reset_past_the_deadline_keeps_the_status_the_client_got(backend: str) -> None:
    # Passes: the handler's OK went out before the deadline; the client's later reset (as
    # grpc-go sends for a call it had not half-closed) changes nothing: a620688's
    # DEADLINE_EXCEEDED does not overwrite a status sent (Stream._on_closed keeps ENDED's).
    got, recorded = await _reset_past_the_deadline(65535)
    assert got == {1: b"0"}
    assert recorded == [Status.OK]


# -- 9034ea4 / 5b0609b: --env-file ----------------------------------------------------------


def test_the_environment_wins_over_the_env_file_whatever_case_the_file_spells_a_name_in(tmp_path: Any) -> None:
    # Failed before its fix (a regression of 9034ea4): "Variables already set win": _load_env_file uses
    # os.environ.setdefault, which compares names exactly, while the settings read names in
    # any case. A file line `app_port=...` is added beside the environment's APP_PORT, and
    # pydantic-settings, lower-casing every name, takes the later one: the file's. Before,
    # pydantic-settings read the file itself, below the environment: APP_PORT=0 won.
    env_file = tmp_path / "dev.env"
    env_file.write_text("app_port=notaport\n")
    done = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", APP, "--env-file", str(env_file)],
        cwd=ROOT,
        env={**os.environ, "APP_PORT": "0", "APP_DRAIN_DELAY": "-1"},  # (-1: it stops at its settings either way)
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "APP_PORT" not in done.stderr, done.stderr
    assert "APP_DRAIN_DELAY: cannot be negative" in done.stderr, done.stderr


@pytest.mark.anyio
async def test_reload_reads_the_env_file_again_for_each_new_child(tmp_path: Any) -> None:
    # Failed before its fix (a regression of 9034ea4): The reloader, like any process, now loads --env-file
    # into its own environment, and its children inherit it: when the child is restarted
    # after an edit, the file's variables are all "already set" (setdefault), so the edited
    # file is never read again. Before, each child's settings read the file afresh (edit
    # .env, save a .py: the new value). Here the file moves the journal (S11_EVENTS).
    first, second = tmp_path / "first", tmp_path / "second"
    env_file, trigger = tmp_path / "dev.env", tmp_path / "trigger.py"
    env_file.write_text(f"S11_EVENTS={first}\n")
    trigger.write_text("x = 1\n")
    args = ("--port", "0", "--reload", "--reload-dir", str(tmp_path), "--env-file", str(env_file))
    async with AppProcess(APP, *args) as app:
        await app.ready()
        await _until(lambda: "enter cache" in _events(str(first)))
        await anyio.sleep(0.3)  # (watchfiles is watching)
        env_file.write_text(f"S11_EVENTS={second}\n")
        trigger.write_text("x = 2\n")
        # The new child journals to the edited file's S11_EVENTS (or, as now, the old one's).
        await _until(lambda: "enter cache" in _events(str(second)) or _events(str(first)).count("enter cache") > 1, 5)
        app.signal(signal.SIGTERM)
        assert await app.wait(10) == 0
    assert "restarting" in app.log, app.log
    assert _events(str(second)) == ["enter journal", "enter cache", "exit cache", "exit journal"], (
        _events(str(first)),
        _events(str(second)),
    )


# -- 5b0609b: settings errors name the variable ---------------------------------------------


def test_a_settings_error_names_the_alias_choice_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Failed before its fix: "Settings errors name the variable that was set": a field with
    # AliasChoices("DATABASE_PORT", "CAFE_DB_PORT") set through CAFE_DB_PORT is reported as
    # DATABASE_PORT (pydantic's loc is the first choice), a variable the user never set.
    from pydantic import AliasChoices, Field

    class Cafe(AppSettings):
        db_port: int = Field(5432, validation_alias=AliasChoices("DATABASE_PORT", "CAFE_DB_PORT"))

    monkeypatch.setenv("CAFE_DB_PORT", "five")
    with pytest.raises(SettingsError) as raised:
        load_settings(Cafe)
    assert "CAFE_DB_PORT" in str(raised.value), str(raised.value)


def test_a_settings_error_in_a_nested_field_names_the_variable_that_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Failed before its fix: With env_nested_delimiter="__" (pydantic-settings' way to set one field of a
    # nested model), APP_DB__PORT=five is reported as "APP_DB.port": there is no APP_DB, and
    # the variable to fix is APP_DB__PORT.
    from pydantic import BaseModel
    from pydantic_settings import SettingsConfigDict

    class Database(BaseModel):
        port: int = 5432

    class Nested(AppSettings):
        model_config = SettingsConfigDict(env_nested_delimiter="__")
        db: Database = Database()

    monkeypatch.setenv("APP_DB__PORT", "five")
    with pytest.raises(SettingsError) as raised:
        load_settings(Nested)
    assert "APP_DB__PORT" in str(raised.value), str(raised.value)


def test_a_settings_error_uses_the_subclass_prefix_and_an_alias_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # Passes: a subclass's own env_prefix names its variables (CAFE_PORT, not APP_PORT), a
    # plain validation_alias is named as it is, and an argument keeps the field's name.
    from pydantic import Field
    from pydantic_settings import SettingsConfigDict

    class Cafe(AppSettings):
        model_config = SettingsConfigDict(env_prefix="CAFE_")
        pool: int = Field(1, validation_alias="CAFE_POOL_SIZE")
        limit: int = 1

    monkeypatch.setenv("CAFE_PORT", "five")
    monkeypatch.setenv("CAFE_LIMIT", "many")
    monkeypatch.setenv("CAFE_POOL_SIZE", "big")
    with pytest.raises(SettingsError) as raised:
        load_settings(Cafe, grace_period=-1)
    message = str(raised.value)
    for named in ("CAFE_PORT: ", "CAFE_LIMIT: ", "CAFE_POOL_SIZE: ", "grace_period: cannot be negative"):
        assert named in message, message
    assert "APP_" not in message, message


# -- e99acc2: a missing module the app imports ----------------------------------------------


def test_a_relative_import_of_a_missing_module_in_a_package_shows_its_traceback(tmp_path: Any) -> None:
    # Passes: `from .helpers import x` in pkg/main.py (pkg.helpers missing) is the app's
    # error with its traceback, not "cannot import pkg.main" as if the target were wrong;
    # a target that is not there stays one line.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "main.py").write_text("from .helpers import x\n")

    def run(target: str) -> subprocess.CompletedProcess[str]:
        return run_app_cli(target, tmp_path)

    broken = run("pkg.main:app")
    assert broken.returncode == 3
    assert 'pkg/main.py", line 1' in broken.stderr and "from .helpers import x" in broken.stderr, broken.stderr
    assert broken.stderr.splitlines()[-1] == (
        "app_kit: importing pkg.main failed: ModuleNotFoundError: No module named 'pkg.helpers'"
    )
    absent = run("pkg.absent:app")
    assert absent.returncode == 3
    assert absent.stderr.splitlines() == ["app_kit: cannot import pkg.absent: No module named 'pkg.absent'"]


# -- 9a1f473: the metrics endpoint ----------------------------------------------------------


class _Flaky:
    """A collector that fails while ``failing``."""

    def __init__(self) -> None:
        self.failing = True

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        if self.failing:
            raise RuntimeError("the collector failed")
        yield GaugeMetricFamily("flaky", "it works now", value=1)


def _scrape(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


@pytest.mark.anyio
@pytest.mark.backends
async def test_the_metrics_endpoint_counts_the_connections_whose_answer_failed_as_closed(backend: str) -> None:
    # Passes: many concurrent scrapes whose collector raises (and clients that leave) each
    # give their slot back; with max_connections=2 a later scrape is still answered.
    flaky = _Flaky()
    registry = CollectorRegistry()
    registry.register(flaky)
    async with serve_metrics("127.0.0.1", 0, registry, max_connections=2) as port:
        async with anyio.create_task_group() as group:
            for _ in range(12):
                group.start_soon(anyio.to_thread.run_sync, _scrape, port)
        flaky.failing = False
        for _ in range(50):  # (the last ones' tasks end as the endpoint sees them closed)
            reply = await anyio.to_thread.run_sync(_scrape, port)
            if reply:
                break
            await anyio.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"flaky 1.0" in reply, reply
