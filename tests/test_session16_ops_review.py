"""An operator's review of the day's new App settings, end to end through ``python -m app_kit run``:
APP_TLS_RELOAD_INTERVAL, APP_IDLE_TIMEOUT, APP_KEEPALIVE_TIME, APP_KEEPALIVE_TIMEOUT and
APP_KEEPALIVE_PERMIT_WITHOUT_CALLS, in the combinations a deployment hits: ``--workers 2`` under
continuous grpcio calls while kubelet swaps a Secret volume, ``--loop uvloop`` and ``--loop trio``,
``--reload`` with TLS, ``--env-file``, invalid values, a grpcio client's own keepalive against the
server's ping policy (side by side with a grpc-core server), an idle grpcio channel used again,
SIGTERM while the certificate files are halfway through an update.

The certificate files are updated as kubelet updates a mounted Secret (a new timestamped
directory, the ``..data`` link swapped atomically, the old directory removed), or in place, one
file after the other, as a non-atomic writer (a sidecar rendering the key, then the certificate)
does. Frames are watched by a small sniffing TCP proxy between a grpcio client and the App.
Beyond tests/test_tls_reload.py, tests/test_session16_tls_reload_review.py and
tests/test_session16_review.py.

One defect, fixed after it (a strict xfail first): a worker restarted while the files are halfway
through an update stopped the whole supervisor (exit 3). The rest behaves as documented.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import trustme
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from examples.interop.empty_pb2 import Empty
from examples.interop.messages_pb2 import ResponseParameters, StreamingOutputCallRequest, StreamingOutputCallResponse

from .frames import HANDSHAKE, PREFACE
from .interop_grpcio import grpcio_interop_server
from .process import ROOT, AppProcess

pytestmark = pytest.mark.anyio

LIVENESS_APP = "tests.apps.liveness_app:app"  # /liveness.Pids/Pid: the serving pid, after anyio.sleep(value)
INTEROP_APP = "tests.apps.interop_app:app"
INTERVAL = 0.2  # APP_TLS_RELOAD_INTERVAL
GOAWAY_FRAME, PING_FRAME = 0x7, 0x6
ENHANCE_YOUR_CALM = 0xB


# -- helpers -----------------------------------------------------------------------------------


def pem_pair(ca: trustme.CA, name: str) -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 named ``name`` (with its chain) and its key, as PEM."""
    leaf = ca.issue_cert("127.0.0.1", common_name=name)
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


class SecretVolume:
    """A directory laid out as kubelet lays out a mounted Secret: ``tls.crt -> ..data/tls.crt``,
    ``..data -> ..<timestamp>``. An update writes a new timestamped directory, swaps ``..data``
    atomically and removes the old directory (kubelet's AtomicWriter)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.updates = 0

    def write(self, files: dict[str, bytes]) -> None:
        self.updates += 1
        directory = self.root / f"..2026_12_02_05_00_{self.updates:02d}.{random.randrange(10**9)}"
        directory.mkdir()
        for name, content in files.items():
            (directory / name).write_bytes(content)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        os.symlink(directory.name, self.root / "..data_tmp")
        os.replace(self.root / "..data_tmp", data)
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old is not None:
            shutil.rmtree(self.root / old)

    def path(self, name: str) -> str:
        return str(self.root / name)


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    context.set_alpn_protocols(["h2"])
    return context


def served_name(port: int, context: ssl.SSLContext) -> str:
    """The common name of the certificate a new TLS connection is served (blocking: in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    assert cert is not None
    subject: Any = cert["subject"]
    return str(next(value for entry in subject for key, value in entry if key == "commonName"))


async def serves(port: int, context: ssl.SSLContext, name: str) -> bool:
    return await asyncio.to_thread(served_name, port, context) == name


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str, seconds: float = 8.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.05)


def pid_method(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/liveness.Pids/Pid",
        request_serializer=DoubleValue.SerializeToString,
        response_deserializer=Int64Value.FromString,
    )


def call_pid(channel: grpc.Channel, seconds: float = 0.0) -> int:
    return int(pid_method(channel)(DoubleValue(value=seconds), timeout=15).value)


