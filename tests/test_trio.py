"""The server on trio as on asyncio: every test here runs on both (the ``backends`` marker).

The peer is grpcio's synchronous client, in a worker thread (``anyio.to_thread``), so that it is
independent of the loop under test; on trio the server runs on anyio's byte streams
(app_kit/aio/streams.py) and its calls on :class:`~app_kit.aio.runtime.TrioRuntime`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import grpc
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value, StringValue

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Server, Status, Stream, client_tls
from app_kit.aio.client import method_for
from app_kit.aio.testing import ChannelFor

from .relay import segmenting_relay
from .services import grpcio_method

pytestmark = [pytest.mark.anyio, pytest.mark.backends]


class Service:
    """Handlers written with anyio only, so that they run on both loops."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.backend = ""

    def __mapping__(self) -> dict[str, Handler]:
        u, us, su, ss = (
            Cardinality.UNARY_UNARY,
            Cardinality.UNARY_STREAM,
            Cardinality.STREAM_UNARY,
            Cardinality.STREAM_STREAM,
        )
        return {
            "/t.S/Unary": Handler(self.unary, u, BytesValue, BytesValue),
            "/t.S/Sleep": Handler(self.sleep, u, Int64Value, Int64Value),
            "/t.S/Fail": Handler(self.fail, u, StringValue, StringValue),
            "/t.S/Count": Handler(self.count, us, Int64Value, Int64Value),
            "/t.S/Sum": Handler(self.sum, su, BytesValue, Int64Value),
            "/t.S/Echo": Handler(self.echo, ss, BytesValue, BytesValue),
        }

    async def unary(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.backend = _backend()
        await stream.send_initial_metadata(metadata=[(k, v) for k, v in stream.metadata.items() if k.startswith("x-")])
        await stream.send_message(BytesValue(value=request.value))
        await stream.send_trailing_metadata(metadata={"x-trailer": "done"})

    async def sleep(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.started.set()
        try:
            await anyio.sleep(request.value / 1000)
        except anyio.get_cancelled_exc_class():
            self.cancelled.set()
            raise
        await stream.send_message(Int64Value(value=request.value))

    async def fail(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value == "grpc":
            raise GRPCError(Status.NOT_FOUND, "no such thing", trailing_metadata={"x-why": "gone"})
        raise RuntimeError("secret internals")

    async def count(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for index in range(request.value):
            await stream.send_message(Int64Value(value=index))

    async def sum(self, stream: Stream[BytesValue, Int64Value]) -> None:
        total = 0
        async for message in stream:
            total += len(message.value)
        await stream.send_message(Int64Value(value=total))

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        async for message in stream:
            await stream.send_message(message)


def _backend() -> str:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "asyncio"


@contextlib.asynccontextmanager
async def serving(service: Any, **start: Any) -> AsyncIterator[tuple[Server, str]]:
    config = start.pop("config", None)
    server = Server([service], config=config)
    await server.start("127.0.0.1", 0, **start)
    try:
        yield server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close(grace=1.0)
        with anyio.fail_after(10):
            await server.wait_closed()


def _methods(channel: grpc.Channel) -> dict[str, Any]:
    return {
        "unary": grpcio_method(channel, "unary_unary", "/t.S/Unary", BytesValue, BytesValue),
        "sleep": grpcio_method(channel, "unary_unary", "/t.S/Sleep", Int64Value, Int64Value),
        "fail": grpcio_method(channel, "unary_unary", "/t.S/Fail", StringValue, StringValue),
        "count": grpcio_method(channel, "unary_stream", "/t.S/Count", Int64Value, Int64Value),
        "sum": grpcio_method(channel, "stream_unary", "/t.S/Sum", BytesValue, Int64Value),
        "echo": grpcio_method(channel, "stream_stream", "/t.S/Echo", BytesValue, BytesValue),
    }


def _every_kind_of_call(target: str, *, concurrent_calls: int = 200) -> None:
    """All four cardinalities, metadata, errors, large messages, concurrent calls."""
    with grpc.insecure_channel(target) as channel:
        m = _methods(channel)
        reply, call = m["unary"].with_call(BytesValue(value=b"hi"), metadata=[("x-echo", "1")], timeout=10)
        assert reply.value == b"hi"
        assert ("x-echo", "1") in call.initial_metadata() and ("x-trailer", "done") in call.trailing_metadata()
        assert [r.value for r in m["count"](Int64Value(value=500), timeout=10)] == list(range(500))
        big = b"b" * (1024 * 1024 - 64)
        assert m["sum"](iter([BytesValue(value=big)] * 4), timeout=10).value == 4 * len(big)
        echoed = list(m["echo"](iter([BytesValue(value=bytes([i % 256]) * 70_000) for i in range(40)]), timeout=10))
        assert [r.value[:1] for r in echoed] == [bytes([i % 256]) for i in range(40)]
        with pytest.raises(grpc.RpcError) as info:
            m["fail"](StringValue(value="grpc"), timeout=10)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND and info.value.details() == "no such thing"
        assert ("x-why", "gone") in info.value.trailing_metadata()
        with pytest.raises(grpc.RpcError) as info:
            m["fail"](StringValue(value="crash"), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNKNOWN and "secret" not in (info.value.details() or "")
        futures = [
            m["unary"].future(BytesValue(value=str(i).encode() * 100), timeout=20) for i in range(concurrent_calls)
        ]
        assert [f.result().value for f in futures] == [str(i).encode() * 100 for i in range(concurrent_calls)]


async def test_every_kind_of_call(backend: str) -> None:
    service = Service()
    async with serving(service) as (_, target):
        await anyio.to_thread.run_sync(_every_kind_of_call, target)
    assert service.backend == backend


@contextlib.contextmanager
def _relay_in_a_thread(port: int, seed: int) -> Iterator[int]:
    """The segmenting relay (asyncio) on its own loop in a thread: it cuts the bytes of
    whichever loop the server runs on."""
    ready: concurrent.futures.Future[int] = concurrent.futures.Future()
    stop = threading.Event()

    async def relay() -> None:
        async with segmenting_relay("127.0.0.1", port, seed=seed) as relay_port:
            ready.set_result(relay_port)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=asyncio.run, args=(relay(),), daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=10)
    finally:
        stop.set()
        thread.join(10)


async def test_every_kind_of_call_through_a_network_that_cuts_bytes_anywhere(backend: str) -> None:
    async with serving(Service()) as (server, _):
        with _relay_in_a_thread(server.sockets[0].getsockname()[1], seed=len(backend)) as relay_port:
            await anyio.to_thread.run_sync(_every_kind_of_call, f"127.0.0.1:{relay_port}")
        assert server.stats().connection_errors == {}


def _deadline_then_cancel(target: str, service: Service) -> None:
    with grpc.insecure_channel(target) as channel:
        sleep = _methods(channel)["sleep"]
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            sleep(Int64Value(value=60_000), timeout=0.3)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        assert service.cancelled.wait(5), "the handler was not cancelled at its deadline"
        service.cancelled.clear()
        service.started.clear()
        future = sleep.future(Int64Value(value=60_000), timeout=30)
        assert service.started.wait(5)
        future.cancel()
        assert service.cancelled.wait(5), "the handler was not cancelled when its client cancelled"


async def test_deadlines_and_cancels_cancel_the_handler(backend: str) -> None:
    service = Service()
    async with serving(service) as (server, target):
        await anyio.to_thread.run_sync(_deadline_then_cancel, target, service)
        with anyio.fail_after(5):
            while server.stats().calls:
                await anyio.sleep(0.01)


async def test_close_finishes_calls_in_progress_then_ends_the_rest_after_the_grace(backend: str) -> None:
    service = Service()
    server = Server([service])
    await server.start("127.0.0.1", 0)
    target = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with grpc.insecure_channel(target) as channel:
        sleep = _methods(channel)["sleep"]
        short = sleep.future(Int64Value(value=200), timeout=10)
        await anyio.to_thread.run_sync(service.started.wait, 5)
        service.started.clear()
        long = sleep.future(Int64Value(value=60_000), timeout=30)
        await anyio.to_thread.run_sync(service.started.wait, 5)
        started = time.monotonic()
        server.close(grace=1.0)
        with anyio.fail_after(10):
            await server.wait_closed()
        took = time.monotonic() - started
        assert 0.9 < took < 5, took
        assert (await anyio.to_thread.run_sync(short.result)).value == 200
        with pytest.raises(grpc.RpcError) as info:
            await anyio.to_thread.run_sync(long.result)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert service.cancelled.is_set()


async def test_a_client_that_stops_reading_does_not_hold_the_shutdown(backend: str) -> None:
    """At the end of the grace, calls blocked by flow control are ended too, and wait_closed()
    returns within grace + linger whatever the peer does."""
    import socket as socket_module

    from .frames import DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, frame, request_block

    config = Configuration(linger_timeout=0.5)
    server = Server([Service()], config=config)
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket_module.socket()
    sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    try:
        request = Int64Value(value=100_000).SerializeToString()
        body = b"\x00" + len(request).to_bytes(4, "big") + request
        sock.sendall(
            HANDSHAKE
            + frame(HEADERS, END_HEADERS, 1, request_block(path="/t.S/Count"))
            + frame(DATA, END_STREAM, 1, body)
        )
        await anyio.sleep(0.5)  # the server fills the window and the socket, then waits
        started = time.monotonic()
        server.close(grace=0.5)
        with anyio.fail_after(10):
            await server.wait_closed()
        assert time.monotonic() - started < 3
    finally:
        sock.close()


async def test_tls_and_the_peer_certificate(backend: str) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server_context)
    client_cert = ca.issue_cert("caller", common_name="caller")

    seen: list[Any] = []

    class WhoAmI:
        def __mapping__(self) -> dict[str, Handler]:
            return {"/t.W/Who": Handler(self.who, Cardinality.UNARY_UNARY, StringValue, StringValue)}

        async def who(self, stream: Stream[StringValue, StringValue]) -> None:
            await stream.recv_message()
            seen.append(stream.peer.addr())
            cert = stream.peer.cert() or {}
            names = [value for field in cert.get("subject", ()) for key, value in field if key == "commonName"]
            await stream.send_message(StringValue(value=names[0]))

    def call(port: int) -> str:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=client_cert.private_key_pem.bytes(),
            certificate_chain=client_cert.cert_chain_pems[0].bytes(),
        )
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            who = grpcio_method(channel, "unary_unary", "/t.W/Who", StringValue, StringValue)
            return str(who(StringValue(), timeout=10).value)

    async with serving(WhoAmI(), ssl=server_context) as (server, _):
        assert await anyio.to_thread.run_sync(call, server.sockets[0].getsockname()[1]) == "caller"
    assert seen and seen[0][0] == "127.0.0.1"


async def _one_call_then_close(server: Server, target: str) -> None:
    """A grpcio call to ``target`` is answered; then the server closes."""

    def call() -> bytes:
        with grpc.insecure_channel(target) as channel:
            return bytes(_methods(channel)["unary"](BytesValue(value=b"u"), timeout=10).value)

    try:
        assert await anyio.to_thread.run_sync(call) == b"u"
    finally:
        server.close()
        with anyio.fail_after(10):
            await server.wait_closed()


async def test_a_unix_socket(backend: str, tmp_path: Any) -> None:
    path = str(tmp_path / "s.sock")
    server = Server([Service()])
    await server.start(path=path)
    await _one_call_then_close(server, f"unix:{path}")
    import os

    assert not os.path.exists(path)


# -- the client ------------------------------------------------------------------------


def _stubs(channel: Channel) -> dict[str, Any]:
    return {
        "unary": method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue),
        "sleep": method_for(channel, "/t.S/Sleep", Cardinality.UNARY_UNARY, Int64Value, Int64Value),
        "fail": method_for(channel, "/t.S/Fail", Cardinality.UNARY_UNARY, StringValue, StringValue),
        "count": method_for(channel, "/t.S/Count", Cardinality.UNARY_STREAM, Int64Value, Int64Value),
        "sum": method_for(channel, "/t.S/Sum", Cardinality.STREAM_UNARY, BytesValue, Int64Value),
        "echo": method_for(channel, "/t.S/Echo", Cardinality.STREAM_STREAM, BytesValue, BytesValue),
    }


async def _every_kind_of_call_from_our_client(channel: Channel) -> None:
    s = _stubs(channel)
    reply, call = await s["unary"].with_call(BytesValue(value=b"hi"), metadata={"x-echo": "1"}, timeout=10)
    assert reply.value == b"hi"
    assert call.initial_metadata["x-echo"] == "1" and call.trailing_metadata["x-trailer"] == "done"
    assert [r.value async for r in s["count"](Int64Value(value=500), timeout=10)] == list(range(500))
    big = b"b" * (1024 * 1024 - 64)
    assert (await s["sum"]([BytesValue(value=big)] * 4, timeout=10)).value == 4 * len(big)

    async def requests() -> AsyncIterator[BytesValue]:
        for i in range(40):
            yield BytesValue(value=bytes([i]) * 70_000)

    echoed = [r.value[:1] async for r in s["echo"](requests(), timeout=10)]
    assert echoed == [bytes([i]) for i in range(40)]
    with pytest.raises(GRPCError) as info:
        await s["fail"](StringValue(value="grpc"), timeout=10)
    assert info.value.status is Status.NOT_FOUND and info.value.message == "no such thing"
    assert info.value.trailing_metadata is not None and info.value.trailing_metadata["x-why"] == "gone"
    started = time.monotonic()
    with pytest.raises(GRPCError) as info:
        await s["sleep"](Int64Value(value=60_000), timeout=0.3)
    assert info.value.status is Status.DEADLINE_EXCEEDED and time.monotonic() - started < 3
    replies: list[bytes] = []

    async def one(i: int) -> None:
        replies.append((await s["unary"](BytesValue(value=str(i).encode()), timeout=20)).value)

    async with anyio.create_task_group() as group:
        for i in range(200):
            group.start_soon(one, i)
    assert sorted(replies) == sorted(str(i).encode() for i in range(200))


async def test_our_client_against_our_server(backend: str) -> None:
    service = Service()
    async with serving(service) as (server, target):
        async with Channel(target) as channel:
            await _every_kind_of_call_from_our_client(channel)
        with anyio.fail_after(5):
            while server.stats().calls:
                await anyio.sleep(0.01)
        assert service.cancelled.is_set()  # the call past its deadline was cancelled on the server too
    assert service.backend == backend


async def test_our_client_through_a_network_that_cuts_bytes_anywhere(backend: str) -> None:
    async with serving(Service()) as (server, _):
        with _relay_in_a_thread(server.sockets[0].getsockname()[1], seed=7 + len(backend)) as relay_port:
            async with Channel(f"127.0.0.1:{relay_port}") as channel:
                await _every_kind_of_call_from_our_client(channel)
        assert server.stats().connection_errors == {}


@contextlib.contextmanager
def _grpcio_server() -> Iterator[int]:
    """grpcio's server (its own threads) with the same methods, written for grpcio."""

    def unary(request: BytesValue, context: grpc.ServicerContext) -> BytesValue:
        context.send_initial_metadata([(k, v) for k, v in context.invocation_metadata() if k.startswith("x-")])
        context.set_trailing_metadata([("x-trailer", "done")])
        return request

    def sleep(request: Int64Value, context: grpc.ServicerContext) -> Int64Value:
        time.sleep(min(request.value / 1000, 2))
        return request

    def fail(request: StringValue, context: grpc.ServicerContext) -> StringValue:
        context.set_trailing_metadata([("x-why", "gone")])
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")

    def count(request: Int64Value, context: grpc.ServicerContext) -> Iterator[Int64Value]:
        for index in range(request.value):
            yield Int64Value(value=index)

    def total(requests: Iterator[BytesValue], context: grpc.ServicerContext) -> Int64Value:
        return Int64Value(value=sum(len(r.value) for r in requests))

    def echo(requests: Iterator[BytesValue], context: grpc.ServicerContext) -> Iterator[BytesValue]:
        yield from requests

    def handler(fn: Any, kind: str, req: Any, rep: Any) -> Any:
        return getattr(grpc, f"{kind}_rpc_method_handler")(
            fn, request_deserializer=req.FromString, response_serializer=rep.SerializeToString
        )

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "t.S",
                {
                    "Unary": handler(unary, "unary_unary", BytesValue, BytesValue),
                    "Sleep": handler(sleep, "unary_unary", Int64Value, Int64Value),
                    "Fail": handler(fail, "unary_unary", StringValue, StringValue),
                    "Count": handler(count, "unary_stream", Int64Value, Int64Value),
                    "Sum": handler(total, "stream_unary", BytesValue, Int64Value),
                    "Echo": handler(echo, "stream_stream", BytesValue, BytesValue),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


async def test_our_client_against_grpcio_server(backend: str) -> None:
    with _grpcio_server() as port:
        async with Channel(f"127.0.0.1:{port}") as channel:
            await _every_kind_of_call_from_our_client(channel)


async def test_the_testing_helper(backend: str) -> None:
    service = Service()
    async with ChannelFor([service]) as channel:
        assert (await _stubs(channel)["unary"](BytesValue(value=b"m"), timeout=5)).value == b"m"
        assert [r.value async for r in _stubs(channel)["count"](Int64Value(value=3))] == [0, 1, 2]
    assert service.backend == backend


async def test_round_robin_and_failover(backend: str) -> None:
    services = [Service(), Service(), Service()]
    servers = [Server([service]) for service in services]
    for server in servers:
        await server.start("127.0.0.1", 0)
    ports = [server.sockets[0].getsockname()[1] for server in servers]
    try:
        async with Channel([f"127.0.0.1:{port}" for port in ports]) as channel:
            unary = _stubs(channel)["unary"]
            for _ in range(30):
                await unary(BytesValue(value=b"x"), timeout=5)
            assert [server.stats().connections_total for server in servers] == [1, 1, 1]
            servers[0].close(grace=1)
            with anyio.fail_after(5):
                await servers[0].wait_closed()
            for _ in range(30):  # none of these may fail because one backend went away gracefully
                await unary(BytesValue(value=b"y"), timeout=5)
    finally:
        for server in servers:
            server.close(grace=1)
            with anyio.fail_after(10):
                await server.wait_closed()


async def test_our_client_over_tls(backend: str) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.internal").configure_cert(server_context)
    roots = ca.cert_pem.bytes()
    async with serving(Service(), ssl=server_context) as (_, target):
        async with Channel(target, ssl=client_tls(root_certificates=roots), server_hostname="api.internal") as channel:
            assert (await _stubs(channel)["unary"](BytesValue(value=b"tls"), timeout=5)).value == b"tls"
        async with Channel(target, ssl=client_tls(root_certificates=roots)) as channel:  # the name does not match
            with pytest.raises(GRPCError) as info:
                await _stubs(channel)["unary"](BytesValue(value=b"tls"), timeout=5)
            assert info.value.status is Status.UNAVAILABLE


async def test_a_call_cancelled_by_its_callers_scope_cancels_the_handler(backend: str) -> None:
    """The caller's own cancel scope (anyio's, which is trio's on trio) ends the call: the
    server hears RST_STREAM, its handler is cancelled, and the channel serves the next call."""
    service = Service()
    async with serving(service) as (server, target):
        async with Channel(target) as channel:
            stubs = _stubs(channel)
            with anyio.move_on_after(0.3) as scope:
                await stubs["sleep"](Int64Value(value=60_000))
            assert scope.cancelled_caught
            assert await anyio.to_thread.run_sync(service.cancelled.wait, 5)
            assert (await stubs["unary"](BytesValue(value=b"next"), timeout=5)).value == b"next"
            assert server.stats().connections_total == 1


async def test_an_idle_connection_is_closed_with_goaway(backend: str) -> None:
    """The per-connection timers (here the idle timeout) run on trio's runtime too."""
    async with serving(Service(), config=Configuration(idle_timeout=0.3)) as (server, target):
        async with Channel(target) as channel:
            await _stubs(channel)["unary"](BytesValue(value=b"x"), timeout=5)
            with anyio.fail_after(5):
                while server.stats().connections:
                    await anyio.sleep(0.05)
            # The channel reconnects for the next call.
            assert (await _stubs(channel)["unary"](BytesValue(value=b"y"), timeout=5)).value == b"y"
        assert server.stats().connections_total == 2


async def test_a_rapid_reset_flood_is_cut_off_and_others_are_served(backend: str) -> None:
    """The flood limits live in the core: the trio transport feeds them the same bytes."""
    from .frames import flood

    async with serving(Service()) as (server, target):
        host, port = target.rsplit(":", 1)
        attacker = await anyio.connect_tcp(host, int(port))
        async with attacker:
            await attacker.send(flood("rapid reset", 5000))
            received = b""
            with anyio.fail_after(10):
                while b"\x07\x00\x00\x00\x00\x00" not in received:  # a GOAWAY frame's type, flags, stream 0
                    try:
                        received += await attacker.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        break
        assert b"\x07\x00\x00\x00\x00\x00" in received
        async with Channel(target) as channel:
            assert (await _stubs(channel)["unary"](BytesValue(value=b"ok"), timeout=5)).value == b"ok"
        assert "ENHANCE_YOUR_CALM" in server.stats().connection_errors


async def test_a_socket_bound_beforehand(backend: str) -> None:
    """``start(sock=...)`` with a socket bound but not listening yet (what the App does to
    bind early): the server listens on it, serves, and closes."""
    import socket as socket_module

    sock = socket_module.socket()
    sock.bind(("127.0.0.1", 0))
    server = Server([Service()])
    await server.start(sock=sock)
    await _one_call_then_close(server, f"127.0.0.1:{sock.getsockname()[1]}")
