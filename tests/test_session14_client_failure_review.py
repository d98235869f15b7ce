"""A fresh-eyes review of the client as a Kubernetes user sees it when backends die: pods killed
(SIGKILL: the kernel closes their sockets), pods draining (GOAWAY, then close), silent network
partitions (SIGSTOP, or a relay that stops forwarding without closing), names that resolve to
several addresses, backends restarting on the same address.

The backends are real: our Server and grpcio's, in subprocesses (killed, stopped) or in this
process behind a relay that can reset every connection or blackhole them; a blackholed address
is a real listening socket whose accept queue is full (the kernel drops the SYNs). Names come
from a stand-in resolver (``socket.getaddrinfo`` for names ending in ``.test``), as in
test_fleet_review.py.

Three tests showed defects, now fixed (each failed first): a name whose first address drops
SYNs, keepalive PINGs on connections without calls, keepalive timed from its checks rather than
from the last frame read; the others confirm behaviour not covered elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, Status, Stream
from app_kit.aio.client import method_for
from app_kit.aio.subchannel import ConnectivityState

pytestmark = pytest.mark.anyio

T = TypeVar("T")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = Cardinality


async def bounded(awaitable: Awaitable[T], timeout: float, failure: str) -> T:
    """``awaitable``'s result; if it takes longer than ``timeout``, the test fails saying ``failure``."""
    try:
        return await asyncio.wait_for(awaitable, timeout)
    except TimeoutError:
        pytest.fail(f"{failure} (nothing after {timeout} s)")


@contextlib.asynccontextmanager
async def spawned() -> AsyncIterator[Callable[[Awaitable[Any]], asyncio.Future[Any]]]:
    """``spawn(awaitable)`` runs it in a task; on the way out, whatever still runs is cancelled
    and every outcome retrieved (a failed test leaves nothing to fail the next one)."""
    tasks: list[asyncio.Future[Any]] = []

    def spawn(awaitable: Awaitable[Any]) -> asyncio.Future[Any]:
        tasks.append(asyncio.ensure_future(awaitable))
        return tasks[-1]

    try:
        yield spawn
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def status_of(awaitable: Awaitable[Any], timeout: float = 5.0) -> tuple[Status | str, float]:
    """How a call ended (its status, or "OK") and when (``time.monotonic()``)."""
    try:
        await bounded(awaitable, timeout, "the call did not end")
        return "OK", time.monotonic()
    except GRPCError as exc:
        return exc.status, time.monotonic()


# -- the service, in this process (our Server) and in a subprocess (ours or grpcio's) ----------