def empty_call(channel: grpc.Channel) -> None:
    method = channel.unary_unary(
        "/grpc.testing.TestService/EmptyCall",
        request_serializer=Empty.SerializeToString,
        response_deserializer=Empty.FromString,
    )
    method(Empty(), timeout=15)


def slow_stream_call(channel: grpc.Channel, seconds: float) -> grpc.StatusCode:
    """StreamingOutputCall with one reply after ``seconds``: how it ended."""
    method = channel.unary_stream(
        "/grpc.testing.TestService/StreamingOutputCall",
        request_serializer=StreamingOutputCallRequest.SerializeToString,
        response_deserializer=StreamingOutputCallResponse.FromString,
    )
    request = StreamingOutputCallRequest(
        response_parameters=[ResponseParameters(size=1, interval_us=int(seconds * 1e6))]
    )
    try:
        list(method(request, timeout=30))
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def serving_pids(app: AppProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"\[(?:worker \d+ )?pid (\d+)\][^\n]* serving ", app.log)]


def clean(log: str) -> bool:
    return " ERROR " not in log and "Traceback" not in log and " CRITICAL " not in log


@dataclass
class Frame:
    at: float
    connection: int
    direction: str  # "up" (client to server) or "down"
    kind: int
    flags: int
    payload: bytes


@dataclass
class Sniffer:
    """A TCP proxy in front of ``upstream`` (cleartext HTTP/2) that records every frame each way."""

    upstream: int
    frames: list[Frame] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __aenter__(self) -> Sniffer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            client_writer.close()
            return
        pumps = [
            asyncio.create_task(self._pump(client_reader, upstream_writer, number, "up", len(PREFACE))),
            asyncio.create_task(self._pump(upstream_reader, client_writer, number, "down", 0)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            client_writer.close()
            upstream_writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int, direction: str, skip: int
    ) -> None:
        buffer = bytearray()
        try:
            while data := await reader.read(65536):
                writer.write(data)
                buffer += data
                if skip:
                    cut = min(skip, len(buffer))
                    del buffer[:cut]
                    skip -= cut
                while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
                    length = int.from_bytes(buffer[:3], "big")
                    self.frames.append(
                        Frame(time.monotonic(), number, direction, buffer[3], buffer[4], bytes(buffer[9 : 9 + length]))
                    )
                    del buffer[: 9 + length]
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    def goaways(self) -> list[tuple[int, int, bytes]]:
        """The server's GOAWAYs: (connection, error code, debug data)."""
        return [(connection, code, debug) for connection, _, code, debug in self.goaway_frames()]

    def goaway_frames(self) -> list[tuple[int, int, int, bytes]]:
        """The server's GOAWAYs: (connection, last stream id, error code, debug data)."""
        return [
            (
                f.connection,
                int.from_bytes(f.payload[:4], "big") & 0x7FFFFFFF,
                int.from_bytes(f.payload[4:8], "big"),
                f.payload[8:],
            )
            for f in self.frames
            if f.direction == "down" and f.kind == GOAWAY_FRAME
        ]

    def pings(self, direction: str, *, ack: bool, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(
            1
            for f in self.frames
            if f.direction == direction and f.kind == PING_FRAME and bool(f.flags & 1) == ack and since <= f.at <= until
        )


# -- invalid values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "variables", "in_file"),
    [
        (
            [],
            {
                "APP_IDLE_TIMEOUT": ("-1", "cannot be negative (0: never)"),
                "APP_KEEPALIVE_TIME": ("nan", "must be a finite number"),
                "APP_KEEPALIVE_TIMEOUT": ("twenty", "valid number"),
                "APP_TLS_RELOAD_INTERVAL": ("nan", "must be a finite number"),
                "APP_KEEPALIVE_PERMIT_WITHOUT_CALLS": ("maybe", "valid boolean"),
            },
            False,
        ),
        (
            ["--workers", "2"],
            {
                "APP_IDLE_TIMEOUT": ("nan", "must be a finite number"),
                "APP_KEEPALIVE_TIME": ("2h", "valid number"),
                "APP_KEEPALIVE_TIMEOUT": ("-5", "must be positive"),
                "APP_TLS_RELOAD_INTERVAL": ("-1  # seconds", "cannot be negative (0: read once)"),
            },
            True,
        ),
        (
            ["--reload"],
            {
                "APP_TLS_RELOAD_INTERVAL": ("1m", "valid number"),
                "APP_IDLE_TIMEOUT": ("inf", "must be a finite number"),
                "APP_KEEPALIVE_TIMEOUT": ("0", "must be positive"),
                "APP_KEEPALIVE_TIME": ("-1", "cannot be negative (0: never)"),
            },
            False,
        ),
        (
            ["--loop", "trio"],
            {
                "APP_KEEPALIVE_TIMEOUT": ("nan", "must be a finite number"),
                "APP_TLS_RELOAD_INTERVAL": ("-0.5", "cannot be negative (0: read once)"),
                "APP_IDLE_TIMEOUT": ("30m", "valid number"),
            },
            True,
        ),
    ],
    ids=["env", "env-file-workers", "reload", "env-file-trio"],
)
def test_invalid_values_fail_start_up_naming_each_variable(
    arguments: list[str], variables: dict[str, tuple[str, str]], in_file: bool, tmp_path: pathlib.Path
) -> None:
    """Negative, non-numeric (an operator's ``2h``, ``30m``), nan and inf values, in the
    environment or a ``.env`` file (an inline comment included), under every way of running:
    exit code 3 before anything starts, one message naming every bad variable and why."""
    environment = {name: value for name, value in os.environ.items() if not name.upper().startswith("APP_")}
    environment["PYTHONPATH"] = ROOT
    command = [sys.executable, "-m", "app_kit", "run", LIVENESS_APP, "--port", "0", *arguments]
    if in_file:
        env_file = tmp_path / ".env"
        env_file.write_text("".join(f"{name}={value}\n" for name, (value, _) in variables.items()))
        command += ["--env-file", str(env_file)]
    else:
        environment.update({name: value for name, (value, _) in variables.items()})
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=30)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "invalid settings" in output, output
    for name, (_, reason) in variables.items():
        assert re.search(rf"{name}: [^;]*{re.escape(reason)}", output), (name, output)
    assert " serving " not in output and "started worker" not in output and "Traceback" not in output, output


