"""Our server against a raw h2 client: malformed requests, limits, flow control, shutdown frames."""

from __future__ import annotations

import asyncio
import gzip

import grpc
import h2.events
import pytest
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value

from app_kit import Configuration

from .conftest import running_server
from .h2client import RawClient, Response, frame_message
from .services import EchoService

pytestmark = pytest.mark.anyio

PROTOCOL_ERROR, REFUSED_STREAM = 1, 7


def _port(server) -> int:  # type: ignore[no-untyped-def]
    return server.sockets[0].getsockname()[1]


async def _assert_still_serving(client: RawClient) -> None:
    stream_id = await client.request("/test.Echo/Unary", BytesValue(value=b"ok").SerializeToString())
    response = await client.read_response(stream_id)
    assert response.grpc_status == 0, response
    assert BytesValue.FromString(response.messages()[0]).value == b"ok"


def _base_headers(path: bytes = b"/test.Echo/Unary") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


async def test_http_level_rejections() -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        stream_id = await client.request("/test.Echo/Unary", method=b"GET")
        response = await client.read_response(stream_id)
        assert response.http_status == 405
        assert response.header(b"content-type") == b"application/grpc"
        assert response.grpc_status == 12

        for content_type in (None, b"text/html", b"application/grpc+json", b"application/grpcx"):
            stream_id = client.new_stream_id()
            headers = [h for h in _base_headers() if h[0] != b"content-type"]
            if content_type is not None:
                headers.append((b"content-type", content_type))
            client.send_headers(stream_id, headers, end_stream=True)
            response = await client.read_response(stream_id)
            assert response.http_status == 415, content_type
            assert response.header(b"content-type") == b"application/grpc"

        for content_type in (b"application/grpc+proto", b"application/grpc;charset=utf-8"):
            stream_id = client.new_stream_id()
            headers = [h for h in _base_headers() if h[0] != b"content-type"] + [(b"content-type", content_type)]
            client.send_headers(stream_id, headers)
            client.conn.send_data(stream_id, b"\x00\x00\x00\x00\x00", end_stream=True)
            client.flush()
            response = await client.read_response(stream_id)
            assert response.grpc_status == 0, content_type
        await _assert_still_serving(client)


@pytest.mark.parametrize(
    "headers",
    [
        [h for h in _base_headers() if h[0] != b":path"],
        [h for h in _base_headers() if h[0] != b":method"],
        [h for h in _base_headers() if h[0] != b":scheme"],
        [*_base_headers()[:3], (b":path", b"/test.Echo/Unary"), *_base_headers()[3:]],
        [*_base_headers(), (b":authority", b"late")],
        [*_base_headers(), (b"X-Upper", b"1")],
        [*_base_headers(), (b"connection", b"keep-alive")],
        [h for h in _base_headers() if h[0] != b"te"] + [(b"te", b"gzip")],
        [*_base_headers(), (b"x-nul", b"a\x00b")],
        [*_base_headers(), (b"x-crlf", b"a\r\nb")],
        [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/x/y"), (b":bogus", b"1")],
    ],
    ids=[
        "no-path",
        "no-method",
        "no-scheme",
        "duplicate-path",
        "pseudo-after-regular",
        "upper-case-name",
        "connection-header",
        "te-not-trailers",
        "nul-in-value",
        "crlf-in-value",
        "unknown-pseudo",
    ],
)
async def test_malformed_requests_get_rst_stream_protocol_error(headers: list[tuple[bytes, bytes]]) -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, headers, end_stream=True)
        response = await client.read_response(stream_id)
        assert response.reset_code == PROTOCOL_ERROR
        assert not response.headers
        await _assert_still_serving(client)  # same connection, next stream


