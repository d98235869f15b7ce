"""The hot path's shortcuts against the libraries they bypass, used as references.

The server writes HEADERS and DATA without h2's frame objects and encodes header blocks
itself: hpack's decoder must read every block back exactly, an h2 client must see the same
events as from h2's own send path, and h2's stream state on the server must end up the
same. Inbound, repeated header blocks and request heads are remembered: what comes from
memory must equal what decoding and parsing afresh gives.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import hpack.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app_kit import Configuration, Status
from app_kit.rpc.events import RequestHead, RequestReceived, StreamWritable
from app_kit.rpc.framing import frame_message
from app_kit.rpc.server import ServerConnection, parse_request
from app_kit.wire.h2_internals import MemoizingHeaderDecoder
from app_kit.wire.header_block import HeaderBlockEncoder

INDEXED = ((b"content-type", b"application/grpc"), (b"grpc-status", b"0"), (b"x-long", b"v" * 300))
STATIC = [(b":status", b"200"), (b":status", b"404"), (b"accept-encoding", b"gzip, deflate")]
names = st.sampled_from(
    [b"grpc-message", b"content-type", b"x-custom", b"grpc-status", b"a" * 200, b"www-authenticate"]
)
values = st.binary(max_size=300).filter(lambda value: b"\0" not in value)
fields = st.one_of(st.sampled_from(INDEXED + tuple(STATIC)), st.tuples(names, values))
# Between blocks: nothing, or the peer changing SETTINGS_HEADER_TABLE_SIZE.
steps = st.tuples(st.lists(fields, max_size=8), st.one_of(st.none(), st.sampled_from([0, 40, 200, 400, 4096, 70000])))


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, min_size=1, max_size=12))
def test_every_block_decodes_to_its_fields_with_the_reference_decoder(script) -> None:  # type: ignore[no-untyped-def]
    encoder = HeaderBlockEncoder(indexed=INDEXED)
    decoder = hpack.Decoder()
    resized = False
    for headers, new_size in script:
        for cached in (False, True, True):
            block = encoder.encode_cached(tuple(headers)) if cached else encoder.encode(headers)
            if resized:  # RFC 7541 §4.2: the first block after a change signals it
                assert block[0] & 0xE0 == 0x20
                resized = False
            assert decoder.decode(block, raw=True) == headers
            # Only the fields meant for the table ever enter it, and it never overflows.
            table = decoder.header_table
            assert set(table.dynamic_entries) <= set(INDEXED)
            assert table._current_size <= encoder.header_table_size
        if new_size is not None:
            resized = new_size != encoder.header_table_size
            encoder.header_table_size = new_size
            decoder.max_allowed_table_size = new_size  # what the decoder's side advertised


def test_repeated_response_blocks_shrink_to_indices() -> None:
    encoder = HeaderBlockEncoder(indexed=INDEXED[:2])
    head = ((b":status", b"200"), (b"content-type", b"application/grpc"))
    first = encoder.encode_cached(head)
    assert len(first) > 16  # the literal that enters the table
    assert encoder.encode_cached(head) == bytes([0x88, 0x80 | 62])  # static 8, dynamic 62
    assert encoder.encode_cached(head) is encoder.encode_cached(head)  # served from the cache
    encoder.header_table_size = 0  # the peer allows no table: literals from now on
    assert encoder.encode_cached(head)[:1] == b"\x20"  # a size update to 0 comes first
    assert encoder.encode_cached(head) == encoder.encode_cached(head)


# -- the same exchange over h2's own send path and over ours ------------------------------


def _client(header_table_size: int = 4096, window: int = 65535, frame: int = 16384) -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: header_table_size,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: frame,  # (grpcio's peers say 4 or 16 MiB)
        },
    )
    client.max_inbound_frame_size = client.incoming_buffer.max_frame_size = frame  # (h2 read it at construction)
    client.initiate_connection()
    if window > 65535:
        client.increment_flow_control_window(window - 65535)
    return client


def _request(client: h2.connection.H2Connection, body: bytes) -> int:
    stream_id = client.get_next_available_stream_id()
    client.send_headers(
        stream_id,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/pkg.Svc/Call"),
            (b":authority", b"x"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ],
    )
    client.send_data(stream_id, frame_message(body), end_stream=True)
    return stream_id


def _pump(client: h2.connection.H2Connection, server: ServerConnection) -> tuple[list[h2.events.Event], list[object]]:
    """Move bytes both ways until both sides are quiet; return what each side saw."""
    client_events: list[h2.events.Event] = []
    server_events: list[object] = []
    while True:
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        if to_server:
            server_events += server.receive_data(to_server)
        if to_client:
            for event in client.receive_data(to_client):
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                client_events.append(event)


def _comparable(events: list[h2.events.Event]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            out.append((type(event).__name__, event.stream_id, list(event.headers or [])))
        elif isinstance(event, h2.events.DataReceived):
            out.append(("data", event.stream_id, event.data))
        elif isinstance(event, h2.events.StreamEnded):
            out.append(("ended", event.stream_id))
    return out


def _stream_state(server: ServerConnection, stream_id: int) -> tuple[object, ...]:
    h2conn = server._h2
    stream = h2conn.streams[stream_id]
    machine = stream.state_machine
    return (
        machine.state,
        machine.headers_sent,
        machine.trailers_sent,
        stream.outbound_flow_control_window,
        h2conn.outbound_flow_control_window,
        h2conn.state_machine.state,
    )


class _ViaH2(ServerConnection):
    """The reference: every frame through h2's own ``send_headers`` and ``send_data``."""

    def __init__(self, config: Configuration) -> None:
        super().__init__(config)
        h2conn = self._h2

        def send_header_block(stream_id: int, block: bytes, end_stream: bool) -> None:
            headers = hpack.Decoder().decode(block, raw=True)  # blocks here use no table
            h2conn.send_headers(stream_id, headers, end_stream=end_stream)

        h2conn.send_header_block = send_header_block  # type: ignore[method-assign]

        def send_data_frames(
            stream_id: int, data: bytes, frame_size: int, end_stream: bool = False, prefix: bytes = b""
        ) -> None:
            data = prefix + bytes(data)
            for offset in range(0, len(data), frame_size):
                chunk = bytes(data[offset : offset + frame_size])
                h2conn.send_data(stream_id, chunk, end_stream=end_stream and offset + len(chunk) == len(data))

        h2conn.send_data_frames = send_data_frames  # type: ignore[method-assign]
        h2conn.encoder = hpack.Encoder()  # its blocks, table and all, for h2's path
        self._encoder = HeaderBlockEncoder()  # literals only: readable by a fresh decoder


