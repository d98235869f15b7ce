"""Retry policies (gRPC's service-config shape), over real sockets: what is retried, how
often, after how long, and what never is."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time

import pytest
from google.protobuf.wrappers_pb2 import Int64Value

from app_kit import Cardinality, Channel, GRPCError, Handler, RetryPolicy, Status, Stream
from app_kit.aio.client import method_for
from app_kit.rpc.retry import RetryPolicies

from .conftest import running_server
from .fake_server import FakeConnection, fake_server

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.05)


class Flaky:
    """Fails the first ``failures`` calls of each method with ``status``, then answers."""

    def __init__(self, failures: int, status: Status = Status.UNAVAILABLE, headers_first: bool = False) -> None:
        self.failures = failures
        self.status = status
        self.headers_first = headers_first
        self.attempts = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.F/Unary": Handler(self.unary, Cardinality.UNARY_UNARY, Int64Value, Int64Value),
            "/t.F/Stream": Handler(self.stream, Cardinality.UNARY_STREAM, Int64Value, Int64Value),
        }

    async def _maybe_fail(self, stream: Stream[Int64Value, Int64Value]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            if self.headers_first:
                await stream.send_initial_metadata()  # commits the call
            raise GRPCError(self.status, f"attempt {self.attempts} failed")

    async def unary(self, stream: Stream[Int64Value, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await self._maybe_fail(stream)
        await stream.send_message(Int64Value(value=self.attempts))

    async def stream(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        await self._maybe_fail(stream)
        for index in range(3):
            await stream.send_message(Int64Value(value=index))


async def call(service: Flaky, policy: RetryPolicy | None, **kwargs: object) -> Int64Value:
    async with running_server([service]) as (_, target), Channel(target, retry_policy=policy) as channel:
        return await method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)(
            Int64Value(), timeout=5, **kwargs
        )


async def test_a_retryable_status_is_retried_until_it_succeeds() -> None:
    service = Flaky(failures=2)
    assert (await call(service, FAST)).value == 3
    assert service.attempts == 3


async def test_without_a_policy_nothing_is_retried() -> None:
    service = Flaky(failures=1)
    with pytest.raises(GRPCError, match="attempt 1 failed"):
        await call(service, None)
    assert service.attempts == 1


async def test_attempts_are_capped_and_the_last_error_raised() -> None:
    service = Flaky(failures=10)
    with pytest.raises(GRPCError, match="attempt 4 failed"):
        await call(service, FAST)
    assert service.attempts == 4


async def test_other_statuses_and_committed_calls_are_not_retried() -> None:
    service = Flaky(failures=1, status=Status.INTERNAL)
    with pytest.raises(GRPCError, match="attempt 1 failed"):
        await call(service, FAST)
    assert service.attempts == 1
    committed = Flaky(failures=1, headers_first=True)  # response headers came back: committed
    with pytest.raises(GRPCError, match="attempt 1 failed"):
        await call(committed, FAST)
    assert committed.attempts == 1


async def test_a_server_streaming_call_is_retried_before_its_first_reply() -> None:
    service = Flaky(failures=2)
    async with running_server([service]) as (_, target), Channel(target, retry_policy=FAST) as channel:
        stream = method_for(channel, "/t.F/Stream", Cardinality.UNARY_STREAM, Int64Value, Int64Value)
        assert [reply.value for reply in await stream(Int64Value(), timeout=5)] == [0, 1, 2]
    assert service.attempts == 3


def unavailable_with_pushback(pushback: bytes | None):  # type: ignore[no-untyped-def]
    attempts: list[float] = []

    def reply(connection: FakeConnection, stream_id: int, number: int) -> None:
        attempts.append(time.monotonic())
        trailers = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"14")]
        if pushback is not None:
            trailers.append((b"grpc-retry-pushback-ms", pushback))
        connection.conn.send_headers(stream_id, trailers, end_stream=True)  # Trailers-Only

    return reply, attempts


@pytest.mark.parametrize(("pushback", "tries"), [(b"-1", 1), (b"soon", 1), (b"200", 4)])
async def test_the_servers_pushback_is_obeyed(pushback: bytes, tries: int) -> None:
    reply, attempts = unavailable_with_pushback(pushback)
    async with fake_server(reply) as (port, _), Channel("127.0.0.1", port, retry_policy=FAST) as channel:
        with pytest.raises(GRPCError):
            await method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)(
                Int64Value(), timeout=5
            )
    assert len(attempts) == tries
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert all(gap >= 0.19 for gap in gaps), gaps


async def test_a_retry_never_outlives_the_calls_deadline() -> None:
    reply, attempts = unavailable_with_pushback(b"2000")  # asks for 2 s; the call has 0.5
    async with fake_server(reply) as (port, _), Channel("127.0.0.1", port, retry_policy=FAST) as channel:
        started = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)(
                Int64Value(), timeout=0.5
            )
    assert info.value.status is Status.UNAVAILABLE and len(attempts) == 1
    assert time.monotonic() - started < 0.4  # gave up at once: no sleeping past the deadline


async def test_service_config_picks_the_most_specific_policy() -> None:
    config = {
        "methodConfig": [
            {
                "name": [{}],
                "retryPolicy": {
                    "maxAttempts": 2,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            },
            {
                "name": [{"service": "t.F"}],
                "retryPolicy": {
                    "maxAttempts": 9,
                    "initialBackoff": "0.01s",
                    "maxBackoff": "0.05s",
                    "backoffMultiplier": 1.5,
                    "retryableStatusCodes": ["UNAVAILABLE", 10],
                },
            },
            {"name": [{"service": "t.F", "method": "Stream"}], "timeout": "1s"},
        ]
    }
    policies = RetryPolicies(config)
    service_policy = policies.for_method("/t.F/Unary")
    assert service_policy is not None and service_policy.max_attempts == 5  # capped, as gRFC A6 says
    assert service_policy.retryable_status_codes == {Status.UNAVAILABLE, Status.ABORTED}
    assert policies.for_method("/t.F/Stream") is service_policy  # its entry has no retryPolicy
    other = policies.for_method("/t.Other/M")
    assert other is not None and other.max_attempts == 2 and other.initial_backoff == 0.1
    service = Flaky(failures=1, status=Status.ABORTED)
    async with running_server([service]) as (_, target), Channel(target, service_config=config) as channel:
        unary = method_for(channel, "/t.F/Unary", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        assert (await unary(Int64Value(), timeout=5)).value == 2
    for bad in (
        {
            "maxAttempts": 1,
            "initialBackoff": "1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": [14],
        },
        {
            "maxAttempts": 3,
            "initialBackoff": "1",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": [14],
        },
        {
            "maxAttempts": 3,
            "initialBackoff": "1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": [],
        },
        {"maxAttempts": 3, "initialBackoff": "1s", "maxBackoff": "1s", "retryableStatusCodes": [14]},
        {
            "maxAttempts": 3,
            "initialBackoff": "1s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["NOPE"],
        },
    ):
        with pytest.raises(ValueError):
            RetryPolicies({"methodConfig": [{"name": [{}], "retryPolicy": bad}]})


async def test_backoff_grows_to_its_cap_with_20_percent_jitter() -> None:
    # gRFC A6 as updated in 2024 (and grpc-core): min(initial x multiplier^(n-1), max) x
    # random(0.8, 1.2); before, random(0, that), which could be next to no wait at all.
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.3, backoff_multiplier=2)
    for retry, backoff in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)):
        delays = [policy.backoff(retry) for _ in range(200)]
        assert backoff * 0.8 <= min(delays) and max(delays) <= backoff * 1.2
        assert min(delays) < backoff * 0.85 and max(delays) > backoff * 1.15  # the whole range
    await asyncio.sleep(0)


# -- a service config's timeout and waitForReady -------------------------------------------


class _SlowlyUnavailable:
    """Answers UNAVAILABLE after ``delay`` seconds, every time; counts the attempts."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.attempts = 0

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.S/Slow": Handler(self.slow, Cardinality.UNARY_UNARY, Int64Value, Int64Value)}

    async def slow(self, stream: Stream[Int64Value, Int64Value]) -> None:
        await stream.recv_message()
        self.attempts += 1
        await asyncio.sleep(self.delay)
        raise GRPCError(Status.UNAVAILABLE, "not now")


