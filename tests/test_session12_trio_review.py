"""Fresh-eyes review of the trio backend (app_kit/aio/trio_runtime.py, streams.py and the trio
branches of server.py and client.py): what must not differ between asyncio and trio, over real
sockets. Tests marked ``backends`` run on both loops (tests/conftest.py); those whose outcome is
the end of a whole run, or a process's exit, run in a child process on each loop.

One defect found and left (``xfail(strict=True)``: it fails today; session 12's note says
why): ``test_system_exit_in_a_handler_or_a_request_iterator_ends_the_run_with_system_exit``.
The other tests confirm behaviour that no other test covers on trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.abc
import grpc
import hpack
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value
from hyperframe.frame import Frame, GoAwayFrame

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, Status, Stream
from app_kit.aio.client import method_for

from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    frame,
    held_messages,
    request_block,
    trailer_statuses,
)
from .process import ROOT, AppProcess
from .services import ByteCounter
from .test_lifecycle_trio import any_loop_app
from .test_trio import Service, _grpcio_server, _relay_in_a_thread, _stubs, serving

MiB = 1024 * 1024


# -- helpers ---------------------------------------------------------------------------------


async def _run_script(template: str, loop: str) -> str:
    """Run ``template`` (formatted with the repository's root and the loop) in a child Python;
    its stdout and stderr together."""
    code = textwrap.dedent(template.format(root=str(ROOT), loop=loop))
    with anyio.fail_after(30):
        result = await anyio.run_process([sys.executable, "-c", code], check=False, stderr=subprocess.STDOUT, cwd=ROOT)
    return result.stdout.decode(errors="replace")


class _Peer:
    """A raw HTTP/2 client on anyio (so on either loop): writes bytes, collects every frame the
    server sends until it closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frames: list[Frame] = []
        self.closed = False

    async def __aenter__(self) -> _Peer:
        self._stream = await anyio.connect_tcp("127.0.0.1", self.port)
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._read)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        await anyio.aclose_forcefully(self._stream)

    async def _read(self) -> None:
        buffer = b""
        try:
            while True:
                buffer += await self._stream.receive()
                while len(buffer) >= 9:
                    parsed, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    parsed.parse_body(memoryview(buffer[9 : 9 + length]))
                    self.frames.append(parsed)
                    buffer = buffer[9 + length :]
        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
            pass
        self.closed = True

    async def send(self, data: bytes) -> bool:
        try:
            await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return False
        return True

    @property
    def goaways(self) -> list[GoAwayFrame]:
        return [f for f in self.frames if isinstance(f, GoAwayFrame)]

    def trailer_statuses(self) -> dict[int, bytes]:
        return trailer_statuses(self.frames)


async def _until(condition: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


# -- a defect: SystemExit ends a trio run as TrioInternalError --------------------------------

_SYSTEM_EXIT = """
import asyncio, sys
sys.path.insert(0, {root!r})
import anyio
from google.protobuf.wrappers_pb2 import BytesValue
from app_kit import Cardinality, Channel, GRPCError, Handler, Server
from app_kit.aio.client import method_for

WHERE = sys.argv[1]

class Exiting:
    def __mapping__(self):
        return {{
            "/t.X/Exit": Handler(self.exit, Cardinality.UNARY_UNARY, BytesValue, BytesValue),
            "/t.X/Echo": Handler(self.echo, Cardinality.STREAM_STREAM, BytesValue, BytesValue),
        }}

    async def exit(self, stream):
        await stream.recv_message()
        sys.exit(3)  # a library the handler calls gives up on the process

    async def echo(self, stream):
        async for message in stream:
            await stream.send_message(message)

async def requests():
    yield BytesValue(value=b"a")
    await anyio.sleep(0.1)
    sys.exit(3)

async def main():
    server = Server([Exiting()])
    await server.start("127.0.0.1", 0)
    async with Channel(f"127.0.0.1:{{server.sockets[0].getsockname()[1]}}") as channel:
        try:
            if WHERE == "handler":
                stub = method_for(channel, "/t.X/Exit", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
                await stub(BytesValue(), timeout=5)
            else:
                stub = method_for(channel, "/t.X/Echo", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
                async for _ in stub(requests(), timeout=5):
                    pass
        except GRPCError:
            pass
        await anyio.sleep(5)  # (SystemExit ends the run before this does)

try:
    anyio.run(main, backend={loop!r})
except BaseException as exc:
    print("ended by", type(exc).__name__)
else:
    print("returned")
"""


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["handler", "request iterator"])
@pytest.mark.parametrize(
    "loop",
    [
        "asyncio",
        pytest.param(
            "trio",
            marks=pytest.mark.xfail(
                strict=True,
                reason="DEFECT, left (trio delivers no exception from a system task to the run's main"
                " task): on trio, SystemExit raised in a handler (or in a streaming call's request"
                " iterator) escapes TrioTask._run into the runtime's system task: the run crashes with"
                " TrioInternalError ('please file a bug') instead of ending with SystemExit as on asyncio",
            ),
        ),
    ],
)
async def test_system_exit_in_a_handler_or_a_request_iterator_ends_the_run_with_system_exit(
    loop: str, where: str
) -> None:
    """sys.exit() called by a handler's code, or by the code of an async iterator of requests,
    ends the run with SystemExit on asyncio (asyncio's tasks re-raise it out of the loop). On
    trio the handler's task and the request sender run in the nurseries of a trio *system* task
    (the server's, the shared runtime's), and TrioTask._run re-raises any BaseException that is
    not a cancellation: a system task that raises crashes trio with TrioInternalError (as
    KeyboardInterrupt in a handler did before it was given KI protection). Under ``app_kit run
    --loop trio`` the process then ends with trio's internal-error traceback, not the exit
    code asked for."""
    output = await _run_script(_SYSTEM_EXIT.replace("WHERE = sys.argv[1]", f"WHERE = {where!r}"), loop)
    ends = [line for line in output.splitlines() if line.startswith(("ended by ", "returned"))]
    assert ends == ["ended by SystemExit"], output[-3000:]


