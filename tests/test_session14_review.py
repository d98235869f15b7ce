"""Session 14 fresh-eyes review of the day's changes (03bebf7..HEAD), over real sockets.

Confirmed: a server stream's messages_sent/bytes_sent as interceptors read them at the call's
end (now derived from its StreamState) match what the handler sent, with compression on, off
per message, messages over max_send_buffer_size, unary-stream and bidi; under
max_concurrent_calls a call whose status waits behind a shut window leaves the count when its
client goes (socket closed, RST_STREAM, GOAWAY with an error), with and without interceptors.

A defect, fixed (its test failed first): APP_TLS_CLIENT_CA_FILE alone (no certificate and key)
was accepted and ignored: the server asked for mutual TLS served plaintext to anybody."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, Int64Value

from app_kit import Cardinality, Channel, Configuration, GRPCError, Handler, ServerInterceptor
from app_kit.aio.client import method_for
from app_kit.app.settings import AppSettings, SettingsError, load_settings

from .conftest import running_server
from .h2client import RawClient

pytestmark = pytest.mark.anyio

SIZES = [10, 300, 70_000, 2_000_000, 5, 100_000]


class Measured(ServerInterceptor):
    """Records what a call says it sent, as ServerMetrics and the access log read it."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, int, int]] = []

    async def intercept(self, call: Any, proceed: Any) -> None:
        await proceed()

    def on_call_end(self, call: Any) -> None:
        self.ended.append((call.method, call.messages_sent, call.bytes_sent))


class Senders:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, int]] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/t.S/Stream": Handler(self.stream, Cardinality.UNARY_STREAM, Int64Value, BytesValue),
            "/t.S/Bidi": Handler(self.bidi, Cardinality.STREAM_STREAM, BytesValue, BytesValue),
            "/t.S/Held": Handler(self.held, Cardinality.UNARY_STREAM, Int64Value, BytesValue),
            "/t.S/Unary": Handler(self.unary, Cardinality.UNARY_UNARY, BytesValue, BytesValue),
        }

    async def stream(self, stream: Any) -> None:
        mode = (await stream.recv_message()).value
        if mode & 1:
            stream.set_compression("gzip")
        count = size = 0
        for index, length in enumerate(SIZES):
            message = BytesValue(value=bytes(length))
            await stream.send_message(message, compress=bool(index % 2) if mode & 2 else True)
            count, size = count + 1, size + len(message.SerializeToString())
        self.sent.append(("/t.S/Stream", count, size))

    async def bidi(self, stream: Any) -> None:
        count = size = 0
        async for message in stream:
            await stream.send_message(message)
            count, size = count + 1, size + len(message.SerializeToString())
        self.sent.append(("/t.S/Bidi", count, size))

    async def held(self, stream: Any) -> None:
        await stream.recv_message()
        for _ in range(4):  # 200 KB: over a 64 KiB window the client never opens
            await stream.send_message(BytesValue(value=bytes(50_000)))

    async def unary(self, stream: Any) -> None:
        await stream.send_message(await stream.recv_message())


@pytest.mark.parametrize("send_buffer", [100, 65536])
async def test_a_server_streams_counts_match_what_its_handler_sent(send_buffer: int) -> None:
    measured, service = Measured(), Senders()
    config = Configuration(max_send_buffer_size=send_buffer)
    async with running_server([service], config=config, interceptors=[measured]) as (_, target):
        options = [("grpc.max_receive_message_length", 10**8)]
        async with grpc.aio.insecure_channel(target, options=options, compression=grpc.Compression.Gzip) as channel:
            stream = channel.unary_stream("/t.S/Stream", Int64Value.SerializeToString, BytesValue.FromString)
            for mode in range(4):
                assert [len(reply.value) async for reply in stream(Int64Value(value=mode))] == SIZES
            bidi = channel.stream_stream("/t.S/Bidi", BytesValue.SerializeToString, BytesValue.FromString)
            call = bidi(iter([BytesValue(value=bytes(length)) for length in SIZES]))
            assert [len(reply.value) async for reply in call] == SIZES
        for _ in range(100):
            if len(measured.ended) == 5:
                break
            await asyncio.sleep(0.01)
    assert sorted(measured.ended) == sorted(service.sent)


@pytest.mark.parametrize("intercepted", [False, True])
@pytest.mark.parametrize("how", ["close", "rst", "goaway"])
async def test_a_call_whose_status_waits_leaves_the_limit_when_its_client_goes(how: str, intercepted: bool) -> None:
    interceptors = [Measured()] if intercepted else []
    config = Configuration(max_concurrent_calls=1)
    async with running_server([Senders()], config=config, interceptors=interceptors) as (server, target):
        port = int(target.rpartition(":")[2])
        raw = RawClient("127.0.0.1", port)
        await raw.__aenter__()
        raw.auto_ack = False  # the window stays shut: the handler returns, its status waits
        stream_id = await raw.request("/t.S/Held", Int64Value(value=1).SerializeToString())
        for _ in range(100):
            if server._tasks and raw.responses.get(stream_id) is not None:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        if how == "close":
            await raw.__aexit__()
        elif how == "rst":
            raw.conn.reset_stream(stream_id, 8)
            raw.flush()
        else:
            raw.conn.close_connection(2)
            raw.flush()
        await asyncio.sleep(0.1)
        async with Channel(target) as channel:
            unary = method_for(channel, "/t.S/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            try:
                outcome: object = (await unary(BytesValue(value=b"ok"), timeout=2)).value
            except GRPCError as exc:
                outcome = exc.status
        if how != "close":
            await raw.__aexit__()
    assert outcome == b"ok"


def test_a_client_ca_without_a_certificate_is_refused(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    with pytest.raises(SettingsError, match="tls_client_ca_file"):
        settings = load_settings(AppSettings, tls_client_ca_file=ca_file)
        # Reached with the defect: no TLS at all, client certificates never asked for.
        assert settings.ssl_context() is None