async def test_grpc_level_rejections() -> None:
    service = EchoService()
    async with running_server([service]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        payload = BytesValue(value=b"x").SerializeToString()
        # Non-ASCII bytes in a text metadata value (obs-text, valid HTTP): left out of the
        # metadata, not an error (PROTOCOL-HTTP2: a receiver must not fail the call for it).
        stream_id = await client.request("/test.Echo/Unary", payload, extra=[(b"x-name", "Zoë".encode())])
        response = await client.read_response(stream_id)
        assert response.grpc_status == 0
        # Invalid base64 in a binary value.
        stream_id = await client.request("/test.Echo/Unary", payload, extra=[(b"x-data-bin", b"!!!")])
        assert (await client.read_response(stream_id)).grpc_status == 13

        for timeout in (b"123456789S", b"10", b"S", b"10x", b"-1S", b"1.5S", b"10 S"):
            stream_id = await client.request("/test.Echo/Unary", payload, timeout=timeout)
            response = await client.read_response(stream_id)
            assert response.grpc_status == 13, timeout
            assert "grpc-timeout" in (response.grpc_message or ""), timeout
        stream_id = await client.request("/test.Echo/Unary", payload, timeout=b"99999999H")  # 8 digits: valid
        assert (await client.read_response(stream_id)).grpc_status == 0

        stream_id = await client.request("/test.Echo/Unary", payload, extra=[(b"grpc-encoding", b"br")])
        response = await client.read_response(stream_id)
        assert response.grpc_status == 12
        assert response.header(b"grpc-accept-encoding") == b"gzip,deflate,identity"
        assert "gzip" in (response.grpc_message or "")

        # Compressed flag without grpc-encoding.
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, _base_headers())
        client.conn.send_data(stream_id, b"\x01\x00\x00\x00\x01x", end_stream=True)
        client.flush()
        response = await client.read_response(stream_id)
        assert response.grpc_status == 13 and "grpc-encoding" in (response.grpc_message or "")

        # Bytes that are no protobuf message of the request type.
        stream_id = await client.request("/test.Echo/Unary", b"\xff\xff\xff")
        response = await client.read_response(stream_id)
        assert response.grpc_status == 13 and "decode" in (response.grpc_message or "")

        # Two requests on a unary method; none at all.
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, _base_headers())
        client.conn.send_data(stream_id, b"\x00\x00\x00\x00\x00" * 2, end_stream=True)
        client.flush()
        assert (await client.read_response(stream_id)).grpc_status == 13
        stream_id = await client.request("/test.Echo/Unary", None)
        assert (await client.read_response(stream_id)).grpc_status == 13

        # A message cut off by END_STREAM.
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, _base_headers())
        client.conn.send_data(stream_id, b"\x00\x00\x00\x00\x09abc", end_stream=True)
        client.flush()
        assert (await client.read_response(stream_id)).grpc_status == 13
        await _assert_still_serving(client)


async def test_huge_length_prefix_is_rejected_before_buffering() -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, _base_headers())
        # Announce 4 GiB - 1 and send only the prefix: the answer must not wait for the body.
        client.conn.send_data(stream_id, b"\x00\xff\xff\xff\xff")
        client.flush()
        response = await client.read_response(stream_id, timeout=2)
        assert response.grpc_status == 8
        assert "larger than max" in (response.grpc_message or "")
        await _assert_still_serving(client)


async def test_gzip_request_gets_gzip_reply() -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        payload = BytesValue(value=b"squeeze " * 1000).SerializeToString()
        stream_id = client.new_stream_id()
        client.send_headers(
            stream_id, [*_base_headers(), (b"grpc-encoding", b"gzip"), (b"grpc-accept-encoding", b"gzip")]
        )
        body = gzip.compress(payload)
        client.conn.send_data(stream_id, b"\x01" + len(body).to_bytes(4, "big") + body, end_stream=True)
        client.flush()
        response = await client.read_response(stream_id)
        assert response.grpc_status == 0
        assert response.header(b"grpc-encoding") == b"gzip"
        assert response.data[0] == 1  # the reply message is compressed
        assert gzip.decompress(response.messages()[0]) == payload

        # A gzip bomb is cut off at the receive limit while inflating.
        bomb = gzip.compress(b"\x00" * (5 * 1024 * 1024))
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, [*_base_headers(), (b"grpc-encoding", b"gzip")])
        client.conn.send_data(stream_id, b"\x01" + len(bomb).to_bytes(4, "big") + bomb, end_stream=True)
        client.flush()
        assert (await client.read_response(stream_id)).grpc_status == 8


