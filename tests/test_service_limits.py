"""What hostile or merely numerous peers can make the health and reflection services spend."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google.rpc import status_pb2

from app_kit import App, AppSettings, Channel, GRPCError, Health, Status
from app_kit.aio.client import ClientStream, method_for
from app_kit.protos.grpc.health.v1.health_grpc import HealthStub
from app_kit.protos.grpc.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse, HealthListRequest
from app_kit.protos.grpc.reflection.v1 import reflection_pb2 as v1
from app_kit.rpc.handlers import Cardinality
from app_kit.services import reflection
from app_kit.services.reflection import Reflection

from .conftest import running_server
from .services import EchoService

pytestmark = pytest.mark.anyio

SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
INFO = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
#: A request of 54 bytes whose answer is descriptor.proto: about 14 KB, legitimately.
DESCRIPTOR_PROTO_REQUEST = v1.ServerReflectionRequest(
    host="localhost:50051", file_containing_symbol="google.protobuf.FileDescriptorProto"
)


class Pool:
    """A resource for the App tests."""


class Watchers:
    """``count`` Watch streams of ``service`` on one channel, counting what each receives."""

    def __init__(self, channel: Channel, service: str, count: int) -> None:
        self.channel, self.service, self.count = channel, service, count
        self.latest: list[int] = []
        self.received = 0
        self._readers: list[asyncio.Task[None]] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Watchers:
        stub = HealthStub(self.channel)
        streams = []
        for _ in range(self.count):
            stream = await self._stack.enter_async_context(stub.Watch.open())
            await stream.send_message(HealthCheckRequest(service=self.service), end=True)
            streams.append(stream)
        first = await asyncio.wait_for(asyncio.gather(*(stream.recv_message() for stream in streams)), 10)
        self.latest = [message.status for message in first if message is not None]
        assert len(self.latest) == self.count
        self._readers = [asyncio.ensure_future(self._read(index, stream)) for index, stream in enumerate(streams)]
        return self

    async def _read(self, index: int, stream: ClientStream[HealthCheckRequest, HealthCheckResponse]) -> None:
        while (message := await stream.recv_message()) is not None:
            self.received += 1
            self.latest[index] = message.status

    async def all_become(self, status: int, timeout: float) -> float:
        """Seconds until every watcher's latest status is ``status``."""
        started = time.perf_counter()
        while any(latest != status for latest in self.latest):
            assert time.perf_counter() - started < timeout, f"{self.latest.count(status)}/{self.count} told"
            await asyncio.sleep(0.005)
        return time.perf_counter() - started

    async def __aexit__(self, *exc_info: object) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await self._stack.aclose()


async def test_idle_watchers_are_not_woken_and_the_check_runs_once_per_ttl() -> None:
    ttl, idle = 0.1, 1.0
    up, runs = True, 0

    async def check() -> bool:
        nonlocal runs
        runs += 1
        return up

    health = Health()
    health.add_check("", check, ttl=ttl)
    health.set_status("plain", True)
    async with running_server([health]) as (_, target), Channel(*_host_port(target)) as channel:
        async with Watchers(channel, "", 400) as checked, Watchers(channel, "plain", 100) as plain:
            assert set(checked.latest) == {SERVING} and set(plain.latest) == {SERVING}
            await asyncio.sleep(2 * ttl)
            calls, cpu, started = runs, time.process_time(), time.perf_counter()
            await asyncio.sleep(idle)
            cpu, elapsed, calls = time.process_time() - cpu, time.perf_counter() - started, runs - calls

            # (a) one run per TTL for the whole server, not one per watcher (that would be ~4,000)
            assert elapsed / ttl * 0.5 <= calls <= elapsed / ttl + 2, calls
            # (b) an unchanging status sends nothing
            assert checked.received == 0 and plain.received == 0
            # (d) and costs next to nothing: waking every watcher at each TTL cost ~45 ms per second here
            assert cpu / elapsed < 0.02, f"{cpu * 1000:.1f} ms of CPU in {elapsed:.2f} s idle"

            # (c) a change reaches every watcher of that service, and only them
            up = False
            assert await checked.all_become(NOT_SERVING, timeout=ttl + 2) < ttl + 1
            assert checked.received == checked.count and plain.received == 0
            health.set_status("plain", False)
            await plain.all_become(NOT_SERVING, timeout=2)
            assert plain.received == plain.count and checked.received == checked.count
            health.close()


