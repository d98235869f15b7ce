"""Fresh-eyes review of the protocol core's fast paths (d979746, c752d2f, d390983, 021e3e9):
a request's HEADERS past h2's parser and the §5.1 "ignore frames on a stream we reset"
override, the carried-frame receive path, ``_send_now`` and ``acknowledge_data``.

The failing tests show defects; the others pin behaviour of the new paths that is right now.
"""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value
from hyperframe.frame import Frame, RstStreamFrame, WindowUpdateFrame

from app_kit import Configuration, Status
from app_kit.rpc.client import ClientConnection
from app_kit.rpc.events import MessagesReceived, RequestReceived, ResponseEnded, StreamClosed
from app_kit.rpc.framing import frame_message
from app_kit.rpc.server import ServerConnection

from .conftest import running_server
from .frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    request_block,
)
from .h2client import RawClient
from .services import EchoService
from .test_fuzz_core import _h2_state, _OnlyH2, _shown

STREAM_CLOSED = 5
CONFIG = Configuration(max_receive_message_length=4096, max_header_list_size=2048)


def _frames(output: bytes | bytearray) -> list[Frame]:
    data, parsed = bytes(output), []
    while len(data) >= 9:
        item, length = Frame.parse_frame_header(memoryview(data[:9]))
        item.parse_body(memoryview(data[9 : 9 + length]))
        parsed.append(item)
        data = data[9 + length :]
    return parsed


def _message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _server() -> ServerConnection:
    connection = ServerConnection(CONFIG)
    connection.initiate()
    connection.data_to_send()
    return connection


# -- frames after the client's END_STREAM: RFC 9113 §5.1 half-closed (remote) ------------------


@pytest.mark.parametrize("late", ["DATA", "HEADERS"])
def test_frames_after_end_stream_are_answered_with_rst_stream(late: str) -> None:
    """RFC 9113 §5.1: a frame other than WINDOW_UPDATE, PRIORITY or RST_STREAM on a half-closed
    (remote) stream MUST be answered with a stream error STREAM_CLOSED. h2 does (its
    ``reset_stream_on_error``), but records that as closed_by SEND_RST_STREAM, the same mark
    as a reset we sent, and the overrides that ignore "frames on a stream we reset" swallow
    the RST_STREAM: the call is dropped (StreamClosed) and the client is told nothing."""
    encoder = hpack.Encoder()
    connection = _server()
    connection.receive_data(HANDSHAKE + frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(encoder)))
    connection.data_to_send()
    if late == "DATA":
        late_frame = frame(DATA, 0, 1, _message(b"late"))
    else:
        late_frame = frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode([("x-late", "1")]))
    events = connection.receive_data(late_frame)
    resets = [item for item in _frames(connection.data_to_send()) if isinstance(item, RstStreamFrame)]
    dropped = [item for item in events if isinstance(item, StreamClosed)]
    # The call is gone on our side; the client must learn it too.
    assert not dropped or [(item.stream_id, item.error_code) for item in resets] == [(1, STREAM_CLOSED)], (
        events,
        resets,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("late", ["DATA", "HEADERS"])
async def test_a_client_sending_after_end_stream_is_not_left_waiting(late: str) -> None:
    """Over a socket: a request with END_STREAM to a handler that takes a while, then DATA or
    HEADERS on the same stream. The server cancels the handler; the client must get
    RST_STREAM (STREAM_CLOSED) or an answer, not silence until its deadline."""
    service = EchoService()
    async with running_server([service]) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawClient("127.0.0.1", port) as client:
            stream_id = await client.request("/test.Echo/Sleep", DoubleValue(value=0.3).SerializeToString())
            await asyncio.wait_for(service.started.wait(), 5)
            if late == "DATA":
                client.send_raw(frame(DATA, 0, stream_id, frame_message(b"late")))
            else:  # a literal without indexing: HPACK state stays as the client's h2 has it
                client.send_raw(frame(HEADERS, END_HEADERS | END_STREAM, stream_id, b"\x00\x06x-late\x01y"))
            response = await client.read_response(stream_id, timeout=2.0)
            assert response.reset_code == STREAM_CLOSED or response.grpc_status is not None, response


def test_frames_on_a_stream_we_reset_are_ignored_but_hpack_stays_in_step() -> None:
    """Pins the §5.1 override (d979746): HEADERS, CONTINUATION and DATA on a stream the server
    reset get no RST_STREAM back, their header blocks still go through the HPACK decoder (a
    later request that refers to entries they added decodes), and the DATA's connection
    window comes back."""
    encoder = hpack.Encoder()
    connection = _server()
    connection.receive_data(HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(encoder)))
    connection.reset_stream(1, 8)  # CANCEL: as a handler's cancel()
    connection.data_to_send()
    block = encoder.encode([("x-added", "v" * 40)])  # inserted into the dynamic table
    events = connection.receive_data(
        frame(DATA, 0, 1, _message(b"x" * 1000))
        + frame(HEADERS, 0, 1, block[:3])
        + frame(CONTINUATION, END_HEADERS | END_STREAM, 1, block[3:])
        + frame(HEADERS, END_HEADERS, 3, request_block(encoder, extra=[("x-added", "v" * 40)]))
    )
    out = _frames(connection.data_to_send())
    assert not [item for item in out if isinstance(item, RstStreamFrame)], out
    assert sum(item.window_increment for item in out if isinstance(item, WindowUpdateFrame) and not item.stream_id) in (
        0,
        1009,
    )
    requests = [item for item in events if isinstance(item, RequestReceived)]
    assert [item.stream_id for item in requests] == [3]
    assert dict(requests[0].head.headers)[b"x-added"] == b"v" * 40