async def test_handler_that_does_not_read_applies_back_pressure() -> None:
    service = EchoService()
    config = Configuration(initial_stream_window_size=65535)
    async with (
        running_server([service], config=config) as (server, _),
        RawClient("127.0.0.1", _port(server)) as client,
    ):
        await client.wait_for(lambda: any(isinstance(e, h2.events.RemoteSettingsChanged) for e in client.events))
        stream_id = client.new_stream_id()
        client.send_headers(stream_id, _base_headers(b"/test.Echo/Hold"))
        message = b"\x00\x00\x00\x03\xeb" + BytesValue(value=b"m" * 1000).SerializeToString()
        assert len(message) == 1008
        sent = 0
        while client.conn.local_flow_control_window(stream_id) >= len(message):
            client.conn.send_data(stream_id, message)
            sent += 1
        client.flush()
        await asyncio.wait_for(service.started.wait(), 5)
        await asyncio.sleep(0.3)
        # Nothing was consumed, so no window came back: the server buffers at most one window.
        assert client.conn.local_flow_control_window(stream_id) < len(message)
        service.release.set()
        await client.wait_for(lambda: client.conn.local_flow_control_window(stream_id) >= 32 * 1024)
        for _ in range(10):
            client.conn.send_data(stream_id, message)
            sent += 1
        client.conn.end_stream(stream_id)
        client.flush()
        response = await client.read_response(stream_id)
        assert response.grpc_status == 0
        assert Int64Value.FromString(response.messages()[0]).value == sent * 1000


async def test_streams_over_the_limit_are_refused_others_unharmed() -> None:
    config = Configuration(max_concurrent_streams=2)
    async with (
        running_server([EchoService()], config=config) as (server, _),
        RawClient("127.0.0.1", _port(server)) as client,
    ):
        await client.wait_for(lambda: client.conn.remote_settings.max_concurrent_streams == 2)
        client.conn.remote_settings.acknowledge()  # let our h2 open more than advertised
        payload = DoubleValue(value=0.3).SerializeToString()
        first = await client.request("/test.Echo/Sleep", payload)
        second = await client.request("/test.Echo/Sleep", payload)
        client.conn.remote_settings._settings[3] = [100]  # type: ignore[attr-defined]
        third = await client.request("/test.Echo/Sleep", payload)
        refused = await client.read_response(third)
        assert refused.reset_code == REFUSED_STREAM
        for stream_id in (first, second):
            assert (await client.read_response(stream_id)).grpc_status == 0