async def test_concurrent_checks_share_one_run_across_services() -> None:
    calls = 0
    release = asyncio.Event()

    async def slow_check() -> bool:
        nonlocal calls
        calls += 1
        await release.wait()
        return True

    health = Health()
    health.add_check(["", "a.A", "b.B"], slow_check, ttl=60)
    health.add_check("c.C", slow_check, ttl=60)  # the same function, ttl and timeout: the same check
    async with running_server([health]) as (_, target), Channel(*_host_port(target)) as channel:
        stub = HealthStub(channel)
        pending = [
            asyncio.ensure_future(stub.Check(HealthCheckRequest(service=service)))
            for service in ("", "a.A", "b.B", "c.C")
            for _ in range(50)
        ]
        await asyncio.sleep(0.2)
        assert calls == 1  # 200 Check calls for four services wait for one run
        release.set()
        replies = await asyncio.wait_for(asyncio.gather(*pending), 5)
        assert {reply.status for reply in replies} == {SERVING}
        listed = await stub.List(HealthListRequest())
        assert {name: value.status for name, value in listed.statuses.items()} == dict.fromkeys(
            ["", "a.A", "b.B", "c.C"], SERVING
        )
        assert calls == 1
        health.close()


async def test_app_runs_its_resource_checks_once_per_ttl_for_every_service_and_watcher() -> None:
    calls = 0
    app = App(AppSettings)

    async def healthy(pool: Pool) -> bool:
        nonlocal calls
        calls += 1
        return True

    @app.resource(health_check=healthy)
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool()

    @app.service
    def echo(pool: Pool) -> EchoService:
        return EchoService()

    ttl = 0.1
    async with app.serve(AppSettings(port=0, grace_period=1, health_check_ttl=ttl)) as running:
        services = ["", *sorted({path.split("/")[1] for path in running.server.mapping})]
        assert len(services) == 5  # the server, test.Echo, health and two reflection services
        async with running.channel() as channel, contextlib.AsyncExitStack() as stack:
            for service in services:
                await stack.enter_async_context(Watchers(channel, service, 20))
            await asyncio.sleep(2 * ttl)
            before, started = calls, time.perf_counter()
            await asyncio.sleep(1.0)
            runs, elapsed = calls - before, time.perf_counter() - started
            # One check for all five statuses (it was five, one per service, each TTL).
            assert runs <= elapsed / ttl + 2, runs


# -- reflection --------------------------------------------------------------------------------


def _host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def _reflection(**limits: Any) -> AsyncIterator[Channel]:
    health = Health()
    async with running_server([health, *Reflection.for_services([health], **limits)]) as (_, target):
        async with Channel(*_host_port(target)) as channel:
            yield channel


async def _exchange(
    channel: Channel, requests: list[v1.ServerReflectionRequest]
) -> list[tuple[float, v1.ServerReflectionResponse]]:
    """Send every request on one stream; each reply with the seconds since the start."""
    info = method_for(channel, INFO, Cardinality.STREAM_STREAM, v1.ServerReflectionRequest, v1.ServerReflectionResponse)
    started = time.perf_counter()
    async with info.open(timeout=30) as stream:

        async def send() -> None:
            for request in requests:
                await stream.send_message(request)
            await stream.end()

        sending = asyncio.ensure_future(send())
        replies = [(time.perf_counter() - started, reply) async for reply in stream]
        await sending
    return replies


async def test_a_huge_symbol_gets_a_small_reply_that_does_not_echo_it() -> None:
    async with _reflection() as channel:
        huge = v1.ServerReflectionRequest(host="h" * 1000, file_containing_symbol="x" * 1_000_000)
        odd = v1.ServerReflectionRequest(file_containing_symbol="bad\n\x00\x1b[31mname\u202e")
        [(_, reply), (_, odd_reply)] = await _exchange(channel, [huge, odd])
    assert reply.ByteSize() < 300, reply.ByteSize()  # it was 2 MB: the symbol in the echo and in the message
    assert not reply.HasField("original_request") and reply.valid_host == ""
    assert reply.error_response.error_code == 5  # NOT_FOUND
    message = reply.error_response.error_message
    assert message.startswith("not found: 'xxx") and "(1000000 characters)" in message and len(message) < 200
    # Names are escaped: no control characters reach the client's terminal or logs.
    assert odd_reply.original_request == odd  # small requests are echoed exactly
    assert odd_reply.error_response.error_message == r"not found: 'bad\n\x00\x1b[31mname\u202e'"
    assert all(char.isprintable() for char in odd_reply.error_response.error_message)


