"""A review of the trio adapter: each test here runs on asyncio and under trio (``backends``).

Each one pins a behaviour asyncio has and the trio adapter (app_kit/aio/runtime.py, streams.py
and the trio branches of server.py and client.py) is expected to have too. The peers are real:
raw sockets with hand-built frames (tests/frames.py), our own Channel, and child processes where
the outcome is the end of a whole run (a KeyboardInterrupt would end this pytest session).
"""

from __future__ import annotations

import gc
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import weakref
from typing import Any

import anyio
import anyio.lowlevel
import h2.stream
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import Cardinality, Channel, Configuration, Handler, Server, Status, Stream
from app_kit.aio.client import ClientInterceptor, ClientStream, method_for

from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, frame, request_block
from .process import ROOT
from .test_trio import Service

pytestmark = [pytest.mark.anyio, pytest.mark.backends]


def _unary_request(value: bytes = b"r") -> bytes:
    """A whole connection's worth of bytes: the preface and one call to /t.S/Unary."""
    message = BytesValue(value=value).SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    return (
        HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(path="/t.S/Unary")) + frame(DATA, END_STREAM, 1, body)
    )


async def _read_until_closed(sock: socket.socket, limit: float = 5.0) -> bytes:
    """Everything the server sends until it closes; ConnectionResetError if it resets."""
    sock.setblocking(False)
    received = b""
    with anyio.fail_after(limit):
        while True:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await anyio.sleep(0.01)
                continue
            if not chunk:
                return received
            received += chunk


async def test_a_client_connecting_after_close_is_refused_not_reset(backend: str) -> None:
    """close() says: no new connection is taken. Once it has returned, a client connecting is
    refused at once (it then knows nothing ran); it must not be taken into the listen backlog
    and reset later, when the listener closes (its request written, it cannot tell whether it
    ran). On trio the listeners stayed open until the accept loops noticed the cancel."""
    server = Server([Service()])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close(grace=1.0)
    sock = socket.socket()
    try:
        try:
            sock.connect(("127.0.0.1", port))  # (blocking: the kernel completes it, or refuses)
        except ConnectionRefusedError:
            refused = True
        else:
            refused = False
            sock.sendall(_unary_request())
        with anyio.fail_after(10):
            await server.wait_closed()
        if not refused:
            try:
                received = await _read_until_closed(sock)
            except ConnectionResetError:
                pytest.fail("accepted by the kernel after close(), then reset when the listener closed")
            assert received, "accepted after close(), then closed without a word"
    finally:
        sock.close()


async def test_sockets_is_empty_once_closed(backend: str) -> None:
    """``Server.sockets`` are the listening sockets: none once closed (asyncio's are ()); on
    trio the closed sockets stayed there, and getsockname() on them raises EBADF."""
    server = Server([Service()])
    await server.start("127.0.0.1", 0)
    assert len(server.sockets) == 1
    server.close()
    with anyio.fail_after(10):
        await server.wait_closed()
    assert server.sockets == ()