# -- cancellation -----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.backends
@pytest.mark.parametrize("peer", ["app_kit", "grpcio"])
async def test_the_callers_scope_cancelled_anywhere_in_calls_of_each_kind_leaves_the_connection_clean(
    backend: str, peer: str
) -> None:
    """The caller's cancel scope (trio's own on trio) ends calls of every cardinality at random
    moments (placing, sending, blocked on flow control, receiving; request iterators sync and
    async): each call ends, nothing of it is left on the client's connection, the connection is
    the same one and serves the next call; our server runs no handler of them any more.
    (test_session12_client_review covers this on asyncio against grpc.aio, not on trio.)"""
    rng = random.Random(20 + len(backend) + len(peer))

    def requests() -> Iterator[BytesValue]:
        for _ in range(2000):
            yield BytesValue(value=b"y" * 20000)

    async def async_requests() -> AsyncIterator[BytesValue]:
        for _ in range(2000):
            yield BytesValue(value=b"y" * 20000)
            await anyio.sleep(0)

    async def calls(target: str, server: Server | None) -> None:
        async with Channel(target) as channel:
            stubs = _stubs(channel)
            await stubs["unary"](BytesValue(value=b"warm"), timeout=5)
            protocol = channel._subchannels[0].protocol
            assert protocol is not None
            for kind in ("unary", "server stream", "client stream", "bidi", "bidi async"):
                for _ in range(12):
                    with anyio.fail_after(5):
                        with anyio.move_on_after(rng.random() * 0.03):
                            if kind == "unary":
                                await stubs["sleep"](Int64Value(value=50))
                            elif kind == "server stream":
                                async for _ in stubs["count"](Int64Value(value=100_000)):
                                    pass
                            elif kind == "client stream":
                                await stubs["sum"](requests())
                            else:
                                async for _ in stubs["echo"](requests() if kind == "bidi" else async_requests()):
                                    pass
                connection = protocol.connection

                def left(c: Any = connection) -> dict[str, int]:
                    return {
                        "calls": len(protocol.calls),
                        "streams": len(c._streams),
                        "slot waiters": len(protocol._slot_waiters),
                        "writers": len(protocol._writers),
                        "blocked": len(c._blocked.on_connection) + len(c._blocked.on_stream),
                    }

                # (On trio a request sender the caller's scope cancelled unwinds a moment after
                # the call: its cleanup's wait for it is cancelled too, trio's cancellation
                # being level-triggered.)
                with contextlib.suppress(TimeoutError):
                    await _until(lambda: not any(left().values()), 3)
                assert left() == dict.fromkeys(left(), 0), kind
                assert channel._subchannels[0].protocol is protocol and not protocol.is_closed, kind
                reply = await stubs["unary"](BytesValue(value=b"after"), timeout=3)
                assert reply.value == b"after", kind
                if server is not None:
                    await _until(lambda: server.stats().calls == 0, 3)
                    assert server.stats().connections_total == 1

    if peer == "grpcio":
        with _grpcio_server() as port:
            await calls(f"127.0.0.1:{port}", None)
    else:
        async with serving(Service()) as (server, target):
            await calls(target, server)