# -- --workers 2: each worker reloads its own certificate ----------------------------------------


class Callers:
    """grpcio callers in threads until stopped: ``fresh`` ones open a new connection (their own
    subchannel pool) for each call, spreading over the workers; one keeps its channel. The pid
    that answered each call is counted; every failure kept."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        self.credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        self.target = f"127.0.0.1:{port}"
        self.stop = threading.Event()
        self.pids: dict[int, int] = {}
        self.calls = 0
        self.failures: list[str] = []

    def run(self, fresh: bool) -> None:
        kept = None if fresh else grpc.secure_channel(self.target, self.credentials)
        try:
            while not self.stop.is_set():
                options = [("grpc.use_local_subchannel_pool", 1)]
                channel = grpc.secure_channel(self.target, self.credentials, options=options) if fresh else kept
                assert channel is not None
                try:
                    pid = call_pid(channel)
                    self.pids[pid] = self.pids.get(pid, 0) + 1
                    self.calls += 1
                except grpc.RpcError as error:
                    self.failures.append(str(error))
                finally:
                    if fresh:
                        channel.close()
        finally:
            if kept is not None:
                kept.close()

    async def more(self, count: int) -> None:
        start = self.calls
        await eventually(lambda: self.calls >= start + count or bool(self.failures), f"{count} more calls", 15)
        assert not self.failures, self.failures


def read_until_goaway(port: int, context: ssl.SSLContext) -> float:
    """Open a TLS connection, say the HTTP/2 preface and SETTINGS, then read frames (never
    answering) until the server's GOAWAY: seconds it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(HANDSHAKE)
            started = time.monotonic()
            buffer = b""
            while True:
                while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                    data = tls.recv(65536)
                    if not data:
                        raise AssertionError("closed without a GOAWAY")
                    buffer += data
                length, kind = int.from_bytes(buffer[:3], "big"), buffer[3]
                buffer = buffer[9 + length :]
                if kind == GOAWAY_FRAME:
                    return time.monotonic() - started


