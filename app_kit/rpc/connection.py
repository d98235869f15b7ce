"""The side-neutral part of the core: h2 driven for gRPC streams, flow control, framing.

:class:`GrpcConnection` consumes bytes (:meth:`~GrpcConnection.receive_data`), returns
events, and queues bytes to write (:meth:`~GrpcConnection.data_to_send`). Server and client
subclass it for what differs: how a stream starts and how it ends.
"""

from __future__ import annotations

import collections
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import ClassVar

import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..wire.config import Configuration
from ..wire.guard import AddressBudget, FrameGuard, PeerMisbehaved, PingPolicy
from ..wire.h2_internals import is_compression_error, new_h2_connection
from .compression import DecompressedTooLarge, DecompressionError, compress, decompress
from .events import (
    ConnectionClosed,
    EndOfStream,
    Event,
    GoAwayReceived,
    MessagesReceived,
    PingAcknowledged,
    StreamClosed,
    StreamWritable,
)
from .framing import _SMALL_PIECE, SMALL_PREFIXES, FramingError, MessageDecoder, MessageTooLarge, pack_prefix
from .metadata import excerpt
from .status import Status

__all__ = ["Compressed", "GrpcConnection", "MessageRejected", "ReceiveBudget", "StreamGone", "StreamState"]

log = logging.getLogger("app_kit.protocol")

_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
# A frame header: its length (as 16 + 8 bits), type, flags and stream id, in one call.
_FRAME_HEADER = struct.Struct(">HBBBL")
_INTERNAL_ERROR = h2.errors.ErrorCodes.INTERNAL_ERROR
_SETTINGS = h2.settings.SettingCodes
_PING_LICENCES = 1024  # well above the DATA frames of one write to many streams
_LATE_RESETS = 1024  # finished streams remembered for a reset that crossed their answer
# What a message handed to the application costs until it is taken, besides the bytes flow
# control counts for it: its entry in its call's queue (a tuple and a slot, ~64 bytes) and
# its bytes object's header (~33). Counted against max_connection_receive_buffer for each
# message a stream holds beyond its first _FREE_MESSAGES (those cost at most a few KiB per
# stream, which max_concurrent_streams bounds, and nothing to count on a unary call's path):
# without it, a window's worth of empty messages (5 bytes each) held ~16 times the window.
_MESSAGE_OVERHEAD = 96
#: A DATA frame of fewer bytes than this, inside a message it neither begins nor ends, carries
#: next to nothing and counts as an empty frame unless a large one licenses it (see the
#: guard's count_crumb): each one costs us a frame's work (a message in frames of 1 byte took
#: ~3 µs of CPU per byte). Senders cut a message at their frame size or at the window's end,
#: proxies where their buffers fill (HAProxy: one frame in four).
_CRUMB = 64
_FREE_MESSAGES = 16


def _late_resets(state: StreamState) -> int:
    """The RST_STREAMs a finished stream licenses: one, and one per frame we sent on it
    (estimated from what it counts: a message or 16 KiB each)."""
    return 1 + state.messages_flushed + state.messages + (state.bytes_taken >> 14)


class ReceiveBudget:
    """Bytes of incomplete and inflated messages that the connections sharing it hold at once
    (a server's: Configuration.max_server_receive_buffer), as each connection counts its own."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class StreamGone(Exception):
    """The stream is closed (reset, finished or aborted); nothing more can be sent on it."""


class StreamState:
    """Per-stream protocol state."""

    __slots__ = (
        "blocked",
        "bytes_taken",
        "consumed",
        "decoder",
        "headers_sent",
        "inflated",
        "local_closed",
        "messages",
        "messages_flushed",
        "over_limit",
        "partial",
        "pending",
        "pending_trailers",
        "queued",
        "recv_encoding",
        "remote_closed",
        "send_encoding",
        "stream_id",
        "unacked",
    )

    def __init__(self, stream_id: int, decoder: MessageDecoder, recv_encoding: str | None) -> None:
        self.stream_id = stream_id
        self.decoder = decoder
        #: ``grpc-encoding`` of the messages we receive (None: identity).
        self.recv_encoding = recv_encoding
        #: ``grpc-encoding`` of the messages we send (None: identity).
        self.send_encoding: str | None = None
        #: Flow-control bytes handed to the application and not yet consumed by it.
        self.unacked = 0
        #: Bytes consumed since the last flush: their window goes back then.
        self.consumed = 0
        #: Bytes of an incomplete message, as counted for the connection's cap.
        self.partial = 0
        #: Messages handed to the application and not taken yet (see _MESSAGE_OVERHEAD).
        self.queued = 0
        #: Bytes of the last message inflated for the application, as counted for the cap.
        self.inflated = 0
        #: Outbound DATA not yet handed to h2: queued this loop turn, or waiting for window.
        #: While it is not empty, the stream's flush is arranged (or it waits for window), so
        #: an uncompressed message may join it without the connection: a sender that holds
        #: this state appends the message's prefix and bytes, counts it in ``messages``, and
        #: sets ``over_limit`` and waits once ``pending`` is over the send buffer, as
        #: :meth:`GrpcConnection.send_message` does (the server's per-message fast path).
        #: Never while ``local_closed``: the stream ended, or the connection let it go.
        self.pending = bytearray()
        #: Messages in ``pending`` not counted yet in the messages sent (counted as flushed).
        self.messages = 0
        #: Messages of the stream counted in the connection's messages sent: ``messages`` move
        #: here when flushed (only then: not when dropped), and those sent at once count here.
        self.messages_flushed = 0
        #: Bytes taken out of ``pending`` (sent or dropped), plus for each message not queued
        #: there as given (compressed, or sent at once) the difference (see sent_bytes).
        self.bytes_taken = 0
        #: A sender was told to wait until ``pending`` drains (StreamWritable then).
        self.over_limit = False
        #: While ``pending`` waits for window: the connection's table of the streams waiting
        #: for that window (their own, or the connection's; see GrpcConnection._flush).
        self.blocked: dict[int, StreamState] | None = None
        #: Trailers to send once ``pending`` is out (they must follow the data).
        self.pending_trailers: Sequence[tuple[bytes, bytes]] | None = None
        #: Whether our HEADERS for the stream went out.
        self.headers_sent = False
        self.remote_closed = False
        self.local_closed = False

    # What a server's Stream reports as sent, from its first reply on: its per-message path
    # counts each reply here alone (in ``messages``, and in ``pending``'s bytes).

    @property
    def sent_messages(self) -> int:
        """The messages queued on the stream or sent at once, in all."""
        return self.messages_flushed + self.messages

    @property
    def sent_bytes(self) -> int:
        """Their bytes as given (uncompressed): all that went through ``pending``, less each
        message's 5-byte prefix."""
        return self.bytes_taken + len(self.pending) - 5 * (self.messages_flushed + self.messages)