async def test_connection_errors_get_goaway_and_server_keeps_serving() -> None:
    async with running_server([EchoService()]) as (server, _):
        async with RawClient("127.0.0.1", _port(server)) as client:
            # DATA on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 §6.1).
            client.send_raw(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            await client.wait_for(lambda: client.closed.is_set())
            goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaways and goaways[0].error_code == PROTOCOL_ERROR
        async with RawClient("127.0.0.1", _port(server)) as client:
            await _assert_still_serving(client)


async def test_unknown_frame_types_are_ignored() -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        client.send_raw(b"\x00\x00\x03\xfa\x00\x00\x00\x00\x00abc")
        await _assert_still_serving(client)


async def test_graceful_close_two_goaways_and_in_flight_call_completes() -> None:
    async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        port = _port(server)
        stream_id = await client.request("/test.Echo/Sleep", DoubleValue(value=0.5).SerializeToString())
        await asyncio.sleep(0.1)
        server.close()
        response = await client.read_response(stream_id)
        assert response.grpc_status == 0
        await client.wait_for(lambda: client.closed.is_set())
        goaways = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
        pings = [e for e in client.events if isinstance(e, h2.events.PingReceived)]
        assert [g.last_stream_id for g in goaways] == [2**31 - 1, stream_id]
        assert all(g.error_code == 0 for g in goaways)
        assert pings
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await asyncio.wait_for(server.wait_closed(), 2)


async def test_close_with_idle_clients_does_not_hang() -> None:
    async with running_server([EchoService()]) as (server, target):
        channel = grpc.aio.insecure_channel(target)
        unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
        assert (await unary(BytesValue(value=b"x"))).value == b"x"
        async with RawClient("127.0.0.1", _port(server)):
            server.close()
            await asyncio.wait_for(server.wait_closed(), 3)
        await channel.close()


async def test_grace_period_expiry_answers_unavailable() -> None:
    service = EchoService()
    async with running_server([service]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        stream_id = await client.request("/test.Echo/Sleep", DoubleValue(value=30).SerializeToString())
        await asyncio.wait_for(service.started.wait(), 5)
        server.close(grace=0.3)
        response = await client.read_response(stream_id, timeout=3)
        assert response.grpc_status == 14
        assert service.cancelled.is_set()
        await asyncio.wait_for(server.wait_closed(), 2)


async def test_server_lifecycle_errors() -> None:
    server = await _started_server()
    with pytest.raises(RuntimeError):
        await server.start("127.0.0.1", 0)
    server.close()
    await server.wait_closed()
    from app_kit import Server

    with pytest.raises(ValueError):
        await Server([EchoService()]).start("127.0.0.1", 0, path="/tmp/x.sock")
    never = Server([EchoService()])
    never.close()
    with pytest.raises(RuntimeError):
        await never.start("127.0.0.1", 0)
    await asyncio.wait_for(never.wait_closed(), 1)


async def _started_server():  # type: ignore[no-untyped-def]
    from app_kit import Server

    server = Server([EchoService()])
    await server.start("127.0.0.1", 0)
    assert server.sockets[0].getsockname()[1] > 0
    return server


async def test_ready_socket() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    async with running_server([EchoService()], sock=sock) as (server, _):
        assert server.sockets[0].getsockname() == sock.getsockname()
        async with RawClient("127.0.0.1", sock.getsockname()[1]) as client:
            await _assert_still_serving(client)


async def test_keepalive_ping_and_timeout() -> None:
    # Without calls, only when permitted (gRPC's keepalive_permit_without_calls, off by default).
    config = Configuration(keepalive_time=0.2, keepalive_timeout=0.3)
    async with running_server([EchoService()], config=config) as (server, _):
        async with RawClient("127.0.0.1", _port(server)) as client:
            await asyncio.sleep(0.6)
            assert not any(isinstance(e, h2.events.PingReceived) for e in client.events)
    config = Configuration(keepalive_time=0.2, keepalive_timeout=0.3, keepalive_permit_without_calls=True)
    async with running_server([EchoService()], config=config) as (server, _):
        # A peer that answers PINGs (h2 does) keeps its connection.
        async with RawClient("127.0.0.1", _port(server)) as client:
            await asyncio.sleep(1.0)
            assert any(isinstance(e, h2.events.PingReceived) for e in client.events)  # we pinged it
            assert not client.closed.is_set()
            await _assert_still_serving(client)
        # A peer that goes silent is closed after keepalive_time + keepalive_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        received = b""
        async with asyncio.timeout(3):
            while chunk := await reader.read(65536):
                received += chunk
        assert b"\x00\x00\x08\x06\x00\x00\x00\x00\x00keepaliv" in received  # the PING frame
        writer.close()


async def test_sender_waits_for_a_client_that_does_not_read() -> None:
    service = EchoService()
    async with running_server([service]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
        client.auto_ack = False  # no WINDOW_UPDATE: the client's 64 KiB windows stay full
        stream_id = await client.request("/test.Echo/Big", Int64Value(value=200).SerializeToString())
        await asyncio.sleep(0.5)
        held = service.observed["sent"]
        # The window (64 KiB) plus the send buffer (64 KiB) hold a few messages, not 200.
        assert isinstance(held, int) and held < 12, held
        await asyncio.sleep(0.3)
        assert service.observed["sent"] == held  # blocked, not buffering
        client.auto_ack = True
        client.conn.acknowledge_received_data(len(client.responses[stream_id].data), stream_id)
        client.flush()
        response = await client.read_response(stream_id, timeout=10)
        assert response.grpc_status == 0
        assert len(response.messages()) == 200


async def test_a_header_list_seen_before_is_held_to_its_content_length() -> None:
    # The core remembers what h2's checks found of a header list (its validation, its
    # content-length): a request repeating an earlier request's headers word for word is held
    # to them all the same. Its body longer than its content-length: refused as on its own.
    body = frame_message(BytesValue(value=b"ok").SerializeToString())
    headers = [*_base_headers(), (b"content-length", str(len(body)).encode())]
    for earlier in (0, 2):
        async with running_server([EchoService()]) as (server, _), RawClient("127.0.0.1", _port(server)) as client:
            for _ in range(earlier):
                stream_id = client.new_stream_id()
                client.send_headers(stream_id, headers)
                client.conn.send_data(stream_id, body, end_stream=True)
                client.flush()
                assert (await client.read_response(stream_id)).grpc_status == 0
            last = client.new_stream_id()
            client.send_headers(last, headers)
            client.conn.send_data(last, body + body, end_stream=True)
            client.flush()
            await client.wait_for(lambda: client.responses.get(last, Response()).ended or client.closed.is_set())  # noqa: B023
            codes = [e.error_code for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
            reset = client.responses.get(last, Response()).reset_code
            assert reset == PROTOCOL_ERROR or codes == [PROTOCOL_ERROR], (earlier, reset, codes)