async def test_close_is_not_held_by_a_tls_handshake_that_never_comes(backend: str) -> None:
    """close(grace) bounds wait_closed() whatever the peers do: a TLS client that connected and
    never sent its ClientHello holds it for no longer than a plain TCP one (grace + linger), not
    for the whole handshake_timeout."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    server = Server([Service()], config=Configuration(handshake_timeout=8.0, linger_timeout=0.5))
    await server.start("127.0.0.1", 0, ssl=context)
    silent = socket.create_connection(server.sockets[0].getsockname())
    try:
        await anyio.sleep(0.2)  # accepted, its handshake under way
        started = time.monotonic()
        server.close(grace=0.5)
        with anyio.move_on_after(4):  # grace + linger is 1 s; the handshake timeout 8 s
            await server.wait_closed()
        took = time.monotonic() - started
        assert took < 3.5, f"wait_closed() waited {took:.1f}s for a TLS handshake (grace 0.5s)"
    finally:
        silent.close()
        with anyio.fail_after(10):
            await server.wait_closed()


async def test_finished_calls_are_freed_whatever_their_timeout(backend: str) -> None:
    """A call's deadline timer is cancelled when the call ends, and a cancelled timer lets go of
    the call (asyncio's TimerHandle.cancel() drops its callback). On trio the cancelled handle
    stayed in the shared runtime's heap, holding the whole ClientStream (its messages, metadata
    and connection) until its deadline: with long timeouts, memory grows with every call."""
    async with serving_unary() as target:
        async with Channel(target) as channel:
            unary = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            calls: list[weakref.ref[ClientStream[Any, Any]]] = []
            for _ in range(20):
                reply, call = await unary.with_call(BytesValue(value=b"x" * 50_000), timeout=3600)
                assert reply.value == b"x" * 50_000
                calls.append(weakref.ref(call))
                del call, reply
            gc.collect()
            alive = sum(ref() is not None for ref in calls)
            assert alive == 0, f"{alive} of 20 finished calls are still referenced"


async def test_close_during_start_keeps_the_server_from_listening(backend: str) -> None:
    """close() says that calling it on a server never started keeps it from starting. Called
    while start() is still opening its listener (a signal during start-up), start() went on
    and listened, on a server closed already; and wait_closed() never returned (the listener
    it waits for is never closed). On both loops. The close lands at several points of the
    start, so that at least one is inside it."""
    for checkpoints in range(6):
        server = Server([Service()])
        ports: list[int] = []

        async def start(server: Server = server, ports: list[int] = ports) -> None:
            try:
                await server.start("localhost", 0)  # (resolving the name: start() waits there)
            except RuntimeError:
                return  # closed before it began: refused, as documented
            ports.extend(sock.getsockname()[1] for sock in server.sockets)

        async with anyio.create_task_group() as group:
            group.start_soon(start)
            for _ in range(checkpoints):
                await anyio.lowlevel.checkpoint()
            server.close()
        with anyio.move_on_after(3) as waited:
            await server.wait_closed()
        listening = []
        for port in ports:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    listening.append(port)
        assert not waited.cancelled_caught and not listening, (
            f"close() after {checkpoints} checkpoints of start(): wait_closed() returned:"
            f" {not waited.cancelled_caught}; still listening on {listening}"
        )


def _h2_streams_alive() -> int:
    gc.collect()
    return sum(isinstance(item, h2.stream.H2Stream) for item in gc.get_objects())


async def test_a_long_lived_client_connection_does_not_keep_every_finished_stream(backend: str) -> None:
    """h2 keeps closed streams in ``H2Connection.streams`` until it sweeps them, which it does
    when asked how many streams are open. The server's h2 is asked on every inbound stream
    (wire/h2_internals.py sweeps there when the count doubles); the client's never is: its
    start_stream() opens streams with _begin_new_stream directly. So a client connection holds
    every stream it ever opened (~600 bytes each, h2's and its state machine): memory grows
    with every call for the life of the connection. On both loops (not trio's doing)."""
    async with serving_unary() as target:
        async with Channel(target) as channel:
            unary = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            for _ in range(50):
                await unary(BytesValue(value=b"x"), timeout=10)
            before = _h2_streams_alive()
            for _ in range(1500):
                await unary(BytesValue(value=b"x"), timeout=10)
            grown = _h2_streams_alive() - before
            assert grown < 200, f"{grown} more h2 streams alive after 1500 finished calls on one connection"


class _SlowStart(ClientInterceptor):
    def __init__(self) -> None:
        self.ended: list[Status | None] = []

    async def start(self, call: ClientStream[Any, Any]) -> None:
        await anyio.sleep(30)

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        self.ended.append(call.status)


async def test_a_call_cancelled_in_an_interceptors_start_ends_cancelled(backend: str) -> None:
    """The caller's scope is cancelled while an interceptor's start() runs: the call ends
    CANCELLED (what on_call_end and the metrics see), as on asyncio, not UNKNOWN: on trio the
    cancellation is trio.Cancelled, which client.py's isinstance(exc, asyncio.CancelledError)
    does not recognise."""
    interceptor = _SlowStart()
    async with Channel("127.0.0.1:1", interceptors=[interceptor]) as channel:
        unary = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        with anyio.move_on_after(0.1) as scope:
            await unary(BytesValue(), timeout=5)
        assert scope.cancelled_caught
    assert interceptor.ended == [Status.CANCELLED]


class _CountingEcho:
    """A bidi echo that counts how many calls reached it."""

    def __init__(self) -> None:
        self.calls = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.S/Echo": Handler(self.echo, Cardinality.STREAM_STREAM, BytesValue, BytesValue)}

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        self.calls += 1
        async for message in stream:
            await stream.send_message(message)


async def test_a_bidi_call_on_a_fresh_channel_is_one_call_on_the_server(backend: str) -> None:
    """stub.Echo(requests) sends from a task of its own while the caller reads the replies. On
    a channel not yet connected, both wait for the connection in send_request(), and both then
    start a stream: the server runs the handler twice, the second stream (headers only) is never
    ended and its handler never returns; the call's replies and its window acknowledgements can
    go to different streams: the window of the one that carries the replies never reopens, and
    ending the call then fails in h2 ("Cannot acknowledge negative data"), which with many such
    calls at once ends the whole connection with GOAWAY INTERNAL_ERROR (seen on trio). On both
    loops (not trio's doing: client.py's send_request re-checks nothing after its await)."""
    service = _CountingEcho()
    server = Server([service])
    await server.start("127.0.0.1", 0)
    try:
        async with Channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}") as channel:
            echo = method_for(channel, "/t.S/Echo", Cardinality.STREAM_STREAM, BytesValue, BytesValue)
            replies = await echo([BytesValue(value=b"a"), BytesValue(value=b"b")], timeout=5)
            assert [reply.value for reply in replies] == [b"a", b"b"]
            with anyio.move_on_after(2):
                while server.stats().calls:
                    await anyio.sleep(0.02)
            assert (service.calls, server.stats().calls) == (1, 0), "handler runs, handlers still running"
    finally:
        server.close(grace=0.5)
        with anyio.fail_after(10):
            await server.wait_closed()


_EMFILE_AT_ACCEPT = """
import os, resource, socket, sys
sys.path.insert(0, {root!r})
import anyio
from app_kit import Server
from tests.test_trio import Service
from tests.test_trio_review import _unary_request

async def main():
    server = Server([Service()])
    await server.start("127.0.0.1", 0)
    client = socket.socket()  # its descriptor, before there are none left
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor from here
    try:
        client.connect(server.sockets[0].getsockname())  # completed by the kernel, queued
        await anyio.sleep(0.2)  # the server's accept() fails with EMFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        client.sendall(_unary_request(b"after EMFILE"))
        with anyio.move_on_after(5):
            while not server.stats().connections_total:
                await anyio.sleep(0.02)
        print("served" if server.stats().connections_total else "never served")
        await anyio.sleep(1.2)  # (asyncio's own accept retries, 1 s after the EMFILE, run before the close)
    except OSError as exc:
        print("never served:", repr(exc))
    client.close()
    server.close(grace=0.5)
    with anyio.fail_after(10):
        await server.wait_closed()

anyio.run(main, backend={backend!r})
"""


async def test_the_server_accepts_again_after_running_out_of_file_descriptors(backend: str) -> None:
    """accept() failing with EMFILE (too many open files, a busy server's everyday trouble) is
    logged and retried, as asyncio does: connections are served again once descriptors are
    free. On trio anyio reports it as BrokenResourceError, which the accept loop takes for the
    listener's end: the server stops accepting for good and closes its listening socket.
    (In a child process: its file descriptor limit is lowered for a moment.)"""
    output = await _run_script(_EMFILE_AT_ACCEPT, backend)
    assert "\nserved\n" in f"\n{output}", output[-3000:]


_CTRL_C_IN_A_HANDLER = """
import asyncio, signal, sys
sys.path.insert(0, {root!r})
import anyio
from google.protobuf.wrappers_pb2 import BytesValue
from app_kit import Cardinality, Channel, Handler, Server
from app_kit.aio.client import method_for

class Interrupted:
    def __mapping__(self):
        return {{"/t.K/Stop": Handler(self.stop, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}}

    async def stop(self, stream):
        await stream.recv_message()
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the handler's code runs
        await stream.send_message(BytesValue())

async def main():
    server = Server([Interrupted()])
    await server.start("127.0.0.1", 0)
    async with Channel(f"127.0.0.1:{{server.sockets[0].getsockname()[1]}}") as channel:
        stop = method_for(channel, "/t.K/Stop", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        await stop(BytesValue(), timeout=10)
        await anyio.sleep(10)  # (the interrupt ends the run before this does)

try:
    if {backend!r} == "trio":
        import trio
        trio.run(main)
    else:
        asyncio.run(main())
except BaseException as exc:
    print("ended by", type(exc).__name__)
else:
    print("returned")
"""


async def test_ctrl_c_during_a_handler_ends_the_run_with_keyboardinterrupt(backend: str) -> None:
    """Ctrl-C that lands while a handler's code runs ends the run with KeyboardInterrupt (what
    asyncio.run raises). On trio the connection's tasks are children of a system task without
    KeyboardInterrupt protection: it was raised there and crashed the run as TrioInternalError.
    (In a child process: a KeyboardInterrupt here would end the test session.)"""
    output = await _run_script(_CTRL_C_IN_A_HANDLER, backend)
    assert output.strip().splitlines()[-1:] == ["ended by KeyboardInterrupt"], output[-2000:]


# -- helpers ---------------------------------------------------------------------------------


async def _run_script(template: str, backend: str) -> str:
    """Run ``template`` (formatted with the repository's root and the backend) in a child
    Python; its output, stdout and stderr together."""
    code = textwrap.dedent(template.format(root=str(ROOT), backend=backend))
    with anyio.fail_after(30):
        result = await anyio.run_process([sys.executable, "-c", code], check=False, stderr=subprocess.STDOUT, cwd=ROOT)
    return result.stdout.decode(errors="replace")


class serving_unary:
    """``async with serving_unary() as target``: a Server with the Service on a free port."""

    def __init__(self) -> None:
        self.server = Server([Service()])

    async def __aenter__(self) -> str:
        await self.server.start("127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc_info: object) -> None:
        self.server.close(grace=1.0)
        with anyio.fail_after(10):
            await self.server.wait_closed()
