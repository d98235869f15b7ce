"""Property-based: random and mutated frame sequences never crash the core nor make it hoard."""

from __future__ import annotations

import os
import re

import hpack
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from app_kit import Configuration, Status
from app_kit.rpc.client import ClientConnection
from app_kit.rpc.connection import GrpcConnection, StreamGone
from app_kit.rpc.events import ConnectionClosed, Event, MessagesReceived, RequestReceived
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
# FUZZ_EXAMPLES=4000 for a longer search than the suite's.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
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


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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


# Mostly calls that go on for a while (runs of DATA frames, some ending), among control frames.
_valid_message = st.builds(lambda body: b"\x00" + len(body).to_bytes(4, "big") + body, st.binary(max_size=300))
_message_frames = st.lists(
    st.builds(lambda fl, body: (0, fl, LATEST, body), st.sampled_from([0, 0, 0, 0, 0, 0, 1]), _valid_message),
    min_size=1,
    max_size=10,
)
_new_call = st.one_of(
    st.builds(lambda fl: (1, fl, NEW, _request("/test.Echo/Unary", [])), st.sampled_from([4, 4, 4, 5])),
    st.builds(  # with a content-length, which h2 holds the DATA to
        lambda size: (1, 4, NEW, _request("/test.Echo/Unary", [("content-length", str(size))])),
        st.sampled_from([0, 5, 6, 10, 30, 305, 1000]),
    ),
)
_call_run = st.builds(lambda head, run: [head, *run], _new_call, _message_frames)
_other_frame = st.one_of(
    st.builds(lambda body: (0, 0, 1, body), _valid_message),  # on the first stream, if still open
    st.builds(lambda body: (0, 0x8, LATEST, b"\x03" + body + b"\x00\x00\x00"), _valid_message),  # padded
    st.builds(lambda code: (3, 0, LATEST, code.to_bytes(4, "big")), st.sampled_from([0, 8])),
    st.builds(lambda data: (6, 0, 0, data), st.binary(min_size=8, max_size=8)),
    st.builds(
        lambda sid, inc: (8, 0, sid, inc.to_bytes(4, "big")), st.sampled_from([0, LATEST]), st.integers(1, 2**16)
    ),
    st.builds(  # a client may not push: h2 refuses it, whatever follows in its block
        lambda fl, body: (5, fl, LATEST, b"\x00\x00\x00\x02" + body), st.sampled_from([0, 4]), st.binary(max_size=20)
    ),
    frames,  # anything, now and then
)
calls = st.lists(st.one_of(_call_run, _message_frames, st.builds(lambda item: [item], _other_frame)), max_size=12).map(
    lambda runs: [item for run in runs for item in run]
)


def _shown(events: list[Event]) -> str:
    # hpack's messages may show a memoryview, whose address differs from one connection to another.
    return re.sub(r" at 0x[0-9a-f]+", "", repr(events))


def _feed_both(fast: GrpcConnection, oracle: GrpcConnection, data: bytes, cuts: list[int]) -> None:
    """The same bytes, cut the same way, into both: the same events, bytes out, windows and states."""
    position, index = 0, 0
    while position < len(data):
        chunk = data[position : position + cuts[index % len(cuts)]]
        position += len(chunk)
        index += 1
        seen = [_shown(connection.receive_data(chunk)) for connection in (fast, oracle)]
        assert seen[0] == seen[1]
        assert bytes(fast.data_to_send()) == bytes(oracle.data_to_send())
        assert _h2_state(fast) == _h2_state(oracle)
        assert fast.closed or not fast._h2.incoming_buffer._data  # h2 is handed whole frames only


class _OnlyH2(ServerConnection):
    """Every frame through h2's own parser: the oracle for the plain frames taken past it."""

    def _take_frames(self, data: bytes, plain_frames: list[int], start: int, stop: int) -> list[object]:  # type: ignore[override]
        return self._h2.receive_data(data[start:stop])  # type: ignore[no-any-return]