def test_frames_on_a_stream_the_peer_reset_are_answered_as_h2_does() -> None:
    """Pins the other half of the override: after the peer's RST_STREAM, its HEADERS and DATA
    on that stream are a stream error STREAM_CLOSED (h2's answer), not ignored."""
    encoder = hpack.Encoder()
    connection = _server()
    connection.receive_data(
        HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(encoder)) + frame(RST_STREAM, 0, 1, b"\0\0\0\x08")
    )
    connection.data_to_send()
    connection.receive_data(frame(HEADERS, END_HEADERS, 1, encoder.encode([("x", "y")])))
    resets = [item for item in _frames(connection.data_to_send()) if isinstance(item, RstStreamFrame)]
    assert [(item.stream_id, item.error_code) for item in resets] == [(1, STREAM_CLOSED)]
    assert not connection.closed


# -- a request's HEADERS past h2's parser ----------------------------------------------------


def _both(data: bytes) -> tuple[list[str], list[bytes], bool]:
    """Events, output and h2 state of ``data`` in our connection and in h2 alone, asserted equal."""
    fast, oracle = ServerConnection(CONFIG), _OnlyH2(CONFIG)
    seen, out = [], []
    for connection in (fast, oracle):
        connection.initiate()
        connection.data_to_send()
        seen.append(_shown(connection.receive_data(data)))
        out.append(bytes(connection.data_to_send()))
    assert seen[0] == seen[1]
    assert out[0] == out[1]
    assert _h2_state(fast) == _h2_state(oracle)
    return seen, out, fast.closed


@pytest.mark.parametrize(
    "ids",
    [
        [3, 1],  # lower than the highest: a connection error (closed implicitly)
        [3, 3],  # reused, the first still open: trailers-like HEADERS on an open stream
        [1, 2],  # even: PROTOCOL_ERROR
        [1, 0],  # stream 0
        [1, 2**31 - 1],  # the highest id
        [1, 5, 3],  # skipped, then used: too low
    ],
)
def test_request_headers_with_odd_stream_ids_match_h2(ids: list[int]) -> None:
    encoder = hpack.Encoder()
    data = HANDSHAKE + b"".join(frame(HEADERS, END_HEADERS, sid, request_block(encoder)) for sid in ids)
    _both(data)


def test_request_headers_that_do_not_decode_are_a_compression_error_on_the_fast_path() -> None:
    """A new stream's block with an invalid index (RFC 9113 §4.3: COMPRESSION_ERROR), taken by
    the new-stream fast path (the connection is open after a first request)."""
    encoder = hpack.Encoder()
    data = (
        HANDSHAKE
        + frame(HEADERS, END_HEADERS, 1, request_block(encoder))
        + frame(HEADERS, END_HEADERS, 3, b"\xff\xff\x7f")  # indexed field far past any table
    )
    _, out, closed = _both(data)
    goaways = [item for item in _frames(out[0]) if item.type == 0x7]
    assert closed and [item.error_code for item in goaways] == [9]


