"""What a call is on either side of a connection: the machinery the server's
:class:`~app_kit.Stream` and the client's :class:`~app_kit.ClientStream` share.

A call queues the messages its connection delivers and hands them over one at a time (giving
their flow-control window back, inflating, decoding, running the interceptors' receive hooks,
counting); it queues encoded messages on its stream (counting them) and says whether the
sender must wait for room. What differs is left to each side, through a few hooks: how a call
that is over says so (:meth:`Call._raise_if_over`), how it ends at once when a message cannot
be taken or sent (:meth:`Call._fail`), what an undecodable message raises
(:meth:`Call._undecodable`) and what the end of the peer's messages means
(:meth:`Call._end_taken`).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, Generic, Protocol, TypeVar

from ..rpc.codecs import CodecBase
from ..rpc.connection import Compressed, GrpcConnection, MessageRejected, StreamGone, StreamState
from ..rpc.handlers import Cardinality
from ..rpc.status import GRPCError, Status
from .hooks import CallMeasures, InterceptorChain, run_hooks
from .runtime import Runtime

__all__ = ["Call", "Host", "Peer"]

RecvT = TypeVar("RecvT")
SendT = TypeVar("SendT")

_END = object()  # queued after the peer's last message


class Host(Protocol):
    """What a call needs of the connection's protocol (the asyncio side of it)."""

    loop: Runtime
    write_paused: bool

    @property
    def flush_scheduled(self) -> object:
        """Not None while a flush is scheduled for the end of this loop turn."""

    def schedule_flush(self) -> None:
        """Write what is queued at the end of this loop turn."""

    async def drain(self, stream_id: int, ready: bool) -> None:
        """Wait while the stream is over its send buffer or the transport is full."""

    def release_writer(self, stream_id: int) -> None:
        """Let the stream's sender go on."""


class Peer:
    """The other end of a connection."""

    __slots__ = ("_addr", "_ssl_object")

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        # Taken now: once the connection is gone, a transport (TLS's, trio's) no longer knows.
        self._addr = transport.get_extra_info("peername")
        self._ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")

    def addr(self) -> Any:
        """The peer's socket address (``(host, port)`` for TCP; '' or None for Unix sockets)."""
        return self._addr

    def cert(self) -> dict[str, Any] | None:
        """The peer's TLS certificate as :meth:`ssl.SSLSocket.getpeercert` returns it, if any."""
        return self._ssl_object.getpeercert() if self._ssl_object is not None else None

    def __repr__(self) -> str:
        return f"<Peer {self.addr()!r}>"