class _Catching:
    """A handler that catches the cancellation its deadline brings, then does what the request
    says: returns, raises GRPCError, sends a reply from a shielded scope, or re-raises."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.C/Catch": Handler(self.catch, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def catch(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            if request.value == b"return":
                return
            if request.value == b"raise":
                raise GRPCError(Status.ABORTED, "gave up") from None
            if request.value == b"shielded send":
                with anyio.CancelScope(shield=True):
                    await stream.send_message(BytesValue(value=b"late"))
                return
            raise


def _call_with_grpc_timeout(port: int, value: bytes) -> tuple[dict[str, str], bytes]:
    """One call with ``grpc-timeout: 300m`` from a raw peer that waits for the server's answer
    (a client's own deadline would end the call first): the trailers and the DATA received."""
    message = BytesValue(value=value).SerializeToString()
    block = request_block(path="/t.C/Catch", extra=[("grpc-timeout", "300m")])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, block)
            + frame(DATA, END_STREAM, 1, b"\x00" + len(message).to_bytes(4, "big") + message)
        )
        sock.settimeout(5)
        buffer, data, decoder = b"", b"", hpack.Decoder()
        while True:
            chunk = sock.recv(65536)
            assert chunk, "closed without the call's trailers"
            buffer += chunk
            while len(buffer) >= 9:
                length, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
                stream_id = int.from_bytes(buffer[5:9], "big")
                if len(buffer) < 9 + length:
                    break
                payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
                if kind == DATA and stream_id == 1:
                    data += payload
                elif kind == HEADERS and stream_id == 1:
                    headers = {k.decode(): v.decode() for k, v in decoder.decode(payload, raw=True)}
                    if flags & END_STREAM:
                        return headers, data


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_handler_that_catches_its_deadlines_cancellation_is_answered_alike_on_either_loop(
    backend: str,
) -> None:
    """The deadline cancels the handler (asyncio's CancelledError, trio's Cancelled); one that
    catches it and returns is answered DEADLINE_EXCEEDED; one that raises GRPCError instead is
    answered with that status; a reply sent from a shielded scope goes out before the
    DEADLINE_EXCEEDED status; one that re-raises is DEADLINE_EXCEEDED. The same on both loops."""
    async with serving(_Catching()) as (server, _):
        port = server.sockets[0].getsockname()[1]
        outcomes = {}
        for action in (b"return", b"raise", b"shielded send", b"re-raise"):
            headers, data = await anyio.to_thread.run_sync(_call_with_grpc_timeout, port, action)
            outcomes[action] = (headers.get("grpc-status"), headers.get("grpc-message"), data[5:])
        await _until(lambda: server.stats().calls == 0)
    late = BytesValue(value=b"late").SerializeToString()
    assert outcomes == {
        b"return": ("4", "Deadline exceeded", b""),
        b"raise": ("10", "gave up", b""),
        b"shielded send": ("4", "Deadline exceeded", late),
        b"re-raise": ("4", "Deadline exceeded", b""),
    }


_CTRL_C_DURING_A_CALL = """
import signal, sys, threading
sys.path.insert(0, {root!r})
import trio
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value
from app_kit import Cardinality, Channel, Server
from app_kit.aio.client import method_for
from tests.test_trio import Service

service = Service()

async def main():
    server = Server([service])
    await server.start("127.0.0.1", 0)
    async with Channel(f"127.0.0.1:{{server.sockets[0].getsockname()[1]}}") as channel:
        sleep = method_for(channel, "/t.S/Sleep", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        unary = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        threading.Timer(0.5, signal.raise_signal, (signal.SIGINT,)).start()
        try:
            await sleep(Int64Value(value=5000), timeout=10)
            print("the call returned")
        except KeyboardInterrupt:
            print("interrupted")
        with trio.move_on_after(3):
            while not service.cancelled.is_set():
                await trio.sleep(0.02)
        print("handler cancelled:", service.cancelled.is_set())
        print("next call:", (await unary(BytesValue(value=b"after"), timeout=5)).value)
        print("handlers running:", server.stats().calls)
    server.close(grace=1)
    await server.wait_closed()

trio.run(main)
"""