def test_request_headers_after_our_goaway_are_refused_the_same_way() -> None:
    """After the final GOAWAY (shutdown phase two), a new stream's HEADERS go through the fast
    path: still refused with REFUSED_STREAM, and later blocks still decode (HPACK in step)."""
    encoder = hpack.Encoder()
    connection = _server()
    connection.receive_data(HANDSHAKE + frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(encoder)))
    connection.start_shutdown()
    connection.finish_shutdown()
    connection.data_to_send()
    events = connection.receive_data(
        frame(HEADERS, END_HEADERS | END_STREAM, 3, request_block(encoder, extra=[("x-a", "1")]))
        + frame(HEADERS, END_HEADERS | END_STREAM, 5, request_block(encoder, extra=[("x-a", "1")]))
    )
    resets = [item for item in _frames(connection.data_to_send()) if isinstance(item, RstStreamFrame)]
    assert [(item.stream_id, item.error_code) for item in resets] == [(3, 7), (5, 7)]
    assert not [item for item in events if isinstance(item, RequestReceived)]
    assert not connection.closed


# -- the carried frame, completed on its own ---------------------------------------------------


def _carried_sequence() -> bytes:
    """Plain and non-plain frames mixed: new requests, DATA, padded DATA, a block with
    CONTINUATION, a peer reset and frames after it, a window update."""
    encoder = hpack.Encoder()
    parts = [HANDSHAKE, frame(HEADERS, END_HEADERS, 1, request_block(encoder, path="/test.Echo/Unary"))]
    parts += [frame(DATA, 0, 1, _message(b"a" * 40)), frame(DATA, 0x8, 1, b"\x02" + _message(b"b" * 10) + b"\0\0")]
    block = request_block(encoder, path="/test.Echo/Bidi")
    parts += [frame(HEADERS, 0, 3, block[:5]), frame(CONTINUATION, END_HEADERS, 3, block[5:])]
    parts.append(frame(DATA, 0, 3, _message(b"c" * 30)))
    parts.append(frame(HEADERS, END_HEADERS | END_STREAM, 5, request_block(encoder, extra=[("x-a", "1")])))
    parts.append(frame(DATA, END_STREAM, 1, _message(b"d")))
    parts += [frame(RST_STREAM, 0, 3, b"\0\0\0\x08"), frame(DATA, 0, 3, _message(b"e"))]
    parts.append(frame(HEADERS, END_HEADERS, 3, encoder.encode([("a", "b")])))
    parts.append(frame(WINDOW_UPDATE, 0, 0, (100).to_bytes(4, "big")))
    parts.append(frame(HEADERS, END_HEADERS, 7, request_block(encoder, extra=[("x-b", "2")])))
    parts.append(frame(DATA, END_STREAM, 7, _message(b"f" * 100)))
    return b"".join(parts)


def test_every_two_cut_split_matches_h2_alone() -> None:
    """The sequence cut into three reads, the first cut at every offset, the second 1, 9 (a
    frame header's length), 37 bytes later or at the end: a carried frame, plain or not,
    followed by plain frames in the same read; the preface and frame headers split. The same
    events, output and state as h2 alone."""
    data = _carried_sequence()
    for first in range(1, len(data)):
        for second in sorted({min(first + step, len(data)) for step in (1, 9, 37, len(data))}):
            fast, oracle = ServerConnection(CONFIG), _OnlyH2(CONFIG)
            for connection in (fast, oracle):
                connection.initiate()
                connection.data_to_send()
            for chunk in (data[:first], data[first:second], data[second:]):
                if not chunk:
                    continue
                seen = [_shown(connection.receive_data(chunk)) for connection in (fast, oracle)]
                assert seen[0] == seen[1], (first, second)
                assert bytes(fast.data_to_send()) == bytes(oracle.data_to_send()), (first, second)
                assert _h2_state(fast) == _h2_state(oracle), (first, second)
                assert not fast._h2.incoming_buffer._data, (first, second)
            assert not fast.closed


# -- _send_now: a large message straight into h2's output --------------------------------------


def _open_call(config: Configuration, settings: bytes = b"", window: int = 0) -> ServerConnection:
    connection = ServerConnection(config)
    connection.initiate()
    data = PREFACE + frame(SETTINGS, 0, 0, settings)
    if window:
        data += frame(WINDOW_UPDATE, 0, 0, window.to_bytes(4, "big"))
    data += frame(HEADERS, END_HEADERS | END_STREAM, 1, request_block(hpack.Encoder()))
    connection.receive_data(data)
    connection.send_response_headers(1, [])
    connection.data_to_send()
    return connection


