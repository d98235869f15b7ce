"""Property: however TCP cuts a valid byte stream, the core sees the same frames and events.

Loopback hands the server whole writes; a real network path, a proxy or TLS records cut the
stream anywhere: inside a 9-byte frame header, a header block, a 5-byte message prefix. Each
example feeds the same bytes to a fresh connection twice — whole, and cut at arbitrary places
(single bytes included) — and requires the same events and the same bytes written back.
"""

from __future__ import annotations

import itertools

import hpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app_kit import Configuration, Status
from app_kit.rpc.client import ClientConnection
from app_kit.rpc.events import EndOfStream, MessagesReceived, RequestReceived
from app_kit.rpc.server import ServerConnection
from app_kit.wire import guard as guard_module
from app_kit.wire.guard import FrameGuard

from .frames import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    PING,
    RST_STREAM,
    WINDOW_UPDATE,
    frame,
    request_block,
)

CONFIG = Configuration()
_messages = st.lists(st.binary(max_size=3000), min_size=1, max_size=4)


def _prefixed(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


@st.composite
def client_streams(draw: st.DrawFn) -> bytes:
    """A valid client byte stream: calls with metadata, messages over several DATA frames,
    header blocks over CONTINUATION, padding, PINGs, WINDOW_UPDATEs and resets between them."""
    encoder = hpack.Encoder()
    parts = [HANDSHAKE]
    for index in range(draw(st.integers(1, 6))):
        stream_id = 2 * index + 1
        metadata = [(f"x-key-{n}", "v" * draw(st.integers(0, 400))) for n in range(draw(st.integers(0, 3)))]
        block = encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/test.Echo/Bidi"),
                (":authority", "localhost"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *metadata,
            ]
        )
        pieces = draw(st.integers(1, 3))  # HEADERS, then CONTINUATION frames
        size = -(-len(block) // pieces)
        chunks = [block[start : start + size] for start in range(0, len(block), size)]
        for number, chunk in enumerate(chunks):
            kind = HEADERS if number == 0 else CONTINUATION
            parts.append(frame(kind, END_HEADERS if number == len(chunks) - 1 else 0, stream_id, chunk))
        body = b"".join(_prefixed(message) for message in draw(_messages))
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=4))))
        bounds = [0, *cuts, len(body)]
        for start, end in itertools.pairwise(bounds):
            padding = draw(st.sampled_from([None, 0, 7]))
            if padding is None:
                parts.append(frame(DATA, 0, stream_id, body[start:end]))
            else:
                parts.append(frame(DATA, 0x8, stream_id, bytes([padding]) + body[start:end] + bytes(padding)))
        ending = draw(st.sampled_from(["end", "end", "reset", "open"]))
        if ending == "end":
            parts.append(frame(DATA, END_STREAM, stream_id))
        elif ending == "reset":
            parts.append(frame(RST_STREAM, 0, stream_id, (8).to_bytes(4, "big")))
        if index < 3 and draw(st.booleans()):  # within the PING policy's strikes, answered or not
            parts.append(frame(PING, 0, 0, index.to_bytes(8, "big")))
        if draw(st.booleans()):
            parts.append(frame(WINDOW_UPDATE, 0, 0, (1000).to_bytes(4, "big")))
    return b"".join(parts)


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({point % (len(data) + 1) for point in cuts})
    bounds = [0, *points, len(data)]
    return [data[start:end] for start, end in itertools.pairwise(bounds) if end > start]


def _feed(pieces: list[bytes]) -> tuple[list[str], bytes]:
    """Feed ``pieces`` to a server connection; what it reported and what it wrote on its own
    (SETTINGS, acknowledgements, window updates). Answers would depend on timing, not bytes."""
    connection = ServerConnection(CONFIG)
    connection.initiate()
    out = bytearray(connection.data_to_send())
    seen: list[str] = []
    for piece in pieces:
        seen += map(repr, connection.receive_data(piece))
        out += connection.data_to_send()
    return seen, bytes(out)


def _answer(data: bytes) -> bytes:
    """What a server connection that echoes every message reversed writes for ``data``."""
    connection = ServerConnection(CONFIG)
    connection.initiate()
    for item in connection.receive_data(data):
        if isinstance(item, RequestReceived):
            connection.send_response_headers(item.stream_id, [])
        elif isinstance(item, MessagesReceived):
            for payload, share in item.messages:
                connection.acknowledge(item.stream_id, share)
                connection.send_message(item.stream_id, payload[::-1])
        elif isinstance(item, EndOfStream):
            connection.send_status(item.stream_id, Status.OK)
    connection.flush_streams()
    return bytes(connection.data_to_send())


