"""What the protocol core reports to the layer above it, in gRPC terms."""

from __future__ import annotations

from .metadata import Metadata
from .status import Status

__all__ = [
    "ConnectionClosed",
    "EndOfStream",
    "Event",
    "GoAwayReceived",
    "MessagesReceived",
    "PingAcknowledged",
    "RequestHead",
    "RequestReceived",
    "ResponseEnded",
    "ResponseStarted",
    "StreamClosed",
    "StreamWritable",
]


class Event:
    """Base class of protocol events."""

    __slots__ = ()

    def __repr__(self) -> str:
        names: tuple[str, ...] = self.__slots__
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"{type(self).__name__}({fields})"


class RequestHead:
    """The validated head of a gRPC request."""

    __slots__ = ("accept_encoding", "authority", "encoding", "headers", "metadata", "path", "timeout", "user_agent")

    def __init__(
        self,
        path: str,
        headers: list[tuple[bytes, bytes]],
        timeout: float | None,
        encoding: str | None,
        accept_encoding: frozenset[str],
        user_agent: str | None,
        authority: str | None,
    ) -> None:
        #: ``/package.Service/Method``.
        self.path = path
        #: The custom-metadata header fields, as received (not decoded yet).
        self.headers = headers
        #: Those fields decoded (a read-only multidict), once a call has (calls with the same
        #: header fields share a head, and so this too); None until then.
        self.metadata: Metadata | None = None
        #: Seconds from ``grpc-timeout``, or None.
        self.timeout = timeout
        #: The request messages' ``grpc-encoding`` (None for identity).
        self.encoding = encoding
        #: Encodings the client accepts for the response.
        self.accept_encoding = accept_encoding
        self.user_agent = user_agent
        self.authority = authority

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"RequestHead({fields})"


class RequestReceived(Event):
    """A valid gRPC request opened a stream. Routing is up to the layer above."""

    __slots__ = ("head", "stream_id")

    def __init__(self, stream_id: int, head: RequestHead) -> None:
        self.stream_id = stream_id
        self.head = head


class MessagesReceived(Event):
    """Whole (decompressed) messages arrived: those one DATA frame completed, in order.

    ``messages`` holds ``(data, flow_size)`` pairs. The ``flow_size`` bytes of window of each
    stay taken until the consumer calls ``acknowledge(stream_id, flow_size)``: that is how a
    slow reader pushes back. One event per frame, not per message: a frame often carries
    many small messages, and the layers above then queue them in one step.
    """

    __slots__ = ("messages", "stream_id")

    def __init__(self, stream_id: int, messages: list[tuple[bytes, int]]) -> None:
        self.stream_id = stream_id
        self.messages = messages


class EndOfStream(Event):
    """The peer half-closed the stream: no more messages will come."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamClosed(Event):
    """The stream ended abnormally: reset by the peer, or aborted by the core.

    ``error_code`` is the HTTP/2 error code of the RST_STREAM; ``reason`` says why, for logs;
    ``by_peer``: the peer sent the RST_STREAM. ``status``: the status the core answered the
    call with when it aborted it (a server's), None for a reset. Nothing more can be sent on
    the stream.
    """

    __slots__ = ("by_peer", "error_code", "reason", "status", "stream_id")

    def __init__(
        self, stream_id: int, error_code: int, reason: str, *, by_peer: bool = False, status: Status | None = None
    ) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.reason = reason
        self.by_peer = by_peer
        self.status = status


class StreamWritable(Event):
    """All data queued on the stream went out; a paused sender may continue."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class PingAcknowledged(Event):
    """The peer answered one of our PINGs."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class ConnectionClosed(Event):
    """The connection is finished after a connection error, ours or the peer's.

    Streams still open are dead; the transport flushes what is queued (our GOAWAY) and closes.
    """

    __slots__ = ("error_code", "reason")

    def __init__(self, error_code: int, reason: str) -> None:
        self.error_code = error_code
        self.reason = reason


class GoAwayReceived(Event):
    """The peer sent a graceful GOAWAY: no new streams; those up to ``last_stream_id`` go on."""

    __slots__ = ("last_stream_id",)

    def __init__(self, last_stream_id: int) -> None:
        self.last_stream_id = last_stream_id


class ResponseStarted(Event):
    """The response HEADERS arrived: ``headers`` carry the initial metadata."""

    __slots__ = ("headers", "stream_id")

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.stream_id = stream_id
        self.headers = headers


class ResponseEnded(Event):
    """The call's outcome: from the trailers, from a non-gRPC response, or from a local abort."""

    __slots__ = ("details", "message", "status", "stream_id", "trailers")

    def __init__(
        self,
        stream_id: int,
        status: Status,
        message: str | None,
        details: bytes | None,
        trailers: list[tuple[bytes, bytes]],
    ) -> None:
        self.stream_id = stream_id
        self.status = status
        self.message = message
        #: The raw ``grpc-status-details-bin``, for the status-details codec.
        self.details = details
        self.trailers = trailers
