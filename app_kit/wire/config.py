"""Every limit and tunable of a connection, in one place."""

from __future__ import annotations

import dataclasses

__all__ = ["Configuration"]

_MiB = 1024 * 1024
_MAX_WINDOW = 2**31 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Configuration:
    """Limits and timeouts shared by the server and the client.

    Every limit the code enforces lives here; nothing else hard-codes one.
    Sizes are in bytes, times in seconds.
    """

    #: Largest message accepted from the peer, checked on the 5-byte prefix before any of the
    #: message is buffered (and again after decompression). Over it: RESOURCE_EXHAUSTED.
    max_receive_message_length: int = 4 * _MiB
    #: Largest message this side may send; over it the send fails with RESOURCE_EXHAUSTED.
    max_send_message_length: int = 4 * _MiB
    #: Bytes one stream may have queued for sending before ``send_message`` waits for them
    #: to leave (bounds what a fast producer buffers when the peer or the socket is slow).
    max_send_buffer_size: int = 64 * 1024
    #: Bytes queued for one peer (written, not yet taken by the socket) over which senders
    #: wait and the peer is no longer read from, until the queue drains to a quarter of it: a
    #: peer that sends requests without reading the answers holds itself back, not our memory.
    max_connection_send_buffer: int = 1 * _MiB
    #: Frames the peer makes us answer (PING and SETTINGS ACKs, RST_STREAM for frames on a
    #: stream it reset) while it takes nothing we send (past ``max_connection_send_buffer``);
    #: over it the connection is closed with GOAWAY ENHANCE_YOUR_CALM. A client reads on
    #: when its peer does not (two peers that both stopped would wait for each other): only
    #: this bounds what such a peer makes it queue (grpc-core's limit is the same 10,000).
    max_pending_induced_frames: int = 10_000
    #: SETTINGS_MAX_CONCURRENT_STREAMS advertised to the peer; streams beyond it are refused
    #: with REFUSED_STREAM (safe for the peer to retry).
    max_concurrent_streams: int = 1000
    #: Server: calls running at once across all its connections; a call over it is answered
    #: RESOURCE_EXHAUSTED at once (grpcio's ``maximum_concurrent_rpcs``), health checks
    #: excepted; None: no limit.
    max_concurrent_calls: int | None = None
    #: How many times a client call is sent again, at once and without counting against its
    #: retry policy, when the server refused it (REFUSED_STREAM) or never processed it (above
    #: a GOAWAY's last-stream-id); RFC 9113 §8.7 says neither reached the application. gRFC A6
    #: retries once; a grpc-core server frees a finished stream's slot only once its own write
    #: completed, so a client that fills the limit exactly can be refused again on the retry.
    max_transparent_retries: int = 3
    #: Bytes of incomplete messages one connection may hold across its streams. Their bytes
    #: are acknowledged as they come (a message may be larger than the window), so flow
    #: control does not bound them; the stream that goes over gets RESOURCE_EXHAUSTED. One
    #: message of ``max_receive_message_length`` always fits, whatever this says. Each
    #: message a call received and has not read yet counts 96 bytes too, past 16 a stream
    #: (flow control counts a message's bytes, not what holding it costs: a window of empty
    #: messages would hold ~16 times the window).
    max_connection_receive_buffer: int = 64 * _MiB
    #: Bytes of inflated messages the calls of one connection hold at once (they count against
    #: ``max_connection_receive_buffer`` too). A compressed message is inflated when its call
    #: takes it, and counts until the call takes its next one or ends: this bounds what small
    #: messages that inflate a thousandfold make us hold. The call whose message would go over
    #: gets RESOURCE_EXHAUSTED. The default fits 8 calls each holding a message of the default
    #: ``max_receive_message_length``; one such message always fits, whatever this says.
    max_connection_inflated_bytes: int = 32 * _MiB
    #: The two above, across every connection of a server (server side): bytes of incomplete
    #: and of inflated messages all its connections hold at once. A peer that opens many
    #: connections stays under each one's budget, not under this one (eight connections each
    #: at its 64 MiB held 520 MiB). The stream that goes over gets RESOURCE_EXHAUSTED; one
    #: message of ``max_receive_message_length`` always fits, whatever this says.
    max_server_receive_buffer: int = 128 * _MiB
    #: SETTINGS_INITIAL_WINDOW_SIZE: how much of one stream's data the peer may send before
    #: the handler consumes it. Bounds what a handler that does not read can make us buffer.
    initial_stream_window_size: int = 1 * _MiB
    #: The connection-level receive window, shared by all streams of a connection.
    initial_connection_window_size: int = 16 * _MiB
    #: SETTINGS_MAX_HEADER_LIST_SIZE: the largest header list (metadata) accepted, counted as
    #: RFC 9113 §6.5.2 and gRPC do (each field's name and value plus 32 bytes). A request over
    #: it is refused on its own stream with RESOURCE_EXHAUSTED, and a client fails a call whose
    #: response metadata or trailers are over it the same way; the connection goes on.
    max_header_list_size: int = 16 * 1024
    #: Hard cap on one header block, both as it arrives (HEADERS and CONTINUATION frames,
    #: checked from their frame headers) and decoded. A block has to be decoded whole whatever
    #: becomes of its stream, or HPACK's table falls out of step with the peer's (RFC 9113
    #: §10.5.1), so past this cap the connection is closed with GOAWAY ENHANCE_YOUR_CALM. At
    #: least ``max_header_list_size``.
    max_header_block_size: int = 32 * 1024
    #: SETTINGS_MAX_FRAME_SIZE: the largest frame payload the peer may send us. Every frame
    #: costs h2 the same Python work whatever its size, so large messages want large frames:
    #: a 1 MiB echo with a grpcio client went from ~270 to ~500 calls/s going from the RFC's
    #: 16 KiB to 1 MiB. A frame is buffered whole before it is parsed, which the connection
    #: window bounds anyway (DATA up to it may wait for a handler to read).
    max_frame_size: int = 1 * _MiB
    #: Send a PING after this long without any frame from the peer; ``None`` disables it.
    keepalive_time: float | None = 2 * 60 * 60.0
    #: Close the connection when a keepalive PING is not answered within this time.
    keepalive_timeout: float = 20.0
    #: Send keepalive PINGs on a connection without calls too (gRPC's
    #: ``keepalive_permit_without_calls``, off by default as there: servers enforce at most
    #: one such PING per ``min_ping_interval_without_calls``, 2 h by default in gRPC).
    keepalive_permit_without_calls: bool = False
    #: On shutdown, how long to wait for the PING that follows the first GOAWAY to be
    #: answered before sending the final GOAWAY.
    shutdown_ping_timeout: float = 5.0
    #: Close a connection whose peer has not completed the HTTP/2 (and TLS) handshake by then.
    handshake_timeout: float = 10.0
    #: After our last frame (a GOAWAY), how long to discard what the peer still sends before
    #: closing: closing with unread data makes the kernel reset the connection, and the reset
    #: can destroy the GOAWAY before the peer reads it.
    linger_timeout: float = 1.0
    #: Close (gracefully, with GOAWAY) a connection without calls for this long; None: never.
    idle_timeout: float | None = 30 * 60.0
    #: Server: close (gracefully, with GOAWAY: its calls finish) a connection this long after it
    #: opened, varied at random by 10 % either way, so that clients connect again and spread over
    #: the backends added since (a Kubernetes Deployment scaled up); None: never.
    max_connection_age: float | None = None
    #: Server: how long the calls of a connection past its age may still run before they end
    #: with UNAVAILABLE and it closes; None: as long as they take.
    max_connection_age_grace: float | None = None
    #: Clients: gRPC's connection backoff. After a failed attempt to connect to a backend,
    #: wait ``connect_initial_backoff``, then ``connect_backoff_multiplier`` times longer
    #: after each further failure, up to ``connect_max_backoff``, each wait varied at random
    #: by ``connect_backoff_jitter`` (a fraction) either way; an attempt may take the larger of
    #: its backoff and ``connect_min_timeout``.
    connect_initial_backoff: float = 1.0
    connect_backoff_multiplier: float = 1.6
    connect_backoff_jitter: float = 0.2
    connect_max_backoff: float = 120.0
    connect_min_timeout: float = 20.0
    #: Clients of a ``dns:`` target: the name is resolved again when a backend fails or sends
    #: GOAWAY, but not sooner than this after the last resolution.
    dns_min_resolution_interval: float = 30.0
    #: The window over which the flood limits below count frames from the peer. Over any
    #: limit, the connection is closed at once with GOAWAY ENHANCE_YOUR_CALM.
    flood_window: float = 10.0
    #: gRPC's keepalive enforcement (servers only, as in gRPC): a PING sooner than this after
    #: the previous one, while calls are open, is a strike, unless one of our HEADERS or DATA
    #: frames licenses it (peers PING when they receive data, to size their windows).
    min_ping_interval: float = 5 * 60.0
    #: The same while the connection has no calls (a client keeping an idle connection alive).
    min_ping_interval_without_calls: float = 2 * 60 * 60.0
    #: Strikes tolerated; the next one gets GOAWAY ENHANCE_YOUR_CALM ``too_many_pings``.
    #: 0 switches the strikes off (the hard cap below still applies).
    max_ping_strikes: int = 2
    #: Hard cap on PINGs per window, licensed or not: only a flood reaches it.
    max_pings_per_window: int = 100_000
    #: SETTINGS frames the peer may send per window.
    max_settings_per_window: int = 100
    #: DATA frames without data or END_STREAM, empty HEADERS/CONTINUATION, frames of an
    #: unknown type, PING or SETTINGS ACKs that answer nothing we sent, and DATA frames of
    #: under 64 bytes in the middle of a message (see rpc/connection.py), per window.
    max_empty_frames_per_window: int = 1000
    #: RST_STREAM frames per window: the bound on the "rapid reset" attack (CVE-2023-44487).
    max_resets_per_window: int = 1000
    #: The same, across every connection from one peer address (server side): an attacker
    #: opening many connections stays under each one's limit, not under this one.
    max_resets_per_window_per_address: int = 4000

    def __post_init__(self) -> None:
        for name in (
            "max_receive_message_length",
            "max_send_message_length",
            "max_concurrent_streams",
            "max_header_list_size",
            "max_header_block_size",
            "max_send_buffer_size",
            "max_connection_receive_buffer",
            "max_connection_inflated_bytes",
            "max_server_receive_buffer",
            "max_connection_send_buffer",
            "max_pending_induced_frames",
            "max_pings_per_window",
            "max_settings_per_window",
            "max_empty_frames_per_window",
            "max_resets_per_window",
            "max_resets_per_window_per_address",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        calls = self.max_concurrent_calls
        if calls is not None and (not isinstance(calls, int) or calls < 1):
            raise ValueError(f"max_concurrent_calls must be a positive int or None, got {calls!r}")
        retries = self.max_transparent_retries
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"max_transparent_retries must be an int of 0 or more, got {retries!r}")
        if self.max_header_block_size < self.max_header_list_size:
            raise ValueError(
                f"max_header_block_size ({self.max_header_block_size}) must be at least "
                f"max_header_list_size ({self.max_header_list_size})"
            )
        for name in ("initial_stream_window_size", "initial_connection_window_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 65535 <= value <= _MAX_WINDOW:
                raise ValueError(f"{name} must be an int from 65535 to 2**31-1, got {value!r}")
        if not isinstance(self.max_frame_size, int) or not 16384 <= self.max_frame_size <= 2**24 - 1:
            raise ValueError(f"max_frame_size must be from 16384 to 2**24-1, got {self.max_frame_size!r}")
        if not isinstance(self.max_ping_strikes, int) or self.max_ping_strikes < 0:
            raise ValueError(f"max_ping_strikes must be an int >= 0, got {self.max_ping_strikes!r}")
        if self.keepalive_time is not None and self.keepalive_time <= 0:
            raise ValueError("keepalive_time must be positive or None")
        if self.idle_timeout is not None and self.idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive or None")
        if self.max_connection_age is not None and not self.max_connection_age > 0:
            raise ValueError("max_connection_age must be positive or None")
        if self.max_connection_age_grace is not None and not self.max_connection_age_grace >= 0:
            raise ValueError("max_connection_age_grace must be 0 or more, or None")
        for name in (
            "keepalive_timeout",
            "shutdown_ping_timeout",
            "handshake_timeout",
            "flood_window",
            "linger_timeout",
            "min_ping_interval",
            "min_ping_interval_without_calls",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
