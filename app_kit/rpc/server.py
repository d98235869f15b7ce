"""The server side of the core: request validation, responses, graceful shutdown."""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from itertools import chain
from typing import ClassVar

import h2.errors
import h2.events
import h2.settings

from ..wire.config import Configuration
from ..wire.fields import BAD_FIELD_VALUE, FIELD_NAME
from ..wire.header_block import HeaderBlockEncoder
from ..wire.logs import RateLimitedLogger
from .compression import IDENTITY, accept_encoding, is_supported, registered_encodings
from .connection import GrpcConnection, StreamState
from .deadline import parse_grpc_timeout
from .events import Event, PingAcknowledged, RequestHead, RequestReceived, StreamClosed
from .metadata import encode_grpc_message, excerpt, shorten_grpc_message
from .status import Status

__all__ = ["SHUTDOWN_PING", "ServerConnection"]

log = RateLimitedLogger(logging.getLogger("app_kit.protocol"))

#: Opaque data of the PING that follows the first GOAWAY of a graceful shutdown.
SHUTDOWN_PING = b"shutdown"
_MAX_STREAM_ID = 2**31 - 1
_REFUSED_STREAM = h2.errors.ErrorCodes.REFUSED_STREAM
_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR
_NO_ERROR = h2.errors.ErrorCodes.NO_ERROR
_MAX_HEADER_LIST_SIZE = h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE
_TRAILERS_BUDGET = 8192  # the most a status message makes a trailer list (see _fit_message)

# RFC 9113 §8.2.2: connection-specific fields make a request malformed.
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
_PSEUDO_HEADERS = frozenset({b":method", b":scheme", b":path", b":authority"})
# Names every gRPC request carries, valid by construction: no regex for them.
_COMMON_NAMES = frozenset(
    {
        b"content-type",
        b"te",
        b"user-agent",
        b"grpc-timeout",
        b"grpc-encoding",
        b"grpc-accept-encoding",
        b"accept-encoding",
        b"grpc-trace-bin",
        b"grpc-tags-bin",
    }
)
_GRPC_CONTENT_TYPE = b"application/grpc"
_CONTENT_TYPE_FIELD = (b"content-type", b"application/grpc")
_OK_FIELD = (b"grpc-status", b"0")
_OK = Status.OK  # (an Enum member read off its class costs a __getattr__ hook on 3.11)
# The header lists of nearly every response, encoded once per connection (see header_block);
# the plain response head also carries grpc-accept-encoding, made per connection.
_OK_TRAILERS = (_OK_FIELD,)
_OK_TRAILERS_ONLY = ((b":status", b"200"), _CONTENT_TYPE_FIELD, _OK_FIELD)
_REMEMBERED_HEADS = 32  # distinct request heads a connection keeps parsed
_FIELD_OVERHEAD = 32  # RFC 9113 §6.5.2: each field counts its name, its value and 32 bytes


class _Malformed(Exception):
    """An HTTP/2-malformed request (RFC 9113 §8.1.1): answered with RST_STREAM PROTOCOL_ERROR."""