def _h2_state(connection: GrpcConnection) -> object:
    h2conn = connection._h2
    streams = {
        stream_id: (stream.state_machine.state, stream._inbound_window_manager.current_window_size)
        for stream_id, stream in h2conn.streams.items()
    }
    return h2conn.state_machine.state, h2conn._inbound_flow_control_window_manager.current_window_size, streams


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequence=calls,
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=1),
    cuts=st.lists(st.one_of(st.integers(1, 64), st.integers(64, 5000)), min_size=1, max_size=8),
)
def test_data_frames_taken_past_h2_leave_what_h2_would(
    sequence: list[tuple[int, int, int, bytes]], flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    # The same bytes, cut the same way, into a connection that takes whole DATA frames itself
    # and one that gives everything to h2: the same events, bytes out, windows and states.
    fast, oracle = ServerConnection(CONFIG), _OnlyH2(CONFIG)
    data = HANDSHAKE + _mutate(_render(sequence), flips)
    for connection in (fast, oracle):
        connection.initiate()
        connection.data_to_send()
    _feed_both(fast, oracle, data, cuts)


class _ClientOnlyH2(ClientConnection):
    def _take_frames(self, data: bytes, plain_frames: list[int], start: int, stop: int) -> list[object]:  # type: ignore[override]
        return self._h2.receive_data(data[start:stop])  # type: ignore[no-any-return]


_response_frame = st.one_of(
    st.builds(lambda sid, fl: ("head", fl, sid), st.integers(1, 4), st.sampled_from([4, 4, 5, 0x24, 0xC])),
    st.builds(lambda sid, fl: ("trailers", fl, sid), st.integers(1, 4), st.sampled_from([5, 5, 4, 1])),
    st.builds(lambda sid, fl, body: (0, fl, sid, body), st.integers(1, 4), st.sampled_from([0, 0, 1]), _valid_message),
    st.builds(lambda sid, code: (3, 0, sid, code.to_bytes(4, "big")), st.integers(1, 9), st.sampled_from([0, 7, 8])),
    st.builds(lambda sid, inc: (8, 0, sid, inc.to_bytes(4, "big")), st.integers(0, 4), st.integers(1, 2**16)),
    st.builds(lambda data: (6, 0, 0, data), st.binary(min_size=8, max_size=8)),
    st.builds(lambda sid, fl: (5, fl, sid, b"\x00\x00\x00\x02"), st.integers(1, 4), st.sampled_from([0, 4])),
    st.builds(lambda sid, fl: (9, fl, sid, b""), st.integers(1, 4), st.sampled_from([0, 4])),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sequence=st.lists(_response_frame, max_size=40),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=1),
    cuts=st.lists(st.one_of(st.integers(1, 64), st.integers(64, 5000)), min_size=1, max_size=8),
)
def test_response_frames_taken_past_h2_leave_what_h2_would(
    sequence: list[tuple[object, ...]], flips: list[tuple[int, int]], cuts: list[int]
) -> None:
    # The client's side of the same comparison: responses, messages and trailers for four
    # calls (stream ids 1, 3, 5, 7), with resets, window updates and pings among them.
    encoder = hpack.Encoder()
    parts = [frame(4, 0, 0, b"")]  # the server's SETTINGS
    for item in sequence:
        if item[0] == "head":
            block = encoder.encode([(":status", "200"), ("content-type", "application/grpc"), ("x-m", "v")])
            parts.append(frame(1, int(item[1]), 2 * int(item[2]) - 1, block))  # type: ignore[call-overload]
        elif item[0] == "trailers":
            block = encoder.encode([("grpc-status", "0"), ("grpc-message", "fine")])
            parts.append(frame(1, int(item[1]), 2 * int(item[2]) - 1, block))  # type: ignore[call-overload]
        else:
            kind, flag_bits, sid, payload = item
            sid = 2 * sid - 1 if kind in (0, 3) or sid else 0  # type: ignore[operator]
            parts.append(frame(kind, flag_bits, sid, payload))  # type: ignore[arg-type]
    data = _mutate(b"".join(parts), flips)
    fast = ClientConnection(CONFIG, authority="x", scheme="http", user_agent="t")
    oracle = _ClientOnlyH2(CONFIG, authority="x", scheme="http", user_agent="t")
    for connection in (fast, oracle):
        connection.initiate()
        for _ in range(4):
            connection.start_call("/test.Echo/Unary", [])
        connection.data_to_send()
    _feed_both(fast, oracle, data, cuts)
