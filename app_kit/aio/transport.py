"""The asyncio adapter: feeds socket bytes to a sans-IO connection and writes what it queues.

Writes are coalesced: whatever the core queues during one event-loop turn (from handlers
of any number of streams) goes out in a single ``transport.write`` at the end of the turn.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import cast

import h2.errors

from ..rpc.connection import GrpcConnection, StreamGone
from ..rpc.events import ConnectionClosed, Event
from ..wire.logs import RateLimitedLogger
from .runtime import Runtime

__all__ = ["ConnectionProtocol"]

log = logging.getLogger("app_kit.transport")
peer_log = RateLimitedLogger(log)  # what peers cause: a flood of them must not flood the log

_KEEPALIVE_PING = b"keepaliv"
_INTERNAL_ERROR = int(h2.errors.ErrorCodes.INTERNAL_ERROR)
_ENHANCE_YOUR_CALM = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)


class ConnectionProtocol(asyncio.Protocol):
    """Drives a :class:`GrpcConnection` over an asyncio transport.

    Subclasses give events their meaning (:meth:`handle_events`) and react to the end of
    the connection (:meth:`on_connection_lost`).
    """

    def __init__(self, connection: GrpcConnection, loop: Runtime) -> None:
        self.connection = connection
        #: The event loop (on trio: a :class:`~app_kit.aio.runtime.TrioRuntime`).
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        #: The flush scheduled for the end of this loop turn, if one is.
        self.flush_scheduled: asyncio.Handle | None = None
        self._write_resumed: asyncio.Future[None] | None = None
        # Senders waiting for their stream's queued bytes to leave, by stream id.
        self._writers: dict[int, asyncio.Future[None]] = {}
        # Senders waiting (in drain) for the transport to take more; also in _writers, so
        # that their call's end (release_writer) reaches them too.
        self._paused_writers: dict[int, asyncio.Future[None]] = {}
        #: The transport asked us to stop writing (its buffer is over the high-water mark).
        self.write_paused = False
        self._induced_before_pause = 0  # the connection's induced_frames when it paused
        self._closed = False
        self._last_read = 0.0  # the loop's time of the last bytes from the peer (keepalive)
        self._keepalive_handle: asyncio.TimerHandle | None = None
        self._keepalive_sent_at: float | None = None  # when our unanswered keepalive PING went
        self._handshake_handle: asyncio.TimerHandle | None = None
        self._linger_handle: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Send our connection preface and start the keepalive timer."""
        # Not an isinstance check: uvloop's transports implement the interface without
        # subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        limit = self.connection.config.max_connection_send_buffer
        self.transport.set_write_buffer_limits(high=limit, low=limit // 4)
        self.connection.initiate()
        self.flush()
        self._handshake_handle = self.loop.call_later(self.connection.config.handshake_timeout, self._handshake_expired)
        self._last_read = self.loop.time()
        if self.connection.config.keepalive_time is not None:
            self._keepalive_handle = self.loop.call_later(self.connection.config.keepalive_time, self._keepalive_check)

    def data_received(self, data: bytes) -> None:
        """Feed the core, dispatch its events, write its answer in the same turn."""
        if self._closed:
            return  # lingering after our last frame: discard
        self._last_read = self.loop.time()
        events = self.connection.receive_data(data)
        if self.write_paused and self._owes_too_much():
            return
        if self._handshake_handle is not None and self.connection.handshake_complete:
            self._handshake_handle.cancel()
            self._handshake_handle = None
        if events:
            try:
                self.handle_events(events)
            except Exception:
                # Our bug, not the peer's: end this connection with GOAWAY INTERNAL_ERROR rather
                # than letting asyncio drop it (and every call on it) without a word.
                log.exception("unexpected error handling peer events; closing the connection")
                self.connection.close(_INTERNAL_ERROR, "internal error")
        self.flush()
        if self.connection.closed:
            self.close_transport()

    def eof_received(self) -> bool | None:
        """The peer closed its side: close ours too."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop timers, release waiting writers, tell the layer above."""
        self._closed = True
        self.write_paused = False
        if self.flush_scheduled is not None:
            self.flush_scheduled.cancel()
            self.flush_scheduled = None
        for handle in (self._keepalive_handle, self._handshake_handle, self._linger_handle):
            if handle is not None:
                handle.cancel()
        self._keepalive_handle = self._handshake_handle = self._linger_handle = None
        if self._write_resumed is not None and not self._write_resumed.done():
            self._write_resumed.set_result(None)
        self._wake_paused_writers()
        self.connection.transport_lost()
        self.on_connection_lost(exc)

    #: Stop reading a peer that does not take what we send (servers: new requests would only
    #: queue more answers). Not for clients: two peers that both stopped reading would wait
    #: for each other for ever.
    pause_reading_while_full = False

    def _owes_too_much(self) -> bool:
        """Whether the peer, taking nothing we send, made us answer more frames than
        ``max_pending_induced_frames`` meanwhile: then the connection is closed (a client
        reads on while its peer does not, and each PING it reads queues an ACK)."""
        connection = self.connection
        owed = connection.induced_frames - self._induced_before_pause
        if owed <= connection.config.max_pending_induced_frames:
            return False
        peer_log.log(logging.INFO, "closing connection: the peer made us answer %d frames and read none", owed)
        connection.close(_ENHANCE_YOUR_CALM, "the peer does not read")
        self.close_transport(f"the peer made us answer {owed} frames and read none of them")
        return True

    def pause_writing(self) -> None:
        """The peer does not take what we send: senders wait in :meth:`writable` (and, see
        :attr:`pause_reading_while_full`, nothing more is read from it) until it catches up."""
        self.write_paused = True
        self._induced_before_pause = self.connection.induced_frames
        if self._write_resumed is None or self._write_resumed.done():
            self._write_resumed = self.loop.create_future()
        if self.pause_reading_while_full and self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """The transport buffer drained: release waiting senders, read the peer again."""
        self.write_paused = False
        if self._write_resumed is not None and not self._write_resumed.done():
            self._write_resumed.set_result(None)
        self._wake_paused_writers()
        if self.pause_reading_while_full and self.transport is not None and not self._closed:
            self.transport.resume_reading()

    # -- for the layer above ---------------------------------------------------------

    def handle_events(self, events: Sequence[Event]) -> None:
        """React to protocol events (subclasses)."""
        for event in events:
            if isinstance(event, ConnectionClosed):
                self.close_transport()

    def on_connection_lost(self, exc: Exception | None) -> None:
        """The socket is gone (subclasses)."""

    @property
    def is_closed(self) -> bool:
        """Whether the transport is closed or closing."""
        return self._closed

    def schedule_flush(self) -> None:
        """Write what the core queued at the end of this loop turn, together with the rest."""
        if self.flush_scheduled is None and not self._closed:
            self.flush_scheduled = self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.flush_scheduled = None
        self.flush()

    def flush(self) -> None:
        """Write what the core queued, now."""
        connection = self.connection
        if connection.has_queued_data:
            events = connection.flush_streams()
            if events:
                self.handle_events(events)
        data = connection.take_output()
        if data and not self._closed and self.transport is not None:
            if isinstance(data, bytearray):
                self.transport.write(data)
            else:
                self.transport.writelines(data)  # (uvloop's: one writev, no copy)

    async def drain(self, stream_id: int, ready: bool) -> None:
        """After a message was queued on a stream: schedule the write, and wait while the
        stream is over its send buffer (``ready`` False) or the transport is paused."""
        self.schedule_flush()
        if not ready:
            self._writers[stream_id] = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._writers.pop(stream_id, None)
        if self.write_paused:
            await self._stream_writable(stream_id)

    async def _stream_writable(self, stream_id: int) -> None:
        """Wait while the transport is full, unless the stream ends meanwhile (its call's
        deadline or cancellation, a reset) or we close the connection: a peer that stopped
        reading must not hold a call past its end."""
        while self.write_paused and not self._closed and self._stream_open(stream_id):
            self._writers[stream_id] = self._paused_writers[stream_id] = waiter = self.loop.create_future()
            try:
                await waiter  # resume_writing, connection_lost, or release_writer (then look again)
            finally:
                self._writers.pop(stream_id, None)
                self._paused_writers.pop(stream_id, None)

    def _stream_open(self, stream_id: int) -> bool:
        try:
            self.connection.stream_state(stream_id)
        except StreamGone:
            return False
        return True

    def _wake_paused_writers(self) -> None:
        waiters, self._paused_writers = self._paused_writers, {}
        for waiter in waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    def release_writer(self, stream_id: int) -> None:
        """The stream's queued bytes left, or the stream ended: let its sender go on."""
        waiter = self._writers.get(stream_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def writable(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        waiter = self._write_resumed
        if waiter is not None and not waiter.done():
            await waiter

    def close_transport(self, reason: str = "") -> None:
        """Flush and close the socket, lingering so that our last frames reach the peer.
        ``reason``: why we close it (subclasses tell the calls still on it)."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            # Half-close and discard input for a moment (see Configuration.linger_timeout);
            # the peer's own close ends it sooner.
            try:
                transport.write_eof()
            except OSError:  # the peer is gone already: nothing to linger for
                transport.close()
                return
            if self.write_paused and self.pause_reading_while_full:
                transport.resume_reading()  # what the peer still sends is discarded, not left unread
        else:
            transport.close()  # TLS: it flushes what is queued first
        self._linger_handle = self.loop.call_later(self.connection.config.linger_timeout, self._linger_over)

    def _linger_over(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size():
            transport.abort()  # a peer that does not read would hold close() for ever
        else:
            transport.close()

    def _handshake_expired(self) -> None:
        self._handshake_handle = None
        if not self.connection.handshake_complete and not self._closed:
            timeout = self.connection.config.handshake_timeout
            peer_log.log(logging.INFO, "closing connection: no HTTP/2 handshake within %ss", timeout)
            self.connection.close(0, "handshake timeout")
            self.close_transport("no HTTP/2 handshake in time")

    # -- keepalive -------------------------------------------------------------------

    def _keepalive_check(self) -> None:
        config = self.connection.config
        keepalive_time = config.keepalive_time
        if self._closed or keepalive_time is None:
            return
        sent_at = self._keepalive_sent_at
        if sent_at is not None:
            if self._last_read < sent_at:
                left = sent_at + config.keepalive_timeout - self.loop.time()
                if left > 0:  # looked at early (see below): no answer yet, and time left
                    self._keepalive_handle = self.loop.call_later(left, self._keepalive_check)
                    return
                timeout = config.keepalive_timeout
                peer_log.log(logging.INFO, "closing connection: keepalive PING not answered within %ss", timeout)
                self.connection.close(0, "keepalive timeout")
                self.close_transport("keepalive PING not answered in time")
                return
            self._keepalive_sent_at = None
        # Timed from the last bytes read: a peer gone silent is found keepalive_time +
        # keepalive_timeout after it last spoke.
        silent = self.loop.time() - self._last_read
        if silent < keepalive_time:
            self._keepalive_handle = self.loop.call_later(keepalive_time - silent, self._keepalive_check)
            return
        if not self.connection.open_streams and not config.keepalive_permit_without_calls:
            # gRPC's rule (gRFC A8): no keepalive PING without calls unless permitted (a server
            # counts such PINGs as strikes, then sends GOAWAY too_many_pings). Looked at again
            # soon: a call that starts meanwhile is covered within a quarter more.
            self._keepalive_handle = self.loop.call_later(keepalive_time / 4, self._keepalive_check)
            return
        # Nothing heard for keepalive_time: ask, and give the peer keepalive_timeout to answer.
        # Looked at again after the shorter of the two: with a keepalive_time under the
        # timeout, the next PING is due keepalive_time after the answer (gRFC A8), not after
        # the timeout.
        self._keepalive_sent_at = self.loop.time()
        self.connection.ping(_KEEPALIVE_PING)
        self.flush()
        self._keepalive_handle = self.loop.call_later(
            min(config.keepalive_timeout, keepalive_time), self._keepalive_check
        )
