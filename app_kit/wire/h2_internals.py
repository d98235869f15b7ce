"""Every use of h2's, hpack's and hyperframe's internals, in one place, for tested versions only.

app_kit drives h2's state machine but writes its hot-path frames itself, keeps h2's
per-connection memory small, and mends a few behaviours that RFC 9113 and gRPC need otherwise.
All of that touches attributes and methods those libraries do not promise to keep, so it all
lives here, and importing this module checks the installed versions against the ranges the
test suite runs with (the lowest and the newest are both run in CI). Outside this module the
code base uses only their public API.
"""

from __future__ import annotations

import collections
import logging
import struct
import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import hpack
import hyperframe
from h2.connection import (
    ConnectionInputs,
    ConnectionState,
    H2ConnectionStateMachine,
    _decode_headers,
)
from h2.events import DataReceived, TrailersReceived
from h2.stream import StreamClosedBy, StreamInputs
from h2.stream import StreamState as H2StreamState
from h2.utilities import SizeLimitDict, is_informational_response
from hpack.exceptions import HPACKError
from hpack.table import HeaderTable
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from .config import Configuration
from .fields import malformed_field

_CACHE_LIMIT = 64  # header blocks the decoder remembers, and header lists _receive_headers does
#: Bytes (RFC 9113 §6.5.2's count) of the largest header list remembered: gRPC heads are a
#: few hundred; a peer sending large varied lists must not make each connection keep 64 of them.
_CACHE_LIST_LIMIT = 1024
# DATA payloads from this size on are written by reference (see send_data_frames).
_BY_REFERENCE = 65536
#: CONTINUATION frames one header block may have: h2 refuses a block of more frames (a
#: PROTOCOL_ERROR without a word); the guard says so first (wire/guard.py).
MAX_CONTINUATION_FRAMES: int = h2.frame_buffer.CONTINUATION_BACKLOG - 1  # its count includes the HEADERS
#: RFC 7541's static table, as hpack holds it.
HPACK_STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
__all__ = [
    "TESTED_VERSIONS",
    "HPACK_STATIC_TABLE",
    "MAX_CONTINUATION_FRAMES",
    "GoAwayTolerantStateMachine",
    "H2Connection",
    "MemoizingHeaderDecoder",
    "OVERSIZED_LIST",
    "check_versions",
    "is_compression_error",
    "MalformedResponse",
    "MalformedTrailers",
    "new_h2_connection",
    "oversized_list_size",
]

#: (lowest, first untested) version of each library; pyproject.toml pins the same ranges.
TESTED_VERSIONS = {"h2": ((4, 2), (4, 5)), "hpack": ((4, 1), (4, 3)), "hyperframe": ((6, 1), (6, 2))}


def check_versions() -> None:
    """Refuse to run on versions whose internals the tests have not checked."""
    # The modules' own __version__, not importlib.metadata: that costs a tenth of a launch.
    modules = {"h2": h2, "hpack": hpack, "hyperframe": hyperframe}
    for name, (lowest, untested) in TESTED_VERSIONS.items():
        version = modules[name].__version__
        parts = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        if not lowest <= parts < untested:
            raise ImportError(
                f"app_kit supports {name} {'.'.join(map(str, lowest))} to before "
                f"{'.'.join(map(str, untested))}, not {version}: it relies on {name}'s internals"
            )


check_versions()

# hpack logs every header it decodes at DEBUG, values included: a root logger at DEBUG (set
# for the app's own debugging) would print each caller's ``authorization``. Unless the
# process chose a level for hpack itself, it stays at INFO (h2 logs to a no-op logger).
_HPACK_LOG = logging.getLogger("hpack")
if _HPACK_LOG.level == logging.NOTSET:
    _HPACK_LOG.setLevel(logging.INFO)

_SETTINGS = h2.settings.SettingCodes
# (Read off their class per use, Enum members cost Python 3.11 a __getattr__ hook.)
_MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE = _SETTINGS.MAX_CONCURRENT_STREAMS, _SETTINGS.INITIAL_WINDOW_SIZE
# RFC 9113 §4.1: 24-bit length (as a high byte and 16 bits), type, flags, stream id.
_FRAME_HEADER = struct.Struct(">BHBBL")
_DATA, _HEADERS, _WINDOW_UPDATE, _CONTINUATION = 0x0, 0x1, 0x8, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_STREAM_OPEN, _STREAM_HALF_CLOSED_LOCAL = H2StreamState.OPEN, H2StreamState.HALF_CLOSED_LOCAL
_STREAM_CLOSED = H2StreamState.CLOSED
_set_ordered = collections.OrderedDict.__setitem__
_NO_STREAM_LIMIT = 2**32 + 1  # what h2's Settings answer while the peer set no limit
_CONNECTION_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
_STREAM_SENDING = (H2StreamState.OPEN, H2StreamState.HALF_CLOSED_REMOTE)


