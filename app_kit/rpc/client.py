"""The client side of the core: request heads, response and trailer parsing."""

from __future__ import annotations

import base64
import binascii
from typing import ClassVar

import h2.errors
import h2.events

from ..wire.config import Configuration
from ..wire.h2_internals import MalformedResponse, MalformedTrailers, oversized_list_size
from ..wire.header_block import HeaderBlockEncoder
from .compression import accept_encoding
from .connection import GrpcConnection, StreamState
from .deadline import encode_grpc_timeout
from .events import Event, ResponseEnded, ResponseStarted, StreamClosed
from .metadata import decode_grpc_message, excerpt
from .status import Status

__all__ = ["ClientConnection", "status_for_http", "status_for_reset"]

_AFTER_GRPC_TYPE = (b"", b"+", b";")  # what may follow b"application/grpc" in a response's content-type

_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
_LIMIT_BEFORE_SETTINGS = 100
# By the grpc-status value's bytes: Status(int(...)) is a parse and an enum lookup per call.
_STATUS_BY_CODE = {str(code).encode("ascii"): Status(code) for code in range(17)}
_TE_FIELD = (b"te", b"trailers")
_OK = Status.OK  # (an Enum member read off its class costs a __getattr__ hook on 3.11)
_MAX_HEADS = 256
_CANCEL = h2.errors.ErrorCodes.CANCEL
_REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_LAST_STREAM_ID = 2**31 - 1  # RFC 9113 §5.1.1: a client's ids are odd, none above it

# gRPC's mapping of HTTP statuses for responses that are not gRPC (http-grpc-status-mapping.md).
_HTTP_TO_STATUS = {
    400: Status.INTERNAL,
    401: Status.UNAUTHENTICATED,
    403: Status.PERMISSION_DENIED,
    404: Status.UNIMPLEMENTED,
    429: Status.UNAVAILABLE,
    502: Status.UNAVAILABLE,
    503: Status.UNAVAILABLE,
    504: Status.UNAVAILABLE,
}
# ... and of RST_STREAM error codes (PROTOCOL-HTTP2.md, "Errors").
_RESET_TO_STATUS = {
    int(h2.errors.ErrorCodes.REFUSED_STREAM): Status.UNAVAILABLE,
    int(h2.errors.ErrorCodes.CANCEL): Status.CANCELLED,
    int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM): Status.RESOURCE_EXHAUSTED,
    int(h2.errors.ErrorCodes.INADEQUATE_SECURITY): Status.PERMISSION_DENIED,
}


def status_for_http(http_status: int) -> Status:
    """The gRPC status of a response whose HTTP status is not 200."""
    return _HTTP_TO_STATUS.get(http_status, Status.UNKNOWN)


def status_for_reset(error_code: int) -> Status:
    """The gRPC status of a stream reset with ``error_code``."""
    return _RESET_TO_STATUS.get(error_code, Status.INTERNAL)


