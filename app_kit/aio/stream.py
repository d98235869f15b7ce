"""The server side of one call, as its handler sees it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Generic, Protocol, TypeVar

from ..rpc.call_state import TERMINAL, CallInput, CallState, transition
from ..rpc.codecs import CodecBase, StatusDetailsCodecBase
from ..rpc.compression import IDENTITY, get_encoding
from ..rpc.connection import StreamGone, StreamState
from ..rpc.deadline import Deadline
from ..rpc.framing import SMALL_PREFIXES, pack_prefix
from ..rpc.handlers import Handler
from ..rpc.metadata import Metadata, MetadataLike, encode_grpc_message, encode_metadata
from ..rpc.server import ServerConnection
from ..rpc.status import GRPCError, ProtocolError, Status
from .call import Call, Host, Peer
from .hooks import InterceptorChain, run_hooks

__all__ = ["Peer", "Stream"]

RecvT = TypeVar("RecvT")
SendT = TypeVar("SendT")

# The states and inputs the hot paths use, looked up once: an Enum member read off its class
# costs Python 3.11 a __getattr__ hook (~65 ns, more than the rest of a check).
_OPEN, _STREAMING, _CANCELLED, _ENDED = CallState.OPEN, CallState.STREAMING, CallState.CANCELLED, CallState.ENDED
_SEND_HEADERS, _SEND_REPLY, _SEND_STATUS = CallInput.SEND_HEADERS, CallInput.SEND_REPLY, CallInput.SEND_STATUS
_STREAM, _CANCEL = CallInput.STREAM, CallInput.CANCEL
_OK = Status.OK


class CallHost(Host, Protocol):
    """What a :class:`Stream` needs of the connection it runs on (the server's protocol)."""

    connection: ServerConnection

    def flush_call_end(self) -> None:
        """A call's status is queued: write it now, or with others this turn."""

    async def writable(self) -> None:
        """Wait while the transport's buffer is full."""


class Stream(Call[RecvT, SendT], Generic[RecvT, SendT]):
    """One call on the server: receive requests, send replies, end with a status.

    Initial metadata goes out with the first message unless sent earlier; trailers (status
    OK) go out when the handler returns, unless it sent them itself. Each message received
    gives its flow-control window back only when :meth:`recv_message` hands it over, so a
    handler that stops reading makes the client wait instead of making the server buffer.
    """

    __slots__ = (
        "_closed_reason",
        "_dispatched",
        "_log_fields",
        "_max_send_buffer",
        "_plain_type",
        "_reply_encoding",
        "_server_streaming",
        "_state",
        "_status_details_codec",
        "_status_queued",
        "_trailers",
        "_wire",
        "accepted_encodings",
        "deadline",
        "metadata",
        "method",
        "peer",
        "request_encoding",
        "user_agent",
    )

    _SENDS = "reply"
    _connection: ServerConnection
    _protocol: CallHost
    _wire: StreamState  # a server stream's, from its first reply on (send_message's fast path)
    _max_send_buffer: int

    def __init__(
        self,
        protocol: CallHost,
        stream_id: int,
        handler: Handler,
        method: str,
        metadata: Metadata,
        user_agent: str | None,
        deadline: Deadline | None,
        peer: Peer,
        codec: CodecBase,
        status_details_codec: StatusDetailsCodecBase | None,
        reply_encoding: str | None,
        request_encoding: str | None = None,
        accepted_encodings: frozenset[str] = frozenset(),
        interceptors: InterceptorChain | None = None,
    ) -> None:
        cardinality = handler.cardinality
        connection = protocol.connection
        Call.__init__(
            self,
            method,
            cardinality,
            codec,
            handler.request_type,
            handler.reply_type,
            connection.config.max_send_message_length,
            interceptors,
            not cardinality.client_streaming,
        )
        self._protocol = protocol
        self._connection = connection
        self._stream_id = stream_id
        # Looked up once: send_message runs per message on the hot path.
        self._server_streaming = cardinality.server_streaming
        self._status_details_codec = status_details_codec
        self._reply_encoding = reply_encoding
        #: ``/package.Service/Method`` of the call.
        self.method = method
        #: Request metadata: lower-case keys; ``-bin`` values as bytes.
        self.metadata = metadata
        #: The client's ``user-agent``, if it sent one.
        self.user_agent = user_agent
        #: When the client stops waiting, if it set a timeout.
        self.deadline = deadline
        #: The client's end of the connection.
        self.peer = peer
        #: The ``grpc-encoding`` the client compresses its messages with (``"identity"``: none).
        #: Each message may still come uncompressed: see :attr:`last_message_compressed`.
        self.request_encoding = request_encoding or IDENTITY
        #: The encodings the client reads (its ``grpc-accept-encoding``).
        self.accepted_encodings = accepted_encodings
        self._trailers: list[tuple[bytes, bytes]] = []
        self._state = _OPEN
        #: Its handler started running (a reset now is a cancellation, not a rapid reset).
        self._dispatched = False
        #: Why a CANCELLED call ended (said to a handler that goes on using it).
        self._closed_reason: str | None = None
        #: Its handler is done and its status waits behind its replies for the client's
        #: window; the interceptors hear of its end when that settles (ServerProtocol._settle).
        self._status_queued = False
        self._log_fields: dict[str, object] | None = None  # (see log_fields)
        self._started_at = time.perf_counter()  # not loop.time(): uvloop's ticks in milliseconds

    # -- receiving -------------------------------------------------------------------

    async def recv_message(self) -> RecvT | None:
        """The next request message, or None once the client has finished sending.

        On a unary-request method, the first call returns the request and later calls None.
        """
        if self._recv_done:
            return None
        if not self._queue:
            await self._arrival()
        return self._take(self._queue.popleft())

    def __aiter__(self) -> AsyncIterator[RecvT]:
        return self

    async def __anext__(self) -> RecvT:
        # recv_message's body again: one coroutine per message instead of an async
        # generator driving a second one.
        if not self._recv_done:
            if not self._queue:
                await self._arrival()
            message = self._take(self._queue.popleft())
            if message is not None:
                return message
        raise StopAsyncIteration

    def _end_taken(self) -> None:
        if self._one_message:
            raise GRPCError(Status.INTERNAL, "the client half-closed the call without sending a request")

    def _undecodable(self) -> GRPCError:
        name = getattr(self._recv_type, "__name__", repr(self._recv_type))
        return GRPCError(Status.INTERNAL, f"could not decode the request message as {name}")

    # -- sending ---------------------------------------------------------------------

    @property
    def response_encoding(self) -> str:
        """The encoding replies are compressed with (``"identity"``: none)."""
        return self._reply_encoding or IDENTITY

    def set_compression(self, encoding: str | None) -> str:
        """Compress this call's replies with ``encoding`` (None or ``"identity"``: don't).

        Only before the response headers go out (with the first reply, or
        :meth:`send_initial_metadata`). An encoding the client did not list in its
        ``grpc-accept-encoding`` is not used: replies then go uncompressed, as gRPC requires.
        Returns the encoding in effect; raises :class:`ValueError` for an encoding that is not
        registered. One message can still be sent uncompressed: ``send_message(m, compress=False)``.
        """
        if self._state is not _OPEN:
            transition(self._state, _SEND_HEADERS, self._closed_reason)  # raises: headers sent or call over
        if encoding is None or encoding == IDENTITY:
            self._reply_encoding = None
        else:
            get_encoding(encoding)
            self._reply_encoding = encoding if encoding in self.accepted_encodings else None
        return self.response_encoding

    async def send_initial_metadata(self, *, metadata: MetadataLike | None = None) -> None:
        """Send the response headers with ``metadata``, ahead of any message."""
        fields = encode_metadata(metadata)
        self._state = transition(self._state, _SEND_HEADERS, self._closed_reason)
        self._connection.send_response_headers(self._stream_id, fields, self._reply_encoding)
        self._protocol.schedule_flush()
        await self._protocol.writable()

    async def send_message(self, message: SendT, *, compress: bool = True) -> None:
        """Send one reply message, waiting while the client's flow-control window is full.

        In a compressed call (see :meth:`set_compression`), ``compress=False`` sends this
        message uncompressed (grpcio's ``disable_next_message_compression``).
        """
        if self._state is _STREAMING and type(message) is self._plain_type:
            # A server stream past its first reply, no hook and the type's own serializer:
            # what the general path below does for it, without its checks that cannot fail.
            encode = self._encode_exact  # (read first: self._encode_exact(...) is a slow LOAD_METHOD)
            data = encode(message)  # type: ignore[misc]  # (not None: see _plain_type)
        else:
            if self._send_hooks:
                if self._state in TERMINAL:  # no hook runs after the call ended: raise as sending would
                    transition(self._state, CallInput.SEND_REPLY, self._closed_reason)
                message = run_hooks(self._send_hooks, self, message)
            encode_exact = self._encode_exact
            if encode_exact is not None and type(message) is self._send_type:
                data = encode_exact(message)
            else:
                data = self._encode(message, self._send_type)
            if self._state is not _STREAMING:
                self._before_reply(data)
                ready = self._put(data, compress)
                protocol = self._protocol
                if ready and not protocol.write_paused:
                    return  # the common case: no second coroutine per message
                await protocol.drain(self._stream_id, ready)
                self._raise_if_over()
                return
        size = len(data)
        if size > self._max_send:
            self._raise_too_large(data)
        wire = self._wire
        pending = wire.pending
        if pending and wire.send_encoding is None and not wire.local_closed:
            # Past the first reply, with earlier ones still queued (their flush is
            # arranged): this one joins them here, as the connection's send_message
            # would (see StreamState.pending), without two calls per message. (Counted
            # there alone: see _counted_by.)
            pending += SMALL_PREFIXES[size] if size < 256 else pack_prefix(0, size)
            pending += data
            wire.messages += 1
            protocol = self._protocol
            # (A comparison that is jumped on, not stored: 3.11 specializes only that one.)
            if len(pending) <= self._max_send_buffer:
                if not protocol.write_paused:
                    return
                ready = True
            else:
                wire.over_limit = True
                ready = False
            await protocol.drain(self._stream_id, ready)
            self._raise_if_over()
            return
        ready = self._put(data, compress)
        protocol = self._protocol
        if ready and not protocol.write_paused:
            return
        await protocol.drain(self._stream_id, ready)
        self._raise_if_over()

    def set_trailing_metadata(self, metadata: MetadataLike) -> None:
        """Metadata to send in the trailers whenever the call ends: when the handler returns,
        raises :class:`GRPCError`, or calls :meth:`send_trailing_metadata` (whose own metadata
        goes after it). Replaces what an earlier call set; invalid metadata raises here."""
        self._trailers = encode_metadata(metadata, trailers=True)

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        """End the call with ``status`` (and its message, rich details and trailing metadata)."""
        self._send_status(status, status_message, status_details, metadata)

    def _send_status(
        self, status: Status, status_message: str | None, status_details: Any, metadata: MetadataLike | None
    ) -> None:
        """What send_trailing_metadata does (the server's own end of a call, without its coroutine)."""
        ended = transition(self._state, _SEND_STATUS, self._closed_reason)
        if type(status) is not Status:
            status = Status(status)  # (an int)
        if status is _OK and not self._sent and not self._server_streaming:
            raise ProtocolError(f"{self.method} is unary: a reply message must be sent before status OK")
        if status_message is not None and not isinstance(status_message, str):
            raise TypeError(f"status_message must be a str, not {type(status_message).__name__}")
        # Everything that can fail is done before the call counts as answered.
        fields = encode_metadata(metadata, trailers=True)
        if self._trailers:
            fields = self._trailers + fields
        details = None
        if status_details and self._status_details_codec is not None:
            details = self._status_details_codec.encode(status, status_message, status_details)
            if status_message and len(status_message) + len(details) > 1024:  # (only then can they not fit)
                status_message, details = self._fit_status(status, status_message, status_details, details, fields)
        self._state = ended
        self._status, self._status_message = status, status_message
        try:
            self._connection.send_status(self._stream_id, status, status_message, details, fields)
        except StreamGone:
            # Reset meanwhile: nobody is there to read the status.
            self._status, self._status_message = Status.CANCELLED, "the stream was reset"
            return
        except Exception:
            self._end_now(Status.INTERNAL, "Internal error: the status could not be sent")
            raise
        self._protocol.flush_call_end()

    def _fit_status(
        self, status: Status, message: str, status_details: Any, details: bytes, fields: list[tuple[bytes, bytes]]
    ) -> tuple[str, bytes]:
        """The message cut, and the details encoded again with it (they carry the message too,
        and must agree with grpc-message), so that both fit the trailers the client takes."""
        room = self._connection.status_room(fields)
        codec = self._status_details_codec
        assert codec is not None
        for _ in range(4):  # each pass cuts by the share over: the second nearly always fits
            size = len(encode_grpc_message(message)) + (len(details) * 4 + 2) // 3
            if size <= room or not message:
                break
            message = message[: int(len(message) * room / size) - 1].rstrip(" ")
            details = codec.encode(status, message, status_details)
        return message, details

    async def cancel(self) -> None:
        """Abort the call with RST_STREAM CANCEL; the client sees CANCELLED."""
        if self.closed:
            return
        self._on_closed("cancelled by the server")
        self._connection.cancel_stream(self._stream_id)
        self._protocol.schedule_flush()

    # -- state -----------------------------------------------------------------------

    @property
    def log_fields(self) -> dict[str, object]:
        """Fields the access log puts on this call's record, set by interceptors (the
        application's own, or :class:`~app_kit.observe.otel.ServerTracing`'s ``trace_id`` and
        ``span_id``, which correlate the line with the call's trace). Empty unless set."""
        fields = self._log_fields
        if fields is None:  # (made only when used: most calls never need one)
            fields = self._log_fields = {}
        return fields

    @property
    def closed(self) -> bool:
        """Whether the call is over: status sent, or the stream reset."""
        return self._state in TERMINAL

    def _before_reply(self, data: bytes) -> None:
        """What send_message checks and does, except in a server stream past its first reply."""
        state = self._state
        replying = transition(state, _SEND_REPLY, self._closed_reason)
        if self._sent and not self._server_streaming:
            raise ProtocolError(f"{self.method} is unary: it sends exactly one reply message")
        if len(data) > self._max_send:
            self._raise_too_large(data)
        if state is _OPEN:
            self._connection.send_response_headers(self._stream_id, [], self._reply_encoding)
        self._sent += 1
        if self._server_streaming:
            # From now on a server stream checks one state per message (only its end changes
            # it), and its messages may join the stream's queue themselves (see send_message).
            connection = self._connection
            self._wire = self._counted_by = connection.sender_state(self._stream_id)
            self._max_send_buffer = connection.config.max_send_buffer_size
            # The type of the replies that take send_message's shortest path from now on: no
            # hook to run, the codec's own serializer (None: none do).
            self._plain_type = None if self._send_hooks or self._encode_exact is None else self._send_type
            self._state = transition(replying, _STREAM)
        else:
            self._state = replying

    def _end_now(self, status: Status, message: str) -> None:
        """End the call at once with a status that cannot fail to encode (dropping what is
        queued), unless it was cancelled; also after its own status failed to go out."""
        if self._state is _CANCELLED:
            return
        self._state = _ENDED
        if not self._connection.end_now(self._stream_id, status, message):
            # Reset by the client in the read being handled: it got no status (interceptors,
            # metrics and the access log record what it saw).
            status, message = Status.CANCELLED, f"reset by peer ({message})"
        self._status, self._status_message = status, message
        self._protocol.flush_call_end()

    _fail = _end_now  # a message that cannot be taken or sent ends the call, whatever its handler does

    def _raise_if_over(self) -> None:
        if self._state is _CANCELLED:
            raise GRPCError(Status.CANCELLED, f"the call is over: {self._closed_reason}")

    # -- called by the connection ----------------------------------------------------

    def _on_closed(self, reason: str, status: Status | None = None) -> None:
        """The call is over from outside its handler (reset, deadline, the connection's end);
        ``status``: what the core answered it with, if it did, or DEADLINE_EXCEEDED for a reset
        that came once the deadline had passed (else it was cancelled)."""
        if self._state is not _ENDED and self._closed_reason is None:
            self._closed_reason = reason
            self._status, self._status_message = status or Status.CANCELLED, reason
        self._state = transition(self._state, _CANCEL)
        self._wake()

    def __repr__(self) -> str:
        return f"<Stream {self._stream_id} {self.method}>"