every_cut = st.lists(st.integers(0, 10**6), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=client_streams(), cuts=every_cut, ones=st.integers(0, 40))
def test_server_core_sees_the_same_whatever_the_segmentation(data: bytes, cuts: list[int], ones: int) -> None:
    whole_events, whole_output = _feed([data])
    assert not any("ConnectionClosed" in line for line in whole_events), whole_events
    # Cut anywhere, and byte by byte over a stretch (a header split at every offset).
    start = (cuts[0] if cuts else 0) % len(data)
    pieces = _cut(data[:start], cuts) + [bytes([b]) for b in data[start : start + ones]] + [data[start + ones :]]
    pieces = [piece for piece in pieces if piece]
    assert _feed(pieces) == (whole_events, whole_output)


def test_frame_header_split_at_every_offset() -> None:
    """The guard's own view: every frame boundary is found whatever the cut (the bug of old:
    a header completed from the next read had its payload read as frame headers)."""
    frames_in = [frame(DATA, 0, 1, bytes(n)) for n in (0, 1, 9, 100, 20_000)] + [frame(PING, 0, 0, bytes(8))]
    data = HANDSHAKE + b"".join(frames_in)
    whole = _seen_by_guard([data])
    assert len(whole) == 1 + len(frames_in)  # SETTINGS, then ours
    for first in range(1, len(data)):
        for second in range(first + 1, min(first + 12, len(data))):
            assert _seen_by_guard([data[:first], data[first:second], data[second:]]) == whole, (first, second)


def _seen_by_guard(pieces: list[bytes]) -> list[tuple[int, int]]:
    """(type, length) of each frame header the guard parsed: the headers within a read as
    it unpacks them, and those completed from two reads, which go to ``_frame``."""
    seen: list[tuple[int, int]] = []
    start = guard_module._FRAME_START

    class RecordingStart:
        def unpack_from(self, data: bytes, offset: int) -> tuple[int, ...]:
            high, low, kind, flags = start.unpack_from(data, offset)
            seen.append((kind, high << 8 | low))
            return high, low, kind, flags

    class Recording(FrameGuard):
        def _frame(self, header: bytes) -> int:
            length = super()._frame(header)
            if header is self._header:  # (headers within a read were recorded as unpacked)
                seen.append((header[3], length))
            return length

    guard = Recording(CONFIG, lambda: 0.0, expect_preface=True)
    guard_module._FRAME_START = RecordingStart()  # type: ignore[assignment]
    try:
        for piece in pieces:
            guard.scan(piece)
    finally:
        guard_module._FRAME_START = start
    return seen


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=st.lists(_messages, min_size=1, max_size=5), cuts=every_cut)
def test_client_core_sees_the_same_whatever_the_segmentation(calls: list[list[bytes]], cuts: list[int]) -> None:
    # A real exchange between our two cores makes the server's bytes; the client's side of it
    # is then replayed, fed those bytes whole and cut.
    def start(client: ClientConnection) -> None:
        client.initiate()
        for messages in calls:
            stream_id = client.start_call("/test.Echo/Bidi", [])
            for message in messages:
                client.send_message(stream_id, message)
            client.end_local(stream_id, [])
        client.flush_streams()

    client = ClientConnection(CONFIG, authority="localhost", scheme="http", user_agent="test")
    start(client)
    server_bytes = _answer(bytes(client.data_to_send()))

    def replay(pieces: list[bytes]) -> list[str]:
        replayed = ClientConnection(CONFIG, authority="localhost", scheme="http", user_agent="test")
        start(replayed)
        replayed.data_to_send()
        seen: list[str] = []
        for piece in pieces:
            for item in replayed.receive_data(piece):
                seen.append(repr(item))
                if isinstance(item, MessagesReceived):
                    for _, share in item.messages:
                        replayed.acknowledge(item.stream_id, share)
        return seen

    whole = replay([server_bytes])
    assert sum("MessagesReceived" in line for line in whole) >= 1
    assert not any("ConnectionClosed" in line for line in whole), whole
    assert replay(_cut(server_bytes, cuts)) == whole
    assert replay([server_bytes[i : i + 1] for i in range(min(len(server_bytes), 300))] + [server_bytes[300:]]) == whole


