"""Property-based: random and mutated frame sequences never crash the core nor make it hoard."""

from __future__ import annotations

import hpack
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app_kit import Configuration, Status
from app_kit.rpc.connection import StreamGone
from app_kit.rpc.events import ConnectionClosed, MessagesReceived, RequestReceived
from app_kit.rpc.server import ServerConnection

from .frames import HANDSHAKE, frame

CONFIG = Configuration(
    max_receive_message_length=4096,
    max_concurrent_streams=8,
    max_header_list_size=2048,
    max_pings_per_window=50,
    max_settings_per_window=20,
    max_empty_frames_per_window=50,
    max_resets_per_window=50,
)
PATHS = ["/test.Echo/Unary", "/x/y", "", "/", "/a" * 300]


def _request(path: str, extra: list[tuple[str, str]]) -> bytes:
    # A fresh encoder: its blocks depend on no dynamic-table state the server lacks.
    return hpack.Encoder().encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra,
        ]
    )


NEW, LATEST = -1, -2  # placeholders: the next new stream id, the latest one opened
stream_ids = st.sampled_from([NEW, LATEST, LATEST, LATEST, 0, 2, 1, 2**31 - 1])
flags = st.integers(0, 255)
message = st.one_of(
    st.builds(lambda body: b"\x00" + len(body).to_bytes(4, "big") + body, st.binary(max_size=300)),
    st.builds(
        lambda flag, length, body: bytes([flag]) + length.to_bytes(4, "big") + body,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0, 3, 100, 4096, 4097, 2**32 - 1]),
        st.binary(max_size=200),
    ),
)
# Mostly well-formed DATA on the live stream, so that messages flow between the attacks.
good_data = st.builds(lambda fl, body: (0, fl, LATEST, body), st.sampled_from([0, 0, 1]), message)
frames = st.one_of(
    good_data,
    good_data,
    good_data,
    st.builds(
        lambda sid, fl, path, extra: (1, fl, sid, _request(path, extra)),
        st.sampled_from([NEW, NEW, NEW, LATEST, 0, 2]),
        st.sampled_from([4, 4, 5, 0, 1, 0x24]),
        st.sampled_from(PATHS),
        st.lists(
            st.tuples(st.sampled_from(["x-a", "grpc-timeout", "grpc-encoding", "x-b-bin", "TE"]), st.text(max_size=12)),
            max_size=3,
        ),
    ),
    st.builds(lambda sid, fl, body: (0, fl, sid, body), stream_ids, st.sampled_from([0, 1, 1, 8, 9]), message),
    st.builds(lambda sid, code: (3, 0, sid, code.to_bytes(4, "big")), stream_ids, st.integers(0, 20)),
    st.builds(lambda fl, data: (6, fl, 0, data), st.sampled_from([0, 1]), st.binary(min_size=8, max_size=8)),
    st.builds(lambda fl, data: (4, fl, 0, data), st.sampled_from([0, 1]), st.binary(max_size=18)),
    st.builds(lambda sid, inc: (8, 0, sid, inc.to_bytes(4, "big")), stream_ids, st.integers(0, 2**31)),
    st.builds(lambda sid, fl, data: (9, fl, sid, data), stream_ids, flags, st.binary(max_size=50)),
    st.builds(
        lambda kind, sid, fl, data: (kind, fl, sid, data),
        st.integers(0, 255),
        stream_ids,
        flags,
        st.binary(max_size=40),
    ),
)


def _render(sequence: list[tuple[int, int, int, bytes]]) -> bytes:
    # One valid request first (stream 1), so that the random frames find a live stream.
    latest, parts = 1, [frame(1, 4, 1, _request("/test.Echo/Unary", []))]
    for kind, flag_bits, sid, payload in sequence:
        if sid == NEW:
            latest = sid = latest + 2
        elif sid == LATEST:
            sid = latest
        parts.append(frame(kind, flag_bits, sid, payload))
    return b"".join(parts)


def _mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, value in flips:
        if mutable:
            mutable[position % len(mutable)] = value
    return bytes(mutable)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequence=st.lists(frames, max_size=30),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
    cuts=st.lists(st.integers(1, 64), min_size=1, max_size=8),
    answer=st.booleans(),
)
def test_random_frames_never_escape_and_buffers_stay_bounded(
    sequence: list[tuple[int, int, int, bytes]], flips: list[tuple[int, int]], cuts: list[int], answer: bool
) -> None:
    connection = ServerConnection(CONFIG)
    connection.initiate()
    data = HANDSHAKE + _mutate(_render(sequence), flips)
    position, index = 0, 0
    output = len(connection.data_to_send())
    while position < len(data):
        chunk = data[position : position + cuts[index % len(cuts)]]
        position += len(chunk)
        index += 1
        events = connection.receive_data(chunk)  # must never raise
        for kind in {type(item).__name__ for item in events}:
            event(kind)  # hypothesis statistics: what the examples reached
        for item in events:
            if isinstance(item, RequestReceived) and answer:
                try:
                    connection.send_response_headers(item.stream_id, [])
                    connection.send_message(item.stream_id, b"reply")
                    connection.send_status(item.stream_id, Status.OK)
                except StreamGone:
                    pass
            elif isinstance(item, MessagesReceived):
                for data, flow_size in item.messages:
                    assert len(data) <= CONFIG.max_receive_message_length
                    connection.acknowledge(item.stream_id, flow_size)
            elif isinstance(item, ConnectionClosed):
                assert connection.closed
        output += len(connection.data_to_send())
        assert connection.open_streams <= CONFIG.max_concurrent_streams
        for state in connection._streams.values():
            assert state.decoder.buffered <= CONFIG.max_receive_message_length + 5
        # The connection's count of incomplete-message bytes is exactly what its streams hold.
        if not connection.closed:
            assert connection._partial_bytes == sum(state.decoder.buffered for state in connection._streams.values())
    # What we write stays proportional to what we were sent (no amplification).
    assert output <= 1024 + 64 * len(data) + 200 * len(sequence)