def _data_frames(output: bytes | bytearray) -> list[tuple[int, int, bool]]:
    return [
        (item.stream_id, len(item.data), "END_STREAM" in item.flags) for item in _frames(output) if item.type == DATA
    ]


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_send_now_at_exactly_the_window(extra: int) -> None:
    """A message whose framed size is the window +-1: handed to h2 at once, whole, when it fits
    (the window then exactly 0), else queued: the window's worth at the flush and the rest
    after a WINDOW_UPDATE;
    the bytes on the wire are the same message either way."""
    config = Configuration(max_send_buffer_size=16384)
    connection = _open_call(config)  # windows: 65535 each
    payload = bytes(range(256)) * 256
    payload = payload[: 65535 - 5 + extra]
    connection.send_message(1, payload)
    at_once = bytes(connection.data_to_send())  # before any flush: _send_now's frames only
    assert sum(length for _, length, _ in _data_frames(at_once)) == (len(payload) + 5 if extra <= 0 else 0)
    connection.flush_streams()
    first = at_once + bytes(connection.data_to_send())
    sent = sum(length for _, length, _ in _data_frames(first))
    assert sent == min(len(payload) + 5, 65535)
    assert connection._h2.outbound_flow_control_window == 65535 - sent
    connection.receive_data(
        frame(WINDOW_UPDATE, 0, 0, (10).to_bytes(4, "big")) + frame(WINDOW_UPDATE, 0, 1, (10).to_bytes(4, "big"))
    )
    rest = bytes(connection.data_to_send())
    body = b"".join(item.data for item in _frames(first + rest) if item.type == DATA)
    assert body == b"\x00" + len(payload).to_bytes(4, "big") + payload


def test_send_now_follows_a_smaller_max_frame_size_and_a_larger_one() -> None:
    """SETTINGS_MAX_FRAME_SIZE changed between messages: each message's frames follow the
    setting in force (16384, then 20000), and no frame is over it."""
    config = Configuration(max_send_buffer_size=16384)
    connection = _open_call(
        config, window=10_000_000, settings=(4).to_bytes(2, "big") + (10_000_000).to_bytes(4, "big")
    )
    payload = b"p" * 50000
    connection.send_message(1, payload)
    first = _data_frames(connection.data_to_send())
    assert [length for _, length, _ in first] == [16384, 16384, 16384, 50005 - 3 * 16384]
    connection.receive_data(frame(SETTINGS, 0, 0, (5).to_bytes(2, "big") + (20000).to_bytes(4, "big")))
    connection.data_to_send()
    connection.send_message(1, payload)
    second = _data_frames(connection.data_to_send())
    assert [length for _, length, _ in second] == [20000, 20000, 10005]


def test_send_now_then_status_keeps_data_before_trailers() -> None:
    """A large message sent at once, then the status: DATA first, then the trailers; a second
    large message on another stream queued behind a blocked one waits its turn."""
    config = Configuration(max_send_buffer_size=16384)
    connection = _open_call(config)
    connection.send_message(1, b"m" * 20000)
    connection.send_status(1, Status.OK)
    connection.flush_streams()
    kinds = [(item.type, "END_STREAM" in item.flags) for item in _frames(connection.data_to_send())]
    assert kinds == [(DATA, False), (DATA, False), (HEADERS, True)]


def test_a_large_message_still_asks_its_sender_to_wait() -> None:
    """send_message's contract: once more than max_send_buffer_size bytes wait, the sender is
    told to wait (False, then StreamWritable once they are handed on). With _send_now a large
    message skips the queue and True comes back at once, however much is piled up in h2's
    output: a sender that never awaits anything else never yields (asyncio's send_message
    returns without a checkpoint), so nothing is written until the peer's windows run out."""
    config = Configuration(max_send_buffer_size=16384)
    # A peer that opened its windows wide (2**31-1): the windows no longer bound anything.
    big = 2**31 - 1
    connection = _open_call(config, window=big - 65535, settings=(4).to_bytes(2, "big") + big.to_bytes(4, "big"))
    answers = [connection.send_message(1, b"m" * 65536) for _ in range(32)]  # 2 MiB, nothing written
    assert answers.count(True) <= 1, answers


@pytest.mark.anyio
async def test_a_server_stream_of_large_messages_is_held_back_by_a_peer_that_does_not_read() -> None:
    """Over a socket: a client opens its windows to 2**31-1, asks for 3000 messages of 16 KiB
    (48 MiB) and reads nothing. The handler must be held back by the transport (it was: each
    large message waited for its flush), not run to the end with all of it in memory."""
    service = EchoService()
    config = Configuration(max_send_buffer_size=16384)
    count = 3000
    async with running_server([service], config=config) as (server, _):
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            big = 2**31 - 1
            writer.write(
                PREFACE
                + frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + big.to_bytes(4, "big"))
                + frame(WINDOW_UPDATE, 0, 0, (big - 65535).to_bytes(4, "big"))
                + frame(HEADERS, END_HEADERS, 1, request_block(path="/test.Echo/Big"))
                + frame(DATA, END_STREAM, 1, frame_message(Int64Value(value=count).SerializeToString()))
            )
            await writer.drain()
            for _ in range(40):
                await asyncio.sleep(0.025)
                if service.observed.get("sent") == count:
                    break
            sent = service.observed.get("sent", 0)
            assert isinstance(sent, int) and 0 < sent < count // 2, sent
        finally:
            writer.close()