def _serve(
    cls: type[ServerConnection], respond, *, header_table_size: int = 4096, window: int = 65535, frame: int = 16384
):  # type: ignore[no-untyped-def]
    server = cls(Configuration(max_frame_size=16384))
    server.initiate()
    client = _client(header_table_size, window, frame)
    _pump(client, server)
    seen: list[tuple[object, ...]] = []
    states = []
    for body in (b"first", b"second"):  # twice: the second response uses the table
        stream_id = _request(client, body)
        client_events, server_events = _pump(client, server)
        (request,) = [event for event in server_events if isinstance(event, RequestReceived)]
        respond(server, request.stream_id, body)
        flush_events = server.flush_streams()
        assert all(isinstance(event, StreamWritable) for event in flush_events)  # (after a large message)
        states.append(_stream_state(server, stream_id) if stream_id in server._h2.streams else None)
        client_events, _ = _pump(client, server)
        seen += _comparable(client_events)
    return seen, states


def _unary(server: ServerConnection, stream_id: int, body: bytes) -> None:
    server.send_response_headers(stream_id, [])
    server.send_message(stream_id, frame_message(body)[5:])
    server.send_status(stream_id, Status.OK)


def _with_metadata_and_error(server: ServerConnection, stream_id: int, body: bytes) -> None:
    server.send_response_headers(stream_id, [(b"x-meta", body), (b"x-big", b"m" * 40000)])
    for _ in range(5):
        server.send_message(stream_id, b"y" * 20000)  # over one frame: split into several
    server.send_status(stream_id, Status.NOT_FOUND, "no such thing", b"details", [(b"x-trailer", b"t")])


def _trailers_only(server: ServerConnection, stream_id: int, body: bytes) -> None:
    server.send_status(stream_id, Status.OK)


