"""Edge cases of the protocol core's fast paths (plain frames past h2, cached request heads,
client header limits): each test compares our connection with h2 alone, or checks what
RFC 9113 / RFC 7541 require, on hand-built frames.
"""

from __future__ import annotations

import hpack

from app_kit import Configuration, Status
from app_kit.rpc.client import ClientConnection
from app_kit.rpc.events import ConnectionClosed, ResponseEnded
from app_kit.rpc.server import ServerConnection

from .frames import CONTINUATION, DATA, END_HEADERS, END_STREAM, HANDSHAKE, HEADERS, SETTINGS, frame

PUSH_PROMISE = 0x5
CONFIG = Configuration(max_receive_message_length=4096, max_header_list_size=2048)


class _ServerOnlyH2(ServerConnection):
    """Every frame through h2's own parser: the oracle for the frames taken past it."""

    def _take_frames(self, data: bytes, plain_frames: list[int], start: int, stop: int) -> list[object]:  # type: ignore[override]
        return self._h2.receive_data(data[start:stop])  # type: ignore[no-any-return]


class _ClientOnlyH2(ClientConnection):
    def _take_frames(self, data: bytes, plain_frames: list[int], start: int, stop: int) -> list[object]:  # type: ignore[override]
        return self._h2.receive_data(data[start:stop])  # type: ignore[no-any-return]


def _request(encoder: hpack.Encoder) -> bytes:
    return encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/test.Echo/Unary"),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _client(cls: type[ClientConnection] = ClientConnection, config: Configuration = CONFIG) -> ClientConnection:
    connection = cls(config, authority="x", scheme="http", user_agent="t")
    connection.initiate()
    return connection


def test_data_inside_a_push_promise_header_block_is_refused_as_h2_would() -> None:
    """A DATA frame inside a PUSH_PROMISE's header block (RFC 9113 §6.6, §6.10: only
    CONTINUATION may follow) is h2's to refuse, never taken past it as a plain frame."""
    encoder = hpack.Encoder()
    promise = (2).to_bytes(4, "big") + encoder.encode([(":method", "GET")])  # block left open
    data = (
        HANDSHAKE
        + frame(HEADERS, END_HEADERS, 1, _request(encoder))
        + frame(PUSH_PROMISE, 0, 1, promise)
        + frame(DATA, 0, 1, _message(b"hi"))
    )
    seen = []
    for connection in (ServerConnection(CONFIG), _ServerOnlyH2(CONFIG)):
        connection.initiate()
        connection.data_to_send()
        seen.append([type(event).__name__ for event in connection.receive_data(data)])
    assert seen[1][-1] == "ConnectionClosed"  # h2 alone: a connection error
    assert seen[0] == seen[1]


def test_data_inside_a_push_promise_block_client_side() -> None:
    """The client's side: a server's PUSH_PROMISE left open (push is disabled), then DATA on the
    call's stream: the connection ends, as with h2 alone."""
    server_encoder = hpack.Encoder()
    head = server_encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    promise = (2).to_bytes(4, "big") + server_encoder.encode([(":method", "GET")])
    data = (
        frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, 1, head)
        + frame(PUSH_PROMISE, 0, 1, promise)
        + frame(DATA, 0, 1, _message(b"hi"))
    )
    seen = []
    for cls in (ClientConnection, _ClientOnlyH2):
        connection = _client(cls)
        connection.start_call("/test.Echo/Unary", [])
        connection.data_to_send()
        seen.append([type(event).__name__ for event in connection.receive_data(data)])
    assert seen[1][-1] == "ConnectionClosed"
    assert seen[0] == seen[1]


def test_push_promise_continuations_count_against_the_header_block_cap() -> None:
    """CONTINUATION frames after a PUSH_PROMISE count against max_header_block_size (h2 alone
    would buffer 64 frames of max_frame_size before refusing them)."""
    config = Configuration(max_header_list_size=1024, max_header_block_size=4096)
    connection = ServerConnection(config)
    connection.initiate()
    encoder = hpack.Encoder()
    data = HANDSHAKE + frame(HEADERS, END_HEADERS, 1, _request(encoder))
    data += frame(PUSH_PROMISE, 0, 1, (2).to_bytes(4, "big") + b"\x00" * 4000)
    data += frame(CONTINUATION, 0, 1, b"\x00" * 4000)  # 8000 bytes of block: over the cap
    events = connection.receive_data(data)
    closed = [event for event in events if isinstance(event, ConnectionClosed)]
    assert closed and "max_header_block_size" in closed[0].reason


