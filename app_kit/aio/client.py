"""The gRPC client: a Channel (one HTTP/2 connection, many calls), call streams, stub methods."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import socket
import ssl as ssl_module
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Generic, TypedDict, TypeVar, Unpack, cast

import h2.errors

from .._version import __version__
from ..rpc.client import ClientConnection, status_for_reset
from ..rpc.codecs import CodecBase, ProtoCodec, ProtoStatusDetailsCodec, StatusDetailsCodecBase
from ..rpc.compression import IDENTITY, get_encoding
from ..rpc.connection import StreamGone
from ..rpc.deadline import Deadline
from ..rpc.events import (
    ConnectionClosed,
    Event,
    MessagesReceived,
    ResponseEnded,
    ResponseStarted,
    StreamClosed,
    StreamWritable,
)
from ..rpc.handlers import Cardinality
from ..rpc.metadata import Metadata, MetadataLike, decode_metadata, encode_metadata
from ..rpc.retry import RetryPolicies, RetryPolicy, pushback_delay
from ..rpc.status import GRPCError, ProtocolError, Status
from ..wire.config import Configuration
from .call import Call, Peer
from .hooks import InterceptorChain, default_hook, run_hooks
from .runtime import (
    Runtime,
    current_runtime,
    deadline_scope,
    expire_scope,
    getaddrinfo,
    is_cancellation,
    running_on_trio,
    sleep,
    wait_done,
    wait_shielded,
)
from .subchannel import DEFAULT_PORT, Address, Backoff, ConnectivityState, Subchannel, Target, parse_target
from .tls import client_tls
from .transport import ConnectionProtocol

__all__ = [
    "Channel",
    "ClientInterceptor",
    "ClientStream",
    "StreamStreamMethod",
    "StreamUnaryMethod",
    "UnaryStreamMethod",
    "UnaryUnaryMethod",
    "method_for",
]

SendT = TypeVar("SendT")
RecvT = TypeVar("RecvT")

log = logging.getLogger("app_kit.client")
_USER_AGENT = f"app_kit/{__version__} python/{sys.version_info[0]}.{sys.version_info[1]}"
_REFUSED_STREAM = int(h2.errors.ErrorCodes.REFUSED_STREAM)
_ENHANCE_YOUR_CALM = int(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
#: The requests of a client-streaming or bidi call kept (encoded) for a transparent retry, at
#: most: past it the call is committed, never retried (grpc-core's per_rpc_retry_buffer_size).
_RESEND_LIMIT = 256 * 1024
_OK, _UNARY_UNARY = Status.OK, Cardinality.UNARY_UNARY  # (off their class: a __getattr__ hook on 3.11)


class ClientInterceptor:
    """Base class of client interceptors; each method's default does nothing.

    Each attempt of a call (a retry is a new attempt) is seen as a call of its own.
    """

    async def start(self, call: ClientStream[Any, Any]) -> None:
        """Before the call connects and its request headers go out: ``call.path``,
        ``call.cardinality``, ``call.deadline``, ``call.request_metadata``; add metadata (e.g.
        credentials) with ``call.add_metadata(key, value)``. Raising :class:`~app_kit.GRPCError`
        fails the call with that status; nothing is sent."""

    @default_hook
    def on_message_sent(self, call: ClientStream[Any, Any], message: Any) -> Any:
        """A request message, before it is encoded: return it, or what replaces it."""
        return message

    @default_hook
    def on_message_received(self, call: ClientStream[Any, Any], message: Any) -> Any:
        """A reply, decoded, before the caller gets it: return it, or what replaces it."""
        return message

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        """The call ended and its caller is done with it (it left the call's ``async with``,
        as stub methods do when they return): ``call.status`` and ``call.status_message`` say
        how it ended, ``call.elapsed`` how long until its status came, the ``messages_*`` and
        ``bytes_*`` counters what went each way. Must not raise."""


class ClientProtocol(ConnectionProtocol):
    """One connection of a Channel: routes events to the calls on it."""

    connection: ClientConnection

    def __init__(self, connection: ClientConnection, loop: Runtime) -> None:
        super().__init__(connection, loop)
        self.calls: dict[int, ClientStream[Any, Any]] = {}
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: Called when the connection stops taking new calls (lost, or draining).
        self.on_unusable: Callable[[], None] | None = None
        #: Called if the server ends the connection for pinging too often.
        self.on_too_many_pings: Callable[[], None] | None = None
        self._closing_when_idle = False
        # Made while a connection attempt waits for the server's SETTINGS (wait_for_settings).
        self._settings_waiter: asyncio.Future[None] | None = None

    def handle_events(self, events: Sequence[Event]) -> None:
        """Deliver each event to the call it concerns."""
        calls = self.calls
        for event in events:
            kind = type(event)
            if kind is MessagesReceived:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None:
                    call._on_messages(event.messages)  # type: ignore[attr-defined]
            elif kind is ResponseStarted:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None:
                    call._on_headers(event.headers)  # type: ignore[attr-defined]
            elif kind is ResponseEnded:
                call = calls.pop(event.stream_id, None)  # type: ignore[attr-defined]
                if call is not None:
                    call._on_outcome(event.status, event.message, event.details, event.trailers)  # type: ignore[attr-defined]
            elif kind is StreamWritable:
                self.release_writer(event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamClosed:
                call = calls.pop(event.stream_id, None)  # type: ignore[attr-defined]
                if call is not None:
                    code = event.error_code  # type: ignore[attr-defined]
                    call._on_outcome(status_for_reset(code), event.reason, None, [], retryable=code == _REFUSED_STREAM)  # type: ignore[attr-defined]
            elif kind is ConnectionClosed:
                reason = event.reason  # type: ignore[attr-defined]
                if event.error_code == _ENHANCE_YOUR_CALM and "too_many_pings" in reason:  # type: ignore[attr-defined]
                    callback, self.on_too_many_pings = self.on_too_many_pings, None
                    if callback is not None:
                        callback()
                self._fail_all(f"connection closed: {reason}")
                self.close_transport()
        self._wake_slot_waiters()
        if self.connection.draining or self.connection.closed:
            self._unusable()
            if not self.calls:
                self.close_transport()
        elif self._closing_when_idle and not self.calls:
            self.close_transport()

    def data_received(self, data: bytes) -> None:
        """Feed the core; calls waiting for a stream slot may start once the server's SETTINGS
        arrive (they come without an event of their own)."""
        super().data_received(data)
        if self._slot_waiters:
            self._wake_slot_waiters()
        if self._settings_waiter is not None and self.connection.handshake_complete:
            self._wake_settings_waiter()

    def on_connection_lost(self, exc: Exception | None) -> None:
        """Every call still on the connection fails with UNAVAILABLE."""
        self._fail_all("connection lost" + (f": {exc}" if exc else ""))
        self._wake_slot_waiters()
        self._unusable()
        self._wake_settings_waiter()

    def close_transport(self, reason: str = "closed by the client") -> None:
        """Close the connection; its calls fail now. Once we close it nothing more is read
        (see data_received), so only the peer's close or the linger's end (a second later,
        if the peer does not close) would end them otherwise."""
        if self.is_closed:
            return
        super().close_transport(reason)
        self._fail_all(f"connection closed: {reason}")
        self._wake_slot_waiters()
        self._unusable()
        self._wake_settings_waiter()

    async def wait_for_settings(self) -> None:
        """Wait for the server's SETTINGS (its connection preface: it speaks HTTP/2, the
        connection is READY); ConnectionError if the connection ends first. Returns at once
        if they came (the usual case: a server sends them as it accepts)."""
        if not self.connection.handshake_complete and not self.is_closed:
            self._settings_waiter = waiter = self.loop.create_future()
            try:
                await waiter
            finally:
                self._settings_waiter = None
        if not self.connection.handshake_complete:
            raise ConnectionError("the connection closed before the server's HTTP/2 SETTINGS")

    def _wake_settings_waiter(self) -> None:
        waiter = self._settings_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _unusable(self) -> None:
        callback, self.on_unusable = self.on_unusable, None
        if callback is not None:
            callback()

    @property
    def takes_calls(self) -> bool:
        """Open, and not draining (GOAWAY, stream ids spent): new calls may start here."""
        connection = self.connection
        return not self.is_closed and not connection.closed and connection.draining is None

    @property
    def carried_calls(self) -> bool:
        """Whether a call was ever started on the connection."""
        return self.connection.carried_calls

    @property
    def unusable_reason(self) -> str:
        """Why it takes no new calls: lost, or draining (and why)."""
        if self.is_closed or self.connection.closed:
            return "connection lost"
        return self.connection.draining or "connection draining"

    def close_when_idle(self) -> None:
        """Take no more calls; close once the calls on the connection are done."""
        self._closing_when_idle = True
        if not self.calls and not self.is_closed:
            self.close_transport()

    def call_finished(self) -> None:
        """A call left the connection (outside an event): close it if it was the last one."""
        if self._closing_when_idle and not self.calls and not self.is_closed:
            self.close_transport()

    def _fail_all(self, reason: str) -> None:
        calls, self.calls = self.calls, {}
        for call in calls.values():
            call._on_outcome(Status.UNAVAILABLE, reason, None, [])

    def _wake_slot_waiters(self) -> None:
        connection = self.connection
        while self._slot_waiters and (connection.can_start_call or self.is_closed or connection.draining is not None):
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_slot(self) -> bool:
        """Wait until the server's stream limit lets a call start; False if it never will here."""
        connection = self.connection
        while not connection.can_start_call:
            if self.is_closed or connection.closed or connection.draining is not None:
                return False
            waiter = self.loop.create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done() or waiter.cancelled():
                    # Not woken (still queued): the call gave up (its deadline, cancelled).
                    # Dropped now, or a long-lived connection whose slots stay taken keeps
                    # every such waiter.
                    with contextlib.suppress(ValueError):
                        self._slot_waiters.remove(waiter)
        return True


