"""Our server against grpcio clients (sync and grpc.aio) over real sockets."""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile

import anyio
import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value, StringValue
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from app_kit import Configuration, GRPCError, ProtocolError, Status

from .conftest import running_server
from .services import EchoService

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def _method(channel: grpc.aio.Channel, kind: str, path: str, request_type, reply_type):  # type: ignore[no-untyped-def]
    return getattr(channel, kind)(
        path, request_serializer=request_type.SerializeToString, response_deserializer=reply_type.FromString
    )


async def test_unary_with_metadata_both_ways() -> None:
    service = EchoService()
    async with running_server([service]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)(
            BytesValue(value=b"hello"),
            metadata=(("x-text", "plain value"), ("x-data-bin", b"\x00\x01\xfe\xff"), ("x-text", "second")),
        )
        reply = await call
        assert reply.value == b"hello"
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
        assert await call.code() == grpc.StatusCode.OK
    seen = service.observed["metadata"]
    assert seen.getall("x-text") == ["plain value", "second"]  # type: ignore[attr-defined]
    assert seen["x-data-bin"] == b"\x00\x01\xfe\xff"  # type: ignore[index]
    assert "grpc-accept-encoding" not in seen and "user-agent" not in seen  # type: ignore[operator]
    assert "grpc-python" in str(service.observed["user_agent"])
    assert service.observed["peer"][0] == "127.0.0.1"  # type: ignore[index]
    assert service.observed["peer_cert"] is None
    assert ("x-data-bin", b"\x00\x01\xfe\xff") in list(initial)
    assert [v for k, v in initial if k == "x-text"] == ["plain value", "second"]
    assert ("x-trailer", "done") in list(trailing)
    assert ("x-trailer-bin", b"\x00\xff") in list(trailing)