# -- acknowledge_data: only for streams the peer has ended ----------------------------


def _pump(client: ClientConnection, server: h2.connection.H2Connection, events: list[object]) -> bool:
    """Move bytes both ways once; True if anything moved."""
    moved = False
    to_server = bytes(client.data_to_send())
    if to_server:
        moved = True
        events.extend(server.receive_data(to_server))
    to_client = server.data_to_send()
    if to_client:
        moved = True
        client.receive_data(to_client)
        client.flush_streams()
        client_out = bytes(client.data_to_send())
        if client_out:
            events.extend(server.receive_data(client_out))
    return moved


def test_a_response_abandoned_without_a_reset_can_still_be_finished_by_the_server() -> None:
    """A unary call (our side ended) answered with HTTP 503 and a body larger than our stream
    window (a proxy's error page): the call ends at the headers without a reset (our side
    was closed). The DATA that follows, on a stream the server has NOT ended, now gives back
    only the connection window (acknowledge_data): the server's stream window
    runs dry at 1 MiB and its stream hangs open for good. h2's acknowledge_received_data
    gave the stream its window back too; a RST_STREAM would also do."""
    client = ClientConnection(Configuration(), authority="x", scheme="http", user_agent="t")
    client.initiate()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    server.initiate_connection()
    server.increment_flow_control_window(2**30)  # not what this is about
    stream_id = client.start_call("/test.Echo/Unary", [])
    client.send_message(stream_id, b"req")
    client.end_local(stream_id, [])
    client.flush_streams()
    events: list[object] = []
    _pump(client, server, events)
    server.send_headers(stream_id, [(":status", "503"), ("content-type", "text/html")])
    body = 3 * 1024 * 1024
    sent, ended, reset = 0, False, False
    outcome: list[object] = []
    for _ in range(500):
        room = min(server.local_flow_control_window(stream_id), body - sent) if not reset else 0
        while room > 0:
            chunk = min(room, server.max_outbound_frame_size)
            server.send_data(stream_id, b"x" * chunk, end_stream=sent + chunk == body)
            sent += chunk
            room -= chunk
        to_client = server.data_to_send()
        if to_client:
            outcome += client.receive_data(to_client)
        client.flush_streams()
        back = bytes(client.data_to_send())
        if back:
            for item in server.receive_data(back):
                reset = reset or isinstance(item, h2.events.StreamReset)
        ended = sent == body
        if ended or reset or (not to_client and not back):
            break
    assert [type(item) for item in outcome if isinstance(item, ResponseEnded)] == [ResponseEnded]
    assert ended or reset, f"the server's stream hangs: {sent} of {body} bytes sent, window shut"


def test_window_of_messages_consumed_after_end_stream_goes_back_to_the_connection() -> None:
    """Pins 021e3e9: a client-streaming request whose END_STREAM came before the handler read
    its messages: what the handler consumes afterwards reopens the connection window (one
    WINDOW_UPDATE on stream 0 once half of it is used, as h2 would), never a stream's."""
    config = Configuration(initial_connection_window_size=65535, max_receive_message_length=70000)
    connection = ServerConnection(config)
    connection.initiate()
    encoder = hpack.Encoder()
    payloads = [_message(b"z" * 16000) for _ in range(3)]
    data = HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(encoder))
    data += b"".join(frame(DATA, 0, 1, payload) for payload in payloads[:-1])
    data += frame(DATA, END_STREAM, 1, payloads[-1])
    events = connection.receive_data(data)
    connection.data_to_send()
    messages = [item for event in events if isinstance(event, MessagesReceived) for item in event.messages]
    assert len(messages) == 3
    for _, flow in messages:
        connection.acknowledge(1, flow)
    connection.flush_streams()
    updates = [item for item in _frames(connection.data_to_send()) if isinstance(item, WindowUpdateFrame)]
    assert [(item.stream_id, item.window_increment) for item in updates] == [(0, 3 * 16005)]
    assert connection._h2._inbound_flow_control_window_manager.current_window_size == 65535