@pytest.mark.anyio
async def test_ctrl_c_caught_around_a_call_on_trio_resets_it_and_the_channel_goes_on() -> None:
    """On trio Ctrl-C is raised in the main task, wherever it waits: here inside a call of ours.
    A program that catches KeyboardInterrupt (an interactive client) finds the call reset (its
    handler cancelled on the server) and its channel serving the next call. (A child process:
    a KeyboardInterrupt here would end the test session.)"""
    output = await _run_script(_CTRL_C_DURING_A_CALL, "trio")
    assert output.strip().splitlines()[-4:] == [
        "interrupted",
        "handler cancelled: True",
        "next call: b'after'",
        "handlers running: 0",
    ], output[-3000:]


# -- peers that reset, flood, or stop reading -------------------------------------------------


def _two_calls() -> bytes:
    """A connection's bytes: the preface, then two bidi calls (100 B and 70 kB, in 16 KiB DATA
    frames), each half-closed."""
    out = HANDSHAKE
    encoder = hpack.Encoder()
    for stream_id, size in ((1, 100), (3, 70_000)):
        message = BytesValue(value=b"x" * size).SerializeToString()
        body = b"\x00" + len(message).to_bytes(4, "big") + message
        out += frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, path="/t.S/Echo"))
        for start in range(0, len(body), 16384):
            out += frame(DATA, 0, stream_id, body[start : start + 16384])
        out += frame(DATA, END_STREAM, stream_id, b"")
    return out


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_peer_that_resets_at_every_moment_leaves_nothing_behind(backend: str, caplog: Any) -> None:
    """A client resets its connection (RST, SO_LINGER 0) after each prefix of its bytes (inside
    the preface, a frame header, a message; before and after it read the answers): every
    connection and handler ends, the server-wide receive budget is back to 0, no connection
    error is counted, and nothing is logged above INFO. On both loops (trio's StreamTransport
    sees the reset as BrokenResourceError at any point of its read or write)."""
    data = _two_calls()
    cuts = sorted({*range(0, 200, 13), *range(200, len(data), 1999), len(data)})  # (the suite's time)
    async with serving(Service(), config=Configuration(linger_timeout=0.2)) as (server, _):
        port = server.sockets[0].getsockname()[1]
        for cut in cuts:
            for read_first in (False, True):
                sock = socket.create_connection(("127.0.0.1", port))
                try:
                    sock.sendall(data[:cut])
                    if read_first:
                        sock.settimeout(0.05)
                        with contextlib.suppress(OSError):
                            sock.recv(100)
                    await anyio.sleep(0.005)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                finally:
                    sock.close()
        await _until(lambda: not server.stats().connections and not server.stats().calls)
        assert server.stats().connections_total == 2 * len(cuts)
        assert server.stats().connection_errors == {}
        assert server._receive_budget.used == 0
    assert [r.getMessage() for r in caplog.records if r.levelname not in ("DEBUG", "INFO")] == []


