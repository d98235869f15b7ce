"""Session 16: defects of my own list ("left alone" in earlier notes), each with the test that
failed before its fix."""

from __future__ import annotations

import asyncio
import logging
import ssl

import anyio
import grpc
import h2.events
import pytest
import trustme
from google.protobuf.wrappers_pb2 import StringValue

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, Status, Stream
from app_kit.aio.client import method_for
from app_kit.rpc.metadata import encode_grpc_message

from .conftest import running_server
from .frames import HANDSHAKE
from .h2client import RawClient
from .process import AppProcess
from .services import EchoService

pytestmark = pytest.mark.anyio


async def test_keepalive_pings_come_keepalive_time_after_the_last_answer() -> None:
    """gRFC A8: keepalive_time is the wait between a PING's answer and the next PING. With a
    keepalive_time shorter than keepalive_timeout (10 s and the default 20 s, say), the next
    PING waited for the timeout's check instead: one every keepalive_timeout, not every
    keepalive_time (a proxy's idle timer between the two cut the connection)."""
    config = Configuration(keepalive_time=0.2, keepalive_timeout=1.5, keepalive_permit_without_calls=True)
    async with running_server([EchoService()], config=config) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawClient("127.0.0.1", port) as client:  # answers every PING at once
            await asyncio.sleep(1.3)
            pings = sum(isinstance(event, h2.events.PingReceived) for event in client.events)
            assert not client.closed.is_set()
    # PINGs at ~0.2, 0.4, ... 1.2 s: 6 (one while waiting for the timeout's check before).
    assert 4 <= pings <= 7, pings