async def test_error_replies_stay_within_a_small_ratio_of_their_requests() -> None:
    requests = [
        v1.ServerReflectionRequest(host="localhost:50051", file_containing_symbol=f"no.such.pkg.Thing{index:05d}")
        for index in range(100)
    ]
    requests += [v1.ServerReflectionRequest(file_by_filename=f"{index}.proto") for index in range(100)]
    requests += [v1.ServerReflectionRequest(file_containing_symbol="y" * size) for size in (100, 300, 509, 510, 4000)]
    async with _reflection(max_requests_per_second=None) as channel:
        replies = [reply for _, reply in await _exchange(channel, requests)]
    for request, reply in zip(requests, replies, strict=True):
        assert reply.WhichOneof("message_response") == "error_response"
        # The echo (the request itself, if at most 512 bytes) plus a message quoting at most 100 characters.
        echoed = min(request.ByteSize(), reflection.DEFAULT_MAX_ECHO_LENGTH)
        assert reply.ByteSize() <= min(2 * echoed + 40, echoed + 160), (request.ByteSize(), reply.ByteSize())
    # A stream of 41-byte requests: replies about twice as large (the echo and the quoted name), no more.
    ratio = sum(r.ByteSize() for r in replies[:100]) / sum(q.ByteSize() for q in requests[:100])
    assert ratio < 2.5, ratio


async def test_response_bytes_per_stream_are_capped() -> None:
    rate = 100_000
    async with _reflection(max_response_bytes_per_second=rate, max_requests_per_second=None) as channel:
        replies = await _exchange(channel, [DESCRIPTOR_PROTO_REQUEST] * 20)
    sizes = [reply.ByteSize() for _, reply in replies]
    assert min(sizes) > 14_000  # each a legitimate descriptor.proto, ~260 times the request
    sent = 0
    for at, reply in replies:
        sent += reply.ByteSize()
        # A burst of one second's worth, then the rate (replies are charged before they leave).
        assert sent <= rate * (1 + at) * 1.05, (sent, at)
    assert replies[-1][0] >= (sent - rate) / rate * 0.9


async def test_requests_per_stream_are_capped() -> None:
    requests = [v1.ServerReflectionRequest(list_services="")] * 100
    async with _reflection(max_requests_per_second=50) as channel:
        replies = await _exchange(channel, requests)
        unlimited = await _reflection_exchange_unlimited(requests)
    assert len(replies) == 100 and all(reply.HasField("list_services_response") for _, reply in replies)
    for index, (at, _) in enumerate(replies):
        assert index + 1 <= 50 * (1 + at) + 1
    assert replies[-1][0] >= 0.9  # 50 in the burst, then 50 more at 50 per second
    assert unlimited < 0.5


async def _reflection_exchange_unlimited(requests: list[v1.ServerReflectionRequest]) -> float:
    async with _reflection(max_requests_per_second=None, max_response_bytes_per_second=None) as channel:
        replies = await _exchange(channel, requests)
    return replies[-1][0]


async def test_dependencies_are_sent_once_per_stream() -> None:
    assert status_pb2.DESCRIPTOR.dependencies[0].name == "google/protobuf/any.proto"
    status = v1.ServerReflectionRequest(file_containing_symbol="google.rpc.Status")
    async with _reflection() as channel:
        replies = [reply for _, reply in await _exchange(channel, [status, status])]
        fresh = [reply for _, reply in await _exchange(channel, [status])]
    # The requested file always; its dependencies once per stream (as grpc-go does).
    assert [len(r.file_descriptor_response.file_descriptor_proto) for r in replies] == [2, 1]
    assert len(fresh[0].file_descriptor_response.file_descriptor_proto) == 2


def test_limits_are_named_validated_and_settable_from_the_app() -> None:
    assert AppSettings().reflection_max_requests_per_second == reflection.DEFAULT_MAX_REQUESTS_PER_SECOND
    assert AppSettings().reflection_max_response_bytes_per_second == reflection.DEFAULT_MAX_RESPONSE_BYTES_PER_SECOND
    with pytest.raises(ValueError):
        Reflection.for_services([], max_requests_per_second=0)
    with pytest.raises(ValueError):
        Reflection.for_services([], max_echo_length=-1)
    with pytest.raises(ValueError):
        AppSettings(reflection_max_requests_per_second=-1)


async def test_app_passes_its_reflection_limits_on() -> None:
    app = App(AppSettings)
    settings = AppSettings(
        port=0, grace_period=1, reflection_max_requests_per_second=7, reflection_max_response_bytes_per_second=0
    )
    async with app.serve(settings) as running:
        service = running.server.mapping[INFO].func.__self__  # type: ignore[attr-defined]
        assert service.max_requests_per_second == 7
        assert service.max_response_bytes_per_second is None  # 0: no limit


async def test_health_check_of_a_huge_unknown_name_gets_a_short_message() -> None:
    health = Health()
    async with running_server([health]) as (_, target), Channel(*_host_port(target)) as channel:
        with pytest.raises(GRPCError) as info:
            await HealthStub(channel).Check(HealthCheckRequest(service="z" * 100_000 + "\n"))
    assert info.value.status == Status.NOT_FOUND
    assert len(info.value.message or "") < 200 and "(100001 characters)" in (info.value.message or "")