# h2's stream transitions, split by input: (state -> (side effect, next state)) per input. A
# lookup in h2's own table hashes the input, a Python-level enum (a Python call per lookup).
_STREAM_TRANSITIONS = {
    stream_input: {state: step for (state, each), step in h2.stream._transitions.items() if each is stream_input}
    for stream_input in StreamInputs
}
_SEND_HEADERS = _STREAM_TRANSITIONS[StreamInputs.SEND_HEADERS]
_SEND_END_STREAM = _STREAM_TRANSITIONS[StreamInputs.SEND_END_STREAM]
_RECV_HEADERS = _STREAM_TRANSITIONS[StreamInputs.RECV_HEADERS]
_RECV_END_STREAM = _STREAM_TRANSITIONS[StreamInputs.RECV_END_STREAM]
# The inputs themselves, for h2's own process_input where a table has no entry (an Enum member
# read off its class costs Python 3.11 a __getattr__ hook).
_IN_SEND_HEADERS, _IN_SEND_END_STREAM = StreamInputs.SEND_HEADERS, StreamInputs.SEND_END_STREAM
_IN_RECV_HEADERS, _IN_RECV_END_STREAM = StreamInputs.RECV_HEADERS, StreamInputs.RECV_END_STREAM
_IN_SEND_DATA = StreamInputs.SEND_DATA


def _advance(
    machine: h2.stream.H2StreamStateMachine, transitions: dict[Any, Any], stream_input: StreamInputs
) -> list[Any]:
    """h2's ``H2StreamStateMachine.process_input`` of ``stream_input``, whose transitions (from
    :data:`_STREAM_TRANSITIONS`) are ``transitions``: the same state change, events and errors."""
    state = machine.state
    step = transitions.get(state)
    if step is None:
        machine.state = H2StreamState.CLOSED
        raise h2.exceptions.ProtocolError(f"Invalid input {stream_input} in state {state}")
    side_effect, machine.state = step
    if side_effect is None:
        return []
    try:
        return side_effect(machine, state)
    except h2.exceptions.ProtocolError:
        machine.state = H2StreamState.CLOSED
        raise
    except AssertionError as exc:
        machine.state = H2StreamState.CLOSED
        raise h2.exceptions.ProtocolError(exc) from exc


def _check_no_op_transitions() -> None:
    """The hot paths below skip h2's state machine for inputs that, in these states, leave
    the state as it is and do nothing else (each call hashes Python-level enums): an open
    connection stays open for the frames sent and received there, an open stream for DATA
    sent. Checked against h2's own tables at import."""
    connection = H2ConnectionStateMachine._transitions
    for state in _CONNECTION_OPEN:
        for event in (ConnectionInputs.SEND_HEADERS, ConnectionInputs.SEND_DATA, ConnectionInputs.RECV_HEADERS):
            if connection.get((state, event)) != (None, state):
                raise ImportError(f"h2's connection state machine changed: {state} on {event}")
    for stream_state in _STREAM_SENDING:
        if h2.stream._transitions.get((stream_state, _IN_SEND_DATA)) != (None, stream_state):
            raise ImportError(f"h2's stream state machine changed: {stream_state} on SEND_DATA")


_check_no_op_transitions()