@pytest.mark.anyio
@pytest.mark.backends
async def test_the_hostile_peer_limits_hold_through_a_relay_that_cuts_bytes_on_either_loop(backend: str) -> None:
    """Through the segmenting relay (bytes re-cut anywhere, as a network does), on both loops:
    the server-wide receive budget is shared by connections and given back when one goes;
    a message over max_receive_message_length is RESOURCE_EXHAUSTED on its own stream and the
    connection serves the next call; a message in DATA frames of 2 bytes is a flood of empty
    frames (GOAWAY ENHANCE_YOUR_CALM), while frames of 64 bytes carry it through. (The limits
    were tested on asyncio only, without a relay.)"""
    config = Configuration(
        max_receive_message_length=64 * 1024,
        max_connection_receive_buffer=1 * MiB,
        max_server_receive_buffer=256 * 1024,
    )
    held = 60 * 1024
    async with serving(ByteCounter(), config=config) as (server, _):
        with _relay_in_a_thread(server.sockets[0].getsockname()[1], seed=31 + len(backend)) as port:
            # The server-wide budget: A holds 3 x 60 KiB; B's first call fits, its second not.
            async with _Peer(port) as b:
                async with _Peer(port) as a:
                    assert await a.send(held_messages(3, held))
                    await _until(lambda: server._receive_budget.used >= 3 * held)
                    assert await b.send(held_messages(2, held))
                    await _until(lambda: bool(b.trailer_statuses()))
                    assert b.trailer_statuses() == {3: b"8"}  # RESOURCE_EXHAUSTED
                    assert a.trailer_statuses() == {} and not a.goaways
                await _until(lambda: server._receive_budget.used <= held)  # A is gone: given back
                async with _Peer(port) as c:
                    assert await c.send(held_messages(3, held))
                    await _until(lambda: server._receive_budget.used >= 4 * held)
                    await anyio.sleep(0.2)
                    assert c.trailer_statuses() == {} and not c.goaways
            await _until(lambda: server._receive_budget.used == 0 and not server.stats().connections)

            # Too large a message, then a call that fits, on one connection.
            encoder = hpack.Encoder()
            big = b"\x00" + (65 * 1024).to_bytes(4, "big") + bytes(65 * 1024)
            small = b"\x00" + (4).to_bytes(4, "big") + b"\x0a\x02hi"
            request = HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/r.R/Count"))
            request += b"".join(frame(DATA, 0, 1, big[i : i + 16384]) for i in range(0, len(big), 16384))
            request += frame(DATA, END_STREAM, 1)
            request += frame(HEADERS, END_HEADERS, 3, request_block(encoder, path="/r.R/Count"))
            request += frame(DATA, END_STREAM, 3, small)
            async with _Peer(port) as peer:
                assert await peer.send(request)
                await _until(lambda: len(peer.trailer_statuses()) == 2)
                assert peer.trailer_statuses() == {1: b"8", 3: b"0"} and not peer.goaways

            # A message in DATA frames of 2 bytes; then one in frames of 64 bytes.
            message = BytesValue(value=b"a" * (8192 - 3)).SerializeToString()  # 8 KiB
            for piece_bytes, flood in ((2, True), (64, False)):
                request = (
                    HANDSHAKE
                    + frame(HEADERS, END_HEADERS, 1, request_block(path="/r.R/Count"))
                    + frame(DATA, 0, 1, b"\x00" + len(message).to_bytes(4, "big"))
                    + b"".join(
                        frame(DATA, 0, 1, message[i : i + piece_bytes]) for i in range(0, len(message), piece_bytes)
                    )
                    + frame(DATA, END_STREAM, 1)
                )
                async with _Peer(port) as peer:
                    await peer.send(request)
                    if flood:
                        await _until(lambda: bool(peer.goaways))
                        assert [g.error_code for g in peer.goaways] == [11]  # ENHANCE_YOUR_CALM
                    else:
                        await _until(lambda: bool(peer.trailer_statuses()))
                        assert peer.trailer_statuses() == {1: b"0"} and not peer.goaways
        await _until(lambda: server._receive_budget.used == 0 and not server.stats().connections)
    assert set(server.stats().connection_errors) == {"ENHANCE_YOUR_CALM"}


class _Hold:
    """A bidi handler that reads nothing: its requests' window closes and stays closed."""

    def __init__(self) -> None:
        self.cancelled = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.H/Hold": Handler(self.hold, Cardinality.STREAM_STREAM, BytesValue, BytesValue)}

    async def hold(self, stream: Stream[BytesValue, BytesValue]) -> None:
        try:
            await anyio.sleep(3600)
        except anyio.get_cancelled_exc_class():
            self.cancelled += 1
            raise


