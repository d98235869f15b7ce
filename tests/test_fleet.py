"""A channel that serves a fleet: several backends, round-robin, failover, backoff, waiting
for a backend, connectivity states. The backends are real server processes, shut down
gracefully (SIGTERM) or killed outright (SIGKILL) under load."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import signal
import socket
import time
from collections.abc import AsyncIterator

import pytest

from app_kit import Channel, Configuration, GRPCError, Server, Status
from app_kit.aio.subchannel import Address, Backoff, ConnectivityState, parse_target
from examples.interop.messages_pb2 import Payload, ResponseParameters, SimpleRequest, StreamingOutputCallRequest
from examples.interop.server import TestService as InteropService
from examples.interop.testing_grpc import TestServiceStub as InteropStub

from .conftest import running_server
from .process import AppProcess

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def backends(count: int) -> AsyncIterator[list[AppProcess]]:
    async with contextlib.AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(
                AppProcess("tests.apps.interop_app:app", env={"APP_PORT": "0", "APP_GRACE_PERIOD": "5"})
            )
            for _ in range(count)
        ]
        for process in processes:
            await process.ready()
        yield processes


async def served_by(stub: InteropStub) -> int:
    """One quick call; the port of the backend that answered it."""
    _, call = await stub.UnaryCall.with_call(SimpleRequest(response_size=10), timeout=5)
    assert call.peer is not None
    return int(call.peer.addr()[1])


async def test_round_robin_graceful_shutdown_and_a_killed_backend_under_load() -> None:
    async with backends(3) as (first, second, third):
        ports = [process.port for process in (first, second, third)]
        async with Channel([f"127.0.0.1:{port}" for port in ports]) as channel:
            stub = InteropStub(channel)
            # Spread: the first call connects one backend; round-robin over the ready ones.
            await channel.channel_ready()
            while channel_ready_count(channel) < 3:
                await served_by(stub)
                await asyncio.sleep(0.01)
            spread = collections.Counter([await served_by(stub) for _ in range(300)])
            assert set(spread) == set(ports) and min(spread.values()) >= 90, spread

            failures: list[GRPCError] = []
            successes: collections.Counter[int] = collections.Counter()
            stop = asyncio.Event()

            async def worker() -> None:
                request = StreamingOutputCallRequest(
                    response_parameters=[ResponseParameters(size=10, interval_us=50_000)] * 2
                )
                while not stop.is_set():
                    try:
                        replies = stub.StreamingOutputCall(request, timeout=5)  # ~0.1 s in flight
                        assert len(await replies) == 2
                        assert replies.call is not None and replies.call.peer is not None
                        successes[int(replies.call.peer.addr()[1])] += 1
                    except GRPCError as exc:
                        failures.append(exc)

            workers = [asyncio.ensure_future(worker()) for _ in range(20)]
            await asyncio.sleep(0.5)
            first.signal(signal.SIGTERM)  # graceful: GOAWAY, its calls finish, new ones go elsewhere
            assert await first.wait() == 0
            await asyncio.sleep(0.5)
            assert failures == [], failures  # nothing failed because of the graceful one
            before_kill = sum(successes.values())
            second.process.kill()  # outright: its calls in flight are lost
            await second.wait()
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*workers)
            assert failures, "calls in flight on the killed backend should have failed"
            assert all(exc.status is Status.UNAVAILABLE for exc in failures), failures
            assert len(failures) <= 20  # at most the calls in flight at the kill
            assert successes[ports[2]] > 0 and sum(successes.values()) - before_kill > 50  # went on

            # After the kill, every call lands on the survivor.
            assert {await served_by(stub) for _ in range(20)} == {ports[2]}


def channel_ready_count(channel: Channel) -> int:
    return sum(1 for subchannel in channel._subchannels if subchannel.state is ConnectivityState.READY)


async def test_failing_backends_fail_fast_unless_a_call_waits_for_ready() -> None:
    port = free_port()
    config = Configuration(connect_initial_backoff=0.2, connect_backoff_jitter=0.0)
    async with Channel("127.0.0.1", port, config=config) as channel:
        assert channel.get_state() is ConnectivityState.IDLE
        stub = InteropStub(channel)
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await stub.UnaryCall(SimpleRequest(), timeout=5)
        assert info.value.status is Status.UNAVAILABLE and "cannot connect" in (info.value.message or "")
        assert time.monotonic() - started < 1
        assert channel.get_state() is ConnectivityState.TRANSIENT_FAILURE

        # A call that waits for ready gets through once a server is there.
        waiting = asyncio.ensure_future(stub.UnaryCall(SimpleRequest(response_size=3), timeout=10, wait_for_ready=True))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        server = Server([InteropService()])
        await server.start("127.0.0.1", port)
        try:
            reply = await waiting
            assert len(reply.payload.body) == 3
            assert channel.get_state() is ConnectivityState.READY
        finally:
            server.close()
            await server.wait_closed()
        # The server went away: the channel says so.
        state = await asyncio.wait_for(channel.wait_for_state_change(ConnectivityState.READY), 5)
        assert state in (ConnectivityState.IDLE, ConnectivityState.TRANSIENT_FAILURE, ConnectivityState.CONNECTING)
    assert channel.get_state() is ConnectivityState.SHUTDOWN


async def test_reconnect_attempts_back_off_exponentially() -> None:
    # Nothing listens: each attempt is refused; a call waiting for ready sees them spaced
    # by the backoff, timed as the channel starts each one.
    config = Configuration(connect_initial_backoff=0.1, connect_backoff_multiplier=2.0, connect_backoff_jitter=0.0)
    port = free_port()
    attempts: list[float] = []
    channel = Channel("127.0.0.1", port, config=config)
    real_connect = channel._connect

    async def timed_connect(address: Address):  # type: ignore[no-untyped-def]
        attempts.append(time.monotonic())
        return await real_connect(address)

    channel._connect = timed_connect  # type: ignore[method-assign]
    async with channel:
        with pytest.raises(GRPCError) as info:
            await InteropStub(channel).UnaryCall(SimpleRequest(), timeout=1.6, wait_for_ready=True)
        assert info.value.status is Status.DEADLINE_EXCEEDED
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # 0.1, 0.2, 0.4, 0.8 s: each wait twice the one before (a little more: the loop's timing).
    assert len(gaps) >= 3, gaps
    for index, gap in enumerate(gaps[:4]):
        assert 0.1 * 2**index - 0.02 <= gap <= 0.1 * 2**index + 0.15, gaps


async def test_backoff_follows_the_spec() -> None:
    backoff = Backoff(Configuration())
    delays = [backoff.next_delay() for _ in range(14)]
    expected = [min(1.6**n, 120.0) for n in range(14)]
    for delay, nominal in zip(delays, expected, strict=True):
        assert nominal * 0.8 <= delay <= nominal * 1.2, (delays, expected)
    backoff.reset()
    assert 0.8 <= backoff.next_delay() <= 1.2


async def test_target_strings() -> None:
    assert parse_target("api:50052").addresses == (Address("api", 50052),)
    assert parse_target("api").addresses == (Address("api", 50051),)
    assert parse_target("[::1]:9").addresses == (Address("::1", 9),)
    assert parse_target("unix:/run/a.sock").addresses == (Address(path="/run/a.sock"),)
    assert parse_target("unix:///run/a.sock").addresses == (Address(path="/run/a.sock"),)
    assert parse_target("unix:relative.sock").addresses == (Address(path="relative.sock"),)
    dns = parse_target("dns:///api.internal:443")
    assert (dns.dns_name, dns.dns_port, dns.authority) == ("api.internal", 443, "api.internal:443")
    assert parse_target("dns://8.8.8.8/api:1").dns_name == "api"
    for bad in ("", ":1", "api:x", "api:0", "unix:", "[::1"):
        with pytest.raises(ValueError):
            parse_target(bad)


async def test_a_dns_target_spreads_over_every_address() -> None:
    # "localhost" resolves to 127.0.0.1 (and ::1 where it has IPv6): a server on both.
    async with running_server([InteropService()], host="localhost") as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with Channel(f"dns:///localhost:{port}") as channel:
            stub = InteropStub(channel)
            for _ in range(10):
                await stub.UnaryCall(SimpleRequest(payload=Payload(body=b"x")), timeout=5)
            addresses = {str(subchannel.address) for subchannel in channel._subchannels}
            resolved = {info[4][0] for info in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)}
            assert len(addresses) == len(resolved) >= 1
            assert channel.get_state() is ConnectivityState.READY


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