def _config(**settings: object) -> dict[str, object]:
    return {"methodConfig": [{"name": [{"service": "t.S"}], **settings}]}


async def test_a_service_config_timeout_bounds_every_call_of_the_method_and_all_its_attempts() -> None:
    retry = {
        "maxAttempts": 5,
        "initialBackoff": "0.01s",
        "maxBackoff": "0.01s",
        "backoffMultiplier": 1,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    service = _SlowlyUnavailable(0.2)
    async with running_server([service]) as (_, target):
        async with Channel(target, service_config=_config(timeout="0.5s", retryPolicy=retry)) as channel:
            slow = method_for(channel, "/t.S/Slow", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
            for timeout in (None, 30.0):  # no deadline of its own, or a later one: the config's wins
                began, attempts = time.monotonic(), service.attempts
                with pytest.raises(GRPCError) as info:
                    await slow(Int64Value(), timeout=timeout)
                elapsed = time.monotonic() - began
                assert info.value.status is Status.DEADLINE_EXCEEDED
                assert 0.45 < elapsed < 1.5  # not five attempts of 0.2 s, each with a fresh 0.5 s
                assert service.attempts - attempts == 3  # 0.2 s each within 0.5 s, the third cut short
            began = time.monotonic()
            with pytest.raises(GRPCError) as info:
                await slow(Int64Value(), timeout=0.1)  # its own sooner deadline wins
            assert info.value.status is Status.DEADLINE_EXCEEDED and time.monotonic() - began < 0.4
            async with method_for(channel, "/t.S/Slow", Cardinality.UNARY_UNARY, Int64Value, Int64Value).open() as call:
                assert call.deadline is not None and 0.3 < call.deadline.time_remaining() <= 0.5  # open() too


async def test_a_service_config_wait_for_ready_is_the_methods_default() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = _config(waitForReady=True)
    async with Channel("127.0.0.1", port, service_config=config) as channel:
        slow = method_for(channel, "/t.S/Slow", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        other = method_for(channel, "/t.Other/M", Cardinality.UNARY_UNARY, Int64Value, Int64Value)
        await asyncio.sleep(0.3)  # the first connection attempt fails: TRANSIENT_FAILURE
        began = time.monotonic()
        with pytest.raises(GRPCError) as info:
            await slow(Int64Value(), timeout=0.5)  # waits for a backend, until its deadline
        assert info.value.status is Status.DEADLINE_EXCEEDED and time.monotonic() - began >= 0.45
        for fails_at_once in (other(Int64Value(), timeout=5), slow(Int64Value(), timeout=5, wait_for_ready=False)):
            began = time.monotonic()
            with pytest.raises(GRPCError) as info:
                await fails_at_once  # no waitForReady for it, or the call's own False wins
            assert info.value.status is Status.UNAVAILABLE and time.monotonic() - began < 0.3


def test_service_config_settings_that_are_wrong_or_unsupported(caplog: pytest.LogCaptureFixture) -> None:
    for bad in ({"timeout": "-1s"}, {"timeout": "soon"}, {"timeout": 0}, {"waitForReady": "yes"}):
        with pytest.raises(ValueError):
            RetryPolicies(_config(**bad))
    config = {
        **_config(timeout="1s", hedgingPolicy={"maxAttempts": 2}, maxRequestMessageBytes=10),
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
        "loadBalancingConfig": [{"pick_first": {}}],
    }
    with caplog.at_level("WARNING", logger="app_kit.client"):
        Channel("127.0.0.1", 1, service_config=config)
    warned = " ".join(record.getMessage() for record in caplog.records)
    for what in ("hedgingPolicy", "maxRequestMessageBytes", "retryThrottling", "pick_first"):
        assert what in warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="app_kit.client"):
        Channel("127.0.0.1", 1, service_config={**_config(timeout="1s"), "loadBalancingPolicy": "round_robin"})
    assert not caplog.records  # what the channel does anyway is no cause for a warning