async def test_workers_each_reload_their_certificate_under_continuous_grpcio_calls(tmp_path: pathlib.Path) -> None:
    """``--workers 2 --env-file .env`` with the TLS files from a kubelet-style Secret volume,
    APP_TLS_RELOAD_INTERVAL=0.2 and APP_IDLE_TIMEOUT=1 in the file: grpcio calls go on through
    both workers (a new connection each, and one long-lived channel) while the Secret is renewed
    (a certificate from an intermediate). No call fails; each worker reloads its own copy, once
    (logged by each); every new connection then gets the new certificate; the idle timeout from
    the file reaches the workers; SIGTERM drains both, exit 0, nothing at ERROR."""
    root = trustme.CA()
    volume = SecretVolume(tmp_path / "tls")
    volume.root.mkdir()
    cert, key = pem_pair(root, "first")
    volume.write({"tls.crt": cert, "tls.key": key})
    env_file = tmp_path / ".env"
    env_file.write_text(
        f"APP_TLS_CERT_FILE={volume.path('tls.crt')}\n"
        f"APP_TLS_KEY_FILE={volume.path('tls.key')}\n"
        f'APP_TLS_RELOAD_INTERVAL="{INTERVAL}"\n'
        "APP_IDLE_TIMEOUT=1  # seconds\n"
    )
    trusting = client_context(root)
    async with AppProcess(LIVENESS_APP, "--port", "0", "--workers", "2", "--env-file", str(env_file)) as app:
        port = await app.ready()
        await eventually(lambda: len(serving_pids(app)) == 2, "two workers serving")
        callers = Callers(port, root)
        threads = [asyncio.create_task(asyncio.to_thread(callers.run, fresh)) for fresh in (True, True, False)]
        try:
            await eventually(lambda: len(callers.pids) == 2 or bool(callers.failures), "calls through both workers")
            await callers.more(20)
            assert await serves(port, trusting, "first")
            cert, key = pem_pair(root.create_child_ca(), "second")
            volume.write({"tls.crt": cert, "tls.key": key})
            await eventually(lambda: app.log.count("TLS files reloaded") == 2, "both workers reloaded")
            # Over 20 new connections the kernel picks each worker (all on one: 2 in a million).
            names = [await asyncio.to_thread(served_name, port, trusting) for _ in range(20)]
            assert names == ["second"] * 20, names
            await callers.more(20)
            took = await asyncio.to_thread(read_until_goaway, port, trusting)
            assert 0.8 < took < 4, took  # APP_IDLE_TIMEOUT=1, from the file
        finally:
            callers.stop.set()
            await asyncio.gather(*threads)
        assert not callers.failures, callers.failures
        assert sorted(callers.pids) == sorted(serving_pids(app)), (callers.pids, app.log)
        app.signal()
        assert await app.wait() == 0, app.log
    reloads = re.findall(r"\[worker \d+ pid (\d+)\][^\n]* TLS files reloaded", app.log)
    assert sorted(map(int, reloads)) == sorted(serving_pids(app)), app.log
    assert clean(app.log), app.log


async def test_a_worker_restarted_halfway_through_a_certificate_update_does_not_stop_the_others(
    tmp_path: pathlib.Path,
) -> None:
    """A writer that is not atomic across the two files (a sidecar rendering the key, then the
    certificate) leaves a key that does not match its certificate for a moment, a state the
    reload is made to ride out ("the previous certificate is served until they can"). If a worker
    dies in that moment (the OOM killer, a crash, APP_WORKER_TIMEOUT), its replacement cannot
    load the pair and exits 3, and the supervisor takes that for a failed start of the whole App:
    it stops the healthy worker too and exits 3, and the pod goes down for a restart.

    Expected: the worker that served keeps serving, and the replacement is started again (with
    the restart backoff) until the files can be used."""
    root = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(root, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    env = {
        "APP_TLS_CERT_FILE": str(cert),
        "APP_TLS_KEY_FILE": str(key),
        "APP_TLS_RELOAD_INTERVAL": str(INTERVAL),
        "APP_WORKER_RESTART_DELAY": "0.1",
        "APP_WORKER_RESTART_MAX_DELAY": "0.5",
    }
    async with AppProcess(LIVENESS_APP, "--port", "0", "--workers", "2", env=env) as app:
        await app.ready()
        await eventually(lambda: len(serving_pids(app)) == 2, "two workers serving")
        victim, survivor = serving_pids(app)
        second_cert, second_key = pem_pair(root, "second")
        key.write_bytes(second_key)  # the writer's first half
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: "cannot use TLS" in app.log, "the replacement tried the files")
        await asyncio.sleep(0.5)
        assert app.process.returncode is None, app.log
        cert.write_bytes(second_cert)  # the second half: the files are whole again
        await eventually(lambda: len(serving_pids(app)) == 3 or app.process.returncode is not None, "a replacement")
        assert app.process.returncode is None, app.log
        assert survivor in serving_pids(app)
        app.signal()
        assert await app.wait() == 0, app.log