class Fleet:
    """Pid (who served), Sleep (unary, for ``value`` seconds), Ticks (replies every 20 ms,
    for ever) and Echo (bidi)."""

    def __init__(self) -> None:
        self.started = 0  # calls whose handler started
        self.processed = 0  # Sleep calls whose handler started

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.F/Pid": Handler(self.pid, C.UNARY_UNARY, BytesValue, Int64Value),
            "/t.F/Sleep": Handler(self.sleep, C.UNARY_UNARY, DoubleValue, Int64Value),
            "/t.F/Ticks": Handler(self.ticks, C.UNARY_STREAM, Int64Value, Int64Value),
            "/t.F/Echo": Handler(self.echo, C.STREAM_STREAM, BytesValue, BytesValue),
        }

    async def pid(self, stream: Stream[BytesValue, Int64Value]) -> None:
        await stream.recv_message()
        await stream.send_message(Int64Value(value=os.getpid()))

    async def sleep(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.started += 1
        self.processed += 1
        await asyncio.sleep(request.value)
        await stream.send_message(Int64Value(value=os.getpid()))

    async def ticks(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        self.started += 1
        number = 0
        while True:
            await stream.send_message(Int64Value(value=number))
            number += 1
            await asyncio.sleep(0.02)

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        self.started += 1
        async for request in stream:
            await stream.send_message(request)


# The same service as a process of its own: ``python -c BACKEND kind port grace``, our Server or
# grpcio's on 127.0.0.1:port (0: any); prints "port N", then "start <method>" as each call
# starts; SIGTERM closes it gracefully (grace seconds for the calls in flight).
BACKEND = r"""
import asyncio, os, signal, sys
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

kind, port, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def say(text):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()

async def pid(request):
    say("start Pid")
    return Int64Value(value=os.getpid())

async def sleep(request):
    say("start Sleep")
    await asyncio.sleep(request.value)
    return Int64Value(value=os.getpid())

async def ticks(request):
    say("start Ticks")
    number = 0
    while True:
        yield Int64Value(value=number)
        number += 1
        await asyncio.sleep(0.02)

async def echo(requests):
    say("start Echo")
    async for request in requests:
        yield request

METHODS = {
    "Pid": (pid, "unary_unary", BytesValue, Int64Value),
    "Sleep": (sleep, "unary_unary", DoubleValue, Int64Value),
    "Ticks": (ticks, "unary_stream", Int64Value, Int64Value),
    "Echo": (echo, "stream_stream", BytesValue, BytesValue),
}

def for_app_kit(function, kind):
    async def unary(stream):
        request = await stream.recv_message()
        await stream.send_message(await function(request))
    async def server_streaming(stream):
        request = await stream.recv_message()
        async for reply in function(request):
            await stream.send_message(reply)
    async def bidi(stream):
        async for reply in function(stream):
            await stream.send_message(reply)
    return {"unary_unary": unary, "unary_stream": server_streaming, "stream_stream": bidi}[kind]

def for_grpcio(function, kind):
    if kind == "unary_unary":
        async def unary(request, context):
            return await function(request)
        return unary
    if kind == "unary_stream":
        async def server_streaming(request, context):
            async for reply in function(request):
                yield reply
        return server_streaming
    async def bidi(requests, context):
        async for reply in function(requests):
            yield reply
    return bidi

async def main():
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    if kind == "app_kit":
        from app_kit import Cardinality, Handler, Server
        cardinalities = {"unary_unary": Cardinality.UNARY_UNARY, "unary_stream": Cardinality.UNARY_STREAM,
                         "stream_stream": Cardinality.STREAM_STREAM}
        class Service:
            def __mapping__(self):
                return {f"/t.F/{name}": Handler(for_app_kit(f, k), cardinalities[k], q, r)
                        for name, (f, k, q, r) in METHODS.items()}
        server = Server([Service()])
        await server.start("127.0.0.1", port)
        say(f"port {server.sockets[0].getsockname()[1]}")
        await stop.wait()
        server.close(grace=grace)
        await server.wait_closed()
    else:
        import grpc
        handlers = {
            name: getattr(grpc, f"{k}_rpc_method_handler")(
                for_grpcio(f, k), request_deserializer=q.FromString, response_serializer=r.SerializeToString)
            for name, (f, k, q, r) in METHODS.items()
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.F", handlers),))
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        say(f"port {bound}")
        await stop.wait()
        await server.stop(grace)

asyncio.run(main())
"""


class Backend:
    """A backend process (see BACKEND): ``kind`` is "app_kit" or "grpcio"."""

    def __init__(self, kind: str, port: int = 0, grace: float = 5.0) -> None:
        self.kind, self.port, self.grace = kind, port, grace
        self.lines: list[str] = []
        self._line_added = asyncio.Event()

    async def __aenter__(self) -> Backend:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            BACKEND,
            self.kind,
            str(self.port),
            str(self.grace),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.process.stdout is not None
        line = (await bounded(self.process.stdout.readline(), 15, "the backend did not start")).decode()
        assert line.startswith("port "), line
        self.port = int(line.split()[1])
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.kill()

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            self.lines.append(line.decode().strip())
            self._line_added.set()

    async def wait_started(self, count: int) -> None:
        """Until ``count`` calls have started on it."""
        while sum(line.startswith("start ") for line in self.lines) < count:
            self._line_added.clear()
            await bounded(self._line_added.wait(), 5, f"{count} calls did not start on the backend")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)  # (a stopped process dies only once it runs)
            self.process.kill()
        await self.process.wait()
        await self._reader


class Calls:
    """The service's methods on a channel."""

    def __init__(self, channel: Channel) -> None:
        self.pid = method_for(channel, "/t.F/Pid", C.UNARY_UNARY, BytesValue, Int64Value)
        self.sleep = method_for(channel, "/t.F/Sleep", C.UNARY_UNARY, DoubleValue, Int64Value)
        self._ticks = method_for(channel, "/t.F/Ticks", C.UNARY_STREAM, Int64Value, Int64Value)
        self._echo = method_for(channel, "/t.F/Echo", C.STREAM_STREAM, BytesValue, BytesValue)
        #: When the latest reply of a Ticks call came.
        self.last_tick = 0.0

    async def ticks(self, **options: Any) -> None:
        """A server-streaming call, read until it ends."""
        async for _ in self._ticks(Int64Value(), **options):
            self.last_tick = time.monotonic()

    async def echo(self, **options: Any) -> None:
        """A bidi call whose requests come every 20 ms, read until it ends."""

        async def requests() -> AsyncIterator[BytesValue]:
            while True:
                yield BytesValue(value=b"x")
                await asyncio.sleep(0.02)

        async for _ in self._echo(requests(), **options):
            pass


# -- a relay that can kill or blackhole the connections through it -----------------------------


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as the kernel does a killed process's busy socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class KillableRelay:
    """A TCP relay to ``upstream_port`` on a port of its own. ``kill()`` resets every connection
    and stops listening (a pod killed: RST, then refused), ``start()`` listens again on the same
    port (the pod back), ``blackhole()`` stops forwarding either way and closes nothing (a silent
    partition: no FIN, no RST)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._flowing = asyncio.Event()

    async def start(self) -> KillableRelay:
        self._flowing.set()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            _reset(writer)
            return
        pair = (writer, upstream_writer)
        self._pairs.add(pair)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    await self._flowing.wait()
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                for side in pair:
                    _reset(side)

        pumps = [
            asyncio.ensure_future(pump(reader, upstream_writer)),
            asyncio.ensure_future(pump(upstream_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            self._pairs.discard(pair)

    def blackhole(self) -> None:
        self._flowing.clear()

    async def kill(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pair in list(self._pairs):
            for side in pair:
                _reset(side)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def served(service: Fleet, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
    """Our Server with ``service`` on ``host``:``port``; yield its port."""
    server = Server([service])
    await server.start(host, port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close(grace=0)
        await server.wait_closed()


# == 1. A backend killed mid-call ==============================================================


@pytest.mark.parametrize("kind", ["app_kit", "grpcio"])
async def test_a_killed_backend_fails_every_call_in_flight_unavailable_and_its_restart_is_reached(kind: str) -> None:
    # SIGKILL with a unary, a server-streaming and a bidi call in flight: each ends UNAVAILABLE at
    # once (not INTERNAL, not a hang), as grpcio's client ends them ("Socket closed"). While the
    # port is closed a call fails fast; once a process listens on the same port again, a call
    # that waits for ready reaches it.
    config = Configuration(connect_initial_backoff=0.2, connect_backoff_jitter=0.0)
    async with (
        Backend(kind) as backend,
        Channel("127.0.0.1", backend.port, config=config) as channel,
        spawned() as spawn,
    ):
        calls = Calls(channel)
        first_pid = (await calls.pid(BytesValue(), timeout=5)).value
        in_flight = [spawn(calls.sleep(DoubleValue(value=30))), spawn(calls.ticks()), spawn(calls.echo())]
        await backend.wait_started(4)
        killed_at = time.monotonic()
        await backend.kill()
        for call in in_flight:
            status, ended_at = await status_of(call)
            assert status is Status.UNAVAILABLE
            assert ended_at - killed_at < 1.0
        status, ended_at = await status_of(calls.pid(BytesValue(), timeout=5))
        assert status is Status.UNAVAILABLE and ended_at - killed_at < 1.5  # fail fast: nobody listens
        async with Backend(kind, port=backend.port) as restarted:
            reply = await bounded(calls.pid(BytesValue(), timeout=5, wait_for_ready=True), 6, "no reconnect")
            assert reply.value == restarted.process.pid != first_pid


# == 2. A silent partition =====================================================================


async def test_a_stopped_backend_ends_calls_at_their_deadline_or_by_keepalive_and_a_waiting_call_gets_through() -> None:
    # SIGSTOP: the kernel still accepts and acknowledges, nobody answers. A call with a deadline
    # ends DEADLINE_EXCEEDED at its deadline (before keepalive could tell); calls without one end
    # UNAVAILABLE once the keepalive PING goes unanswered (within 2 x keepalive_time +
    # keepalive_timeout of the last frame: see the keepalive timing test below). A call waiting
    # for ready then gets through once the process runs again (SIGCONT).
    keepalive_time, keepalive_timeout = 0.5, 0.3
    config = Configuration(
        keepalive_time=keepalive_time,
        keepalive_timeout=keepalive_timeout,
        connect_initial_backoff=0.1,
        connect_backoff_jitter=0.0,
    )
    async with (
        Backend("app_kit") as backend,
        Channel("127.0.0.1", backend.port, config=config) as channel,
        spawned() as spawn,
    ):
        calls = Calls(channel)
        await calls.pid(BytesValue(), timeout=5)
        started = time.monotonic()
        with_deadline = spawn(calls.sleep(DoubleValue(value=30), timeout=0.5))
        without = [spawn(calls.sleep(DoubleValue(value=30))), spawn(calls.ticks())]
        await backend.wait_started(4)
        backend.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        status, ended_at = await status_of(with_deadline)
        assert status is Status.DEADLINE_EXCEEDED
        assert 0.48 <= ended_at - started < 0.8
        for call in without:
            status, ended_at = await status_of(call)
            assert status is Status.UNAVAILABLE
            assert ended_at - stopped_at < 2 * keepalive_time + keepalive_timeout + 0.4
        waiting = spawn(calls.pid(BytesValue(), timeout=5, wait_for_ready=True))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        backend.signal(signal.SIGCONT)
        assert (await bounded(waiting, 6, "the waiting call did not get through")).value == backend.process.pid


async def test_a_silent_peer_is_found_within_keepalive_time_and_timeout_of_its_last_frame() -> None:
    # Replies every 20 ms until the relay blackholes the connection just after a keepalive
    # check: the client hears nothing from then on. The README: "a connection PINGs its server
    # after keepalive_time without a frame from it"; the PING unanswered for keepalive_timeout
    # closes it. The call should fail UNAVAILABLE keepalive_time + keepalive_timeout (1.1 s) after
    # the last reply; here the check that follows the silence still sees the replies that came
    # since the check before, and the PING waits one more interval (2.05 s).
    keepalive_time, keepalive_timeout = 1.0, 0.1
    config = Configuration(keepalive_time=keepalive_time, keepalive_timeout=keepalive_timeout)
    service = Fleet()
    async with served(service) as port:
        relay = await KillableRelay(port).start()
        try:
            async with Channel("127.0.0.1", relay.port, config=config) as channel, spawned() as spawn:
                await channel.channel_ready()
                connected_at = time.monotonic()  # (the connection's keepalive timer started just before)
                calls = Calls(channel)
                call = spawn(calls.ticks())
                await asyncio.sleep(connected_at + keepalive_time + 0.1 - time.monotonic())
                relay.blackhole()
                status, ended_at = await status_of(call)
                assert status is Status.UNAVAILABLE
                silent_for = ended_at - calls.last_tick
                assert silent_for < keepalive_time + keepalive_timeout + 0.3, f"found dead after {silent_for:.2f} s"
        finally:
            await relay.kill()


@pytest.mark.parametrize("server_kind", ["app_kit", "grpcio"])
async def test_an_idle_channel_with_a_short_keepalive_is_not_told_too_many_pings(server_kind: str) -> None:
    # A channel that sets keepalive_time (to find dead peers under calls that wait long, as
    # Kubernetes users are told to) and then sits idle: default servers allow a PING on an idle
    # connection every 2 h at most. A grpcio client with the same setting sends none while idle.
    config = Configuration(keepalive_time=0.1, keepalive_timeout=0.1)
    async with contextlib.AsyncExitStack() as stack:
        if server_kind == "app_kit":
            port = await stack.enter_async_context(served(Fleet()))
        else:
            grpcio_server = grpc.aio.server()
            port = grpcio_server.add_insecure_port("127.0.0.1:0")
            await grpcio_server.start()
            stack.push_async_callback(grpcio_server.stop, None)
        async with Channel("127.0.0.1", port, config=config) as channel:
            await channel.channel_ready()
            protocol = channel._subchannels[0].protocol
            await asyncio.sleep(2.0)  # idle: four PINGs (a GOAWAY after 0.8 s) or more
            assert channel.keepalive_time == 0.1, "the server said too_many_pings"
            assert channel._subchannels[0].protocol is protocol and channel.get_state() is ConnectivityState.READY


# == 3 and 5. Names with several addresses =====================================================


class Resolver:
    """The stand-in DNS: ``answers[name]`` is a list of IPs for names ending in ``.test``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answers: dict[str, list[str]] = {}
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if not (isinstance(host, str) and host.endswith(".test")):
                return real(host, port, *args, **kwargs)
            return [info for ip in self.answers[host] for info in real(ip, port, *args, **kwargs)]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@contextlib.contextmanager
def blackholed(host: str, port: int) -> Any:
    """``host``:``port`` listens with its accept queue full and never accepts: the kernel drops
    the SYNs of every further connection (no answer, no RST: a host gone from the network)."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind((host, port))
        listener.listen(0)
        filler.connect((host, port))  # the one connection the queue holds
        probe = socket.socket()
        probe.settimeout(0.2)
        with pytest.raises(TimeoutError):  # (dropped, as this test needs)
            probe.connect((host, port))
        probe.close()
        yield
    finally:
        filler.close()
        listener.close()


async def test_a_host_name_whose_first_address_is_unreachable_reaches_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    # "api.test" resolves to 127.0.0.2 (a host gone: its SYNs vanish) and 127.0.0.1 (serving):
    # as a headless Kubernetes service does for a while after a node died, or a dual-stack name
    # whose IPv6 address is unroutable. grpcio, given the same two addresses (ipv4:a,b), is
    # served in ~0.25 s; here the call fails UNAVAILABLE ("timed out") at connect_min_timeout.
    resolver = Resolver(monkeypatch)
    config = Configuration(connect_min_timeout=1.0)
    async with served(Fleet()) as port:
        resolver.answers["api.test"] = ["127.0.0.2", "127.0.0.1"]
        with blackholed("127.0.0.2", port):
            async with Channel(f"api.test:{port}", config=config) as channel:
                status, _ = await status_of(Calls(channel).pid(BytesValue(), timeout=3))
                assert status == "OK"


# == 4. A draining backend =====================================================================


async def test_a_grpcio_backend_stopped_with_grace_under_load_fails_no_call_and_runs_none_twice() -> None:
    # Two grpcio backends, twenty callers; one is stopped gracefully (GOAWAY, its calls finish,
    # its port closes). The calls go on on the other, and every call the backends ran was run
    # once: what the stopped one never processed was sent to the other, what it processed was not
    # sent again. (grpcio's server cancels the calls that reach it while it stops, before any
    # handler saw them: those fail CANCELLED, here as with grpcio's own client; none other fails.)
    processed = [0, 0]

    def service(index: int) -> grpc.GenericRpcHandler:
        async def sleep(request: DoubleValue, context: Any) -> Int64Value:
            processed[index] += 1
            await asyncio.sleep(request.value)
            return Int64Value(value=index)

        handler = grpc.unary_unary_rpc_method_handler(
            sleep, request_deserializer=DoubleValue.FromString, response_serializer=Int64Value.SerializeToString
        )
        return grpc.method_handlers_generic_handler("t.F", {"Sleep": handler})

    servers, ports = [], []
    for index in range(2):
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((service(index),))
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    try:
        async with Channel([f"127.0.0.1:{port}" for port in ports]) as channel, spawned() as spawn:
            calls = Calls(channel)
            failures: list[GRPCError] = []
            served_by = [0, 0]
            stop = asyncio.Event()

            async def caller() -> None:
                while not stop.is_set():
                    try:
                        served_by[(await calls.sleep(DoubleValue(value=0.03), timeout=5)).value] += 1
                    except GRPCError as exc:
                        failures.append(exc)

            callers = [spawn(caller()) for _ in range(20)]
            while not all(served_by):
                await asyncio.sleep(0.02)
            await servers[0].stop(grace=3)
            before = sum(served_by)
            await asyncio.sleep(0.3)
            stop.set()
            await bounded(asyncio.gather(*callers), 5, "the callers did not finish")
            assert {exc.status for exc in failures} <= {Status.CANCELLED}, failures
            assert sum(served_by) - before > 20  # went on, on the other backend
            assert served_by == processed
    finally:
        for server in servers:
            await server.stop(None)


# == 6. Hygiene over churn =====================================================================


async def test_two_hundred_kills_and_restarts_with_calls_in_flight_leave_nothing_behind() -> None:
    # Each cycle: a call that waits for ready (reconnecting), then a unary, a server-streaming and
    # a bidi call in flight; the backend "dies" (every connection reset, the port refused) and
    # comes back on the same port. Every call in flight ends UNAVAILABLE; tasks, sockets, timers
    # and objects stay level from cycle 50 to 200. Then close() with calls in flight ends them at
    # once (UNAVAILABLE) and leaves nothing running.
    loop = asyncio.get_running_loop()
    service = Fleet()
    config = Configuration(connect_initial_backoff=0.005, connect_max_backoff=0.01, connect_backoff_jitter=0.0)

    def level() -> tuple[int, int, int, int]:
        gc.collect()
        scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
        timers = len([handle for handle in scheduled if not handle.cancelled()])
        return len(asyncio.all_tasks()), len(os.listdir("/proc/self/fd")), timers, len(gc.get_objects())

    async with served(service) as port:
        relay = await KillableRelay(port).start()
        channel = Channel("127.0.0.1", relay.port, config=config)
        calls = Calls(channel)
        leftovers: list[asyncio.Future[Any]] = []  # (cancelled if the test fails)
        try:
            statuses: set[Status | str] = set()
            at_fifty = (0, 0, 0, 0)
            for cycle in range(200):
                await calls.pid(BytesValue(), timeout=5, wait_for_ready=True)
                started = service.started
                in_flight = [
                    asyncio.ensure_future(calls.sleep(DoubleValue(value=30))),
                    asyncio.ensure_future(calls.ticks()),
                    asyncio.ensure_future(calls.echo()),
                ]
                leftovers[:] = in_flight
                while service.started < started + 3:
                    await asyncio.sleep(0.001)
                await relay.kill()
                for call in in_flight:
                    statuses.add((await status_of(call, 2))[0])
                del in_flight, call
                await relay.start()
                if cycle == 49:
                    at_fifty = level()
            at_end = level()
            assert statuses == {Status.UNAVAILABLE}
            assert at_end[:3] == at_fifty[:3], (at_fifty, at_end)  # tasks, file descriptors, timers
            assert at_end[3] - at_fifty[3] < 150, (at_fifty, at_end)  # objects: under one per cycle

            in_flight = [
                asyncio.ensure_future(calls.sleep(DoubleValue(value=30))),
                asyncio.ensure_future(calls.ticks()),
            ]
            leftovers[:] = in_flight
            await asyncio.sleep(0.05)
            closed_at = time.monotonic()
            channel.close()
            for call in in_flight:
                status, ended_at = await status_of(call, 2)
                assert status is Status.UNAVAILABLE and ended_at - closed_at < 0.2
            for _ in range(50):  # (the server and the relay see the connection's end a moment later)
                if level()[:3] == at_fifty[:3]:
                    break
                await asyncio.sleep(0.02)
            assert level()[:3] == at_fifty[:3], (at_fifty, level())
        finally:
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)
            channel.close()
            await relay.kill()