class ClientConnection(GrpcConnection):
    """A client's connection: starts calls and reports their responses."""

    _HANDLERS: ClassVar[dict[type, str]] = {
        **GrpcConnection._HANDLERS,
        h2.events.ResponseReceived: "_on_response",
        h2.events.TrailersReceived: "_on_trailers",
        MalformedResponse: "_on_malformed",
        MalformedTrailers: "_on_malformed",
        h2.events.InformationalResponseReceived: "_on_informational",
    }
    _client_side = True

    def __init__(self, config: Configuration, *, authority: str, scheme: str, user_agent: str) -> None:
        super().__init__(config, client_side=True)
        self._authority = authority.encode("ascii")
        self._scheme = scheme.encode("ascii")
        self._user_agent = user_agent.encode("ascii")
        # The request head is the same for every call of a method: its fields go into the
        # server's table once, and then the head is a few cached index bytes (see
        # HeaderBlockEncoder); the deadline and metadata follow it as literals.
        accept_field = (b"grpc-accept-encoding", accept_encoding())
        self._head_start = (
            (b":method", b"POST"),
            (b":scheme", self._scheme),
        )
        self._head_end = (
            (b":authority", self._authority),
            _TE_FIELD,
        )
        self._head_fields = ((b"user-agent", self._user_agent), accept_field)
        self._encoder = HeaderBlockEncoder(indexed=(self._head_end[0], _TE_FIELD, *self._head_fields))
        self._h2.use_encoder(self._encoder)
        self._heads: dict[tuple[str, bytes, str | None], tuple[tuple[bytes, bytes], ...]] = {}
        #: Why no new call may start here though calls in flight go on (the peer sent GOAWAY,
        #: our stream ids are spent); None while they may.
        self.draining: str | None = None

    @property
    def can_start_call(self) -> bool:
        """Whether a new call may start now (open, and under the peer's stream limit)."""
        limit = self._h2.peer_max_concurrent_streams
        if not self.handshake_complete:
            # h2 assumes no limit until the server's SETTINGS arrive; gRPC clients assume 100,
            # which every gRPC server allows, so a burst on a new connection is not refused.
            limit = min(limit, _LIMIT_BEFORE_SETTINGS)
        return not self.closed and not self.draining and len(self._streams) < limit  # h2's count walks every stream

    @property
    def carried_calls(self) -> bool:
        """Whether a call was ever started here."""
        return self._h2.highest_outbound_stream_id > 0

    def start_call(
        self,
        path: str,
        metadata: list[tuple[bytes, bytes]],
        *,
        timeout: float | None = None,
        encoding: str | None = None,
        content_type: bytes = b"application/grpc",
    ) -> int:
        """Send a request's HEADERS; return the new stream's id."""
        encoder = self._encoder
        head = self._heads.get((path, content_type, encoding))
        if head is None:
            head = self._request_head(path, content_type, encoding)
        block = encoder.encode_cached(head)
        if timeout is not None:
            block += encoder.encode(((b"grpc-timeout", encode_grpc_timeout(timeout).encode("ascii")),))
        if metadata:
            block += encoder.encode(metadata)
        stream_id = self._h2.start_stream(block, False, self._authority)
        if stream_id >= _LAST_STREAM_ID:
            # That was the last id: the connection drains, as after a GOAWAY, and new calls go
            # to a new one (grpc-core, grpc-go). Never a call h2 fails for want of an id.
            self.draining = "stream ids exhausted"
        state = self._open_stream(stream_id, None)
        state.send_encoding = encoding
        state.headers_sent = True
        return stream_id

    def _request_head(self, path: str, content_type: bytes, encoding: str | None) -> tuple[tuple[bytes, bytes], ...]:
        """The constant part of a method's request headers (pseudo-headers first, RFC 9113 §8.3)."""
        path_field = (b":path", path.encode("ascii"))
        content_type_field = (b"content-type", content_type)
        fields = [*self._head_start, path_field, *self._head_end, content_type_field, *self._head_fields]
        if encoding is not None:
            fields.append((b"grpc-encoding", encoding.encode("ascii")))
        head = tuple(fields)
        if len(self._heads) < _MAX_HEADS:  # beyond that many methods, built per call and literal
            self._heads[(path, content_type, encoding)] = head
            for field in head[2:]:
                self._encoder.allow_indexing(field)
        return head

    # -- responses -------------------------------------------------------------------

    def _on_informational(self, event: h2.events.InformationalResponseReceived, events: list[Event]) -> None:
        # gRPC has no use for 1xx responses, but one over our advertised limit fails its call
        # like any other response over it.
        state = self._streams.get(event.stream_id)
        size = oversized_list_size(event.headers or [])
        if state is not None and size is not None:
            self._header_list_too_large(state, "informational response", size, events)

    def _on_response(self, event: h2.events.ResponseReceived, events: list[Event]) -> None:
        state = self._streams.get(event.stream_id)
        if state is None:
            return
        headers = event.headers or []
        fields = dict(headers)
        raw_status = fields.get(b":status", b"")
        trailers_only = event.stream_ended is not None
        if raw_status != b"200":
            # Three ASCII digits (RFC 9110 §15), or no status: int() of a peer's bytes unchecked
            # is a ValueError past 4300 digits, and the connection's other calls went with it.
            http_status = int(raw_status) if len(raw_status) == 3 and raw_status.isdigit() else 0
            size = oversized_list_size(headers)  # it may have no :status: checked only when failing
            if size is not None:
                self._header_list_too_large(state, "response", size, events)
                return
            message = f"HTTP status {http_status or repr(excerpt(raw_status.decode('latin-1')))} from the server"
            self._end_response(state, status_for_http(http_status), message, None, headers, events)
            return
        content_type = fields.get(b"content-type", b"")
        # application/grpc, alone or with +subtype or ;parameters (not grpc-web, grpcx...).
        if not content_type.startswith(b"application/grpc") or content_type[16:17] not in _AFTER_GRPC_TYPE:
            size = oversized_list_size(headers)  # its :status only, then the marker
            if size is not None:
                self._header_list_too_large(state, "response", size, events)
                return
            message = f"unexpected content-type {content_type.decode('latin-1')!r} from the server"
            self._end_response(state, Status.UNKNOWN, message, None, headers, events)
            return
        encoding = fields.get(b"grpc-encoding")
        if encoding is not None and encoding != b"identity":
            # Kept even if we lack it: only a compressed message in it fails the call (when
            # inflated), as in grpc-go and grpc-core; a status alone, or uncompressed
            # messages, are the server's to give.
            state.recv_encoding = encoding.decode("latin-1")
        if trailers_only:
            # One HEADERS frame for the whole response: no initial metadata, these are the trailers.
            events.append(ResponseStarted(event.stream_id, []))
            self._on_trailer_fields(state, headers, events)
        else:
            events.append(ResponseStarted(event.stream_id, headers))

    def _on_trailers(self, event: h2.events.TrailersReceived, events: list[Event]) -> None:
        state = self._streams.get(event.stream_id)
        if state is not None:
            self._on_trailer_fields(state, event.headers or [], events)

    def _on_malformed(self, event: MalformedResponse | MalformedTrailers, events: list[Event]) -> None:
        # RFC 9113 §8.1.1: a malformed response is a stream error of type PROTOCOL_ERROR.
        state = self._streams.get(event.stream_id)
        if state is not None:
            message = f"malformed response from the server: {event.reason}"
            self._abort(state, Status.INTERNAL, message, events, _PROTOCOL_ERROR)

    def _on_trailer_fields(self, state: StreamState, headers: list[tuple[bytes, bytes]], events: list[Event]) -> None:
        fields = dict(headers)
        raw_status = fields.get(b"grpc-status")
        raw_message = fields.get(b"grpc-message")
        message = decode_grpc_message(raw_message) if raw_message else None
        # By table, never int(): a peer's digits may be more than int() takes (4300), and the
        # ValueError would end the connection. Only a code's own digits are that code.
        status = _STATUS_BY_CODE.get(raw_status) if raw_status is not None else None
        if status is None:
            size = oversized_list_size(headers)  # it has no grpc-status, so the check costs only here
            if size is not None:
                self._header_list_too_large(state, "trailer", size, events)
                return
            # A code from a newer spec or a broken peer: UNKNOWN, as gRPC says, keeping what came.
            if raw_status is None:
                shown = "missing in the trailers"
            else:
                text = raw_status.decode("latin-1")
                shown = (excerpt(text) if raw_status.isdigit() else repr(excerpt(text))) + " from the server"
            unknown = f"grpc-status {shown}" + (f": {message}" if message else "")
            self._end_response(state, Status.UNKNOWN, unknown, None, headers, events)
            return
        details = None
        raw_details = fields.get(b"grpc-status-details-bin")
        if raw_details is not None:
            try:
                details = base64.b64decode(raw_details + b"=" * (-len(raw_details) % 4))
            except binascii.Error:
                details = None
        self._end_response(state, status, message, details, headers, events)

    def _on_stream_ended(self, event: h2.events.StreamEnded, events: list[Event]) -> None:
        # Trailers and trailers-only responses ended the call already (the stream is gone): this
        # is END_STREAM on DATA, a response without trailers, so without a status (as grpc-go).
        state = self._streams.get(event.stream_id)
        if state is not None:
            message = "the server closed the stream without sending trailers"
            self._end_response(state, Status.INTERNAL, message, None, [], events)

    def _end_response(
        self,
        state: StreamState,
        status: Status,
        message: str | None,
        details: bytes | None,
        trailers: list[tuple[bytes, bytes]],
        events: list[Event],
    ) -> None:
        """The call's outcome is known: report it and forget the stream."""
        if state.decoder.buffered and status is _OK:
            status, message = Status.INTERNAL, "the response ended in the middle of a message"
        events.append(ResponseEnded(state.stream_id, status, message, details, trailers))
        state.remote_closed = True
        if not state.local_closed:
            # The server is done with the call; stop sending to it.
            stream = self._h2.streams.get(state.stream_id)
            if stream is not None and not stream.closed:
                self._h2.reset_stream(state.stream_id, _NO_ERROR if status is _OK else _CANCEL)
        self._release(state)

    def _header_list_too_large(self, state: StreamState, what: str, size: int, events: list[Event]) -> None:
        # RFC 9113 §10.5.1: our limit is advisory, and the block was decoded whole (HPACK is in
        # step), so only this call fails: RESOURCE_EXHAUSTED, as grpc-core's client says.
        limit = self.config.max_header_list_size
        message = f"{what} header list of {size} bytes is over the limit of {limit} (SETTINGS_MAX_HEADER_LIST_SIZE)"
        self._abort(state, Status.RESOURCE_EXHAUSTED, message, events)

    def _abort(
        self, state: StreamState, status: Status, message: str, events: list[Event], code: int = _CANCEL
    ) -> None:
        # Something the server sent is unacceptable: cancel the call and report why. The stream
        # may be closed in h2 already (its END_STREAM came in the same read): no reset then.
        if self._h2_open(state.stream_id):
            self._h2.reset_stream(state.stream_id, code)
        self._release(state)
        events.append(ResponseEnded(state.stream_id, status, message, None, []))

    def _local_ended(self, state: StreamState) -> None:
        if state.remote_closed:
            self._release(state)

    def _on_goaway(self, last_stream_id: int, events: list[Event]) -> None:
        super()._on_goaway(last_stream_id, events)
        self.draining = "server sent GOAWAY"
        self._refuse_unprocessed(last_stream_id, events)

    def _refuse_unprocessed(self, last_stream_id: int, events: list[Event]) -> None:
        # Streams above last_stream_id were never processed: safe to try again elsewhere.
        for stream_id in [sid for sid in self._streams if sid > last_stream_id]:
            self._release(self._streams[stream_id])
            events.append(StreamClosed(stream_id, int(_REFUSED_STREAM), "not processed by the server (GOAWAY)"))