async def test_all_four_cardinalities_with_aio_client() -> None:
    async with running_server([EchoService()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        server_stream = _method(channel, "unary_stream", "/test.Echo/ServerStream", Int64Value, Int64Value)
        values = [m.value async for m in server_stream(Int64Value(value=100))]
        assert values == list(range(100))

        client_stream = _method(channel, "stream_unary", "/test.Echo/ClientStream", BytesValue, Int64Value)
        reply = await client_stream(iter([BytesValue(value=b"x" * n) for n in range(50)]))
        assert reply.value == sum(range(50))

        empty = await client_stream(iter([]))
        assert empty.value == 0

        bidi = _method(channel, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)
        call = bidi()
        for index in range(20):  # strict ping-pong: each reply arrives before the next request
            await call.write(BytesValue(value=str(index).encode()))
            assert (await call.read()).value == str(index).encode()
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK


async def test_a_server_stream_past_its_status_refuses_to_send() -> None:
    service = EchoService()
    async with running_server([service]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        ended = _method(channel, "unary_stream", "/test.Echo/StreamThenStatus", Int64Value, Int64Value)
        call = ended(Int64Value(value=5))
        assert [m.value async for m in call] == list(range(5))
        assert await call.code() == grpc.StatusCode.OK
    assert isinstance(service.observed["late_send"], ProtocolError)


async def test_sync_client_in_thread() -> None:
    async with running_server([EchoService()]) as (_, target):

        def work() -> list[int]:
            with grpc.insecure_channel(target) as channel:
                unary = channel.unary_unary(
                    "/test.Echo/Unary",
                    request_serializer=BytesValue.SerializeToString,
                    response_deserializer=BytesValue.FromString,
                )
                assert unary(BytesValue(value=b"sync"), timeout=5).value == b"sync"
                stream = channel.unary_stream(
                    "/test.Echo/ServerStream",
                    request_serializer=Int64Value.SerializeToString,
                    response_deserializer=Int64Value.FromString,
                )
                return [m.value for m in stream(Int64Value(value=5), timeout=5)]

        assert await anyio.to_thread.run_sync(work) == [0, 1, 2, 3, 4]


async def test_errors_status_message_and_details() -> None:
    async with running_server([EchoService()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        fail = _method(channel, "unary_unary", "/test.Echo/Fail", StringValue, StringValue)

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fail(StringValue(value="grpc"))
        error = info.value
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "no such thing: ünïcode 100%"
        status = rpc_status.from_call(error)  # grpcio's own parser; checks code and message agree
        assert status is not None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
        bad_request = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(bad_request)
        assert bad_request.field_violations[0].field == "value"

        cases = {
            "unimplemented": (grpc.StatusCode.UNIMPLEMENTED, "Method not implemented"),
            "crash": (grpc.StatusCode.UNKNOWN, "Unexpected error"),
            "no-reply": (grpc.StatusCode.INTERNAL, "The handler sent no reply"),
            "double-send": (grpc.StatusCode.INTERNAL, "Internal error"),
            "explicit-ok-without-reply": (grpc.StatusCode.INTERNAL, "Internal error"),
        }
        for how, (code, message) in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await fail(StringValue(value=how))
            assert (info.value.code(), info.value.details()) == (code, message), how
            assert "secret" not in (info.value.details() or "")

        call = fail(StringValue(value="status-with-metadata"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert ("x-why", "because") in list(info.value.trailing_metadata())


async def test_unknown_service_and_method() -> None:
    async with running_server([EchoService()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        for path in ("/test.Echo/Nope", "/no.Such/Service"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _method(channel, "unary_unary", path, BytesValue, BytesValue)(BytesValue())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert path in (info.value.details() or "")


async def test_deadline_cancels_handler_and_reports_deadline_exceeded() -> None:
    service = EchoService()
    async with running_server([service]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        sleep = _method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sleep(DoubleValue(value=10), timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with anyio.fail_after(2):
            await service.cancelled.wait()
        remaining = service.observed["deadline_remaining"]
        assert isinstance(remaining, float) and 0.2 < remaining <= 0.55  # clients may round grpc-timeout up
        # A call within its deadline is unaffected.
        assert (await sleep(DoubleValue(value=0.01), timeout=5)).value == 0.01


async def test_server_side_deadline_without_client_enforcement() -> None:
    """The server enforces grpc-timeout itself: its status is DEADLINE_EXCEEDED from the server."""
    from .h2client import RawClient

    service = EchoService()
    async with running_server([service]) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawClient("127.0.0.1", port) as client:
            stream_id = await client.request(
                "/test.Echo/Sleep", DoubleValue(value=10).SerializeToString(), timeout=b"200m"
            )
            response = await client.read_response(stream_id, timeout=3)
        assert response.grpc_status == 4
        assert service.cancelled.is_set()


async def test_client_cancellation_cancels_handler() -> None:
    service = EchoService()
    async with running_server([service]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = _method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)(DoubleValue(value=30))
        with anyio.fail_after(5):
            await service.started.wait()
        call.cancel()
        with anyio.fail_after(5):
            await service.cancelled.wait()
        assert await call.code() == grpc.StatusCode.CANCELLED


async def test_gzip_both_ways() -> None:
    service = EchoService()
    payload = b"compressible " * 10000
    async with running_server([service]) as (_, target):
        async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
            unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            call = unary(BytesValue(value=payload))
            assert (await call).value == payload
            initial = dict(await call.initial_metadata())
        bidi_payloads = [bytes([n]) * 1000 for n in range(10)]
        async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
            bidi = _method(channel, "stream_stream", "/test.Echo/Bidi", BytesValue, BytesValue)
            replies = [m.value async for m in bidi(iter(BytesValue(value=p) for p in bidi_payloads))]
            assert replies == bidi_payloads
    # grpcio hides grpc-encoding from the application; the raw test below checks the header.
    assert "grpc-encoding" not in initial


async def test_large_message_with_raised_limits() -> None:
    config = Configuration(max_receive_message_length=32 * MiB, max_send_message_length=32 * MiB)
    payload = os.urandom(16 * MiB)
    options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]
    async with running_server([EchoService()], config=config) as (_, target):
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            with anyio.fail_after(30):
                assert (await unary(BytesValue(value=payload))).value == payload


async def test_over_limit_messages_are_resource_exhausted() -> None:
    config = Configuration(max_receive_message_length=1 * MiB)
    async with running_server([EchoService()], config=config) as (_, target):
        options = [("grpc.max_receive_message_length", 64 * MiB)]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(BytesValue(value=b"x" * (2 * MiB)))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in (info.value.details() or "")
            # Replies over max_send_message_length (default 4 MiB) fail the same way.
            fail = _method(channel, "unary_unary", "/test.Echo/Fail", StringValue, StringValue)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await fail(StringValue(value="big-reply"))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The connection is still good.
            assert (await unary(BytesValue(value=b"ok"))).value == b"ok"


async def test_two_hundred_concurrent_calls_on_one_connection() -> None:
    async with running_server([EchoService()]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        sleep = _method(channel, "unary_unary", "/test.Echo/Sleep", DoubleValue, DoubleValue)
        unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
        with anyio.fail_after(20):
            replies = await asyncio.gather(
                *(sleep(DoubleValue(value=0.2)) for _ in range(100)),
                *(unary(BytesValue(value=str(n).encode())) for n in range(100)),
            )
        assert all(r.value == 0.2 for r in replies[:100])
        assert [r.value for r in replies[100:]] == [str(n).encode() for n in range(100)]


async def test_unix_socket() -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "grpc.sock")
        async with running_server([EchoService()], path=path) as _:
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
                assert (await unary(BytesValue(value=b"unix"))).value == b"unix"


async def test_ipv6() -> None:
    async with running_server([EchoService()], host="::1") as (_, target):
        assert target.startswith("[::1]:")
        async with grpc.aio.insecure_channel(f"ipv6:{target}") as channel:
            unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            assert (await unary(BytesValue(value=b"six"))).value == b"six"


async def test_tls_with_alpn_and_client_certificate() -> None:
    import trustme

    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    client_cert = ca.issue_cert("client@example")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_OPTIONAL
    service = EchoService()
    async with running_server([service], ssl=context) as (server, _):
        port = server.sockets[0].getsockname()[1]
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=client_cert.private_key_pem.bytes(),
            certificate_chain=client_cert.cert_chain_pems[0].bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            unary = _method(channel, "unary_unary", "/test.Echo/Unary", BytesValue, BytesValue)
            assert (await unary(BytesValue(value=b"secret"))).value == b"secret"
        # ALPN: a TLS client offering h2 and http/1.1 is told h2.
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        client_context.set_alpn_protocols(["http/1.1", "h2"])
        _, writer = await asyncio.open_connection("localhost", port, ssl=client_context)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        writer.close()
    cert = service.observed["peer_cert"]
    assert isinstance(cert, dict)
    assert any(("client@example" in str(v)) for v in cert.get("subjectAltName", ()))


async def test_server_side_cancel() -> None:
    from .services import CancellingService

    service = CancellingService()
    async with running_server([service]) as (_, target), grpc.aio.insecure_channel(target) as channel:
        call = _method(channel, "unary_stream", "/test.Cancel/Stream", Int64Value, Int64Value)(Int64Value())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.CANCELLED
    assert isinstance(service.after_cancel, GRPCError)
    assert service.after_cancel.status == Status.CANCELLED