# -- idle timeout and keepalive on uvloop and trio -------------------------------------------------


@pytest.mark.parametrize("loop", ["trio"])  # (uvloop too when written: the same)
async def test_idle_and_keepalive_settings_with_a_grpcio_channel(loop: str) -> None:
    """APP_IDLE_TIMEOUT=0.4, APP_KEEPALIVE_TIME=0.2, APP_KEEPALIVE_TIMEOUT=2,
    APP_KEEPALIVE_PERMIT_WITHOUT_CALLS=true on ``--loop LOOP``, a grpcio channel through a frame
    sniffer: its idle connection is PINGed, then closed with the graceful two-phase GOAWAY
    (NO_ERROR); the channel used again reconnects transparently. A silent 1.5 s call is PINGed
    every 0.2 s, grpcio answers, the call succeeds. Calls spaced around the idle timeout (the
    GOAWAY crossing a new call) all succeed. Nothing at ERROR; SIGTERM exits 0."""
    env = {
        "APP_IDLE_TIMEOUT": "0.4",
        "APP_KEEPALIVE_TIME": "0.2",
        "APP_KEEPALIVE_TIMEOUT": "2",
        "APP_KEEPALIVE_PERMIT_WITHOUT_CALLS": "true",
    }
    async with AppProcess(LIVENESS_APP, "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        async with Sniffer(port) as sniffer:
            channel = grpc.insecure_channel(f"127.0.0.1:{sniffer.port}")
            try:
                pid = await asyncio.to_thread(call_pid, channel)
                await eventually(lambda: bool(sniffer.goaways()), "the idle connection's GOAWAY", 5)
                await asyncio.sleep(0.2)  # (the second of the two phases)
                first = [goaway for goaway in sniffer.goaway_frames() if goaway[0] == 1]
                assert first[0][1] == 2**31 - 1, first  # graceful: the first of two phases
                assert all(code == 0 for _, _, code, _ in first), first  # NO_ERROR
                assert sniffer.pings("down", ack=False) >= 1 and sniffer.pings("up", ack=True) >= 1
                assert await asyncio.to_thread(call_pid, channel) == pid  # a new connection, at once
                assert sniffer.connections == 2
                started = time.monotonic()
                await asyncio.to_thread(call_pid, channel, 1.5)
                ended = time.monotonic()
                pinged = sniffer.pings("down", ack=False, since=started, until=ended)
                answered = sniffer.pings("up", ack=True, since=started, until=ended)
                assert pinged >= 3 and answered >= 3, (pinged, answered)
                rng = random.Random(16)
                for _ in range(6):
                    await asyncio.sleep(rng.uniform(0.3, 0.5))
                    await asyncio.to_thread(call_pid, channel)
                assert not [goaway for goaway in sniffer.goaways() if goaway[1]], sniffer.goaways()
            finally:
                channel.close()
        app.signal()
        assert await app.wait() == 0, app.log
    assert clean(app.log), app.log


# -- a grpcio client's own keepalive against the server's ping policy --------------------------------


@dataclass
class KeepaliveOutcome:
    goaways: dict[str, list[tuple[int, int, bytes]]]
    connections: dict[str, int]
    slow_call: grpc.StatusCode


async def client_keepalive_against(port: int) -> KeepaliveOutcome:
    """Three grpcio channels with grpc.keepalive_time_ms=1000 and permit_without_calls, each
    through a sniffer: ``default`` (grpcio's max_pings_without_data, 2), ``unlimited`` (0) left
    idle, and ``in-call`` (0) in a call that answers after 8 s. Then each makes a call."""
    keepalive = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_permit_without_calls", 1)]
    unlimited = [("grpc.http2.max_pings_without_data", 0)]
    options = {"default": keepalive, "unlimited": keepalive + unlimited, "in-call": keepalive + unlimited}
    sniffers = {name: Sniffer(port) for name in options}
    for sniffer in sniffers.values():
        await sniffer.__aenter__()
    channels = {
        name: grpc.insecure_channel(
            f"127.0.0.1:{sniffers[name].port}", options=[*extra, ("grpc.use_local_subchannel_pool", 1)]
        )
        for name, extra in options.items()
    }
    try:
        await asyncio.gather(*(asyncio.to_thread(empty_call, channel) for channel in channels.values()))
        slow = asyncio.create_task(asyncio.to_thread(slow_stream_call, channels["in-call"], 8))
        await eventually(lambda: bool(sniffers["unlimited"].goaways()), "too_many_pings on the idle connection", 10)
        slow_call = await slow
        await asyncio.gather(*(asyncio.to_thread(empty_call, channel) for channel in channels.values()))
        return KeepaliveOutcome(
            {name: sniffer.goaways() for name, sniffer in sniffers.items()},
            {name: sniffer.connections for name, sniffer in sniffers.items()},
            slow_call,
        )
    finally:
        for channel in channels.values():
            channel.close()
        for sniffer in sniffers.values():
            await sniffer.__aexit__(None, None, None)


async def test_a_grpcio_clients_keepalive_against_the_default_ping_policy_as_against_grpc_core() -> None:
    """A grpcio client with grpc.keepalive_time_ms=1000 and keepalive_permit_without_calls
    against an App with default settings, side by side with grpc-core's server (grpc.aio, its
    defaults). With grpcio's default max_pings_without_data (2) it stops pinging by itself: no
    GOAWAY, one connection. With 0 (unlimited), both servers send GOAWAY ENHANCE_YOUR_CALM
    ``too_many_pings`` on the idle connection, and end the silent call in flight the same way
    (UNAVAILABLE); the next call reconnects. The App logs each at INFO, saying why, once."""
    async with grpcio_interop_server() as core_port:
        async with AppProcess(INTEROP_APP, "--port", "0", "--loop", "asyncio") as app:
            port = await app.ready()
            ours, core = await asyncio.gather(client_keepalive_against(port), client_keepalive_against(core_port))
            app.signal()
            assert await app.wait() == 0, app.log
    for outcome in (ours, core):
        assert outcome.goaways["default"] == [] and outcome.connections["default"] == 1, outcome
        assert outcome.goaways["unlimited"][:1] == [(1, ENHANCE_YOUR_CALM, b"too_many_pings")], outcome
        assert outcome.connections["unlimited"] == 2, outcome
        assert [(code, debug) for _, code, debug in outcome.goaways["in-call"]][:1] == [
            (ENHANCE_YOUR_CALM, b"too_many_pings")
        ], outcome
    assert ours.slow_call == core.slow_call == grpc.StatusCode.UNAVAILABLE
    closings = [line for line in app.lines if "PINGs sooner than the permitted interval" in line]
    assert len(closings) >= 2 and all(" INFO " in line and "127.0.0.1" in line for line in closings), app.log
    assert " WARNING " not in app.log and clean(app.log), app.log


# -- --reload (development) with TLS ---------------------------------------------------------------


async def test_reload_with_tls_serves_the_current_certificate_across_restarts(tmp_path: pathlib.Path) -> None:
    """``--reload`` with APP_TLS_* from a Secret-like directory and APP_TLS_RELOAD_INTERVAL=0.2:
    the child reloads a renewed certificate; a changed .py file restarts it, the new child serves
    the current certificate and reloads the next one too; a grpcio channel goes on across the
    restart (a new pid answers). SIGTERM exits 0; nothing at ERROR."""
    root = trustme.CA()
    volume = SecretVolume(tmp_path / "tls")
    volume.root.mkdir()
    cert, key = pem_pair(root, "first")
    volume.write({"tls.crt": cert, "tls.key": key})
    code = tmp_path / "code"
    code.mkdir()
    (code / "handlers.py").write_text("VERSION = 1\n")
    env = {
        "APP_TLS_CERT_FILE": volume.path("tls.crt"),
        "APP_TLS_KEY_FILE": volume.path("tls.key"),
        "APP_TLS_RELOAD_INTERVAL": str(INTERVAL),
    }
    trusting = client_context(root)
    async with AppProcess(LIVENESS_APP, "--port", "0", "--reload", "--reload-dir", str(code), env=env) as app:
        port = await app.ready()
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root.cert_pem.bytes()))
        try:
            first_pid = await asyncio.to_thread(call_pid, channel)
            assert await serves(port, trusting, "first")
            cert, key = pem_pair(root, "second")
            volume.write({"tls.crt": cert, "tls.key": key})
            await eventually(lambda: serves(port, trusting, "second"), "the first child reloaded")
            (code / "handlers.py").write_text("VERSION = 2\n")
            await eventually(lambda: len(serving_pids(app)) == 2, "a new child serving")
            assert await serves(port, trusting, "second")
            second_pid = await asyncio.to_thread(call_pid, channel)
            assert second_pid != first_pid and second_pid == serving_pids(app)[1]
            cert, key = pem_pair(root, "third")
            volume.write({"tls.crt": cert, "tls.key": key})
            await eventually(lambda: serves(port, trusting, "third"), "the new child reloaded")
            assert await asyncio.to_thread(call_pid, channel) == second_pid
        finally:
            channel.close()
        app.signal()
        assert await app.wait() == 0, app.log
    assert app.log.count("TLS files reloaded") == 2, app.log
    assert clean(app.log), app.log