@pytest.mark.anyio
@pytest.mark.backends
async def test_a_call_blocked_by_a_server_that_stops_reading_ends_by_deadline_scope_or_close(backend: str) -> None:
    """Our client sends an endless stream to a handler that reads nothing: its sender blocks on
    flow control. The call's deadline (DEADLINE_EXCEEDED), the caller's cancel scope, or the
    channel's close (UNAVAILABLE) ends it at once, and the server's handler is cancelled each
    time. (test_session12_client_review covers the deadline and close on asyncio only.)"""

    def requests() -> Iterator[BytesValue]:
        while True:
            yield BytesValue(value=b"z" * 4096)

    service = _Hold()
    async with serving(service) as (server, target):
        for ending in ("deadline", "scope", "close"):
            channel = Channel(target)
            hold = method_for(channel, "/t.H/Hold", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
            outcome: object = None
            started = time.monotonic()

            async def call(ending: str = ending, hold: Any = hold) -> None:
                nonlocal outcome
                try:
                    with anyio.fail_after(5):
                        with anyio.move_on_after(0.5 if ending == "scope" else 100):
                            await hold(requests(), timeout=0.5 if ending == "deadline" else None)
                        outcome = "scope"
                except GRPCError as exc:
                    outcome = exc.status

            async with anyio.create_task_group() as group:
                group.start_soon(call)
                if ending == "close":
                    await anyio.sleep(0.5)
                    channel.close()
            assert time.monotonic() - started < 2, ending
            channel.close()
            assert (
                outcome == {"deadline": Status.DEADLINE_EXCEEDED, "scope": "scope", "close": Status.UNAVAILABLE}[ending]
            )
        await _until(lambda: server.stats().calls == 0)
    assert service.cancelled == 3


# -- many calls, and the App's drain ----------------------------------------------------------


def _many_grpcio_calls(target: str, calls: int) -> dict[str, int]:
    """``calls`` server-streaming, ``calls`` bidi and ``calls`` unary calls at once from grpcio."""
    from .test_trio import _methods

    outcomes: dict[str, int] = {}
    with grpc.insecure_channel(target) as channel:
        m = _methods(channel)
        counts = [m["count"](Int64Value(value=200), timeout=60) for _ in range(calls)]
        echoes = [m["echo"](iter([BytesValue(value=b"e" * 5000)] * 20), timeout=60) for _ in range(calls)]
        sleeps = [m["sleep"].future(Int64Value(value=300), timeout=60) for _ in range(calls)]
        for kind, check in (
            ("count", lambda c: [r.value for r in c] == list(range(200))),
            ("echo", lambda c: len(list(c)) == 20),
            ("sleep", lambda f: f.result().value == 300),
        ):
            for call in {"count": counts, "echo": echoes, "sleep": sleeps}[kind]:
                try:
                    key = kind if check(call) else f"{kind} wrong"
                except grpc.RpcError as exc:
                    key = f"{kind} {exc.code().name}"
                outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


@pytest.mark.anyio
@pytest.mark.parametrize("backend", ["trio"])  # (asyncio: test_grpcio_client, test_relay: 200 at once)
async def test_hundreds_of_streaming_calls_at_once_from_grpcio(backend: str) -> None:
    """450 calls at once on one grpcio connection (150 each of server streaming, bidi, and
    unary that wait 0.3 s): all served, on both loops. (test_trio's 200 are unary only.)"""
    async with serving(Service()) as (server, target):
        outcomes = await anyio.to_thread.run_sync(_many_grpcio_calls, target, 150)
        assert outcomes == {"count": 150, "echo": 150, "sleep": 150}
        assert server.stats().connection_errors == {}


def _sleep_calls(port: int, count: int, seconds: float) -> tuple[list[grpc.Channel], list[grpc.Future]]:
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(4)]
    methods = [
        channel.unary_unary("/test.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString)
        for channel in channels
    ]
    return channels, [methods[i % 4].future(DoubleValue(value=seconds), timeout=30) for i in range(count)]


@pytest.mark.anyio
@pytest.mark.parametrize("loop", ["asyncio", "trio"])
async def test_sigterm_with_hundreds_of_calls_in_flight_serves_them_all_and_refuses_new_ones(
    loop: str, tmp_path: Any
) -> None:
    """``app_kit run --loop trio`` (and asyncio, alike): SIGTERM while 300 calls on 4
    connections are in their handlers; every one of them is answered, calls made after the
    signal are UNAVAILABLE (never run), and the process exits 0 well within the grace.
    (test_lifecycle_trio drains one call.)"""
    target, env = any_loop_app(tmp_path, APP_GRACE_PERIOD="10")
    async with AppProcess(target, "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        channels, calls = _sleep_calls(port, 300, 1.0)
        try:
            deadline = time.monotonic() + 15
            while sum("sleeping 1.0" in line for line in app.lines) < 300:
                assert time.monotonic() < deadline, app.log[-3000:]
                await asyncio.sleep(0.02)
            started = time.monotonic()
            app.signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            late = [
                channel.unary_unary(
                    "/test.Sleeper/Sleep", DoubleValue.SerializeToString, DoubleValue.FromString
                ).future(DoubleValue(value=0.1), timeout=10)
                for channel in channels
            ]
            errors = await asyncio.to_thread(lambda: [call.exception(timeout=20) for call in calls])
            late_errors = await asyncio.to_thread(lambda: [call.exception(timeout=20) for call in late])
            assert await app.wait() == 0, app.log[-3000:]
            assert time.monotonic() - started < 5
        finally:
            for channel in channels:
                channel.close()
    assert [error for error in errors if error is not None] == []
    assert [error.code() if error is not None else None for error in late_errors] == [grpc.StatusCode.UNAVAILABLE] * 4
    assert not any("sleeping 0.1" in line for line in app.lines)
    assert "Traceback" not in app.log