def test_oversized_informational_response_fails_the_call_only() -> None:
    """A 1xx response over max_header_list_size fails its call only (RESOURCE_EXHAUSTED): it
    keeps its :status, so h2 still tells it from the final response that follows."""
    server_encoder = hpack.Encoder()
    big = server_encoder.encode([(":status", "103"), ("x-big", "v" * 3000)])
    head = server_encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    trailers = server_encoder.encode([("grpc-status", "0")])
    connection = _client()
    first = connection.start_call("/test.Echo/Unary", [])
    connection.start_call("/test.Echo/Unary", [])  # another call on the same connection
    connection.data_to_send()
    data = (
        frame(SETTINGS, 0, 0)
        + frame(HEADERS, END_HEADERS, first, big)
        + frame(HEADERS, END_HEADERS, first, head)
        + frame(DATA, 0, first, _message(b"hi"))
        + frame(HEADERS, END_HEADERS | END_STREAM, first, trailers)
    )
    events = connection.receive_data(data)
    assert not [event for event in events if isinstance(event, ConnectionClosed)], events
    ended = [event for event in events if isinstance(event, ResponseEnded)]
    assert ended and ended[0].status is Status.RESOURCE_EXHAUSTED
    assert not connection.closed


def _header_blocks(output: bytes) -> list[tuple[int, bytes]]:
    """(stream id, whole header block) of each HEADERS (+ CONTINUATION) in ``output``."""
    blocks, position, open_block = [], 0, b""
    while position + 9 <= len(output):
        length = int.from_bytes(output[position : position + 3], "big")
        kind, flags = output[position + 3], output[position + 4]
        stream_id = int.from_bytes(output[position + 5 : position + 9], "big") & 0x7FFFFFFF
        payload = output[position + 9 : position + 9 + length]
        position += 9 + length
        if kind in (HEADERS, CONTINUATION):
            open_block = payload if kind == HEADERS else open_block + payload
            if flags & END_HEADERS:
                blocks.append((stream_id, open_block))
    return blocks


def test_cached_request_heads_stay_decodable_when_the_server_resizes_its_table() -> None:
    """the cached request head, with many methods, metadata, timeouts and
    encodings, decodes right in the server's HPACK decoder while the server changes
    SETTINGS_HEADER_TABLE_SIZE (down to 0, below the entries in use, and back up)."""
    connection = _client(config=Configuration())
    connection.receive_data(frame(SETTINGS, 0, 0))
    connection.data_to_send()
    decoder = hpack.Decoder()
    sizes = [None, 64, None, 0, None, 4096, 200, None, 8192, None]
    for round_, size in enumerate(sizes * 3):
        if size is not None:
            connection.receive_data(frame(SETTINGS, 0, 0, (1).to_bytes(2, "big") + size.to_bytes(4, "big")))
            decoder.max_allowed_table_size = size
            connection.data_to_send()  # the acknowledgement
            continue
        for index in range(40):
            path = f"/svc.S/Method{(index * 7 + round_) % 60}"
            metadata = [(b"x-k", b"v%d" % (index % 3))] if index % 2 else []
            encoding = "gzip" if index % 5 == 0 else None
            timeout = 1.5 if index % 3 == 0 else None
            stream_id = connection.start_call(path, metadata, timeout=timeout, encoding=encoding)
            ((sent_on, block),) = _header_blocks(bytes(connection.data_to_send()))
            fields = decoder.decode(block, raw=True)
            assert sent_on == stream_id
            assert [name for name, _ in fields][:4] == [b":method", b":scheme", b":path", b":authority"]
            found = dict(fields)
            assert found[b":path"] == path.encode()
            assert found[b"te"] == b"trailers" and found[b"user-agent"] == b"t"
            assert found.get(b"grpc-encoding") == (b"gzip" if encoding else None)
            assert (b"grpc-timeout" in found) == (timeout is not None)
            assert all(found[name] == value for name, value in metadata)
            connection.receive_data(frame(0x3, 0, stream_id, (8).to_bytes(4, "big")))  # RST_STREAM CANCEL
            connection.data_to_send()