def _large_messages(server: ServerConnection, stream_id: int, body: bytes) -> None:
    # Payloads written by reference (bytes, from 64 KiB), between frames that are copied.
    server.send_response_headers(stream_id, [(b"x-meta", body)])
    server.send_message(stream_id, body * 40000)
    server.send_message(stream_id, b"s" * 100)
    server.send_message(stream_id, bytes(range(256)) * 1000 + body)
    server.send_status(stream_id, Status.OK)


def test_our_send_path_gives_the_peer_and_h2_what_h2s_own_path_gives() -> None:
    for respond in (_unary, _with_metadata_and_error, _trailers_only, _large_messages):
        for table_size, frame in ((4096, 16384), (0, 16384), (100, 1 << 22), (4096, 100_000)):
            ours = _serve(ServerConnection, respond, header_table_size=table_size, window=1 << 22, frame=frame)
            reference = _serve(_ViaH2, respond, header_table_size=table_size, window=1 << 22, frame=frame)
            assert ours == reference, (respond.__name__, table_size, frame)
            assert any(kind == "ended" for kind, *_ in ours[0])


def test_h2s_own_data_to_send_includes_payloads_queued_by_reference() -> None:
    server = ServerConnection(Configuration(max_frame_size=16384))
    server.initiate()
    client = _client(window=1 << 22)
    _pump(client, server)
    stream_id = _request(client, b"x")
    server.receive_data(client.data_to_send())
    server.send_response_headers(stream_id, [])
    message = bytes(range(256)) * 800
    server.send_message(stream_id, message)
    server.send_status(stream_id, Status.OK)
    events = client.receive_data(server._h2.data_to_send())
    received = b"".join(bytes(event.data) for event in events if isinstance(event, h2.events.DataReceived))
    assert received == frame_message(message) and any(isinstance(event, h2.events.StreamEnded) for event in events)
    assert not server.data_to_send()  # nothing left behind, nothing twice


@pytest.mark.parametrize("frame", [16384, 1 << 22])  # many frames, or one (grpcio's peers allow 4 MiB)
def test_large_payloads_go_out_by_reference_and_mutable_ones_as_copies(frame: int) -> None:
    server = ServerConnection(Configuration(max_frame_size=16384))
    server.initiate()
    client = _client(window=1 << 22, frame=frame)
    _pump(client, server)
    stream_id = _request(client, b"x")
    server.receive_data(client.data_to_send())
    server.send_response_headers(stream_id, [])
    message = b"m" * 200_000
    server.send_message(stream_id, message)
    output = server.take_output()
    assert type(output) is list  # the payload's frames are views of it, not a copy
    assert any(type(part) is memoryview and part.obj is message for part in output)
    wire = b"".join(output)
    assert wire.count(message[: 16384 - 5]) >= 1 and len(wire) > len(message)
    mutable = bytearray(b"b" * 200_000)  # a codec may return a bytearray, and reuse it
    server.send_message(stream_id, mutable)
    mutable[:] = b"X" * len(mutable)
    server.send_status(stream_id, Status.OK)
    sent = server.data_to_send()  # one buffer, whatever was queued
    assert type(sent) is bytearray and b"X" not in sent and sent.count(b"b") >= 200_000
    events = client.receive_data(bytes(wire) + bytes(sent))
    received = b"".join(bytes(event.data) for event in events if isinstance(event, h2.events.DataReceived))
    assert received == frame_message(message) + frame_message(b"b" * 200_000)


def test_large_header_blocks_go_out_in_continuation_frames() -> None:
    seen, _ = _serve(ServerConnection, _with_metadata_and_error)
    head = next(headers for kind, _, *headers in seen if kind == "ResponseReceived")
    assert (b"x-big", b"m" * 40000) in head[0]  # 40 KB of field over 16 KiB frames


def _one_call(client: h2.connection.H2Connection, server: ServerConnection) -> None:
    _request(client, b"x")
    _, events = _pump(client, server)
    (request,) = [event for event in events if isinstance(event, RequestReceived)]
    _unary(server, request.stream_id, b"x")
    server.flush_streams()
    _pump(client, server)