class _SmallDeque(list[Any]):
    """The deque operations h2 and hpack use, on a list.

    h2 keeps each setting's pending values, and hpack each header table, in a
    ``collections.deque`` of 760 bytes: 18 of them were most of an idle connection's memory.
    They hold a handful of items (a header table at most ~128), where a list does the same
    in about 80 bytes and moving a few pointers costs nothing.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)

    def appendleft(self, item: Any) -> None:
        self.insert(0, item)


def _compact_settings(settings: h2.settings.Settings) -> h2.settings.Settings:
    settings._settings = {key: _SmallDeque(values) for key, values in settings._settings.items()}  # type: ignore[misc]
    return settings


class _AdvertisedSettings(h2.settings.Settings):
    """Our SETTINGS, with the concurrent-streams limit enforced by us, not by h2.

    h2 treats one stream over SETTINGS_MAX_CONCURRENT_STREAMS as a connection error and
    tears every call down; RFC 9113 §5.1.2 lets us refuse just that stream with
    REFUSED_STREAM, which a client may safely retry. The limit is still advertised:
    h2 serializes settings from ``items()``, and only its own check reads this property.
    """

    @property  # type: ignore[misc]  # read-only on purpose: h2 must not enforce it
    def max_concurrent_streams(self) -> int:
        return 2**31 - 1


class H2Connection(h2.connection.H2Connection):
    """h2's connection, plus hot paths that skip h2's per-frame objects.

    h2 builds, validates and serializes a frame object (and logs) for every frame it sends,
    and parses each frame it receives into one; for a unary call that was most of the
    server's CPU. The send methods below make exactly the state and window changes h2's
    ``send_headers``/``send_data`` make on an existing stream and write the frames directly;
    the receive methods take the plain HEADERS and DATA frames the guard found (a request,
    a message, a response, trailers) with h2's own decoding and stream state changes. The
    rest goes through h2's parser. The tests compare both paths on the wire and in h2's
    stream state.
    """

    #: Closed streams h2 may keep in ``streams`` before they are swept (see below).
    _sweep_at = 16
    #: HEADERS and DATA frames sent: each licenses one PING from the peer (see PingPolicy).
    frames_sent = 0
    #: Frames h2 answered the peer's with (ACKs, resets): see max_pending_induced_frames.
    induced_frames = 0
    #: KiB of DATA sent in frames of 1 KiB or more: each licenses WINDOW_UPDATEs (rpc/connection.py).
    data_kib_sent = 0
    #: What h2 made of the header lists received: see _receive_headers.
    _validated: dict[tuple[Any, Any, Any], tuple[list[Any], int | None, str | None]] | None = None
    #: Buffers queued before ``_data_to_send``, while a large payload is queued by reference.
    _parts: list[bytes | bytearray | memoryview] | None = None

    def __init__(self, config: h2.config.H2Configuration | None = None) -> None:
        super().__init__(config)
        # Read per request: h2's option is a Python descriptor (a call per read).
        self._server_side = not self.config.client_side

    def _receive_goaway_frame(self, frame: Any) -> Any:
        """h2's, without emptying what we queued to send: h2 clears its outbound buffer on a
        peer's GOAWAY, which loses the SETTINGS and PING ACKs and the HEADERS queued before it
        (their HPACK entries too: every later header block then fails to decode), while the
        streams up to its last-stream-id are still ours to finish (RFC 9113 §6.8)."""
        kept = self._data_to_send
        result = super()._receive_goaway_frame(frame)
        self._data_to_send = kept
        return result

    def _receive_frame(self, frame: Any) -> list[Any]:
        """h2's handling of one received frame, with two differences.

        Frames on a stream we reset are ignored, as RFC 9113 §5.1 says: they were sent before
        our RST_STREAM reached the peer. h2 answers each with RST_STREAM STREAM_CLOSED (DATA
        too: see :meth:`_handle_data_on_closed_stream`), and a server counts those against its
        rapid-reset budget: a client with short deadlines, whose resets cross the answers,
        got cut off. And no trace log: h2 formats ``repr(frame)`` for it, logged or not (for
        a DATA frame, a hex dump of a copy of its payload).
        """
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as exc:
            closed_by = self._stream_closed_by(exc.stream_id)
            if closed_by is StreamClosedBy.SEND_RST_STREAM and not exc._events:
                return []  # a stream reset earlier (with events, h2 resets it for this frame)
            if closed_by is not StreamClosedBy.SEND_RST_STREAM and closed_by is not StreamClosedBy.RECV_RST_STREAM:
                raise
            self._reset_closed_stream(exc.stream_id, exc.error_code)  # a stream error, as h2 says
            return exc._events
        except h2.exceptions.StreamIDTooLowError as exc:
            closed_by = self._stream_closed_by(exc.stream_id)
            if closed_by is StreamClosedBy.SEND_RST_STREAM:
                return []
            if closed_by is StreamClosedBy.RECV_RST_STREAM:
                self._reset_closed_stream(exc.stream_id, h2.errors.ErrorCodes.STREAM_CLOSED)
                return []
            if closed_by is StreamClosedBy.RECV_END_STREAM or closed_by is StreamClosedBy.SEND_END_STREAM:
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc  # a connection error
            raise  # closed implicitly: PROTOCOL_ERROR
        if frames:
            self.induced_frames += len(frames)
        self._prepare_for_sending(frames)
        return events

    def _reset_closed_stream(self, stream_id: int, error_code: int) -> None:
        frame = RstStreamFrame(stream_id)
        frame.error_code = error_code
        self.induced_frames += 1
        self._prepare_for_sending([frame])
        self._reset_once(stream_id)

    def _reset_once(self, stream_id: int) -> None:
        """After answering a frame on a stream the peer reset with RST_STREAM STREAM_CLOSED,
        treat the stream as reset by us: its later frames are ignored, not each answered (a
        peer that sent 150,000 frames after its own RST_STREAM got as many resets back)."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.state_machine.stream_closed_by = StreamClosedBy.SEND_RST_STREAM
        elif stream_id in self._closed_streams:
            self._closed_streams[stream_id] = StreamClosedBy.SEND_RST_STREAM

    def _handle_data_on_closed_stream(
        self, events: list[Any], exc: h2.exceptions.StreamClosedError, frame: Any
    ) -> tuple[list[Any], list[Any]]:
        # h2 answers every DATA frame on a closed stream with RST_STREAM STREAM_CLOSED. On a
        # stream we reset ourselves, RFC 9113 §5.1 says to ignore them: the peer sent them
        # before our RST_STREAM reached it (61 resets for one rejected 8 MiB upload). The
        # connection window they used still goes back. (A frame the stream's state refuses
        # now — DATA after the peer's END_STREAM — comes with h2's StreamReset event: that
        # reset is h2's answer to this very frame, and goes out.)
        frames, events = super()._handle_data_on_closed_stream(events, exc, frame)
        if not exc._events:
            closed_by = self._stream_closed_by(exc.stream_id)
            if closed_by is StreamClosedBy.SEND_RST_STREAM:
                frames = [item for item in frames if not isinstance(item, RstStreamFrame)]
            elif closed_by is StreamClosedBy.RECV_RST_STREAM:
                self._reset_once(exc.stream_id)
        return frames, events

    def send_headers(self, *args: Any, **kwargs: Any) -> None:
        """h2's, counted."""
        self.frames_sent += 1
        super().send_headers(*args, **kwargs)

    def end_stream(self, stream_id: int) -> None:
        """h2's, counted."""
        self.frames_sent += 1
        super().end_stream(stream_id)

    def _terminate_connection(self, error_code: h2.errors.ErrorCodes) -> None:
        # Called by h2 while handling the exception that ends the connection.
        if is_compression_error(sys.exc_info()[1]):
            error_code = h2.errors.ErrorCodes.COMPRESSION_ERROR
        super()._terminate_connection(error_code)

    @property
    def open_inbound_streams(self) -> int:
        """What h2 asks before accepting a stream (checked against a limit h2 never reaches:
        see :class:`_AdvertisedSettings`); 0, and the moment to sweep out closed streams."""
        self._sweep()
        return 0

    @property
    def open_outbound_streams(self) -> int:
        """The same for the streams we open: the client enforces the peer's stream limit
        itself, from its own count of calls."""
        self._sweep()
        return 0

    def _sweep(self) -> None:
        """Forget closed streams, as h2's count of open streams does on each new stream: here
        only whenever their number doubled (O(1) per stream, not a walk over every stream)."""
        streams = self.streams
        if len(streams) < self._sweep_at:
            return
        closed = [stream_id for stream_id, stream in streams.items() if stream.state_machine.state is _STREAM_CLOSED]
        how = self._closed_streams  # (bounded: h2 keeps the newest of them)
        if type(how) is SizeLimitDict:
            # Its bound applied once after them all, not per stream (two Python calls each).
            for stream_id in closed:
                _set_ordered(how, stream_id, streams.pop(stream_id).state_machine.stream_closed_by)
            how._check_size_limit()
        else:
            for stream_id in closed:
                how[stream_id] = streams.pop(stream_id).state_machine.stream_closed_by
        self._sweep_at = max(16, 2 * len(streams))

    def send_header_block(self, stream_id: int, block: bytes, end_stream: bool) -> None:
        """``send_headers`` on an open stream, with the header block already encoded."""
        stream = self.streams[stream_id]
        self.frames_sent += 1
        if self.state_machine.state not in _CONNECTION_OPEN:  # (else a no-op: see above)
            self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        machine = stream.state_machine
        _advance(machine, _SEND_HEADERS, _IN_SEND_HEADERS)
        flags = 0
        if end_stream:
            _advance(machine, _SEND_END_STREAM, _IN_SEND_END_STREAM)
            flags = _END_STREAM
        out = self._data_to_send
        size = len(block)
        limit = self.max_outbound_frame_size
        if size <= limit:
            out += _FRAME_HEADER.pack(size >> 16, size & 0xFFFF, _HEADERS, flags | _END_HEADERS, stream_id)
            out += block
            return
        # RFC 9113 §6.10: the rest of the block follows in CONTINUATION frames.
        kind = _HEADERS
        for start in range(0, size, limit):
            chunk = block[start : start + limit]
            if start + limit >= size:
                flags |= _END_HEADERS
            out += _FRAME_HEADER.pack(len(chunk) >> 16, len(chunk) & 0xFFFF, kind, flags, stream_id)
            out += chunk
            kind, flags = _CONTINUATION, 0

    def stream_open(self, stream_id: int) -> bool:
        """Whether the stream is known and not closed: ``not streams[stream_id].closed``
        without h2's property (a Python call, and an Enum member read off its class)."""
        stream = self.streams.get(stream_id)
        return stream is not None and stream.state_machine.state is not _STREAM_CLOSED

    @property
    def peer_max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (h2's ``remote_settings`` property, its
        default when unset), without the three Python calls of Settings' property: a client
        asks for every call."""
        values = self.remote_settings._settings.get(_MAX_CONCURRENT_STREAMS)
        value = values[0] if values else None
        return _NO_STREAM_LIMIT if value is None else value

    def _new_stream(self, stream_id: int, outbound: bool) -> h2.stream.H2Stream:
        """h2's ``_begin_new_stream`` for an id the caller checked (above every id of its side,
        of that side's parity), without its three debug-log calls."""
        # (Its arguments positional: keywords cost a class call a dict, made and taken apart.)
        stream = h2.stream.H2Stream(
            stream_id,
            self.config,
            # The settings' current values, without two Python calls each (Settings' property
            # and __getitem__): a window size is always set. Inbound, then outbound.
            self.local_settings._settings[_INITIAL_WINDOW_SIZE][0],
            self.remote_settings._settings[_INITIAL_WINDOW_SIZE][0],
        )
        stream.max_outbound_frame_size = self.max_outbound_frame_size
        self.streams[stream_id] = stream
        if outbound:
            self.highest_outbound_stream_id = stream_id
        else:
            self.highest_inbound_stream_id = stream_id
        return stream

    def start_stream(self, block: bytes, end_stream: bool, authority: bytes) -> int:
        """``send_headers`` opening our next stream with a request whose header block is
        already encoded (a client's); returns the new stream's id. The caller enforces the
        peer's stream limit."""
        stream_id = self.highest_outbound_stream_id + 2 if self.highest_outbound_stream_id else 1
        if stream_id > self.HIGHEST_ALLOWED_STREAM_ID:
            raise h2.exceptions.NoAvailableStreamIDError("Exhausted allowed stream IDs")
        self._sweep()
        stream = self._new_stream(stream_id, True)
        # What h2's send_headers records from the header list it would have seen.
        stream._authority = authority
        stream.request_method = b"POST"
        self.send_header_block(stream_id, block, end_stream)
        return stream_id

    def send_data_frames(
        self,
        stream_id: int,
        data: bytes | bytearray | memoryview,
        frame_size: int,
        end_stream: bool = False,
        prefix: bytes = b"",
    ) -> None:
        """``send_data`` of ``prefix + data`` (not empty), which the caller fitted into the
        windows, as DATA frames of ``frame_size`` (the last one shorter); ``end_stream`` sets
        END_STREAM on the last (our side of the stream ends with it). One state change for
        all the frames: a large message is many, and per-frame state machine calls were a
        fifth of its cost. ``prefix`` (a message's 5 bytes) leads the first frame, without
        ``prefix + data`` being made.

        ``data`` of 64 KiB and more whose buffer is immutable ``bytes`` is queued by reference:
        its frames are views of it between their headers, not copied into the output (a
        fresh megabyte per large message, whose page faults cost more than the copy)."""
        stream = self.streams[stream_id]
        size = len(prefix) + len(data)
        self.frames_sent += -(-size // frame_size)
        if size >= 1024:
            self.data_kib_sent += size >> 10
        if self.state_machine.state not in _CONNECTION_OPEN:  # (else a no-op: see above)
            self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        if stream.state_machine.state not in _STREAM_SENDING:  # (else a no-op), an error
            stream.state_machine.process_input(_IN_SEND_DATA)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        if end_stream:
            _advance(stream.state_machine, _SEND_END_STREAM, _IN_SEND_END_STREAM)
        flags = _END_STREAM if end_stream else 0
        out = self._data_to_send
        pack = _FRAME_HEADER.pack
        if size <= frame_size and size < _BY_REFERENCE:  # the common case: one frame, copied
            out += pack(size >> 16, size & 0xFFFF, _DATA, flags, stream_id)
            if prefix:
                out += prefix
            out += data
            return
        if size >= _BY_REFERENCE and type(data.obj if type(data) is memoryview else data) is bytes:
            parts = self._parts
            if parts is None:
                self._parts = parts = []
            if out:
                parts.append(out)
                self._data_to_send = bytearray()
            self._frame_into(parts.append, memoryview(data), size, frame_size, flags, stream_id, prefix)
            return  # (the view is not released: the views queued are of it)
        with memoryview(data) as view:  # (slices of a view: no copy but the one into out)
            self._frame_into(out.extend, view, size, frame_size, flags, stream_id, prefix)

    @staticmethod
    def _frame_into(
        add: Any, view: memoryview, size: int, frame_size: int, flags: int, stream_id: int, prefix: bytes
    ) -> None:
        """``add`` each frame's header, then its share of ``prefix`` and ``view`` (``flags`` on
        the last frame only)."""
        pack = _FRAME_HEADER.pack
        position = 0  # in view
        while size:
            length = frame_size if size > frame_size else size
            size -= length
            add(pack(length >> 16, length & 0xFFFF, _DATA, 0 if size else flags, stream_id))
            if prefix:
                add(prefix)
                length -= len(prefix)
                prefix = b""
            if length:
                add(view[position : position + length])
                position += length

    def acknowledge_data(self, size: int, stream_id: int, peer_ended: bool) -> None:
        """``acknowledge_received_data``; for a stream the peer has ended (``peer_ended``) only
        the connection's window needs the bytes back, and h2 would look the stream up and
        count them against its window too, for nothing."""
        if not peer_ended:
            self.acknowledge_received_data(size, stream_id)
            return
        increment = self._inbound_flow_control_window_manager.process_bytes(size)
        if increment:
            self._data_to_send += _FRAME_HEADER.pack(0, 4, _WINDOW_UPDATE, 0, 0) + increment.to_bytes(4, "big")

    def receive_data_frame(self, stream_id: int, payload: bytes | memoryview, end_stream: bool) -> list[Any] | None:
        """What ``receive_data`` does with one whole, unpadded DATA frame, without h2's frame
        buffer, frame object and logging: the same window and state changes, the same events.

        Only for the plain case — an open connection, a stream open for the peer's data, room
        in both windows, within its content-length if it has one. Returns None for anything
        else, and the frame is then h2's to take (and to refuse, if it is wrong): no error is
        judged here.
        """
        stream = self.streams.get(stream_id)
        if stream is None or self.state_machine.state not in _CONNECTION_OPEN:
            return None
        machine = stream.state_machine
        if machine.state is not _STREAM_OPEN and machine.state is not _STREAM_HALF_CLOSED_LOCAL:
            return None
        if not machine.headers_received:
            return None  # h2 calls it a protocol error
        size = len(payload)
        connection_window = self._inbound_flow_control_window_manager
        stream_window = stream._inbound_window_manager
        if size > connection_window.current_window_size or size > stream_window.current_window_size:
            return None
        received = stream._actual_content_length + size
        expected = stream._expected_content_length  # a content-length header (h2load sends one)
        if expected is not None and (received > expected or (end_stream and received != expected)):
            return None
        connection_window.current_window_size -= size
        stream_window.current_window_size -= size
        stream._actual_content_length = received
        # Made without __init__, whose signature changed in h2 4.3; the same four attributes.
        event = DataReceived.__new__(DataReceived)
        event.stream_id = stream_id
        event.data = payload  # type: ignore[assignment]  # (a view of a frame joined from many reads)
        event.flow_controlled_length = size
        event.stream_ended = None
        if not end_stream:
            return [event]
        ended = _advance(machine, _RECV_END_STREAM, _IN_RECV_END_STREAM)
        event.stream_ended = ended[0]  # the StreamEnded h2 made
        return [event, *ended]

    def receive_headers_frame(self, stream_id: int, block: bytes | memoryview, end_stream: bool) -> list[Any] | None:
        """What ``receive_data`` does with one HEADERS frame that is a whole header block,
        without padding or priority: h2's own decoding and stream handling, without its frame
        buffer, frame object and logging.

        Only for a stream already open (a response's headers, or trailers) or, on a server, a
        new stream the client may open (a request). None for anything else — a closed or
        reused stream id among them: h2's to take, and to judge.
        """
        if self.state_machine.state not in _CONNECTION_OPEN:
            return None
        stream = self.streams.get(stream_id)
        if stream is None:
            # A request: an odd id above every id the client used so far (RFC 9113 §5.1.1).
            if not self._server_side or stream_id <= self.highest_inbound_stream_id or not stream_id & 1:
                return None
            self._sweep()  # (as h2's count of open streams would)
        elif (
            stream.state_machine.state is not _STREAM_OPEN
            and stream.state_machine.state is not _STREAM_HALF_CLOSED_LOCAL
        ):
            return None
        if type(block) is memoryview:
            block = bytes(block)  # (of a frame joined from many reads: hpack takes bytes)
        try:
            headers = _decode_headers(self.decoder, block)  # first: HPACK stays in step whatever follows
            if stream is None:
                # (RECV_HEADERS on the open connection: a no-op, see _check_no_op_transitions)
                stream = self._new_stream(stream_id, False)
            return self._receive_headers(stream, headers, end_stream)
        except h2.exceptions.ProtocolError as exc:
            self._terminate_connection(exc.error_code)  # as receive_data does: GOAWAY, then raise
            raise

    def _receive_headers_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        """h2's, for the HEADERS frames ``receive_headers_frame`` leaves to it (CONTINUATION,
        padding, priority, a frame header split across reads): a client's responses and
        trailers checked there too, as :meth:`_receive_headers` checks the others."""
        frames, events = super()._receive_headers_frame(frame)
        if self.config.client_side:
            event: Any
            for event in events:
                kind = type(event)
                if kind is h2.events.ResponseReceived or kind is TrailersReceived:
                    _mark_if_malformed(event, _malformation(event, event.headers or []))
        return frames, events

    def _receive_headers(self, stream: h2.stream.H2Stream, headers: Any, end_stream: bool) -> list[Any]:
        """h2's ``H2Stream.receive_headers`` (the same steps, in its order), remembering what
        it makes of a header list: the content-length it reads and the list its processing
        passes on (its 1xx check, validation flags and processing pipeline; the validation
        itself our configuration leaves to the gRPC layer). They depend only on the fields, the
        kind of headers (request, response, trailers) and the side. Calls of a method repeat
        their requests' fields, responses and trailers theirs, so each list is taken apart
        once per connection, not once per call."""
        machine = stream.state_machine
        remembered = self._validated
        if remembered is None:
            remembered = self._validated = {}
        # What the fields are taken as (request, response, trailers) follows from the side and
        # whether headers came before; only lists that are not a 1xx response are remembered.
        key = (tuple(headers), machine.client, machine.headers_received)
        known = remembered.get(key)
        if known is None and is_informational_response(headers):
            return stream.receive_headers(headers, end_stream, self.config.header_encoding)[1]
        events = _advance(machine, _RECV_HEADERS, _IN_RECV_HEADERS)
        event: Any = events[0]
        if end_stream:
            ended = _advance(machine, _RECV_END_STREAM, _IN_RECV_END_STREAM)
            event.stream_ended = ended[0]
            events += ended
        fields = None
        if known is not None and stream.request_method != b"HEAD":
            fields, stream._expected_content_length, problem = known
        else:
            stream._initialize_content_length(headers)
        if end_stream is False and isinstance(event, TrailersReceived):
            raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set")
        if fields is None:
            flags = stream._build_hdr_validation_flags(events)
            fields = stream._process_received_headers(headers, flags, self.config.header_encoding)
            # A client's responses and trailers checked here, once per list (a server checks
            # its requests as it parses them): h2's own checks are off, and cost more.
            problem = _malformation(event, headers) if machine.client else None
            if stream.request_method != b"HEAD" and _list_size(headers) <= _CACHE_LIST_LIMIT:
                if len(remembered) >= _CACHE_LIMIT:
                    remembered.clear()  # lists that vary (a grpc-timeout, a request id) come and go
                remembered[key] = (fields, stream._expected_content_length, problem)
        event.headers = list(fields)
        _mark_if_malformed(event, problem)
        return events

    def queue_goaway(self, last_stream_id: int, error_code: int) -> None:
        """Queue a GOAWAY without closing h2's state machine (``close_connection`` would, and
        then refuse to serve the streams a graceful GOAWAY promises to finish)."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self._data_to_send += frame.serialize()  # behind what h2 queued, like our other frames

    def data_to_send(self, amount: int | None = None) -> bytes:
        """h2's, with any payloads queued by reference in their place."""
        if self._parts is not None:
            self._data_to_send = bytearray().join([*self._parts, self._data_to_send])
            self._parts = None
        return super().data_to_send(amount)

    def take_output(self) -> bytearray | list[bytes | bytearray | memoryview]:
        """Everything queued since the last call: the buffer itself (h2's ``data_to_send``
        copies it, a megabyte per large message), which the caller owns from now on; or, if
        a large payload was queued by reference, the list of buffers to write in order."""
        data, self._data_to_send = self._data_to_send, bytearray()
        parts = self._parts
        if parts is None:
            return data
        self._parts = None
        if data:
            parts.append(data)
        return parts

    def use_encoder(self, encoder: Any) -> None:
        """Encode every header block h2 sends with ``encoder`` (one per connection, as HPACK
        needs, shared with the blocks we encode ourselves)."""
        self.encoder = encoder


class MalformedResponse(h2.events.ResponseReceived):
    """A client's ResponseReceived whose field list is malformed (RFC 9113 §8.2.1, see
    :func:`~app_kit.wire.fields.malformed_field`): ``reason`` says why. Found by
    ``H2Connection._receive_headers``, once per list, and told by the event's class."""

    reason: str


class MalformedTrailers(h2.events.TrailersReceived):
    """A client's TrailersReceived whose field list is malformed, as :class:`MalformedResponse`."""

    reason: str


def _malformation(event: Any, headers: Any) -> str | None:
    """Why a client's response (or trailers) ``event`` with ``headers`` is malformed, or None."""
    return malformed_field(headers, b"" if isinstance(event, TrailersReceived) else b":status")


def _mark_if_malformed(event: Any, problem: str | None) -> None:
    # Told by the event's class: a connection dispatching on it pays nothing otherwise.
    if problem is not None:
        event.__class__ = MalformedTrailers if isinstance(event, TrailersReceived) else MalformedResponse
        event.reason = problem


def is_compression_error(exc: BaseException | None) -> bool:
    """RFC 9113 §4.3: a field block that cannot be decoded is a COMPRESSION_ERROR (h2 says
    PROTOCOL_ERROR); an oversized one stays h2's ENHANCE_YOUR_CALM."""
    return (
        type(exc) is h2.exceptions.ProtocolError
        and isinstance(exc.__cause__, HPACKError)
        and not isinstance(exc, h2.exceptions.DenialOfServiceError)
    )


class GoAwayTolerantStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that a received GOAWAY does not close it.

    h2 moves to CLOSED on any GOAWAY and then rejects every frame, even those of the streams
    the GOAWAY lets finish (and the PING that follows it in the same read). RFC 9113 §6.8
    keeps those streams alive, so stay in the current state; the gRPC layer stops opening new
    streams and closes the connection once the remaining ones are done. Only the transition
    table differs, so the per-frame cost is h2's own.
    """

    _transitions: ClassVar[dict[tuple[ConnectionState, ConnectionInputs], Any]] = {  # type: ignore[misc]
        **H2ConnectionStateMachine._transitions,
        **{
            (state, ConnectionInputs.RECV_GOAWAY): (side_effect, state)
            for (state, event), (side_effect, _) in H2ConnectionStateMachine._transitions.items()
            if event is ConnectionInputs.RECV_GOAWAY and state is not ConnectionState.CLOSED
        },
    }


def new_h2_connection(config: Configuration, *, client_side: bool) -> H2Connection:
    """An h2 connection set up for gRPC: our settings and limits, our decoder, small tables."""
    connection = H2Connection(
        h2.config.H2Configuration(
            client_side=client_side,
            header_encoding=None,
            # We build outbound headers ourselves and validate inbound ones in the gRPC layer,
            # where a malformed request can be answered on its own stream instead of h2's
            # connection error.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
    )
    connection.local_settings = _compact_settings(
        _AdvertisedSettings(
            client=client_side,
            initial_values={
                _SETTINGS.MAX_CONCURRENT_STREAMS: config.max_concurrent_streams,
                _SETTINGS.MAX_HEADER_LIST_SIZE: config.max_header_list_size,
                _SETTINGS.INITIAL_WINDOW_SIZE: config.initial_stream_window_size,
                _SETTINGS.MAX_FRAME_SIZE: config.max_frame_size,
                _SETTINGS.ENABLE_PUSH: 0,
            },
        )
    )
    _compact_settings(connection.remote_settings)
    # hpack enforces its list limit by raising in the middle of a block, with the entries before
    # that point already in the dynamic table and those after it not: h2 can only end the
    # connection then, every call on it with it. So each block is decoded whole up to the hard
    # cap, keeping the table in step with the peer's encoder (RFC 9113 §10.5.1), and a list
    # over the advertised limit costs its own stream only: a server's gRPC layer measures the
    # request heads it has not seen, a client's decoder marks the responses (see the decoder).
    advertised = config.max_header_list_size if client_side else None
    connection.decoder = MemoizingHeaderDecoder(config.max_header_block_size, advertised)
    for table in (connection.encoder.header_table, connection.decoder.header_table):
        table.dynamic_entries = _SmallDeque(table.dynamic_entries)  # type: ignore[assignment]
    connection.state_machine = GoAwayTolerantStateMachine()
    connection.max_inbound_frame_size = config.max_frame_size
    return connection


#: RFC 9113 §6.5.2: what each field adds to a header list's size, besides its name and value.
_FIELD_OVERHEAD = 32


class _OwnName(bytes):
    """A field name no peer can send: those decoded from the wire are plain ``bytes``."""

    __slots__ = ()


#: The name of the one field that stands for a header list over the advertised limit (its
#: value is the list's decoded size): bytes, as h2 expects, but never one off the wire.
OVERSIZED_LIST = _OwnName(b"oversized-header-list")


def oversized_list_size(headers: Sequence[tuple[Any, Any]]) -> int | None:
    """The decoded size of the list :class:`MemoizingHeaderDecoder` replaced with
    :data:`OVERSIZED_LIST` for being over its advertised limit; None for any other list."""
    if headers and headers[-1][0] is OVERSIZED_LIST:
        return int(headers[-1][1])
    return None


def _list_size(headers: Sequence[tuple[Any, Any]]) -> int:
    """A header list's size as RFC 9113 §6.5.2 counts it."""
    return sum([len(name) + len(value) for name, value in headers]) + _FIELD_OVERHEAD * len(headers)


class MemoizingHeaderDecoder(hpack.Decoder):
    """hpack's decoder, answering a block it has seen from memory when that gives the same result.

    A block's result depends only on its bytes and the dynamic table. Only blocks that left
    the table as they found it (indices and literals without indexing) are remembered, with
    the table they were decoded against; the memory is used only while the table is still
    that one. The table changes only by insertions, which put a new entry object first, and
    by evictions, which shorten it, so its newest entry (by identity), its length and its
    size limit tell the table apart from any other.

    Its list limit (hpack's ``max_header_list_size``) is the one it was made with: h2 sets the
    advertised SETTINGS_MAX_HEADER_LIST_SIZE there once the peer acknowledges our SETTINGS,
    which would put the list limit back in hpack's hands (see :func:`new_h2_connection`).

    Given an ``advertised`` limit too (a client's), a list over it comes out as its
    ``:status`` (if it has one: h2 tells a 1xx response from the final one by it) and the
    field :data:`OVERSIZED_LIST` (see :func:`oversized_list_size`): h2 hands them on as the
    headers of its event, the gRPC layer fails that call only, and the fields nobody will
    read are not kept. A remembered block is measured once, when it is first decoded.
    """

    def __init__(self, max_header_list_size: int, advertised: int | None = None) -> None:
        self._limit = max_header_list_size
        self._advertised = advertised
        super().__init__(max_header_list_size)
        self._remembered: dict[bytes, tuple[Any, int, int, tuple[Any, ...]]] = {}

    @property
    def max_header_list_size(self) -> int:
        """The decoded size (RFC 9113 §6.5.2) past which hpack refuses a block."""
        return self._limit

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        pass  # h2 (on SETTINGS ACK) and hpack's __init__: the limit stays as constructed

    def decode(self, data: bytes, raw: bool = False) -> Any:
        """The header list of a block (as hpack's :meth:`hpack.Decoder.decode`)."""
        table = self.header_table
        entries = table.dynamic_entries
        newest = entries[0] if entries else None
        length, size = len(entries), table._maxsize  # (hpack's maxsize property, without the call)
        if raw:
            if type(data) is not bytes:
                data = bytes(data)
            known = self._remembered.get(data)
            if known is not None and known[0] is newest and known[1] == length and known[2] == size:
                if size > self.max_allowed_table_size:  # hpack's check at the end of a block
                    self._assert_valid_table_size()  # (which raises)
                return list(known[3])
        headers: Any = super().decode(data, raw)  # a list, whatever hpack's annotation says
        decoded = _list_size(headers)
        if self._advertised is not None:
            if decoded > self._advertised:
                # Its :status stays, so that h2 still tells a 1xx response from the final one.
                marker = (OVERSIZED_LIST, str(decoded).encode("ascii"))
                headers = [*[field for field in headers if field[0] == b":status"][:1], marker]
        entries = table.dynamic_entries
        if (
            raw
            and decoded <= _CACHE_LIST_LIMIT
            and (entries[0] if entries else None) is newest
            and len(entries) == length
            and table.maxsize == size
        ):
            if len(self._remembered) >= _CACHE_LIMIT:
                self._remembered.clear()  # blocks that vary (say, a grpc-timeout) come and go
            self._remembered[data] = (newest, length, size, tuple(headers))
        return headers