#: RFC 8305's Connection Attempt Delay, as gRPC's pick_first uses it (gRFC A61).
HAPPY_EYEBALLS_DELAY = 0.25


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _connect_first(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A socket connected to the first of ``host``'s addresses that answers. The next address is
    tried ``HAPPY_EYEBALLS_DELAY`` after the previous attempt began (or at once when it failed),
    the earlier attempts going on: one address that drops SYNs (a node gone, an unroutable IPv6
    address) costs a quarter second, not the whole attempt. (asyncio's own Happy Eyeballs is not
    in uvloop.)"""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    waiting = collections.deque(infos)
    attempts: set[asyncio.Task[socket.socket]] = set()
    errors: list[OSError] = []
    try:
        while waiting or attempts:
            if waiting:
                family, kind, proto, _, address = waiting.popleft()
                attempts.add(loop.create_task(_connect_socket(loop, family, kind, proto, address)))
            done, attempts = await asyncio.wait(
                attempts, timeout=HAPPY_EYEBALLS_DELAY if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            connected = [task.result() for task in done if task.exception() is None]
            errors += [cast(OSError, task.exception()) for task in done if task.exception() is not None]
            if connected:
                for extra in connected[1:]:
                    extra.close()
                return connected[0]
    finally:
        for task in attempts:
            task.cancel()  # (each closes its socket; one that connected meanwhile is closed here)
            task.add_done_callback(_close_if_connected)
    if not errors:
        raise OSError(f"{host!r} resolved to no address")
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(map(str, errors))}")


async def _connect_socket(
    loop: asyncio.AbstractEventLoop, family: int, kind: int, proto: int, address: Any
) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _close_if_connected(task: asyncio.Task[socket.socket]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result().close()


class Channel:
    """Calls to one server or a fleet of them, over HTTP/2 connections opened as calls need them.

    What to connect to, as ``Channel(host, port)`` or as ``Channel(target)``:

    - ``Channel("10.0.0.7", 50051)``, ``Channel("api:50051")``, ``Channel(path="/run/api.sock")``
      or ``Channel("unix:/run/api.sock")``: one backend (a host name is resolved when connecting);
    - ``Channel("dns:///api.internal:50051")``: every address the name resolves to is a backend,
      resolved again in the background (at most every ``dns_min_resolution_interval``) when a
      connection fails or its server sends GOAWAY;
    - ``Channel(["10.0.0.7:50051", "10.0.0.8:50051"])``: these backends.

    Each backend gets its own connection, opened on demand and reopened after it is lost, with
    gRPC's exponential backoff between failed attempts (``connect_*`` in :class:`Configuration`).
    Calls go round-robin over the ready connections; a server's GOAWAY drains its connection
    while new calls go elsewhere. A backend that failed stays failing (TRANSIENT_FAILURE) until
    it is READY again, reconnecting in the background. A call fails at once with UNAVAILABLE
    when every backend is failing (or the name did not resolve), unless it asks
    ``wait_for_ready=True``: then it waits (within its deadline) for one to come back.
    :meth:`get_state`, :meth:`wait_for_state_change` and :meth:`channel_ready` follow the
    channel's connectivity.

    Failed calls are retried by ``retry_policy`` (a :class:`~app_kit.RetryPolicy` for every
    method) or by the ``retryPolicy`` entries of a gRPC ``service_config`` (a dict in its JSON
    shape, per service or method): only calls whose request is a single message, only before
    response headers came back, always within the call's deadline. A call the server refused or
    never processed is retried transparently, whatever its kind (see :class:`_RequestSender`).
    The service config's ``timeout`` per method bounds its calls (retries included) and its
    ``waitForReady`` is their default; what the channel does not implement is logged and ignored.

    ``ssl=True`` uses a default TLS context (:func:`~app_kit.client_tls` makes one with your
    roots and a client certificate, for mutual TLS); a context of your own is used as given,
    never changed, and must offer ALPN ``h2``. ``server_hostname`` is the name the server's
    certificate is checked against (and sent as SNI, and as the calls' ``:authority``), when it
    is not the host connected to.
    ``compression="gzip"`` compresses requests (any registered encoding; a call can say
    otherwise); responses in every registered encoding are accepted.

    ``interceptors`` (:class:`ClientInterceptor`, outermost first) run around every call.
    """

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        path: str | None = None,
        ssl: ssl_module.SSLContext | bool | None = None,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
        compression: str | None = None,
        retry_policy: RetryPolicy | None = None,
        service_config: Mapping[str, Any] | None = None,
        server_hostname: str | None = None,
        interceptors: Sequence[ClientInterceptor] = (),
    ) -> None:
        for interceptor in interceptors:
            if not isinstance(interceptor, ClientInterceptor):
                raise TypeError(f"{interceptor!r} is not a ClientInterceptor")
        #: The interceptors, and the hooks they override.
        self.interceptors = InterceptorChain(interceptors, inward="sent")
        if path is not None and (host is not None or port is not None):
            raise ValueError("path and host/port are mutually exclusive")
        compression = _request_encoding(compression)
        if path is not None:
            self._target = Target(addresses=(Address(path=path),))
        elif host is None:
            self._target = Target(addresses=(Address("127.0.0.1", port or DEFAULT_PORT),))
        elif not isinstance(host, str):
            if port is not None or not host:
                raise ValueError("a list of targets takes no port, and cannot be empty")
            addresses = [parse_target(item) for item in host]
            if any(target.dns_name is not None for target in addresses):
                raise ValueError("a list of targets takes addresses (host:port or unix:path), not dns: names")
            self._target = Target(addresses=tuple(address for target in addresses for address in target.addresses))
        elif port is not None:
            self._target = Target(addresses=(Address(host, port),))
        else:
            self._target = parse_target(host)
        if ssl is True:
            ssl = client_tls()
        self._ssl: ssl_module.SSLContext | None = ssl or None  # used as given, never changed
        if server_hostname is not None and self._ssl is None:
            raise ValueError("server_hostname is for TLS: pass ssl= too")
        self._server_hostname = server_hostname
        self.codec = codec if codec is not None else ProtoCodec()
        if status_details_codec is None and isinstance(self.codec, ProtoCodec):
            status_details_codec = ProtoStatusDetailsCodec()
        self.status_details_codec = status_details_codec
        self.config = config if config is not None else Configuration()
        #: The encoding of requests (None: uncompressed), unless a call says otherwise.
        self.compression = compression
        #: Our keepalive interval: doubled each time a server ends a connection because we
        #: pinged too often (GOAWAY ENHANCE_YOUR_CALM "too_many_pings"), as gRPC clients do.
        self.keepalive_time = self.config.keepalive_time
        self._retry_policies = RetryPolicies(service_config, default=retry_policy)
        for what in self._retry_policies.ignored:
            log.warning("service config: %s is not supported by app_kit's channel, and is ignored", what)
        #: The connection the latest call was placed on.
        self._protocol: ClientProtocol | None = None
        self._subchannels: list[Subchannel[ClientProtocol]] = []
        #: The ``:authority`` of requests: the server-name override if any (as grpc-core's
        #: ssl_target_name_override and grpc-go's credentials' server name make it), else
        #: the target's name.
        self._authority = server_hostname if server_hostname is not None else self._target.authority
        # Resolving a dns: name, in the background: the lookup under way, the timer that
        # starts the next one (one schedule per channel, whoever asks), and the time before
        # which none starts (the backoff after a failure, dns_min_resolution_interval after
        # a success).
        self._resolving: Any = None
        self._resolve_timer: Any = None
        self._resolve_after = 0.0
        self._resolve_wanted = False  # a backend failed or went away: resolve again when allowed
        self._resolve_error: str | None = None  # why the last lookup failed
        self._resolve_backoff = Backoff(self.config)
        self._next_pick = 0
        self._changed: asyncio.Future[None] | None = None
        # A call or try_to_connect asked for connections: backends DNS adds connect at once.
        self._used = False
        self._closed = False
        subtype = self.codec.content_subtype
        self._content_type = f"application/grpc+{subtype}".encode("ascii") if subtype else b"application/grpc"

    def __repr__(self) -> str:
        return f"<Channel {self._describe_target()}>"

    def _describe_target(self) -> str:
        if self._target.dns_name is not None:
            return f"dns:///{self._target.authority}"
        return ",".join(str(address) for address in self._target.addresses)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection; calls still on them fail with UNAVAILABLE."""
        self._closed = True
        subchannels, self._subchannels = self._subchannels, []
        for subchannel in subchannels:
            protocol = subchannel.protocol
            subchannel.shutdown()
            if protocol is not None and not protocol.is_closed:
                protocol.connection.close(0, "channel closed")
                protocol.close_transport("the channel was closed")  # its calls fail now
        if self._resolve_timer is not None:
            self._resolve_timer.cancel()
            self._resolve_timer = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        self._protocol = None
        self._notify()  # the calls waiting for a backend or for the name end now

    # -- connectivity ------------------------------------------------------------------

    def get_state(self, try_to_connect: bool = False) -> ConnectivityState:
        """The channel's connectivity: READY if a connection takes calls, else CONNECTING while
        one is being opened, IDLE before the first call (or after connections went away),
        TRANSIENT_FAILURE when every backend is failing, SHUTDOWN once closed.
        ``try_to_connect`` starts connecting an idle channel."""
        if self._closed:
            return ConnectivityState.SHUTDOWN
        if try_to_connect:
            self._used = True
            self._connect_all()
        for subchannel in self._subchannels:
            subchannel.ready_protocol()  # a lost or draining connection shows as IDLE
        states = {subchannel.state for subchannel in self._subchannels}
        for state in (ConnectivityState.READY, ConnectivityState.CONNECTING, ConnectivityState.IDLE):
            if state in states:
                return state
        if self._resolve_error is not None or states:
            return ConnectivityState.TRANSIENT_FAILURE
        return ConnectivityState.IDLE

    async def wait_for_state_change(self, last_state: ConnectivityState) -> ConnectivityState:
        """Wait until the state is other than ``last_state``; return the new one."""
        while (state := self.get_state()) is last_state and state is not ConnectivityState.SHUTDOWN:
            await self._state_change()
        return state

    async def channel_ready(self) -> None:
        """Connect if need be, and wait until a connection is READY (or the channel closed)."""
        while (state := self.get_state(try_to_connect=True)) is not ConnectivityState.READY:
            if state is ConnectivityState.SHUTDOWN:
                raise GRPCError(Status.UNAVAILABLE, "the channel is closed")
            await self._state_change()

    async def _state_change(self) -> None:
        if self._changed is None or self._changed.done():
            self._changed = current_runtime().create_future()
        await wait_shielded(self._changed)

    def _notify(self, subchannel: Subchannel[ClientProtocol] | None = None) -> None:
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)
        if (
            subchannel is not None
            and subchannel.state in (ConnectivityState.TRANSIENT_FAILURE, ConnectivityState.IDLE)
            and self._target.dns_name is not None
        ):
            self._resolve_wanted = True  # a backend failed or went away: the name may say more now
            self._resolve_soon()

    # -- picking a connection ----------------------------------------------------------

    async def _connection(self, wait_for_ready: bool = False) -> ClientProtocol:
        """A READY connection for a new call, round-robin; connect the backends that are idle.

        Fails with UNAVAILABLE when every backend is failing (or the name does not resolve),
        unless ``wait_for_ready``: then it waits for the channel's next change (a backend
        READY, a lookup's result, the channel closed).
        """
        self._used = True
        while True:
            if self._closed:
                raise GRPCError(Status.UNAVAILABLE, "the channel is closed")
            self._start_subchannels()
            protocol = self._pick()
            if protocol is not None:
                return protocol
            if not wait_for_ready:
                failure = self._failure()
                if failure is not None:
                    raise GRPCError(Status.UNAVAILABLE, failure)
            await self._state_change()

    def _failure(self) -> str | None:
        """Why a call that does not wait for ready fails now: every backend is in
        TRANSIENT_FAILURE, or the name's last lookup failed (it is not looked up again for
        the call: the channel's own schedule does that). None while one may yet connect."""
        subchannels = self._subchannels
        if not subchannels:
            return self._resolve_error  # None while the first lookup runs
        for subchannel in subchannels:
            if subchannel.state is not ConnectivityState.TRANSIENT_FAILURE:
                return None
        return subchannels[-1].last_error or "no backend is reachable"

    def _pick(self, only_with_a_free_slot: bool = False) -> ClientProtocol | None:
        """The next READY connection, round-robin, or None; connect the backends that are idle.
        ``only_with_a_free_slot``: None, and the turn not taken, if that one has no free slot."""
        ready = []
        for subchannel in self._subchannels:
            protocol = subchannel.ready_protocol()
            if protocol is not None:
                ready.append(protocol)
            else:
                subchannel.request_connection()
        if not ready:
            return None
        protocol = ready[self._next_pick % len(ready)]
        if only_with_a_free_slot and not protocol.connection.can_start_call:
            return None
        self._next_pick += 1
        self._protocol = protocol
        return protocol

    def _pick_at_once(self) -> ClientProtocol | None:
        """What :meth:`_connection` and a free stream slot would give without waiting, once
        the channel has backends (a name is resolved beside the calls, never by them): a
        call's usual start takes no await. Otherwise None, and the round-robin turn is left to
        the waiting path."""
        if self._closed or not self._subchannels:
            return None
        return self._pick(only_with_a_free_slot=True)

    def _connect_all(self) -> None:
        self._start_subchannels()
        for subchannel in self._subchannels:
            subchannel.request_connection()

    def _start_subchannels(self) -> None:
        """The backends: the target's addresses, made once; for a dns: name, those of its
        last lookup, the first one started here (in the background; see :meth:`_resolve_soon`)."""
        if self._subchannels or self._closed:
            return
        if self._target.dns_name is None:
            self._subchannels = [self._subchannel(address) for address in self._target.addresses]
        else:
            self._resolve_soon()

    def _resolve_soon(self) -> None:
        """Look the name up in the background: now, or once the backoff after a failed lookup
        (after a successful one: ``dns_min_resolution_interval``) is over. One schedule per
        channel: asking again while a lookup runs or is scheduled changes nothing."""
        if self._closed or self._resolving is not None or self._resolve_timer is not None:
            return
        runtime = current_runtime()
        wait = self._resolve_after - runtime.time()
        if wait > 0:
            self._resolve_timer = runtime.call_later(wait, self._resolve_now)
        else:
            self._resolve_now()

    def _resolve_now(self) -> None:
        self._resolve_timer = None
        target = self._target
        if not self._closed and self._resolving is None and target.dns_name is not None:
            self._resolving = current_runtime().create_task(self._resolve(target.dns_name, target.dns_port))

    async def _resolve(self, name: str, port: int) -> None:
        """One lookup: its addresses become the backends (a failed one keeps those there
        are); then the next lookup is scheduled if one is wanted. Every outcome is a change
        the waiting calls see."""
        runtime = current_runtime()
        self._resolve_wanted = False
        error = None
        try:
            infos = await getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # socket.gaierror; a name IDNA cannot encode...
            error = f"cannot resolve {name}: {exc}"
            infos = []
        finally:
            self._resolving = None
        addresses = list(dict.fromkeys(Address(str(info[4][0]), int(info[4][1])) for info in infos))
        if self._closed:
            return
        if error is not None or not addresses:
            self._resolve_error = error or f"{name} resolved to no address"
            self._resolve_after = runtime.time() + self._resolve_backoff.next_delay()
            if not self._subchannels:
                self._resolve_wanted = True  # nothing to call: try again after the backoff
        else:
            self._resolve_error = None
            self._resolve_backoff.reset()
            self._resolve_after = runtime.time() + self.config.dns_min_resolution_interval
            kept = {subchannel.address: subchannel for subchannel in self._subchannels}
            for address, subchannel in kept.items():
                if address not in addresses:
                    subchannel.shutdown()  # gone from DNS: its calls finish, no new ones
            self._subchannels = [kept.get(address) or self._subchannel(address) for address in addresses]
            if self._used:
                for subchannel in self._subchannels:
                    subchannel.request_connection()
        if self._resolve_wanted:
            self._resolve_soon()
        self._notify()

    def _subchannel(self, address: Address) -> Subchannel[ClientProtocol]:
        return Subchannel(address, self._connect, self.config, self._notify)

    async def _connect(self, address: Address) -> ClientProtocol:
        """Open one connection to ``address`` (OSError, or ConnectionError without ALPN h2)."""
        authority = self._authority

        config = self.config
        if config.keepalive_time != self.keepalive_time:
            config = dataclasses.replace(config, keepalive_time=self.keepalive_time)

        made: list[ClientProtocol] = []  # what the attempt opened, to close if it fails

        def factory(loop: Runtime) -> ClientProtocol:
            connection = ClientConnection(
                config,
                authority=authority,
                scheme="https" if self._ssl is not None else "http",
                user_agent=_USER_AGENT,
            )
            made.append(ClientProtocol(connection, loop))
            return made[-1]

        try:
            protocol = await self._open_transport(factory, address)
            if self._ssl is not None:
                assert protocol.transport is not None
                ssl_object = protocol.transport.get_extra_info("ssl_object")
                if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                    raise ConnectionError(
                        f"{address} did not negotiate HTTP/2 (ALPN h2); a TLS context of your own must offer it:"
                        ' context.set_alpn_protocols(["h2"]), or make it with app_kit.client_tls()'
                    )
            # READY once the server speaks HTTP/2, not at TCP connect: a proxy with no live
            # backend accepts and closes; calls put on that would fail, and reconnecting would
            # not back off.
            await protocol.wait_for_settings()
            if self._closed:  # close() ran while we connected: this connection is nobody's
                raise ConnectionError("the channel is closed")
        except BaseException:
            # Failed, timed out (the attempt's deadline), or cancelled (the subchannel shut
            # down): what was opened is closed now, not left to the handshake timeout.
            for opened in made:
                opened.connection.close(0, "connection attempt abandoned")
                opened.close_transport("the connection attempt was abandoned")
            raise
        protocol.on_too_many_pings = self._back_off_keepalive
        return protocol

    def _back_off_keepalive(self) -> None:
        if self.keepalive_time is not None:
            self.keepalive_time *= 2
            log.warning("server said too_many_pings: keepalive_time doubled to %ss", self.keepalive_time)

    async def _open_transport(self, factory: Callable[[Runtime], ClientProtocol], address: Address) -> ClientProtocol:
        if running_on_trio():
            from .streams import open_connection

            made = await open_connection(
                factory,
                host=address.host,
                port=address.port,
                path=address.path,
                tls=self._ssl,
                server_hostname=self._server_hostname,
                handshake_timeout=self.config.handshake_timeout,
            )
            return cast(ClientProtocol, made)
        loop = asyncio.get_running_loop()
        # The TLS handshake has handshake_timeout, as the HTTP/2 one after it (a stalled TLS
        # proxy held a call until connect_min_timeout, 20 s by default).
        tls_timeout = self.config.handshake_timeout if self._ssl else None
        if address.path is not None:
            hostname = self._server_hostname or ("localhost" if self._ssl else None)
            _, protocol = await loop.create_unix_connection(
                functools.partial(factory, loop),
                address.path,
                ssl=self._ssl,
                server_hostname=hostname,
                ssl_handshake_timeout=tls_timeout,
            )
        else:
            assert address.host is not None and address.port is not None  # set whenever path is None
            if _is_ip_address(address.host):
                _, protocol = await loop.create_connection(
                    functools.partial(factory, loop),
                    address.host,
                    address.port,
                    ssl=self._ssl,
                    server_hostname=self._server_hostname,
                    ssl_handshake_timeout=tls_timeout,
                )
            else:
                sock = await _connect_first(loop, address.host, address.port)
                _, protocol = await loop.create_connection(
                    functools.partial(factory, loop),
                    sock=sock,
                    ssl=self._ssl,
                    server_hostname=(self._server_hostname or address.host) if self._ssl else None,
                    ssl_handshake_timeout=tls_timeout,
                )
        return protocol

    def request(
        self,
        path: str,
        cardinality: Cardinality,
        request_type: Any,
        reply_type: Any,
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
        compression: str | None = None,
        wait_for_ready: bool | None = None,
    ) -> ClientStream[Any, Any]:
        """A call to ``path``, used as ``async with channel.request(...) as stream``.

        ``wait_for_ready``: while no backend is reachable, wait (within the deadline) instead
        of failing with UNAVAILABLE at once (None: as the service config says for the
        method, else False). A ``timeout`` the service config gives the method bounds the
        call's deadline too."""
        deadline = _earliest(timeout, deadline)
        if self._retry_policies.has_call_settings:
            deadline = _earliest(self._retry_policies.timeout_for(path), deadline)
            if wait_for_ready is None:
                wait_for_ready = self._retry_policies.wait_for_ready_for(path)
        return ClientStream(
            self,
            path,
            cardinality,
            request_type,
            reply_type,
            metadata=encode_metadata(metadata),
            deadline=deadline,
            compression=self.compression if compression is None else _request_encoding(compression),
            wait_for_ready=bool(wait_for_ready),
        )


def _request_encoding(name: str | None) -> str | None:
    """A call's request encoding as sent (None: identity); ValueError if not registered."""
    if name is None or name == IDENTITY:
        return None
    get_encoding(name)
    return name


def _earliest(timeout: float | None, deadline: Deadline | None) -> Deadline | None:
    """The sooner of ``timeout`` seconds from now and ``deadline``."""
    if timeout is None:
        return deadline
    from_timeout = Deadline.from_timeout(timeout)
    return from_timeout if deadline is None or from_timeout < deadline else deadline


class ClientStream(Call[RecvT, SendT], Generic[SendT, RecvT]):
    """One call on the client side.

    Use it as ``async with``: leaving the block cancels the call if it is not finished.
    Request headers go out with the first message (or :meth:`send_request`); a non-OK status
    is raised as :class:`GRPCError` from :meth:`recv_message`, :meth:`recv_trailing_metadata`
    or :meth:`recv_initial_metadata`.
    """

    _SENDS = "request"
    _connection: ClientConnection
    _protocol: ClientProtocol

    def __init__(
        self,
        channel: Channel,
        path: str,
        cardinality: Cardinality,
        request_type: Any,
        reply_type: Any,
        *,
        metadata: list[tuple[bytes, bytes]],
        deadline: Deadline | None,
        compression: str | None,
        wait_for_ready: bool = False,
    ) -> None:
        interceptors = channel.interceptors
        Call.__init__(
            self,
            path,
            cardinality,
            channel.codec,
            reply_type,
            request_type,
            channel.config.max_send_message_length,
            interceptors,
            False,
        )
        self._channel = channel
        #: Wait for a backend to be reachable instead of failing UNAVAILABLE at once.
        self.wait_for_ready = wait_for_ready
        #: ``/package.Service/Method`` of the call (also :attr:`method`).
        self.path = path
        self._metadata = metadata
        #: When the call gives up with DEADLINE_EXCEEDED.
        self.deadline = deadline
        self._compression = compression
        # _protocol and _connection are set when the call is placed, and its _stream_id then.
        self._stream_id = 0
        self._send_ended = False
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._outcome: tuple[Status, str | None, bytes | None, list[tuple[bytes, bytes]]] | None = None
        self._retryable = False
        # A list while a streaming method's sender keeps the requests sent (see _RequestSender).
        self._kept: list[bytes] | None = None
        self._deadline_handle: asyncio.TimerHandle | None = None
        # While one of the call's tasks places it (see _placing_step), the scope that bounds
        # that; the others wait for it.
        self._placing: Any = None
        self._placed: Any = None  # a future, made when a second task waits
        #: Response headers' metadata, once :meth:`recv_initial_metadata` returned.
        self.initial_metadata: Metadata | None = None
        #: Trailers' metadata, once :meth:`recv_trailing_metadata` returned.
        self.trailing_metadata: Metadata | None = None
        self._interceptors = interceptors.interceptors
        self._started_at = 0.0

    async def __aenter__(self) -> ClientStream[SendT, RecvT]:
        self._enter()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave(exc_info[1])

    def _enter(self) -> None:
        if self.deadline is not None:
            self._deadline_handle = current_runtime().call_later(self.deadline.time_remaining(), self._on_deadline)

    def _leave(self, error: object) -> None:
        """The caller is done with the call (``error``: what it raised, or None)."""
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        if self._outcome is None:
            if isinstance(error, GRPCError):
                # Failed on our side (no backend, a request too large...): the call ends as raised.
                self._abort(error.status, error.message or "")
            else:
                self._abort(Status.CANCELLED, "cancelled by the client")
        if self._entered:
            self._end_interceptors()

    @property
    def request_encoding(self) -> str:
        """The encoding of this call's request messages (``"identity"``: uncompressed)."""
        return self._compression or IDENTITY

    @property
    def response_encoding(self) -> str:
        """The server's ``grpc-encoding`` for its replies, once the response headers came."""
        for name, value in self._headers or ():
            if name == b"grpc-encoding":
                return value.decode("latin-1")
        return IDENTITY

    @property
    def peer(self) -> Peer | None:
        """The server's end of the connection, once the call started."""
        if not self._stream_id or self._protocol.transport is None:
            return None
        return Peer(self._protocol.transport)

    # -- sending ---------------------------------------------------------------------

    async def send_request(self, *, end: bool = False) -> None:
        """Send the request headers (implicit with the first message); ``end`` half-closes too."""
        if self._stream_id or self._placing is not None:
            raise ProtocolError("the request was sent already")
        self._raise_if_over()
        if not self._interceptors or self._entered:
            protocol = self._channel._pick_at_once()
            if protocol is not None:  # the common case: nothing to wait for, no step to bound
                self._start(protocol, end)
                return
        await self._placing_step(self._send_request, end)

    async def _place(self) -> None:
        """Place the call (its request headers) if not yet, or wait while another of its
        tasks does (a bidi call's sender and receiver both start it). Raises if the call
        ended first."""
        while not self._stream_id:
            self._raise_if_over()
            if self._placing is None:
                await self.send_request()
            else:
                if self._placed is None:
                    self._placed = current_runtime().create_future()
                await wait_shielded(self._placed)

    async def _placing_step(self, step: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Run a step of placing the call (its interceptors' start, waiting for a connection
        and a stream slot, sending the headers) as its one placing task; its other tasks wait
        (:meth:`_place`). The deadline bounds the step, and the call's end cuts it short
        (:meth:`_on_outcome`: cancel() from another task, the deadline's timer); the call's
        status is raised then. A step that fails otherwise ends the call (CANCELLED if its
        task was cancelled): the call is one, whichever of its tasks placed it."""
        deadline = self.deadline
        scope = deadline_scope(current_runtime(), deadline.time_remaining() if deadline is not None else None)
        try:
            async with scope:
                self._placing = scope
                try:
                    await step(*args)
                finally:
                    self._placing = None
        except BaseException as exc:
            if isinstance(exc, TimeoutError) and scope.expired():
                self._on_deadline()  # (unless the call ended first: that is what expired it)
                self._raise_if_over()
            if self._outcome is None:
                if isinstance(exc, GRPCError):
                    self._abort(exc.status, exc.message or "")
                else:
                    self._abort(Status.CANCELLED, "cancelled by the client")
            raise
        finally:
            placed, self._placed = self._placed, None
            if placed is not None:
                placed.set_result(None)

    @property
    def method(self) -> str:
        """``/package.Service/Method`` of the call: :attr:`path`, under the name the server's
        :class:`~app_kit.Stream` gives it (one interceptor can serve both sides)."""
        return self.path

    async def _send_request(self, end: bool) -> None:
        # (A placing step: see _placing_step.)
        if self._interceptors and not self._entered:
            await self._start_interceptors()
        protocol = self._channel._pick_at_once()
        if protocol is None:
            protocol = await self._channel._connection(self.wait_for_ready)
            while not await protocol.wait_for_slot():
                protocol = await self._channel._connection(self.wait_for_ready)
        self._raise_if_over()
        self._start(protocol, end)

    def _start(self, protocol: ClientProtocol, end: bool = False) -> None:
        """Send the request headers on ``protocol``'s connection (it has a free slot); ``end``
        half-closes too."""
        connection = protocol.connection
        self._stream_id = connection.start_call(
            self.path,
            self._metadata,
            timeout=self.deadline.time_remaining() if self.deadline else None,
            encoding=self._compression,
            content_type=self._channel._content_type,
        )
        self._protocol = protocol
        self._connection = connection
        protocol.calls[self._stream_id] = self
        protocol.schedule_flush()
        if end:
            self._send_ended = True
            connection.end_local(self._stream_id, [])

    async def send_message(self, message: SendT, *, end: bool = False, compress: bool = True) -> None:
        """Send one request message; ``end=True`` half-closes the stream after it.

        In a compressed call, ``compress=False`` sends this one message uncompressed.
        """
        if self._send_ended:
            raise ProtocolError("the request stream was ended already")
        if self._sent and not self._cardinality.client_streaming:
            raise ProtocolError(f"{self.path} takes exactly one request message")
        if self._interceptors and not self._entered:
            await self._placing_step(self._start_interceptors)  # before the message hooks see the call
        if self._send_hooks and self._outcome is None:  # never after the call ended
            message = run_hooks(self._send_hooks, self, message)
        encode_exact = self._encode_exact
        if encode_exact is not None and type(message) is self._send_type:
            data = encode_exact(message)
        else:
            data = self._encode(message, self._send_type)
        if len(data) > self._max_send:
            try:
                self._raise_too_large(data)
            except GRPCError as exc:
                # The call ends with it (as grpc-go's and grpc-java's do): the server, waiting
                # for this request, would otherwise wait for ever for a sender that gave up.
                if self._outcome is None:
                    self._abort(exc.status, exc.message or "")
                raise
        if not self._stream_id:
            # Usually placed here and now: a ready connection with a free slot, nothing to
            # await first (interceptors, a call placing meanwhile from another task).
            protocol = None
            if not self._placing and self._outcome is None and not (self._interceptors and not self._entered):
                protocol = self._channel._pick_at_once()
            if protocol is not None:
                self._start(protocol)
            else:
                await self._place()
        self._raise_if_over()
        self._sent += 1
        ready = self._put(data, compress, end)
        if self._kept is not None:
            self._kept.append(data)
        if end:
            self._send_ended = True
        if not ready or self._protocol.write_paused:
            await self._wait_sent(ready)

    async def _wait_sent(self, ready: bool) -> None:
        """Wait while a message just queued must wait to leave (for its stream's buffer or a
        full socket)."""
        await self._protocol.drain(self._stream_id, ready)
        if self._outcome is not None:
            # The call ended meanwhile: a failure is raised here; a success is the caller's to
            # read (the whole response may have come meanwhile).
            self._raise_outcome()

    async def _resend(self, data: bytes) -> None:
        """Send a request message as an earlier attempt of the call sent it (encoded, its
        interceptors' ``on_message_sent`` run then): a transparent retry of a streaming call."""
        if not self._stream_id:
            await self._place()
        self._raise_if_over()
        self._sent += 1
        ready = self._put(data, True)
        if not ready or self._protocol.write_paused:
            await self._wait_sent(ready)

    async def end(self) -> None:
        """Half-close: no more request messages."""
        if self._send_ended:
            return
        if not self._stream_id:
            if self._placing is None:
                await self.send_request(end=True)
                return
            await self._place()  # placed by another of the call's tasks: end it here
            if self._send_ended:
                return
        self._send_ended = True
        if self._outcome is None:
            try:
                self._connection.end_local(self._stream_id, [])
            except StreamGone:
                return
            self._protocol.schedule_flush()

    async def cancel(self) -> None:
        """Abort the call (RST_STREAM CANCEL); it ends with CANCELLED."""
        if self._outcome is not None:
            return
        self._abort(Status.CANCELLED, "cancelled by the client")

    def _abort(self, status: Status, message: str) -> None:
        stream_id = self._stream_id
        if stream_id:
            protocol = self._protocol
            protocol.calls.pop(stream_id, None)
            protocol.connection.cancel_stream(stream_id)
            protocol.schedule_flush()
            protocol._wake_slot_waiters()  # its slot is free now
            protocol.call_finished()
        self._on_outcome(status, message, None, [])

    # -- receiving -------------------------------------------------------------------

    async def recv_initial_metadata(self) -> Metadata:
        """Wait for the response headers and return their metadata."""
        if self.initial_metadata is not None:
            return self.initial_metadata
        if not self._stream_id:
            await self._place()
        while self._headers is None and self._outcome is None:
            await self._wait()
        if self._headers is None:
            self._raise_outcome()
            self._headers = []
        try:
            self.initial_metadata = decode_metadata(self._headers)
        except ValueError as exc:
            raise self._fail_here(Status.INTERNAL, f"invalid response metadata: {exc}") from None
        return self.initial_metadata

    async def recv_message(self) -> RecvT | None:
        """The next reply, or None after the last one (a non-OK status is raised)."""
        if self.initial_metadata is None:
            await self.recv_initial_metadata()
        if self._recv_done:
            self._raise_outcome()
            return None
        if not self._queue:
            await self._arrival()
        return self._take(self._queue.popleft())

    def __aiter__(self) -> AsyncIterator[RecvT]:
        return self

    async def __anext__(self) -> RecvT:
        # recv_message's body again: one coroutine per reply instead of an async generator
        # driving a second one.
        if self.initial_metadata is None:
            await self.recv_initial_metadata()
        if self._recv_done:
            self._raise_outcome()
        else:
            if not self._queue:
                await self._arrival()
            message = self._take(self._queue.popleft())
            if message is not None:
                return message
        raise StopAsyncIteration

    async def recv_trailing_metadata(self) -> Metadata:
        """Wait for the end of the call; return the trailers' metadata (a non-OK status is raised)."""
        if not self._stream_id and self._outcome is None:
            await self._place()
        while self._outcome is None:
            await self._wait()
        self._raise_outcome()
        return self.trailing_metadata  # type: ignore[return-value]

    async def _unary_reply(self) -> RecvT:
        """What a unary stub call reads, in one coroutine: :meth:`recv_message` (the response
        headers, then the reply, each taken as it arrives: a bad one fails the call at once),
        then :meth:`recv_trailing_metadata`."""
        while self._headers is None and self._outcome is None:
            # _wait's body (usually the only wait: headers, reply and status come together).
            self._waiter = waiter = self._protocol.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self._headers is None:
            self._raise_outcome()  # (a failure raises; an OK without headers: no metadata)
            self._headers = []
        try:
            self.initial_metadata = decode_metadata(self._headers)
        except ValueError as exc:
            raise self._fail_here(Status.INTERNAL, f"invalid response metadata: {exc}") from None
        if not self._queue:
            await self._arrival()
        reply = self._take(self._queue.popleft())  # the end, if no reply came: a failure raises
        while self._outcome is None:
            await self._wait()
        self._raise_outcome()
        if reply is None:
            raise self._fail_here(Status.UNIMPLEMENTED, "the server sent no reply to a unary call")
        return reply

    # -- outcome ---------------------------------------------------------------------

    def _raise_outcome(self) -> None:
        assert self._outcome is not None
        status, message, details, _ = self._outcome
        if status is _OK:
            return
        decoded = None
        codec = self._channel.status_details_codec
        if details is not None and codec is not None:
            try:
                decoded = codec.decode(status, message, details)
            except Exception:
                decoded = None
        raise GRPCError(status, message, decoded, trailing_metadata=self.trailing_metadata)

    def _raise_if_over(self) -> None:
        if self._outcome is not None:
            self._raise_outcome()
            raise ProtocolError("the call is finished")

    def _fail(self, status: Status, message: str) -> None:
        """A reply that cannot be inflated (or a request not compressed) ends the call here,
        whatever status the server sent (see :meth:`_fail_here`)."""
        self._fail_here(status, message)

    def _undecodable(self) -> GRPCError:
        return self._fail_here(Status.INTERNAL, "could not decode the reply message")

    def _fail_here(self, status: Status, message: str) -> GRPCError:
        """The call fails on our side (what came back is unusable), whatever status the server
        sent: an OK becomes ``status`` for the call's ``status`` and its interceptors too,
        as the caller gets it; a call still running is ended (RST_STREAM CANCEL)."""
        if self._outcome is None:
            self._abort(status, message)
        elif self._outcome[0] is _OK:
            self._outcome = (status, message, None, self._outcome[3])
            self._status, self._status_message = status, message
        return GRPCError(status, message)

    def _end_taken(self) -> None:
        self._raise_outcome()

    def _on_deadline(self) -> None:
        if self._outcome is None:
            self._abort(Status.DEADLINE_EXCEEDED, "Deadline exceeded")

    # -- called by the connection ----------------------------------------------------

    def _on_headers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._headers = headers
        self._wake()

    def _on_outcome(
        self,
        status: Status,
        message: str | None,
        details: bytes | None,
        trailers: list[tuple[bytes, bytes]],
        *,
        retryable: bool = False,
    ) -> None:
        if self._outcome is not None:
            return
        if self._messages_arrived > 1 and status is _OK and not self._cardinality.server_streaming:
            # Two replies to a call that takes one: the server is broken, not the first reply
            # the result (grpc-go and grpc-java fail it so). Checked once here, not per message.
            status, message = Status.INTERNAL, "cardinality violation: more than one reply to a unary call"
        self._outcome = (status, message, details, trailers)
        self._status, self._status_message = status, message
        if self._placing is not None:  # a task waits to place it: that ends now
            expire_scope(self._placing)
        self._on_end()  # after the replies that came: recv_message hands them over first
        # Refused or never processed, and nothing came back: a retry cannot run it twice.
        self._retryable = retryable and self._headers is None
        # The status is the server's whatever its trailers hold: a value that cannot be read
        # is left out, not the others with it.
        self.trailing_metadata = decode_metadata(trailers, lenient=True)
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
        self._wake()
        if self._entered:
            self._ended_at = time.perf_counter()

    # -- interceptors ----------------------------------------------------------------

    async def _start_interceptors(self) -> None:
        """Run each interceptor's ``start``; one that raises ends the call before it is sent.
        (A placing step: a cancellation is the step's to tell, its deadline's or its task's.)"""
        self._started_at = time.perf_counter()
        for interceptor in self._interceptors:
            self._entered += 1
            try:
                await interceptor.start(self)
            except GRPCError as exc:
                self._on_outcome(exc.status, exc.message, None, [])
                raise
            except BaseException as exc:
                if not is_cancellation(exc):
                    self._on_outcome(Status.UNKNOWN, f"{interceptor!r} failed: {exc!r}", None, [])
                raise

    def _end_interceptors(self) -> None:
        """The caller is done with the ended call: its interceptors hear of it, once."""
        entered, self._entered = self._entered, 0
        interceptors, self._interceptors = self._interceptors, ()  # and never start again
        for interceptor in reversed(interceptors[:entered]):
            try:
                interceptor.on_call_end(self)
            except Exception:
                log.exception("%r failed in on_call_end of %s", interceptor, self.path)

    @property
    def request_metadata(self) -> Metadata:
        """The metadata the call sends (what interceptors added included)."""
        return decode_metadata(self._metadata)

    def add_metadata(self, key: str, value: str | bytes) -> None:
        """Send this metadata too (before the request headers went out; interceptors' ``start``)."""
        if self._stream_id:
            raise ProtocolError("the request headers were sent already")
        self._metadata.extend(encode_metadata([(key, value)]))


class CallOptions(TypedDict, total=False):
    """What every call of a stub method takes, by keyword.

    ``timeout`` (seconds) or ``deadline`` (the sooner wins), ``metadata`` to send,
    ``compression`` of the requests (overriding the channel's; ``"identity"`` for none),
    ``wait_for_ready``: wait for a reachable backend instead of failing UNAVAILABLE at once.
    """

    timeout: float | None
    deadline: Deadline | None
    metadata: MetadataLike | None
    compression: str | None
    wait_for_ready: bool


class _Method(Generic[SendT, RecvT]):
    """A method of a stub: ``open()`` a call, or call it directly."""

    cardinality: Cardinality

    def __init__(self, channel: Channel, path: str, request_type: Any, reply_type: Any) -> None:
        self.channel = channel
        self.path = path
        self.request_type = request_type
        self.reply_type = reply_type
        #: The service config's timeout for the method (seconds), if it gives one.
        self._config_timeout = channel._retry_policies.timeout_for(path)

    def open(
        self,
        **options: Unpack[CallOptions],
    ) -> ClientStream[SendT, RecvT]:
        """A call to use as ``async with method.open(...) as stream``."""
        return self.channel.request(self.path, self.cardinality, self.request_type, self.reply_type, **options)

    def _fix_deadline(self, options: CallOptions) -> None:
        """The call's deadline, fixed once for all its attempts (a retry gets what is left of
        it): the sooner of its timeout, its deadline and the service config's timeout."""
        options["deadline"] = _earliest(options.pop("timeout", None), options.get("deadline"))
        if self._config_timeout is not None:
            options["deadline"] = _earliest(self._config_timeout, options["deadline"])

    def _attempts(self, options: CallOptions) -> _Attempts:
        """The call's deadline fixed once (a retry gets what is left of it), and its retries."""
        self._fix_deadline(options)
        policy = self.channel._retry_policies.for_method(self.path)
        return _Attempts(policy, options["deadline"], self.channel.config.max_transparent_retries)

    def _transparent_attempts(self, options: CallOptions) -> _Attempts:
        """As :meth:`_attempts`, for a call that streams its requests: transparent retries
        only (retry policies are for calls with a single request)."""
        self._fix_deadline(options)
        return _Attempts(None, options["deadline"], self.channel.config.max_transparent_retries)


class _Attempts:
    """Whether (and after how long) a failed attempt of a call is made again.

    Transparently and at once, up to ``max_transparent_retries`` times: a call the server
    refused (REFUSED_STREAM) or never processed (above a GOAWAY's last-stream-id). By the
    retry policy: a retryable status while the call is not committed (no response headers
    came back), within the attempts allowed, the server's pushback and the call's deadline.
    """

    def __init__(self, policy: RetryPolicy | None, deadline: Deadline | None, transparent: int) -> None:
        self._policy = policy
        self._deadline = deadline
        self._transparent_left = transparent
        self._attempts = 1
        self._since_pushback = 0  # retries backed off since the server's last pushback

    def tell(self, stream: ClientStream[Any, Any]) -> None:
        """Say in ``stream``'s request headers how many attempts of the call came before it,
        as gRFC A6's ``grpc-previous-rpc-attempts`` (absent on the first)."""
        if self._attempts > 1:
            stream._metadata.append((b"grpc-previous-rpc-attempts", b"%d" % (self._attempts - 1)))

    def retry_delay(self, stream: ClientStream[Any, Any], error: GRPCError) -> float | None:
        """Seconds to wait before the next attempt, or None: raise ``error``."""
        if stream._retryable and self._transparent_left > 0:
            self._transparent_left -= 1  # not counted as an attempt, as gRFC A6 says
            return 0.0
        policy = self._policy
        if policy is None or self._attempts >= policy.max_attempts or stream._headers:
            return None  # no policy, out of attempts, or committed (response headers came)
        if error.status not in policy.retryable_status_codes:
            return None
        raw = stream._outcome[3] if stream._outcome is not None else []
        pushbacks = [value for name, value in raw if name == b"grpc-retry-pushback-ms"]
        self._attempts += 1
        if pushbacks:
            # The server's word, 0 included (at once); a malformed one: do not retry. The
            # backoff starts again from the initial one after it (gRFC A6, grpc-core).
            delay = pushback_delay(pushbacks[0].decode("latin-1"))
            if delay is None:
                return None
            self._since_pushback = 0
        else:
            self._since_pushback += 1
            delay = policy.backoff(self._since_pushback)
        if self._deadline is not None and self._deadline.time_remaining() <= delay:
            return None  # no time left for another attempt
        return delay


class UnaryUnaryMethod(_Method[SendT, RecvT]):
    """One request, one reply: ``reply = await stub.Method(request)``; ``with_call`` for metadata."""

    cardinality = Cardinality.UNARY_UNARY

    async def __call__(
        self,
        request: SendT,
        **options: Unpack[CallOptions],
    ) -> RecvT:
        """Make the call; a non-OK status raises :class:`GRPCError`."""
        return (await self._call(request, options))[0]

    async def with_call(
        self,
        request: SendT,
        **options: Unpack[CallOptions],
    ) -> tuple[RecvT, ClientStream[SendT, RecvT]]:
        """Make the call; return the reply and the finished call, whose ``initial_metadata``,
        ``trailing_metadata``, ``response_encoding`` and ``peer`` tell how it went."""
        return await self._call(request, options)

    async def _call(self, request: SendT, options: CallOptions) -> tuple[RecvT, ClientStream[SendT, RecvT]]:
        # The deadline is fixed now (a retry gets what is left of it); the retry policy is
        # looked up if an attempt fails.
        options["deadline"] = _earliest(options.pop("timeout", None), options.get("deadline"))
        if self._config_timeout is not None:  # (_fix_deadline's, inline: it runs per call)
            options["deadline"] = _earliest(self._config_timeout, options["deadline"])
        attempts = None
        while True:
            # `async with channel.request(...) as stream`, without its two coroutines.
            stream = self.channel.request(self.path, _UNARY_UNARY, self.request_type, self.reply_type, **options)
            if attempts is not None:
                attempts.tell(stream)
            stream._enter()
            try:
                await stream.send_message(request, end=True)
                reply = await stream._unary_reply()
            except GRPCError as exc:
                if attempts is None:
                    attempts = self._attempts(options)
                delay = attempts.retry_delay(stream, exc)
                if delay is None:
                    stream._leave(exc)
                    raise
                stream._leave(None)
            except BaseException as exc:
                stream._leave(exc)
                raise
            else:
                stream._leave(None)
                return reply, stream
            await sleep(delay)


class ReplyStream(Generic[SendT, RecvT]):
    """The replies of a call that streams them: ``async for reply in stub.Method(...)`` takes
    each as it arrives; ``await stub.Method(...)`` collects them in a list.

    The call starts when iteration (or the await) does, and runs once. Leaving the ``async
    for`` early cancels it. After it ended, :attr:`call` is the finished :class:`ClientStream`
    (its ``initial_metadata``, ``trailing_metadata``...).
    """

    def __init__(
        self,
        run: Callable[[ReplyStream[SendT, RecvT]], AsyncIterator[RecvT]],
    ) -> None:
        self._run = run
        self._started = False
        #: The call, once it started.
        self.call: ClientStream[SendT, RecvT] | None = None

    def __aiter__(self) -> AsyncIterator[RecvT]:
        if self._started:
            raise ProtocolError("a call's replies can be read once")
        self._started = True
        return self._run(self)

    def __await__(self) -> Generator[Any, None, list[RecvT]]:
        return self._collect().__await__()

    async def _collect(self) -> list[RecvT]:
        return [reply async for reply in self]


class UnaryStreamMethod(_Method[SendT, RecvT]):
    """One request, a stream of replies: ``async for reply in stub.Method(request)``."""

    cardinality = Cardinality.UNARY_STREAM

    def __call__(
        self,
        request: SendT,
        **options: Unpack[CallOptions],
    ) -> ReplyStream[SendT, RecvT]:
        """The call's replies, as they arrive (``async for``), or all of them (``await``)."""
        attempts = self._attempts(options)

        async def run(replies: ReplyStream[SendT, RecvT]) -> AsyncIterator[RecvT]:
            while True:
                async with self.open(**options) as stream:
                    replies.call = stream
                    attempts.tell(stream)
                    try:
                        await stream.send_message(request, end=True)
                        async for reply in stream:
                            yield reply
                        await stream.recv_trailing_metadata()
                        return
                    except GRPCError as exc:
                        # Never once a reply was yielded: its headers committed the call.
                        delay = attempts.retry_delay(stream, exc)
                        if delay is None:
                            raise
                await sleep(delay)

        return ReplyStream(run)


class StreamUnaryMethod(_Method[SendT, RecvT]):
    """A stream of requests, one reply: ``reply = await stub.Method(requests)``, or ``open()``."""

    cardinality = Cardinality.STREAM_UNARY

    async def __call__(
        self,
        requests: Iterable[SendT] | AsyncIterable[SendT],
        **options: Unpack[CallOptions],
    ) -> RecvT:
        """Send every request (an iterable or an async iterable, consumed in a task of its own),
        then return the reply. The server may answer before it read them all: what is left is
        not sent. If the requests' iterator raises, the call is cancelled and its exception
        raised here. A call the server refused or never processed is retried transparently
        (see :class:`_RequestSender`)."""
        attempts = self._transparent_attempts(options)
        sender: _RequestSender | None = None
        try:
            while True:
                async with self.open(**options) as stream:
                    # Sent from a task, not inline: the call's deadline (or the server's early
                    # answer) must end it while the iterator waits for its next request.
                    if sender is None:
                        sender = _RequestSender(stream, requests)
                    else:
                        sender.next_attempt(stream)
                    try:
                        reply = await stream.recv_message()
                        await stream.recv_trailing_metadata()
                        if reply is None:  # (failed inside the call: its interceptors hear so)
                            raise stream._fail_here(Status.UNIMPLEMENTED, "the server sent no reply to a unary call")
                        break
                    except GRPCError as exc:
                        sender.raise_failure()
                        if not sender.resendable or attempts.retry_delay(stream, exc) is None:
                            raise
        finally:
            if sender is not None:
                await sender.stop()
        sender.raise_failure()
        return reply


class StreamStreamMethod(_Method[SendT, RecvT]):
    """Streams both ways: ``async for reply in stub.Method(requests)``, or ``open()`` to
    interleave sending and receiving by hand."""

    cardinality = Cardinality.STREAM_STREAM

    def __call__(
        self,
        requests: Iterable[SendT] | AsyncIterable[SendT],
        **options: Unpack[CallOptions],
    ) -> ReplyStream[SendT, RecvT]:
        """Send ``requests`` (an iterable or an async iterable, consumed in a task of its own)
        while the replies come: ``async for`` takes them as they arrive, ``await`` collects them.

        If the requests' iterator raises, the call is cancelled and its exception raised here.
        """

        async def run(replies: ReplyStream[SendT, RecvT]) -> AsyncIterator[RecvT]:
            attempts = self._transparent_attempts(options)
            sender: _RequestSender | None = None
            try:
                while True:
                    async with self.open(**options) as stream:
                        replies.call = stream
                        if sender is None:
                            sender = _RequestSender(stream, requests)
                        else:
                            sender.next_attempt(stream)
                        try:
                            async for reply in stream:
                                yield reply
                            await stream.recv_trailing_metadata()
                            break
                        except GRPCError as exc:
                            sender.raise_failure()  # the call was cancelled because of it
                            # Never once a reply was yielded: its headers committed the call.
                            if not sender.resendable or attempts.retry_delay(stream, exc) is None:
                                raise
            finally:
                if sender is not None:
                    await sender.stop()  # the call is over: nobody reads what it would send
            sender.raise_failure()

        return ReplyStream(run)


_NOTHING = object()  # _RequestSender._send: no request, only what is due before one


class _RequestSender:
    """Sends a call's requests from a task of its own (reading their iterator once, for every
    attempt of the call). If that fails while the call runs, the call ends at once: nothing
    else would end it (the server waits for the requests). A GRPCError raised here (a request
    over max_send_message_length, an iterator piping another call that failed) ends it with
    its status; anything else with CANCELLED.

    A call the server refused or never processed (REFUSED_STREAM, above a GOAWAY's
    last-stream-id) is retried transparently, as grpc-core does: the requests sent so far are
    kept, encoded, and the next attempt (:meth:`next_attempt`) is sent them again before the
    rest. They are kept until response headers come (the call is committed) or they total
    more than ``_RESEND_LIMIT`` bytes; then they are let go, and the call is not retried.
    """

    __slots__ = ("_ended", "_failure", "_kept", "_kept_size", "_next", "_on", "_stream", "_task")

    def __init__(self, stream: ClientStream[Any, Any], requests: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._failure: BaseException | None = None  # what failed the call, raised to the caller
        self._stream = stream  # the call's current attempt
        self._on = stream  # the attempt that was sent what was kept
        self._kept: list[bytes] | None = []  # None: the call cannot be retried
        self._kept_size = 0
        self._ended = False  # the iterator is exhausted: the attempts half-close
        self._next: Any = None  # a future while waiting for the next attempt
        stream._kept = self._kept
        self._task = current_runtime().create_task(self._send_all(requests))
        self._task.add_done_callback(self._sent)

    @property
    def resendable(self) -> bool:
        """Whether a next attempt can be sent everything this one was."""
        return self._kept is not None

    def next_attempt(self, stream: ClientStream[Any, Any]) -> None:
        """Send on ``stream`` from now on, what was sent before first (only if resendable)."""
        self._stream = stream
        stream._kept = self._kept
        waiter, self._next = self._next, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _forget(self) -> None:
        self._kept = self._stream._kept = None

    async def _send_all(self, requests: Iterable[Any] | AsyncIterable[Any]) -> None:
        """Send every request (from an iterable or an async iterable), then half-close."""
        if isinstance(requests, AsyncIterable):
            async for request in requests:
                await self._send(request)
        else:
            for request in requests:
                await self._send(request)
        self._ended = True
        await self._send(_NOTHING)
        while self._kept is not None:  # the call may yet be retried: send it all again then
            await self._attempt_after(self._stream)
            await self._send(_NOTHING)

    async def _send(self, request: Any) -> None:
        """Send ``request`` (or, once the requests ended, the half-close) on the call's current
        attempt, after what the attempts before it were sent; if the attempt ends and the call
        may be retried, on the next attempt."""
        while True:
            stream = self._stream
            if self._kept is not None and stream._headers is not None:
                self._forget()  # response headers came: the call is committed
            kept = self._kept
            count = len(kept) if kept is not None else 0
            try:
                if stream is not self._on:
                    assert kept is not None  # (a next attempt only while resendable)
                    for data in kept:
                        await stream._resend(data)
                    self._on = stream
                if request is not _NOTHING:
                    await stream.send_message(request)
                elif self._ended:
                    await stream.end()
                return
            except (GRPCError, ProtocolError, StreamGone):
                if not (stream._retryable and self._kept is not None):
                    raise  # the call ended for good (or failed because of this request)
            finally:
                if kept is not None and len(kept) > count:  # the request went out, and is kept
                    request = _NOTHING
                    self._kept_size += len(kept[-1])
                    if self._kept_size > _RESEND_LIMIT and stream is self._stream:
                        self._forget()  # (once a next attempt started, it is sent them all)
            await self._attempt_after(stream)

    async def _attempt_after(self, stream: ClientStream[Any, Any]) -> None:
        """Wait for the attempt after ``stream`` (stop() ends the wait if none comes)."""
        while self._stream is stream:
            self._next = waiter = current_runtime().create_future()
            await waiter

    def _sent(self, task: Any) -> None:
        if task.cancelled():
            return  # stopped: the call is over
        failure = task.exception()  # (retrieved in any case: asyncio logs one never retrieved)
        stream = self._stream
        if failure is None or stream._outcome is not None:
            return  # sent them all, or failed because the call ended: its outcome tells
        self._failure = failure
        if isinstance(failure, GRPCError):
            stream._abort(failure.status, failure.message or "")
        else:
            stream._abort(Status.CANCELLED, "the request iterator raised")

    def raise_failure(self) -> None:
        """Raise what sending raised, if that failed the call; or, once the call is over,
        if the request iterator raised something of its own (not the call's end: a GRPCError
        or ProtocolError from sending on a finished call)."""
        failure = self._failure
        task = self._task
        if failure is None and task.done() and not task.cancelled():
            failure = task.exception()
            if isinstance(failure, GRPCError | ProtocolError):
                failure = None
        if failure is not None:
            raise failure from None

    async def stop(self) -> None:
        """Cancel the sending if still under way (the call is over), and wait for its end."""
        task = self._task
        if not task.done():
            task.cancel()
            await wait_done(task)


_METHOD_CLASSES: dict[Cardinality, type[_Method[Any, Any]]] = {
    Cardinality.UNARY_UNARY: UnaryUnaryMethod,
    Cardinality.UNARY_STREAM: UnaryStreamMethod,
    Cardinality.STREAM_UNARY: StreamUnaryMethod,
    Cardinality.STREAM_STREAM: StreamStreamMethod,
}


def method_for(channel: Channel, path: str, cardinality: Cardinality, request_type: Any, reply_type: Any) -> Any:
    """The stub method object for a method of the given cardinality (used by generated stubs)."""
    return _METHOD_CLASSES[cardinality](channel, path, request_type, reply_type)