def test_closed_streams_are_swept_from_h2() -> None:
    # h2 sweeps closed streams when asked how many are open; we ask only when their number
    # doubled, so a long-lived connection still keeps a bounded number of them.
    server = ServerConnection(Configuration())
    server.initiate()
    client = _client()
    _pump(client, server)
    for _ in range(500):
        _one_call(client, server)
        assert len(server._h2.streams) <= 32
    assert len(server._h2._closed_streams) > 100  # swept streams are still known as closed
    server._h2._closed_streams._size_limit = 150  # and h2's bound on them holds (its oldest go)
    for _ in range(100):
        _one_call(client, server)
    assert len(server._h2._closed_streams) == 150
    assert min(server._h2._closed_streams) > 600  # the first 300 streams (ids 1..599) went


# -- the memoizing decoder against hpack's own ---------------------------------------------

request_fields = st.one_of(
    st.sampled_from(
        [
            (b":method", b"POST"),
            (b":path", b"/pkg.Svc/A"),
            (b":path", b"/pkg.Svc/B"),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", b"grpc-python/1.0"),
        ]
    ),
    st.tuples(st.sampled_from([b"grpc-timeout", b"x-id", b"x-" + b"n" * 100]), st.binary(min_size=1, max_size=60)),
)
# Each step: a header list, sometimes with never-indexed fields, or a table size change.
decoder_steps = st.one_of(
    st.tuples(st.just("headers"), st.lists(request_fields, max_size=8), st.booleans()),
    st.tuples(st.just("resize"), st.sampled_from([0, 64, 256, 4096]), st.just(False)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(decoder_steps, max_size=30))
def test_memoized_decoding_matches_hpack_and_leaves_the_same_table(script) -> None:  # type: ignore[no-untyped-def]
    encoder = hpack.Encoder()  # a stateful peer: indexes what it can, like real clients
    ours, reference = MemoizingHeaderDecoder(1 << 16), hpack.Decoder(1 << 16)
    for kind, argument, sensitive in script:
        if kind == "resize":
            if argument != encoder.header_table_size:  # hpack's encoder mishandles a repeated size
                encoder.header_table_size = argument
            continue
        headers = [hpack.NeverIndexedHeaderTuple(*field) if sensitive else field for field in argument]
        for _ in range(2):  # again: once indexed, the same bytes, which may come from memory
            block = encoder.encode(headers)
            assert ours.decode(block, raw=True) == reference.decode(block, raw=True)
            assert list(ours.header_table.dynamic_entries) == list(reference.header_table.dynamic_entries)
            assert ours.header_table.maxsize == reference.header_table.maxsize


def test_a_remembered_block_is_refused_like_a_fresh_one_when_the_table_was_not_shrunk() -> None:
    # We lowered SETTINGS_HEADER_TABLE_SIZE and the peer never sent the size update: hpack
    # refuses every block from then on, one it decoded before (ours remembers it) included.
    encoder = hpack.Encoder()
    block = encoder.encode([(b"x-a", b"1"), (b"x-b", b"2")])
    again = encoder.encode([(b"x-a", b"1"), (b"x-b", b"2")])  # indices now
    ours, reference = MemoizingHeaderDecoder(1 << 16), hpack.Decoder(1 << 16)
    for decoder in (ours, reference):
        decoder.decode(block, raw=True)
        decoder.decode(again, raw=True)  # remembered by ours
        decoder.max_allowed_table_size = 0
        with pytest.raises(hpack.exceptions.InvalidTableSizeError):
            decoder.decode(again, raw=True)


def test_remembered_request_heads_equal_fresh_ones() -> None:
    server = ServerConnection(Configuration())
    server.initiate()
    client = _client()
    _pump(client, server)
    base = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/pkg.Svc/Call"),
        (b":authority", b"x"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    variants = [[], [], [(b"x-meta", b"1")], [], [(b"grpc-timeout", b"500m")], [(b"grpc-timeout", b"2S")]]
    for extra in variants * 2:
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, base + extra, end_stream=True)
        _, events = _pump(client, server)
        (request,) = [event for event in events if isinstance(event, RequestReceived)]
        fresh = parse_request(base + extra, b"proto")
        assert [getattr(request.head, name) for name in RequestHead.__slots__] == [
            getattr(fresh, name) for name in RequestHead.__slots__
        ]
        server.send_status(request.stream_id, Status.OK)
        _pump(client, server)