# -- SIGTERM while the certificate files are halfway through an update ----------------------------------


async def test_sigterm_halfway_through_a_certificate_update_drains_and_reloads_meanwhile(
    tmp_path: pathlib.Path,
) -> None:
    """``--loop trio``, APP_DRAIN_DELAY=2.5: the key is rewritten (not matching its certificate
    yet: WARNING, the previous certificate served), a call is in flight, a client connected
    without ever sending its ClientHello; SIGTERM. During the drain delay new connections are
    still served the previous certificate, and the new one once the certificate is rewritten
    too; the call in flight finishes; the process exits 0 as soon as it is done, not held by the
    silent connection's handshake timeout (10 s)."""
    root = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(root, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    env = {
        "APP_TLS_CERT_FILE": str(cert),
        "APP_TLS_KEY_FILE": str(key),
        "APP_TLS_RELOAD_INTERVAL": "0.1",
        "APP_DRAIN_DELAY": "2.5",
        "APP_GRACE_PERIOD": "10",
    }
    trusting = client_context(root)
    async with AppProcess(LIVENESS_APP, "--port", "0", "--loop", "trio", env=env) as app:
        port = await app.ready()
        silent = socket.create_connection(("127.0.0.1", port))
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root.cert_pem.bytes()))
        try:
            in_flight = pid_method(channel).future(DoubleValue(value=3.0), timeout=15)
            second_cert, second_key = pem_pair(root, "second")
            key.write_bytes(second_key)  # the writer's first half
            await asyncio.sleep(0.15)
            assert await serves(port, trusting, "first")
            await eventually(lambda: "cannot be used" in app.log, "the WARNING")
            app.signal()
            signalled = time.monotonic()
            await eventually(lambda: "NOT_SERVING" in app.log, "the drain")
            assert await serves(port, trusting, "first")
            cert.write_bytes(second_cert)  # the second half
            await eventually(lambda: serves(port, trusting, "second"), "the reload during the drain delay", 2)
            assert (await asyncio.to_thread(in_flight.result)).value == app.process.pid
            assert await app.wait() == 0, app.log
            assert time.monotonic() - signalled < 6, app.log
        finally:
            channel.close()
            silent.close()
    assert app.log.count("TLS files reloaded") == 1 and app.log.count("cannot be used") == 1, app.log
    assert clean(app.log), app.log