class _Rejected(Exception):
    """A well-formed request we will not serve: answered with a response and a status."""

    def __init__(
        self,
        http_status: int,
        status: Status,
        message: str,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        *,
        peer_fault: bool = False,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.status = status
        self.message = message
        self.extra = extra
        #: The peer broke a limit it was told of: counted like a reset we send because of it.
        self.peer_fault = peer_fault


def parse_request(headers: list[tuple[bytes, bytes]], content_subtype: bytes) -> RequestHead:
    """Validate a request's header block per RFC 9113 §8 and gRPC's PROTOCOL-HTTP2."""
    method = scheme = path = authority = None
    content_type = timeout = encoding = accept = user_agent = None
    seen_regular = False
    seen_pseudo: set[bytes] = set()
    metadata: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if BAD_FIELD_VALUE.search(value):
            raise _Malformed(f"invalid characters in the value of {name!r}")
        if name[:1] == b":":
            if seen_regular:
                raise _Malformed(f"pseudo-header {name!r} after a regular header")
            if name not in _PSEUDO_HEADERS:
                raise _Malformed(f"unknown pseudo-header {name!r}")
            if name in seen_pseudo:
                raise _Malformed(f"duplicate pseudo-header {name!r}")
            seen_pseudo.add(name)
            if name == b":path":
                path = value
            elif name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            else:
                authority = value
            continue
        seen_regular = True
        if name not in _COMMON_NAMES:
            if not FIELD_NAME.match(name):
                raise _Malformed(f"invalid header name {name!r}")
            if name in _CONNECTION_SPECIFIC:
                raise _Malformed(f"connection-specific header {name!r}")
            if name[:5] != b"grpc-":  # other grpc- names belong to the protocol, not the app
                metadata.append((name, value))
            continue
        if name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name == b"grpc-accept-encoding":
            accept = value
        elif name == b"user-agent":
            user_agent = value
        elif name == b"te" and value != b"trailers":
            raise _Malformed('the only te value allowed is "trailers"')
    if not method or not scheme or not path:
        raise _Malformed("missing :method, :scheme or :path")
    if method != b"POST":
        raise _Rejected(
            405,
            Status.UNIMPLEMENTED,
            f"HTTP method {excerpt(method.decode('latin-1'))} not allowed: gRPC requires POST",
            ((b"allow", b"POST"),),
        )
    if not _is_grpc_content_type(content_type, content_subtype):
        shown = "none" if content_type is None else excerpt(content_type.decode("latin-1"))
        raise _Rejected(415, Status.INTERNAL, f"unsupported content-type {shown}: application/grpc expected")
    seconds = None
    if timeout is not None:
        try:
            seconds = parse_grpc_timeout(timeout)
        except ValueError as exc:
            raise _Rejected(200, Status.INTERNAL, str(exc)) from None
    recv_encoding = None
    if encoding is not None and encoding != b"identity":
        recv_encoding = encoding.decode("latin-1")
        if not is_supported(recv_encoding):
            known = ", ".join([*registered_encodings(), IDENTITY])
            raise _Rejected(
                200,
                Status.UNIMPLEMENTED,
                f"grpc-encoding {excerpt(recv_encoding)} is not supported; accepted: {known}",
                ((b"grpc-accept-encoding", accept_encoding()),),
            )
    accepted = frozenset(item.strip() for item in accept.decode("latin-1").split(",")) if accept else frozenset()
    return RequestHead(
        path=path.decode("latin-1"),
        headers=metadata,
        timeout=seconds,
        encoding=recv_encoding,
        accept_encoding=accepted,
        user_agent=user_agent.decode("latin-1") if user_agent is not None else None,
        authority=authority.decode("latin-1") if authority is not None else None,
    )


def _is_grpc_content_type(value: bytes | None, subtype: bytes) -> bool:
    if value is None or not value.startswith(_GRPC_CONTENT_TYPE):
        return False
    rest = value[len(_GRPC_CONTENT_TYPE) :]
    if not rest or rest[:1] == b";":
        return True
    if rest[:1] != b"+":
        return False
    return rest[1:].split(b";", 1)[0].strip() == subtype


class ServerConnection(GrpcConnection):
    """A server's connection: turns requests into events and calls' outcomes into frames."""

    _HANDLERS: ClassVar[dict[type, str]] = {**GrpcConnection._HANDLERS, h2.events.RequestReceived: "_on_request"}

    def __init__(self, config: Configuration, *, content_subtype: str = "proto") -> None:
        super().__init__(config, client_side=False)
        # Ours encodes every block h2 or we send (one encoder per connection, as HPACK needs).
        accept_field = (b"grpc-accept-encoding", accept_encoding())  # the encodings registered now
        self._plain_head = ((b":status", b"200"), _CONTENT_TYPE_FIELD, accept_field)
        self._encoder = HeaderBlockEncoder(indexed=(_CONTENT_TYPE_FIELD, accept_field, _OK_FIELD))
        self._h2.use_encoder(self._encoder)
        self._content_subtype = content_subtype.encode("ascii")
        self._heads: dict[tuple[tuple[bytes, bytes], ...], RequestHead] = {}
        #: 0: serving; 1: first GOAWAY and PING sent; 2: final GOAWAY sent.
        self.shutdown_phase = 0
        self._last_stream_id = _MAX_STREAM_ID

    # -- requests --------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived, events: list[Event]) -> None:
        stream_id = event.stream_id
        if stream_id > self._last_stream_id:
            # After our final GOAWAY: the client knows this stream was not processed (it sent it
            # before it saw the GOAWAY: no fault of its own). Unless it reset it already, later
            # in the same read.
            if self._h2_open(stream_id):
                self._h2.reset_stream(stream_id, _REFUSED_STREAM)
            return
        if len(self._streams) >= self.config.max_concurrent_streams:
            log.log(
                logging.INFO, "refusing stream %d: max_concurrent_streams (%d) reached", stream_id, len(self._streams)
            )
            self.reset_for_peer_fault(stream_id, _REFUSED_STREAM)
            return
        try:
            head = self._parse(event.headers or [])
        except _Malformed as exc:
            log.log(logging.INFO, "malformed request on stream %d: %s", stream_id, exc)
            self.reset_for_peer_fault(stream_id, _PROTOCOL_ERROR)
            return
        except _Rejected as exc:
            if exc.peer_fault:
                log.log(logging.INFO, "refusing stream %d: %s", stream_id, exc.message)
                self._guard.count_reset()  # may end the connection: over max_resets_per_window
            headers = [
                (b":status", str(exc.http_status).encode("ascii")),
                _CONTENT_TYPE_FIELD,
                (b"grpc-status", str(exc.status.value).encode("ascii")),
                (b"grpc-message", encode_grpc_message(exc.message)),
                *exc.extra,
            ]
            if self._h2_open(stream_id):  # else reset in this very read
                self._h2.send_headers(stream_id, headers, end_stream=True)
                self._stop_peer_sending(stream_id)
            return
        self._open_stream(stream_id, head.encoding)
        events.append(RequestReceived(stream_id, head))

    def _parse(self, headers: list[tuple[bytes, bytes]]) -> RequestHead:
        """:func:`parse_request`, remembered: a client repeats the same head call after call.

        A head is read-only once made, so calls with the same header fields share it. Heads
        with a timeout are not kept: their ``grpc-timeout`` differs from call to call.

        A header list over ``max_header_list_size`` (SETTINGS_MAX_HEADER_LIST_SIZE, which RFC
        9113 §10.5.1 calls advisory) is refused with RESOURCE_EXHAUSTED on its own stream, as
        grpc-core does; the HPACK decoder took in the whole block (see ``new_h2_connection``),
        so the connection and its other calls go on. A remembered head was within the limit.
        """
        key = tuple(headers)
        head = self._heads.get(key)
        if head is None:
            size = sum(map(len, chain.from_iterable(headers))) + _FIELD_OVERHEAD * len(headers)
            if size > self.config.max_header_list_size:
                raise _Rejected(
                    200,
                    Status.RESOURCE_EXHAUSTED,
                    f"request header list of {size} bytes is over the limit of "
                    f"{self.config.max_header_list_size} (SETTINGS_MAX_HEADER_LIST_SIZE)",
                    peer_fault=True,
                )
            head = parse_request(headers, self._content_subtype)
            if head.timeout is None:
                if len(self._heads) >= _REMEMBERED_HEADS:
                    self._heads.clear()
                self._heads[key] = head
        return head

    def _on_ping_ack(self, event: h2.events.PingAckReceived, events: list[Event]) -> None:
        if event.ping_data == SHUTDOWN_PING and self.shutdown_phase == 1:
            self.finish_shutdown()
        events.append(PingAcknowledged(event.ping_data))

    # -- responses -------------------------------------------------------------------

    def send_response_headers(
        self,
        stream_id: int,
        metadata: list[tuple[bytes, bytes]],
        encoding: str | None = None,
    ) -> None:
        """Send the response HEADERS (initial metadata); ``encoding`` compresses what follows."""
        state = self.stream_state(stream_id)
        if encoding is None and not metadata:
            block = self._encoder.encode_cached(self._plain_head)
        else:
            headers = list(self._plain_head)
            if encoding is not None:
                headers.append((b"grpc-encoding", encoding.encode("ascii")))
                state.send_encoding = encoding
            headers.extend(metadata)
            block = self._encoder.encode(headers)
        self._h2.send_header_block(stream_id, block, end_stream=False)
        state.headers_sent = True

    def send_status(
        self,
        stream_id: int,
        status: Status,
        message: str | None = None,
        details: bytes | None = None,
        metadata: list[tuple[bytes, bytes]] = [],  # noqa: B006 - never mutated
    ) -> None:
        """End the call: trailers, or a Trailers-Only response if no HEADERS went out yet."""
        state = self.stream_state(stream_id)
        self._end_local(state, self._status_fields(state, status, message, details, metadata))

    def _status_fields(
        self,
        state: StreamState,
        status: Status,
        message: str | None,
        details: bytes | None,
        metadata: list[tuple[bytes, bytes]],
    ) -> Sequence[tuple[bytes, bytes]]:
        if status is _OK and not message and details is None and not metadata:
            if state.headers_sent:
                return _OK_TRAILERS
            state.headers_sent = True
            return _OK_TRAILERS_ONLY
        fields = [(b"grpc-status", _STATUS_VALUES[status])]
        encoded = encode_grpc_message(message) if message else b""
        if encoded:
            fields.append((b"grpc-message", encoded))
        if details is not None:
            fields.append((b"grpc-status-details-bin", base64.b64encode(details).rstrip(b"=")))
        fields.extend(metadata)
        if encoded and details is None:  # (with details, the caller made them fit: see status_room)
            self._fit_message(fields)
        if not state.headers_sent:
            state.headers_sent = True
            fields[:0] = [(b":status", b"200"), _CONTENT_TYPE_FIELD]
        return fields

    def status_room(self, metadata: list[tuple[bytes, bytes]]) -> int:
        """Bytes left, beside ``metadata``, for a status message and details (their values:
        ``grpc-message`` percent-encoded, ``grpc-status-details-bin`` in base64) in trailers
        that stay under the client's SETTINGS_MAX_HEADER_LIST_SIZE and 8 KiB: past its limit a
        client fails the call RESOURCE_EXHAUSTED, its real status lost; grpc-core clients do so
        at random from 8 KiB (their "soft" limit) though they advertise 16 KiB, and count the
        limit itself over."""
        # RFC 9113 §6.5.2's size: each field's name and value, and 32 more; the two fields a
        # trailers-only response puts in front are counted whether or not this is one.
        fixed = [(b":status", b"200"), _CONTENT_TYPE_FIELD, (b"grpc-status", b"00")]
        taken = sum(len(name) + len(value) + 32 for name, value in chain(fixed, metadata))
        return self._trailers_limit() - 1 - taken - (len(b"grpc-message") + 32) - (len(b"grpc-status-details-bin") + 32)

    def _trailers_limit(self) -> int:
        advertised = self._h2.remote_settings.get(_MAX_HEADER_LIST_SIZE)
        return _TRAILERS_BUDGET if advertised is None else min(advertised, _TRAILERS_BUDGET)

    def _fit_message(self, fields: list[tuple[bytes, bytes]]) -> None:
        """Cut the status message (``fields[1]``) to fit the trailers (see :meth:`status_room`)."""
        limit = self._trailers_limit()
        in_front = [(b":status", b"200"), _CONTENT_TYPE_FIELD]
        size = sum(len(name) + len(value) + 32 for name, value in chain(in_front, fields))
        name, encoded = fields[1]
        if size >= limit:
            shortened = shorten_grpc_message(encoded, len(encoded) - (size - limit) - 1)
            if shortened:
                fields[1] = (name, shortened)
            else:  # the rest alone is over it (large details or metadata): no message, not an empty one
                del fields[1]

    def end_now(self, stream_id: int, status: Status, message: str) -> bool:
        """End a call at once with ``status``; False if its stream is gone already.

        DATA still queued is dropped, and so is a status parked behind it: trailers are not
        flow-controlled, so they go out even to a peer whose window is shut.
        """
        state = self._streams.get(stream_id)
        if state is None:
            return False
        if not self._h2_open(stream_id):
            # Reset by the peer in the very read whose events are being handled.
            self._release(state)
            return False
        state.bytes_taken += len(state.pending)
        state.pending = bytearray()
        state.pending_trailers = None
        self._end_local_now(state, self._status_fields(state, status, message, None, []))
        return True

    @property
    def open_stream_ids(self) -> list[int]:
        """The streams still in progress (a status may be queued behind their DATA)."""
        return list(self._streams)

    def _abort(self, state: StreamState, status: Status, message: str, events: list[Event]) -> None:
        log.log(logging.INFO, "ending stream %d: %s", state.stream_id, message)
        if not self.end_now(state.stream_id, status, message):
            # Reset by the peer in this very read: it got no status, its call was cancelled.
            status, message = Status.CANCELLED, f"reset by peer ({message})"
        events.append(StreamClosed(state.stream_id, 0, message, status=status))

    def _send_trailers(self, stream_id: int, trailers: Sequence[tuple[bytes, bytes]]) -> None:
        if trailers is _OK_TRAILERS or trailers is _OK_TRAILERS_ONLY:
            block = self._encoder.encode_cached(trailers)
        else:
            block = self._encoder.encode(trailers)
        self._h2.send_header_block(stream_id, block, end_stream=True)

    def _local_ended(self, state: StreamState) -> None:
        # The status is out, so the call is over; a client still sending is told to stop
        # (RFC 9113 §8.1) and the stream is forgotten.
        self._stop_peer_sending(state.stream_id)
        self._release(state)

    # -- graceful shutdown -----------------------------------------------------------

    def start_shutdown(self) -> None:
        """Phase one: GOAWAY with the maximal stream id, then a PING to time the round trip.

        Streams the client opens until it sees this are still accepted and served.
        """
        if self.shutdown_phase or self.closed:
            return
        self.shutdown_phase = 1
        self.send_goaway(_MAX_STREAM_ID)
        self.ping(SHUTDOWN_PING)

    def finish_shutdown(self) -> None:
        """Phase two: GOAWAY with the last stream id received; later ones are refused.

        Called when the shutdown PING is answered (the client has seen the first GOAWAY, so
        nothing more is in flight) or when waiting for that answer timed out.
        """
        if self.shutdown_phase >= 2 or self.closed:
            return
        self.shutdown_phase = 2
        self._last_stream_id = self._h2.highest_inbound_stream_id
        self.send_goaway(self._last_stream_id)

    @property
    def drained(self) -> bool:
        """The final GOAWAY is out and no stream is left: the connection can be closed."""
        return self.shutdown_phase >= 2 and not self._streams


_STATUS_VALUES = {status: str(status.value).encode("ascii") for status in Status}