class _EveryFrameGuard(FrameGuard):
    """The reference: the guard as it was before its fast path, every frame through _frame."""

    __slots__ = ()

    def scan(self, data: bytes) -> tuple[list[int], int]:
        plain_frames: list[int] = []
        size = len(data)
        position = min(self._skip, size)
        self._skip -= position
        if self._skip:
            return plain_frames, 0
        if self._header:
            missing = 9 - len(self._header)
            self._header += data[position : position + missing]
            position += missing
            if len(self._header) < 9:
                return plain_frames, 0
            position += self._frame(self._header)
            self._header = b""
        self.carried_end = position
        start, plain = -1, False
        while position + 9 <= size:
            end = position + 9
            plain = self._block < 0
            length = self._frame(data[position:end])
            if plain:
                kind = data[position + 3]
                if kind == DATA:
                    plain = not data[position + 4] & 0x8
                else:
                    plain = kind == HEADERS and data[position + 4] & 0x2C == END_HEADERS
                if plain and end + length <= size:
                    plain_frames.append(position)
            start = position
            position = end + length
        if position < size:
            self._header = data[position:]
            self.carried_plain = False
            return plain_frames, position
        if position > size:
            self._skip = position - size
            if start < 0:
                return plain_frames, 0
            self.carried_plain = plain
            return plain_frames, start
        return plain_frames, size


_SMALL_LIMITS = Configuration(max_frame_size=16384, max_header_block_size=8000, max_header_list_size=8000)
_any_frame = st.tuples(
    st.sampled_from([DATA, HEADERS, CONTINUATION, PING, 0x4, WINDOW_UPDATE, RST_STREAM, 0x2, 0x20]),
    st.integers(0, 255),  # flags: padded, priority, END_HEADERS, END_STREAM, ACK, whatever
    st.sampled_from([0, 1, 4, 8, 100, 7999, 8000, 8001, 16384, 16385]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(_any_frame, max_size=25), cuts=every_cut)
def test_the_guards_fast_path_decides_as_every_frame_through_frame(frames, cuts) -> None:  # type: ignore[no-untyped-def]
    # DATA and whole header blocks skip _frame: the same plain frames, counts, block state,
    # carried bytes and refusals as when every frame went through it, however the bytes are cut.
    data = b"".join(
        frame(kind, flags, 1 + index % 3, bytes(length)) for index, (kind, flags, length) in enumerate(frames)
    )
    results = []
    for cls in (FrameGuard, _EveryFrameGuard):
        guard = cls(_SMALL_LIMITS, lambda: 0.0, expect_preface=False)
        outcome: list[object] = []
        for piece in [piece for piece in _cut(data, cuts) if piece]:
            try:
                outcome.append(guard.scan(piece))
            except Exception as exc:
                outcome.append((type(exc).__name__, str(exc)))
                break
            outcome.append((guard.carried_plain, guard.carried_end, guard._block, list(guard._counts), guard._skip))
        results.append(outcome)
    assert results[0] == results[1]


def test_a_message_in_one_large_frame_over_many_reads_arrives_whole_as_bytes() -> None:
    # grpcio's clients send a 1 MiB message as one DATA frame (they allow 4 MiB frames), which
    # TCP hands over in many reads: the frame is joined once and the message copied out once,
    # whatever the cuts; tiny reads are gathered, not kept one object each.
    message = bytes(range(256)) * 4000  # (a frame holds at most max_frame_size, 1 MiB)
    data = HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block()) + frame(DATA, END_STREAM, 1, _prefixed(message))
    start = len(HANDSHAKE) + 9 + len(request_block()) + 3  # inside the DATA frame's header
    pieces = [data[:start]] + [data[n : n + 1] for n in range(start, start + 700)]
    pieces += [data[n : n + 100_000] for n in range(start + 700, len(data), 100_000)]
    connection = ServerConnection(CONFIG)
    connection.initiate()
    received = []
    for number, piece in enumerate(pieces):
        for item in connection.receive_data(piece):
            if isinstance(item, MessagesReceived):
                received += [payload for payload, _ in item.messages]
        if number == 700:  # 700 one-byte reads of the frame so far
            assert len(connection._carry) <= 2  # gathered into one bytearray
    assert len(received) == 1 and type(received[0]) is bytes and received[0] == message