class Call(CallMeasures, Generic[RecvT, SendT]):
    """One call, on either side: its queue of received messages, its send path, and what
    interceptors and logs read of it.

    ``_connection``, ``_protocol`` and ``_stream_id`` are the subclass's to set (the client's
    once its call is placed; a ``_stream_id`` of 0: not yet).
    """

    __slots__ = (
        "_bytes_received",
        "_bytes_sent",
        "_cardinality",
        "_connection",
        "_counted_by",
        "_decode",
        "_encode",
        "_encode_exact",
        "_ended_at",
        "_entered",
        "_last_compressed",
        "_max_send",
        "_messages_arrived",
        "_messages_received",
        "_messages_sent",
        "_one_message",
        "_path",
        "_protocol",
        "_queue",
        "_recv_done",
        "_recv_hooks",
        "_recv_type",
        "_send_hooks",
        "_send_type",
        "_sent",
        "_started_at",
        "_status",
        "_status_message",
        "_stream_id",
        "_waiter",
    )

    #: What the call sends, as its errors name it ("reply" on the server, "request" on the client).
    _SENDS = "message"

    _connection: GrpcConnection
    _protocol: Host
    _stream_id: int

    def __init__(
        self,
        path: str,
        cardinality: Cardinality,
        codec: CodecBase,
        recv_type: Any,
        send_type: Any,
        max_send: int,
        interceptors: InterceptorChain | None,
        one_message: bool,
    ) -> None:
        self._path = path
        self._cardinality = cardinality
        # Bound once: they run per message.
        self._decode = codec.decoder(recv_type)
        self._encode = codec.encode
        # For a message of exactly the send type, the codec's own serializer if it has one
        # (for protobuf, the type's SerializeToString: no Python call per message around it).
        self._encode_exact = codec.encoder(send_type)
        self._recv_type = recv_type
        self._send_type = send_type
        self._max_send = max_send
        # (Empty when no interceptor overrides them; not `if interceptors`: a Python __bool__.)
        self._recv_hooks = interceptors.received if interceptors is not None else ()
        self._send_hooks = interceptors.sent if interceptors is not None else ()
        #: The peer sends exactly one message (a unary request, on the server): a second one
        #: is refused, and taking the first ends the receiving.
        self._one_message = one_message
        self._queue: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._messages_arrived = 0
        self._recv_done = False
        self._last_compressed = False
        self._sent = 0
        self._status: Status | None = None
        self._status_message: str | None = None
        self._ended_at: float | None = None
        self._messages_received = self._messages_sent = self._bytes_received = self._bytes_sent = 0
        #: The stream state that counts the messages sent instead (a server stream's, from its
        #: first reply on: its replies past the first are not counted one by one here).
        self._counted_by: StreamState | None = None
        #: How many interceptors started (those hear ``on_call_end``).
        self._entered = 0

    # -- what it is ------------------------------------------------------------------

    @property
    def service(self) -> str:
        """The service's full name, ``package.Service``."""
        return self._path.split("/")[1]

    @property
    def method_name(self) -> str:
        """The method's own name, ``Method``."""
        return self._path.rpartition("/")[2]

    @property
    def cardinality(self) -> Cardinality:
        """Whether the client, the server, both or neither send a stream of messages."""
        return self._cardinality

    @property
    def status(self) -> Status | None:
        """How the call ended, once it has; None while it runs. On the server: the status
        sent, or CANCELLED if it was reset or its connection lost first. On the client: the
        status received (a failure is also raised to the caller), or the one it ended with
        here (cancelled, its deadline passed...)."""
        return self._status

    @property
    def status_message(self) -> str | None:
        """The message that went with :attr:`status` (for a CANCELLED server call: why)."""
        return self._status_message

    @property
    def last_message_compressed(self) -> bool:
        """Whether the message last handed over (a request to the handler, a reply to the
        caller) arrived compressed (its flag on the wire)."""
        return self._last_compressed

    # -- receiving -------------------------------------------------------------------

    async def _arrival(self) -> None:
        """Wait until something is queued (or raise if the call is over meanwhile)."""
        while not self._queue:
            self._raise_if_over()
            # _wait's body: one coroutine less per message waited for.
            self._waiter = waiter = self._protocol.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def _wait(self) -> None:
        """Wait for the next thing the connection delivers to the call."""
        self._waiter = waiter = self._protocol.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _take(self, item: Any) -> RecvT | None:
        """Hand over a queued message: give its window back, inflate and decode it, run the
        receive hooks. None for the end of the peer's messages (see :meth:`_end_taken`)."""
        if item is _END:
            self._recv_done = True
            self._end_taken()
            return None
        data, flow_size = item
        if self._connection.acknowledge(self._stream_id, flow_size):
            self._protocol.schedule_flush()
        if self._one_message:
            self._recv_done = True
        if type(data) is Compressed:
            self._last_compressed = True
            data = self._inflate(data)
        else:
            self._last_compressed = False
        self._messages_received += 1
        self._bytes_received += len(data)
        try:
            message = self._decode(data)
        except Exception:
            raise self._undecodable() from None
        if self._recv_hooks:
            return run_hooks(self._recv_hooks, self, message)
        return message

    def _inflate(self, data: Compressed) -> bytes:
        try:
            return self._connection.inflate(self._stream_id, data)
        except MessageRejected as exc:
            self._fail(exc.status, exc.message)  # the call ends here, whatever its user does
            raise GRPCError(exc.status, exc.message) from None

    # -- sending ---------------------------------------------------------------------

    def _put(self, data: bytes, compress: bool, end: bool = False) -> bool:
        """Queue one encoded message on the stream and count it; its write is scheduled.
        ``end``: our side of the stream ends with it. False: the stream is over its send
        buffer (the sender awaits ``_protocol.drain``)."""
        try:
            ready = self._connection.send_message(self._stream_id, data, compress, end)
        except StreamGone:
            self._raise_if_over()
            raise
        except MessageRejected as exc:
            self._fail(exc.status, exc.message)  # its headers may be out: end it here
            raise GRPCError(exc.status, exc.message) from None
        self._messages_sent += 1
        self._bytes_sent += len(data)
        protocol = self._protocol
        if protocol.flush_scheduled is None:  # (once per loop turn: not a call per message)
            protocol.schedule_flush()
        return ready

    def _raise_too_large(self, data: bytes) -> None:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED, f"{self._SENDS} message larger than max ({len(data)} vs. {self._max_send})"
        )

    # -- called by the connection ----------------------------------------------------

    def _on_messages(self, messages: list[tuple[bytes, int]]) -> bool:
        """Queue ``(data, flow_size)`` messages; False if the call takes only one and more came."""
        self._messages_arrived += len(messages)
        if self._one_message and self._messages_arrived > 1:
            return False
        self._queue.extend(messages)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True

    def _on_end(self) -> None:
        """The peer sends no more messages (queued after those it sent)."""
        self._queue.append(_END)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        """Something changed for whoever waits on the call: its receiver and its sender."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._stream_id:
            self._protocol.release_writer(self._stream_id)

    # -- what each side says ---------------------------------------------------------

    def _raise_if_over(self) -> None:
        """If the call is over, raise what using it now raises."""
        raise NotImplementedError

    def _fail(self, status: Status, message: str) -> None:
        """End the call at once with ``status``: a message could not be taken or sent."""
        raise NotImplementedError

    def _undecodable(self) -> GRPCError:
        """What a message that does not decode raises (after ending the call, if it does)."""
        raise NotImplementedError

    def _end_taken(self) -> None:
        """The end of the peer's messages was handed over: raise if the call failed."""
        raise NotImplementedError