@pytest.mark.backends
async def test_a_tls_client_that_leaves_after_its_handshake_is_not_an_error(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that completes its TLS handshake and leaves at once, without close_notify (a
    port scanner, a TCP health check that speaks TLS, the probe of a load balancer): on trio the
    server's first write (its SETTINGS) then raised anyio's EndOfStream, which the writer did not
    count as a lost connection: 'unexpected error serving a connection' at ERROR, a traceback
    per client."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with caplog.at_level(logging.INFO, logger="app_kit"):
        async with running_server([EchoService()], ssl=server_context) as (server, _):
            port = server.sockets[0].getsockname()[1]
            for _ in range(30):
                stream = await anyio.connect_tcp(
                    "127.0.0.1", port, tls=True, ssl_context=client_context, tls_standard_compatible=False
                )
                await anyio.aclose_forcefully(stream)
            await anyio.sleep(0.3)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == []


class LongFailure:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.L/Fail": Handler(self.fail, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def fail(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value == "with-metadata":  # trailers over 8 KiB without the message
            raise GRPCError(Status.FAILED_PRECONDITION, "m" * 5000, trailing_metadata={"x-big": "b" * 9000})
        raise GRPCError(Status.FAILED_PRECONDITION, request.value * 5000)


@pytest.mark.parametrize("unit", ["é", "🎉", "a%", "x "])
async def test_a_long_status_message_is_cut_between_characters(unit: str) -> None:
    """A message cut to fit the trailers is cut at a character's boundary, never inside one's
    UTF-8 bytes or inside a %XX escape, and with no space at its end."""
    async with running_server([LongFailure()]) as (_, target), Channel(*_split(target)) as channel:
        call = method_for(channel, "/t.L/Fail", Cardinality.UNARY_UNARY, StringValue, StringValue)
        with pytest.raises(GRPCError) as info:
            await call(StringValue(value=unit), timeout=5)
    message = info.value.message or ""
    assert info.value.status is Status.FAILED_PRECONDITION
    assert 7000 < len(encode_grpc_message(message)) < 8192 and len(message) < len(unit) * 5000
    assert (unit * 5000).startswith(message) and "\ufffd" not in message and not message.endswith(" ")


def _split(target: str) -> tuple[str, int]:
    host, port = target.rsplit(":", 1)
    return host, int(port)


@pytest.mark.parametrize(
    ("env", "ended_within"),
    [
        # A client that completed its handshake and answers nothing, without calls.
        ({"APP_IDLE_TIMEOUT": "0.5"}, 2.0),
        (
            {
                "APP_KEEPALIVE_TIME": "0.3",
                "APP_KEEPALIVE_TIMEOUT": "0.3",
                "APP_KEEPALIVE_PERMIT_WITHOUT_CALLS": "true",
                "APP_IDLE_TIMEOUT": "0",
            },
            3.0,
        ),
    ],
    ids=["idle-timeout", "keepalive"],
)
async def test_an_apps_idle_and_keepalive_settings_end_a_silent_connection(
    env: dict[str, str], ended_within: float
) -> None:
    """APP_IDLE_TIMEOUT and APP_KEEPALIVE_* reach the server (an App could not set them: a
    client gone without a word held its connection for the 30-minute idle timeout)."""
    async with AppProcess("tests.apps.interop_app:app", "--port", "0", env=env) as app:
        port = await app.ready()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        started = asyncio.get_running_loop().time()
        async with asyncio.timeout(ended_within + 3):
            while True:  # frames until a GOAWAY (its PINGs unanswered)
                length, kind = int.from_bytes(await reader.readexactly(3), "big"), (await reader.readexactly(6))[0]
                await reader.readexactly(length)
                if kind == 0x07:
                    break
        took = asyncio.get_running_loop().time() - started
        writer.close()
    assert took < ended_within, took


async def test_trailers_over_8_kib_without_the_message_go_without_it() -> None:
    """A message that cannot fit beside large trailing metadata is left out (not sent empty);
    the status and the metadata go as they are."""
    async with running_server([LongFailure()]) as (_, target), Channel(*_split(target)) as channel:
        call = method_for(channel, "/t.L/Fail", Cardinality.UNARY_UNARY, StringValue, StringValue)
        with pytest.raises(GRPCError) as info:
            await call(StringValue(value="with-metadata"), timeout=5)
    assert info.value.status is Status.FAILED_PRECONDITION
    assert info.value.message is None
    assert ("x-big", "b" * 9000) in dict(info.value.trailing_metadata or {}).items()
    async with running_server([LongFailure()]) as (server, _):
        async with RawClient("127.0.0.1", server.sockets[0].getsockname()[1]) as client:
            stream_id = await client.request("/t.L/Fail", StringValue(value="with-metadata").SerializeToString())
            response = await client.read_response(stream_id)
    assert response.grpc_status == Status.FAILED_PRECONDITION.value
    assert response.header(b"grpc-message") is None  # (an empty one went out)


@pytest.mark.parametrize("permitted", [True])
async def test_a_grpcio_client_pinging_without_calls_as_permitted_keeps_its_connection(permitted: bool) -> None:
    """APP_KEEPALIVE_PERMIT_WITHOUT_CALLS, as grpc-core's server option, also lets clients PING
    an idle connection as often as APP_MIN_PING_INTERVAL; without it, such PINGs are strikes,
    then GOAWAY too_many_pings (grpc-core's server behaves the same; [False] was run too, and
    test_session16_ops_review.py keeps that case)."""
    env = {"APP_MIN_PING_INTERVAL": "0.5", "APP_LOG_LEVEL": "debug"}
    if permitted:
        env["APP_KEEPALIVE_PERMIT_WITHOUT_CALLS"] = "true"
    options = [
        ("grpc.keepalive_time_ms", 700),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with AppProcess("tests.apps.interop_app:app", "--port", "0", env=env) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            empty = channel.unary_unary("/grpc.testing.TestService/EmptyCall")
            await empty(b"", timeout=5)
            await asyncio.sleep(6.0)  # idle: PINGs every 0.7 s
            await empty(b"", timeout=5)
        # Told to go away, the client connected again for its second call.
        connections = sum(": connection from (" in line and "closed" not in line for line in app.lines)
    assert connections == (1 if permitted else 2), app.log[-3000:]