_GONE = StreamState(0, MessageDecoder(0), None)  # what sender_state says of a stream gone
_GONE.local_closed = _GONE.remote_closed = True


class GrpcConnection:
    """One HTTP/2 connection carrying gRPC calls, without I/O."""

    #: The budget shared with the other connections of a server (share_receive_budget), if any
    #: (a class attribute until then: a client's connection has no attribute to spare).
    _shared_budget: ReceiveBudget | None = None
    #: Whether this is a client's connection (a class attribute, for the same reason).
    _client_side = False

    #: Which method handles which h2 event (a class attribute: nothing per connection).
    _HANDLERS: ClassVar[dict[type, str]] = {
        h2.events.DataReceived: "_on_data",
        h2.events.StreamEnded: "_on_stream_ended",
        h2.events.StreamReset: "_on_stream_reset",
        h2.events.WindowUpdated: "_on_window_updated",
        h2.events.RemoteSettingsChanged: "_on_remote_settings",
        h2.events.PingAckReceived: "_on_ping_ack",
        h2.events.ConnectionTerminated: "_on_terminated",
    }

    def __init__(
        self, config: Configuration, *, client_side: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._guard = FrameGuard(
            config,
            clock,
            expect_preface=not client_side,
            ping_context=self._ping_context,
            update_licensed=self._update_licensed,
            reset_licensed=self._reset_licensed,
            # gRPC's keepalive enforcement is a server's: servers PING clients that send data.
            ping_policy=PingPolicy(config) if not client_side else None,
        )
        # How many of h2.frames_sent licensed a PING already, and WINDOW_UPDATEs (two each).
        self._pings_licensed = 0
        self._updates_licensed = 0
        self._messages_out = 0  # messages handed to h2: each licenses WINDOW_UPDATEs too
        # Streams finished lately, and the late RST_STREAMs each licenses (see _reset_licensed).
        self._finished: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._h2 = new_h2_connection(config, client_side=client_side)
        # The bytes of a frame not complete yet (at most a frame header and max_frame_size),
        # in the pieces they came in (joined once, when the frame is complete; small pieces
        # gathered in a bytearray, see _SMALL_PIECE): h2 is handed whole frames only, so the
        # guard's walk over the frames is the one.
        self._carry: list[bytes | bytearray | memoryview] = []
        self._streams: dict[int, StreamState] = {}
        self._max_send_buffer = config.max_send_buffer_size
        # Bytes of incomplete messages buffered across all streams (see _on_data), and of
        # inflated messages the application holds (see inflate).
        self._partial_bytes = 0
        self._inflated_bytes = 0
        self._max_partial_bytes = max(config.max_connection_receive_buffer, config.max_receive_message_length + 5)
        # What of that budget is left to them: less what the messages handed to the
        # application and not taken yet cost besides their bytes (see _MESSAGE_OVERHEAD).
        # (One attribute, not a counter more: a client's connection has 29, and from 30 on
        # CPython 3.11 reads each of an instance's attributes more slowly, its keys no longer
        # sharing the class's: measured, +2,000 instructions per client call.)
        self._partial_limit = self._max_partial_bytes
        self._max_inflated_bytes = max(config.max_connection_inflated_bytes, config.max_receive_message_length)
        # Streams with DATA waiting for window (see _Blocked).
        self._blocked = _Blocked()
        # Streams with DATA queued since the last flush, in order.
        self._dirty: dict[int, StreamState] = {}
        # Streams whose consumed messages' window is still to be given back.
        self._consumed: dict[int, StreamState] = {}
        self.closed = False
        #: The peer's first SETTINGS arrived: the HTTP/2 handshake is done.
        self.handshake_complete = False

    # -- input -------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface (our SETTINGS and connection window)."""
        self._h2.initiate_connection()
        self._guard.settings_sent()
        increment = self.config.initial_connection_window_size - 65535
        if increment > 0:
            self._h2.increment_flow_control_window(increment)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; return what they mean."""
        if self.closed:
            return []
        try:
            # First the cheap look at frame headers: a flood stops here, before h2 parses it.
            guard = self._guard
            carried_plain = guard.carried_plain
            plain_frames, whole = guard.scan(data)
            carry = self._carry
            if carry:  # a frame begun in an earlier read: complete it first
                if not whole:
                    _keep(carry, data)  # still not complete
                    return []
                # Only that frame is copied together (once); the rest is taken where it lies.
                end = guard.carried_end
                carry.append(memoryview(data)[:end])
                first: bytes | memoryview = b"".join(carry)
                if carried_plain:
                    # Taken past h2's parser: its payload is a view of the joined frame (a
                    # large message, one frame over many reads, is not copied again).
                    first = memoryview(first)
                h2_events = self._take_frames(first, [0] if carried_plain else [], 0, len(first))
                h2_events += self._take_frames(data, plain_frames, end, whole)
                self._carry = []
                if whole < len(data):
                    _keep(self._carry, data[whole:])
            else:
                if whole < len(data):
                    _keep(carry, data[whole:])  # h2 gets whole frames only
                h2_events = self._take_frames(data, plain_frames, 0, whole)
        except PeerMisbehaved as exc:
            self._h2.close_connection(exc.error_code, additional_data=exc.debug or None)
            return self._connection_lost(exc.error_code, exc.reason)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the matching error code.
            code = h2.errors.ErrorCodes.COMPRESSION_ERROR if is_compression_error(exc) else exc.error_code
            return self._connection_lost(int(code), f"protocol error: {exc}")
        except Exception as exc:  # a peer must never crash us; log it as our bug
            log.exception("unexpected error processing peer data")
            self._h2.close_connection(_INTERNAL_ERROR)
            return self._connection_lost(int(_INTERNAL_ERROR), f"internal error: {exc!r}")
        events: list[Event] = []
        handlers = self._HANDLERS
        try:
            for event in h2_events:
                handler = handlers.get(type(event))
                if handler is not None:
                    getattr(self, handler)(event, events)
                    if self.closed:  # a GOAWAY with an error ended it: what came after is void
                        break
        except PeerMisbehaved as exc:  # over a budget because of what these frames made us do
            self._h2.close_connection(exc.error_code, additional_data=exc.debug or None)
            return self._connection_lost(exc.error_code, exc.reason)
        except Exception as exc:  # our bug, but the peer must not be able to crash the server
            log.exception("unexpected error handling peer events")
            self._h2.close_connection(_INTERNAL_ERROR)
            return self._connection_lost(int(_INTERNAL_ERROR), f"internal error: {exc!r}")
        return events

    def _take_frames(
        self, data: bytes | memoryview, plain_frames: list[int], start: int, stop: int
    ) -> list[h2.events.Event]:
        """h2's events for the whole frames in ``data[start:stop]``: its plain ones (offsets
        from the guard) taken past h2's frame parser where h2 allows (DATA and HEADERS on
        open streams, a request's HEADERS), the rest given to h2 in runs of whole frames, so
        its frame buffer is empty at each frame taken here.

        Parsing a frame into h2's frame object costs as much as the rest of its handling, and
        a gRPC call is a few small frames: HEADERS, a DATA frame per message, trailers. A
        read is never sliced whole (for large messages that was three copies of each byte).
        """
        h2conn = self._h2
        h2_events: list[h2.events.Event] = []
        unpack = _FRAME_HEADER.unpack_from
        for offset in plain_frames:
            if offset < start:
                continue  # (in the frame completed from an earlier read: taken already)
            if offset > start:
                h2_events += h2conn.receive_data(data[start:offset])  # the frames before it first
                start = offset
            high, low, kind, flags, stream_id = unpack(data, offset)
            end = offset + 9 + (high << 8 | low)
            stream_id &= 0x7FFFFFFF
            if kind:  # HEADERS
                taken = h2conn.receive_headers_frame(stream_id, data[offset + 9 : end], flags & 1 == 1)
            else:
                taken = h2conn.receive_data_frame(stream_id, data[offset + 9 : end], flags & 1 == 1)
            if taken is not None:
                h2_events += taken
                start = end
        if start < stop:
            h2_events += h2conn.receive_data(data[start:stop] if start or stop < len(data) else data)
        return h2_events

    def _ping_context(self) -> tuple[bool, bool]:
        """For the guard, per PING received: licensed by a frame of ours? Calls open?"""
        # Frames licence PINGs for a while, not forever: at most _PING_LICENCES in stock.
        used = max(self._pings_licensed, self._h2.frames_sent - _PING_LICENCES)
        licensed = self._h2.frames_sent > used
        self._pings_licensed = used + licensed
        return licensed, bool(self._streams)

    def _reset_licensed(self, stream_id: int) -> bool:
        """For the guard, per RST_STREAM received: does it cancel a stream we had finished?

        A client's deadline and the server's fire together: the server answers while the
        client's reset is on its way. Such a reset cost us nothing; once per stream, and once
        more per DATA frame we sent on it, it is not counted as a rapid reset (measured: a
        client with 20 ms deadlines cut off; HAProxy answers a client stream the server ended
        early with CANCEL, then STREAM_CLOSED for each DATA frame it still got: 125 such
        calls in 10 s cut our client's connection off)."""
        finished = self._finished
        left = finished.get(stream_id)
        if left is None:
            state = self._streams.get(stream_id) if self._client_side else None
            if state is None:
                return False
            # A client's call still open: the read that brings the resets may end it first
            # (a proxy's come with the trailers: the guard sees every frame of a read before
            # the trailers are taken). Its licences start now; _release keeps what is left.
            left = _late_resets(state)
        finished[stream_id] = left - 1  # (0 kept: an open stream's licences are not renewed)
        return left > 0

    def _update_licensed(self) -> bool:
        """For the guard, per WINDOW_UPDATE received: called for by what we sent?

        Two (stream and connection) per HEADERS or DATA frame, per message, and per KiB of
        DATA: gRPC peers acknowledge each message their application reads, and we pack many
        into one frame (grpc-core, through a network: 4,620 updates for 1,801 DATA frames of
        a bidi stream); HAProxy acknowledges as its buffers drain, ~3.6 updates per 16 KiB
        frame (9 MiB of replies in 10 s through it were cut off as a flood).
        """
        h2_connection = self._h2
        sent = h2_connection.frames_sent + self._messages_out + h2_connection.data_kib_sent
        used = max(self._updates_licensed, 2 * (sent - _PING_LICENCES))
        licensed = 2 * sent > used
        self._updates_licensed = used + licensed
        return licensed

    def _connection_lost(self, error_code: int, reason: str) -> list[Event]:
        self.closed = True
        for state in self._streams.values():  # for senders that hold them (see pending)
            state.local_closed = state.remote_closed = True
        self._streams.clear()
        if self._shared_budget is not None:
            self._shared_budget.used -= self._partial_bytes + self._inflated_bytes
        self._partial_bytes = self._inflated_bytes = 0
        self._blocked = _Blocked()
        self._dirty.clear()
        self._consumed.clear()
        return [ConnectionClosed(error_code, reason)]

    def _on_data(self, event: h2.events.DataReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        flow = event.flow_controlled_length
        state = self._streams.get(stream_id)
        if state is None:
            # Late DATA for a stream we already finished: give the window back at once (the
            # stream's too: the peer may not have ended it, and nothing else would finish it).
            if flow:
                self._h2.acknowledge_received_data(flow, stream_id)
            return
        data = event.data
        if not data and flow and not event.stream_ended:
            self._guard.count_empty()  # padding only: a frame that carries nothing
        decoder = state.decoder
        try:
            messages, compressed, leftover = decoder.feed(data)
        except MessageTooLarge as exc:
            state.unacked += flow
            self._abort(state, Status.RESOURCE_EXHAUSTED, str(exc), events)
            return
        except FramingError as exc:
            state.unacked += flow
            self._abort(state, Status.INTERNAL, str(exc), events)
            return
        # Padding and bytes of a not yet complete message are acknowledged right away:
        # withholding them would stall any message larger than the window. So flow control
        # does not bound them; the message size limit does per stream, and this per connection.
        # Nor does it bound what complete messages cost besides their bytes (a window holds
        # 200,000 empty ones): that counts here too (see _MESSAGE_OVERHEAD).
        partial = decoder.buffered
        if not messages and state.partial and len(data) < _CRUMB and partial:
            self._guard.count_crumb()
        grown = partial - state.partial
        self._partial_bytes += grown
        state.partial = partial
        shared = self._shared_budget
        if grown and shared is not None:
            shared.used += grown
        if self._partial_bytes > self._partial_limit:
            state.unacked += flow
            self._over_receive_budget(state, events)
            return
        if shared is not None and grown > 0 and shared.used > shared.limit:
            state.unacked += flow
            message = f"incomplete messages on the server over max ({shared.limit} bytes)"
            self._abort(state, Status.RESOURCE_EXHAUSTED, message, events)
            return
        immediate = leftover + flow - len(data)
        if messages:
            state.queued = queued = state.queued + len(messages)
            if queued > _FREE_MESSAGES:
                self._count_queued(queued - max(queued - len(messages), _FREE_MESSAGES))
                if self._partial_bytes > self._partial_limit:
                    state.unacked += flow
                    self._over_receive_budget(state, events)
                    return
            if compressed:
                if state.recv_encoding is None:
                    state.unacked += flow
                    message = "compressed message received, but grpc-encoding is identity or absent"
                    self._abort(state, Status.INTERNAL, message, events)
                    return
                # Inflated only when the application takes them (inflate()): until then they
                # are the compressed bytes flow control bounds.
                for position in compressed:
                    payload, share = messages[position]
                    messages[position] = (Compressed(payload, state.recv_encoding), share)
            events.append(MessagesReceived(stream_id, messages))
            state.unacked += flow - immediate  # the shares of the messages just queued
        if immediate:
            self._h2.acknowledge_received_data(immediate, stream_id)

    def _count_queued(self, messages: int) -> None:
        """``messages`` more (or fewer) unread messages count against the receive budget."""
        self._partial_limit -= messages * _MESSAGE_OVERHEAD

    def _over_receive_budget(self, state: StreamState, events: list[Event]) -> None:
        """The stream's DATA took the connection over max_connection_receive_buffer."""
        if self._partial_bytes > self._max_partial_bytes:
            what = "incomplete messages"
        else:
            what = f"incomplete and unread messages ({_MESSAGE_OVERHEAD} bytes each past {_FREE_MESSAGES} a stream)"
        message = f"{what} on the connection over max ({self._max_partial_bytes} bytes)"
        self._abort(state, Status.RESOURCE_EXHAUSTED, message, events)

    def inflate(self, stream_id: int, payload: Compressed) -> bytes:
        """Inflate a message the application takes from ``stream_id``, within the budgets.

        At most ``max_receive_message_length`` comes out of one message. What comes out
        counts against ``max_connection_inflated_bytes``, and with the incomplete messages
        against ``max_connection_receive_buffer``, until the stream inflates its next message
        or ends: a handler holds what it took (its parsed copy, as large). Raises
        :class:`MessageRejected` with the status the call ends with. A stream that ended
        meanwhile (a response's trailers came in the same read) holds nothing here any more:
        its message is inflated within the message limit alone.
        """
        limit = self.config.max_receive_message_length
        state = self._streams.get(stream_id)
        shared = self._shared_budget
        if state is not None:
            self._inflated_bytes -= state.inflated
            if shared is not None:
                shared.used -= state.inflated
            state.inflated = 0
            buffer_room = self._partial_limit - self._partial_bytes - self._inflated_bytes
            inflated_room = self._max_inflated_bytes - self._inflated_bytes
            limit = max(0, min(limit, buffer_room, inflated_room))
            if shared is not None:
                limit = max(0, min(limit, shared.limit - shared.used))
        try:
            data = decompress(payload.encoding, payload, limit)
        except DecompressedTooLarge:
            if limit < self.config.max_receive_message_length:
                if shared is not None and limit >= shared.limit - shared.used:
                    budget = f"the server's max_server_receive_buffer ({shared.limit} bytes)"
                elif inflated_room <= buffer_room:
                    budget = f"max_connection_inflated_bytes ({self._max_inflated_bytes} bytes)"
                else:
                    budget = f"max_connection_receive_buffer ({self._max_partial_bytes} bytes)"
                message = f"inflated messages on the connection over {budget}"
            else:
                message = f"decompressed message larger than max ({limit} bytes)"
            raise MessageRejected(Status.RESOURCE_EXHAUSTED, message) from None
        except DecompressionError as exc:
            raise MessageRejected(Status.INTERNAL, str(exc)) from None
        except Exception as exc:  # a registered encoding's own failure: still this message's fault
            raise MessageRejected(Status.INTERNAL, f"could not decompress {payload.encoding} message: {exc}") from None
        if state is not None:
            state.inflated = len(data)
            self._inflated_bytes += state.inflated
            if shared is not None:
                shared.used += state.inflated
        return data

    def _on_stream_ended(self, event: h2.events.StreamEnded, events: list[Event]) -> None:
        state = self._streams.get(event.stream_id)
        if state is None:
            return
        if state.decoder.buffered:
            self._abort(state, Status.INTERNAL, "stream ended in the middle of a message", events)
            return
        state.remote_closed = True
        events.append(EndOfStream(event.stream_id))
        if state.local_closed and state.pending_trailers is None:
            # Both sides done. (Not while our end waits behind DATA for window, or for the
            # turn's flush: the stream goes once that is out, see _flush.)
            self._release(state)

    def _on_stream_reset(self, event: h2.events.StreamReset, events: list[Event]) -> None:
        state = self._streams.get(event.stream_id)
        if state is None:
            return
        self._release(state)
        code = int(event.error_code) if event.error_code is not None else 0
        events.append(StreamClosed(event.stream_id, code, f"reset by peer (error code {code})", by_peer=True))

    def _on_window_updated(self, event: h2.events.WindowUpdated, events: list[Event]) -> None:
        if event.stream_id:
            # (One waiting for the connection's window still waits: the update is no use to it.)
            state = self._blocked.on_stream.get(event.stream_id)
            if state is not None:
                self._flush_waiting(state, events)
        else:
            self._flush_blocked(events)

    def _on_remote_settings(self, event: h2.events.RemoteSettingsChanged, events: list[Event]) -> None:
        self.handshake_complete = True
        if _SETTINGS.INITIAL_WINDOW_SIZE in event.changed_settings:
            # Every stream's window moved: each one waiting for its own is tried (if the
            # connection's is shut, it moves to the streams waiting for that one).
            for state in list(self._blocked.on_stream.values()):
                self._flush_waiting(state, events)

    def _on_ping_ack(self, event: h2.events.PingAckReceived, events: list[Event]) -> None:
        events.append(PingAcknowledged(event.ping_data))

    def _on_terminated(self, event: h2.events.ConnectionTerminated, events: list[Event]) -> None:
        if event.error_code == _NO_ERROR:
            # Graceful: streams up to last_stream_id still complete, in both directions.
            self._on_goaway(event.last_stream_id or 0, events)
            return
        code = int(event.error_code or 0)
        reason = f"peer sent GOAWAY {event.error_code!r}"
        if event.additional_data:  # what gRPC peers put there: "too_many_pings", ...
            reason += f" ({excerpt(event.additional_data.decode('latin-1'))})"
        # Even so, the streams above its last-stream-id were never processed (RFC 9113 §6.8).
        self._refuse_unprocessed(event.last_stream_id or 0, events)
        events.extend(self._connection_lost(code, reason))

    def _on_goaway(self, last_stream_id: int, events: list[Event]) -> None:
        """The peer sent a graceful GOAWAY (subclasses add what it means for their side)."""
        events.append(GoAwayReceived(last_stream_id))

    def _refuse_unprocessed(self, last_stream_id: int, events: list[Event]) -> None:
        """A GOAWAY said the streams we opened above ``last_stream_id`` were never processed
        (a client's: subclasses end them as refused, safe to try again)."""

    # -- stream bookkeeping ----------------------------------------------------------

    def _open_stream(self, stream_id: int, recv_encoding: str | None) -> StreamState:
        state = StreamState(stream_id, MessageDecoder(self.config.max_receive_message_length), recv_encoding)
        self._streams[stream_id] = state
        return state

    def _give_back(self, state: StreamState) -> None:
        """What a stream that ends held of incomplete and inflated messages is free again."""
        self._partial_bytes -= state.partial
        self._inflated_bytes -= state.inflated
        if self._shared_budget is not None:
            self._shared_budget.used -= state.partial + state.inflated

    def _release(self, state: StreamState) -> None:
        """Forget a finished stream, returning any window its unread messages held."""
        stream_id = state.stream_id
        if self._streams.pop(stream_id, None) is not None:
            if state.partial or state.inflated:  # (rarely: a call that ended holding messages)
                self._give_back(state)
            if state.queued > _FREE_MESSAGES:
                self._count_queued(_FREE_MESSAGES - state.queued)
            finished = self._finished
            if stream_id not in finished:  # (else licences it took while open: see _reset_licensed)
                # _late_resets(state), inline: this runs once per call.
                finished[stream_id] = 1 + state.messages_flushed + state.messages + (state.bytes_taken >> 14)
            if len(finished) > _LATE_RESETS:
                finished.popitem(last=False)  # O(1); a dict's oldest key costs a scan past its holes
        if state.blocked is not None:
            del state.blocked[stream_id]
            state.blocked = None
        self._dirty.pop(stream_id, None)
        self._consumed.pop(stream_id, None)
        peer_done = state.remote_closed
        state.local_closed = state.remote_closed = True
        returned = state.unacked + state.consumed
        if returned:
            # The peer may still send if it had not ended the stream (a response we gave up
            # on without a reset): then the stream's window too.
            self._h2.acknowledge_data(returned, stream_id, peer_done)
            state.unacked = state.consumed = 0

    def _abort(self, state: StreamState, status: Status, message: str, events: list[Event]) -> None:
        """End a stream because of something the peer sent; subclasses answer it."""
        raise NotImplementedError

    @property
    def open_streams(self) -> int:
        """How many streams are in progress."""
        return len(self._streams)

    @property
    def induced_frames(self) -> int:
        """Frames sent so far only to answer the peer's (ACKs, resets): see
        ``Configuration.max_pending_induced_frames``."""
        return self._h2.induced_frames

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of an open stream, or :class:`StreamGone`."""
        state = self._streams.get(stream_id)
        if state is None:
            raise StreamGone(stream_id)
        return state

    def sender_state(self, stream_id: int) -> StreamState:
        """The stream's state, for a sender that appends to its ``pending`` itself (see
        :attr:`StreamState.pending`); if the stream is gone already, a closed one."""
        state = self._streams.get(stream_id)
        return _GONE if state is None else state

    # -- output ----------------------------------------------------------------------

    def acknowledge(self, stream_id: int, size: int) -> bool:
        """The application consumed a message (one call per message): give its bytes of
        window back to the peer. It no longer counts as held for the application.

        They are handed to h2 at the next :meth:`flush_streams`, together (per message, h2's
        bookkeeping was a quarter of a bidi echo's CPU). True when that flush is still to be
        arranged; False when an earlier call since the last flush did so already.
        """
        state = self._streams.get(stream_id)
        if state is None or not size:
            return False  # released streams returned their window already
        queued = state.queued
        if queued > _FREE_MESSAGES:
            self._partial_limit += _MESSAGE_OVERHEAD  # _count_queued(-1), inline: once per message
        state.queued = queued - 1
        state.unacked -= size
        state.consumed += size
        if state.consumed == size:
            self._consumed[stream_id] = state
            return True
        return False

    def send_message(self, stream_id: int, payload: bytes, compress_message: bool = True, end: bool = False) -> bool:
        """Queue one message for the next :meth:`flush_streams`; False: the sender should wait.
        ``end``: our side of the stream ends with it (the client's half-close, on its frame).

        The message is compressed with the stream's send encoding, if it has one, unless
        ``compress_message`` is False (then it goes out with the compressed flag clear); if
        compressing fails, :class:`MessageRejected` says with what status the call must end.

        Messages queued in one loop turn leave together, packed into as few DATA frames as
        the frame size allows: streaming costs a few byte appends per message, not an h2
        frame. Once more than ``max_send_buffer_size`` bytes wait on the stream, the sender
        is asked to wait for :class:`StreamWritable`.
        """
        state = self._streams.get(stream_id)
        if state is None or state.local_closed:
            raise StreamGone(stream_id)
        flag = 0
        if state.send_encoding is not None and compress_message:
            try:
                compressed = compress(state.send_encoding, payload)
            except Exception as exc:  # unregistered meanwhile, or the encoding's own failure
                message = f"could not compress the message with {state.send_encoding}: {exc}"
                raise MessageRejected(Status.INTERNAL, message) from None
            state.bytes_taken += len(payload) - len(compressed)
            payload = compressed
            flag = 1
        pending = state.pending
        size = len(payload)
        if not pending:
            if (end or size >= self._max_send_buffer) and self._send_now(stream_id, flag, payload, end):
                self._messages_out += 1
                state.messages_flushed += 1
                state.bytes_taken += 5 + size  # (as if queued and taken)
                if end:
                    state.local_closed = True
                    self._local_ended(state)
                if size < self._max_send_buffer:
                    return True
                # Sent, but as large as the send buffer: its sender waits for the flush to say
                # so (StreamWritable), as if it had been queued, so that a stream of large
                # messages still yields and feels the transport's backpressure.
                self._dirty[stream_id] = state
                state.over_limit = True
                return False
            # Else the stream is queued already: for this turn's flush, or for window.
            self._dirty[stream_id] = state
        pending += SMALL_PREFIXES[size] if size < 256 and not flag else pack_prefix(flag, size)
        pending += payload
        state.messages += 1
        if end:
            state.pending_trailers = []  # END_STREAM rides on the last frame (see _flush)
            state.local_closed = True  # no more messages may be queued behind the end
        if len(pending) > self._max_send_buffer:
            state.over_limit = True
            return False
        return True

    def _send_now(self, stream_id: int, flag: int, payload: bytes, end: bool) -> bool:
        """Hand a message with nothing queued before it to h2 at once, if the windows hold
        all of it; ``end`` sets END_STREAM on its last frame. False: it must wait its turn in
        the queue. For a client's request with its end (a unary call's), one DATA frame
        written now, not a queue to flush later; for a large message one copy, into the
        frames, and not first into the stream's queue (for 1 MiB a tenth of the server's CPU:
        each fresh buffer costs its page faults too)."""
        h2conn = self._h2
        size = len(payload) + 5
        if size > min(h2conn.outbound_flow_control_window, h2conn.streams[stream_id].outbound_flow_control_window):
            return False
        h2conn.send_data_frames(stream_id, payload, h2conn.max_outbound_frame_size, end, pack_prefix(flag, size - 5))
        return True

    @property
    def has_queued_data(self) -> bool:
        """Whether :meth:`flush_streams` has anything to do."""
        return bool(self._dirty or self._consumed)

    def flush_streams(self) -> list[Event]:
        """Hand the DATA queued since the last call to h2, as far as flow control allows, and
        give back the window of the messages consumed meanwhile."""
        if self._consumed:
            consumed, self._consumed = self._consumed, {}
            for stream_id, state in consumed.items():
                size, state.consumed = state.consumed, 0
                self._h2.acknowledge_data(size, stream_id, state.remote_closed)
        events: list[Event] = []
        dirty, self._dirty = self._dirty, {}
        for state in dirty.values():
            if state.blocked is None and state.stream_id in self._streams:
                self._flush(state, events)
        return events

    def _flush(self, state: StreamState, events: list[Event]) -> bool:
        """Send as much pending DATA as the windows allow; then the end of the stream, if queued.

        A half-close (the client's end: no trailers) queued behind the data rides on its last
        frame as END_STREAM, so a unary request is HEADERS + one DATA frame, not a third, empty one.
        """
        stream_id = state.stream_id
        pending = state.pending
        h2conn = self._h2
        stream_window = h2conn.streams[stream_id].outbound_flow_control_window
        window = min(h2conn.outbound_flow_control_window, stream_window)
        size = len(pending)
        frame_size = h2conn.max_outbound_frame_size
        trailers = state.pending_trailers
        end_with_data = trailers is not None and not trailers and size > 0
        sent = min(size, max(window, 0))
        if sent and state.messages:  # (they go out now, or with what follows them)
            self._messages_out += state.messages
            state.messages_flushed += state.messages
            state.messages = 0
        if sent == size:
            if size:  # (the common case: all of it, usually one frame)
                h2conn.send_data_frames(stream_id, pending, frame_size, end_with_data)
        elif sent:
            with memoryview(pending) as view:
                h2conn.send_data_frames(stream_id, view[:sent], frame_size, False)
        if sent < size:
            del pending[:sent]
            state.bytes_taken += sent
            # Whichever window ran out: the stream's own first (if both did, the stream's
            # update moves it on, to wait for the connection's if that is still shut).
            blocked = self._blocked
            table = blocked.on_stream if stream_window <= sent else blocked.on_connection
            if state.blocked is not table:
                if state.blocked is not None:
                    del state.blocked[stream_id]
                table[stream_id] = state
                state.blocked = table
            return False
        state.bytes_taken += size
        state.pending = bytearray()
        if state.blocked is not None:
            del state.blocked[stream_id]
            state.blocked = None
        if trailers is not None:
            state.pending_trailers = None
            if end_with_data:
                self._local_ended(state)  # END_STREAM went out on the last frame
            else:
                self._end_local_now(state, trailers)
        if state.over_limit:  # also when the end went out behind the data: its sender waits
            state.over_limit = False
            events.append(StreamWritable(stream_id))
        return True

    def _flush_blocked(self, events: list[Event]) -> None:
        """The connection's window opened: the streams waiting for it go, in the order they
        got blocked, as far as it goes. Each one tried leaves the table (sent, or now waiting
        for its own window) or shuts the window: the walk never sees a stream it cannot move."""
        waiting = self._blocked.on_connection
        h2conn = self._h2
        while waiting and h2conn.outbound_flow_control_window > 0:
            self._flush_waiting(next(iter(waiting.values())), events)

    def _flush_waiting(self, state: StreamState, events: list[Event]) -> None:
        """:meth:`_flush` a stream waiting for window, from the events of a read that gave it:
        if the peer reset the stream later in that read (a window given and the call cancelled
        in one write), h2 has closed it already and its reset, among the events still to come,
        ends it: nothing more goes out on it, and it waits no more."""
        if self._h2_open(state.stream_id):
            self._flush(state, events)
            return
        state.bytes_taken += len(state.pending)
        state.pending = bytearray()
        if state.blocked is not None:
            del state.blocked[state.stream_id]
            state.blocked = None

    def end_local(self, stream_id: int, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        """End our side of the stream, after any DATA still waiting for window.

        ``trailers`` go out as a HEADERS frame with END_STREAM (the server's status); an
        empty list ends the stream with an empty DATA frame (the client's half-close).
        """
        self._end_local(self.stream_state(stream_id), trailers)

    def _end_local(self, state: StreamState, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        if state.local_closed:
            raise StreamGone(state.stream_id)
        if state.pending:
            state.pending_trailers = trailers
            state.local_closed = True  # no more messages may be queued behind the end
            self._dirty[state.stream_id] = state
            return
        self._end_local_now(state, trailers)

    def _end_local_now(self, state: StreamState, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        if trailers:
            self._send_trailers(state.stream_id, trailers)
        else:
            self._h2.end_stream(state.stream_id)
        state.local_closed = True
        self._local_ended(state)

    def _send_trailers(self, stream_id: int, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        """HEADERS with END_STREAM (subclasses may encode them their own way)."""
        self._h2.send_headers(stream_id, trailers, end_stream=True)

    def _local_ended(self, state: StreamState) -> None:
        """Our side of the stream is done (subclasses decide what that means for it)."""
        raise NotImplementedError

    def _stop_peer_sending(self, stream_id: int) -> None:
        """RST_STREAM NO_ERROR if the peer has not half-closed the stream.

        Asks h2, not our own flag: END_STREAM may have arrived in the very batch of frames
        whose events are being handled, ahead of the StreamEnded event that tells us.
        """
        if self._h2_open(stream_id):
            self._h2.reset_stream(stream_id, _NO_ERROR)

    def _h2_open(self, stream_id: int) -> bool:
        """Whether h2 still has the stream open: frames later in the read being handled may
        have ended or reset it before its events reach us."""
        return self._h2.stream_open(stream_id)

    def reset_for_peer_fault(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM for a request the peer got wrong; counted like a reset the peer sends.

        Nothing if the peer reset the stream itself later in the same read (its reset counted)."""
        if self._h2_open(stream_id):
            self._h2.reset_stream(stream_id, error_code)
            self._guard.count_reset()

    def share_receive_budget(self, budget: ReceiveBudget) -> None:
        """Count this connection's incomplete and inflated messages in ``budget`` too."""
        self._shared_budget = budget
        budget.used += self._partial_bytes + self._inflated_bytes

    def share_reset_budget(self, budget: AddressBudget) -> None:
        """Count this connection's resets in its peer address's ``budget`` too."""
        self._guard.share_resets(budget)

    def forgive_reset(self) -> None:
        """The peer's last reset cancelled a call that was served: see FrameGuard.forgive_reset."""
        self._guard.forgive_reset()

    def cancel_stream(self, stream_id: int) -> None:
        """Abort a call with RST_STREAM CANCEL (the peer sees CANCELLED)."""
        self.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abort a stream with RST_STREAM."""
        state = self._streams.get(stream_id)
        if state is None:
            return
        self._h2.reset_stream(stream_id, error_code)
        self._release(state)

    def ping(self, data: bytes) -> None:
        """Send a PING with 8 bytes of opaque data."""
        self._h2.ping(data)
        self._guard.ping_sent()

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """Queue a GOAWAY frame without closing h2's state machine.

        h2's ``close_connection()`` would leave it unable to serve the streams a graceful
        GOAWAY promises to finish, so the frame is built and queued by hand.
        """
        self._h2.queue_goaway(last_stream_id, error_code)

    def transport_lost(self) -> None:
        """The bytes stopped (the socket closed or failed) before the connection was closed:
        forget its streams, giving back what they held of a shared budget."""
        if not self.closed:
            self._connection_lost(0, "the connection was lost")

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Close the connection at once with a final GOAWAY."""
        if self.closed:
            return
        self._h2.close_connection(error_code)
        self._connection_lost(error_code, reason)

    def data_to_send(self) -> bytearray:
        """Everything queued for the peer since the last call, in one buffer.

        The buffer itself is handed over, not a copy (h2's ``data_to_send`` copies it, a
        megabyte per large message): the caller owns it, and nothing here touches it again.
        """
        output = self._h2.take_output()
        return output if isinstance(output, bytearray) else bytearray().join(output)

    def take_output(self) -> bytearray | list[bytes | bytearray | memoryview]:
        """What :meth:`data_to_send` returns, for a transport that writes lists of buffers
        (``writelines``): a large message's payload is not copied but listed, as views of
        it, between its frame headers. A list only when there is such a payload."""
        return self._h2.take_output()


def _keep(pieces: list[bytes | bytearray | memoryview], data: bytes) -> None:
    """Keep ``data`` (bytes of an incomplete frame) as it came, or if small, in a bytearray
    with the small pieces before it: the heap a frame cut into tiny reads holds stays within a
    small factor of its bytes (see framing._SMALL_PIECE)."""
    if len(data) >= _SMALL_PIECE:
        pieces.append(data)
    elif pieces and type(pieces[-1]) is bytearray:
        pieces[-1] += data
    else:
        pieces.append(bytearray(data))


class _Blocked:
    """A connection's streams with DATA waiting for window, in the order they got blocked:
    for the connection's (their own has room), and for their own (whatever the
    connection's). A connection WINDOW_UPDATE walks the first only, from its front, as far
    as the window goes (an OrderedDict: a dict's first key costs a scan past its holes); a
    stream's own moves just that stream (see GrpcConnection._flush)."""

    __slots__ = ("on_connection", "on_stream")

    def __init__(self) -> None:
        self.on_connection: dict[int, StreamState] = collections.OrderedDict()
        self.on_stream: dict[int, StreamState] = {}


class Compressed(bytes):
    """A received message still compressed (with ``encoding``): inflate it with
    :meth:`GrpcConnection.inflate` when the application takes it."""

    encoding: str

    def __new__(cls, payload: bytes, encoding: str) -> Compressed:
        """``payload`` as sent, compressed with ``encoding``."""
        message = super().__new__(cls, payload)
        message.encoding = encoding
        return message


class MessageRejected(Exception):
    """A received message cannot be handed over; the call ends with ``status``."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
