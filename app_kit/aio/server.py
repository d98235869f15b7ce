"""The gRPC server: listening sockets, one protocol per connection, one task per call."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import random
import socket
import ssl as ssl_module
import stat
import time
from asyncio import selector_events
from collections.abc import Iterable, Sequence
from typing import Any

import h2.errors

from ..rpc.call_state import TERMINAL
from ..rpc.codecs import CodecBase, ProtoCodec, ProtoStatusDetailsCodec, StatusDetailsCodecBase
from ..rpc.compression import IDENTITY, get_encoding
from ..rpc.connection import ReceiveBudget
from ..rpc.deadline import Deadline
from ..rpc.events import (
    ConnectionClosed,
    EndOfStream,
    Event,
    GoAwayReceived,
    MessagesReceived,
    RequestReceived,
    StreamClosed,
    StreamWritable,
)
from ..rpc.handlers import Handler, ServiceLike, collect_handlers
from ..rpc.metadata import MetadataLike, decode_metadata, excerpt
from ..rpc.server import ServerConnection
from ..rpc.status import GRPCError, ProtocolError, Status
from ..wire.config import Configuration
from ..wire.guard import AddressBudget
from ..wire.logs import RateLimitedLogger
from .hooks import InterceptorChain, Proceed, default_hook
from .runtime import Runtime, current_runtime, deadline_scope, running_on_trio
from .stream import Peer, Stream
from .transport import ConnectionProtocol

__all__ = ["Server", "ServerInterceptor", "ServerStats"]

log = logging.getLogger("app_kit.server")
peer_log = RateLimitedLogger(log)
# Out of descriptors, trio's accept is retried every 0.1 s: one line per 10 s says so.
accept_log = RateLimitedLogger(log, burst=1)


class _HandshakeLoggingSSLObject(ssl_module.SSLObject):
    """The TLS object of a server connection on asyncio or uvloop: logs why a handshake failed
    (a client without the certificate mutual TLS asks for, a wrong CA, not TLS at all), which
    those loops' TLS layers report only in debug mode. Installed on the server's context as
    ``sslobject_class`` (the hook :meth:`ssl.SSLContext.wrap_bio` documents)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl_module.SSLWantReadError, ssl_module.SSLWantWriteError):
            raise  # more bytes to come: not a failure
        except ssl_module.SSLError as exc:
            # Not a client's handshake (the context may be shared), nor one on trio, whose
            # connections log their own (streams.serve_stream; the class stays on the context).
            if self.server_side and not running_on_trio():
                peer_log.log(logging.INFO, "TLS handshake failed: %r", exc)
            raise


class ServerInterceptor:
    """Base class of server interceptors; each method's default does nothing.

    One instance serves every call, concurrently: keep per-call state in locals of
    :meth:`intercept`, or in a dict keyed by the call, removed in :meth:`on_call_end`.
    """

    async def intercept(self, call: Stream[Any, Any], proceed: Proceed) -> None:
        """Run around the handler: ``await proceed()`` runs it (and the inner interceptors).

        ``call`` is the handler's :class:`~app_kit.Stream`: ``call.method``, ``call.service``,
        ``call.method_name``, ``call.cardinality``, ``call.metadata``, ``call.peer``,
        ``call.deadline``. Raising :class:`~app_kit.GRPCError` without proceeding ends the call
        with that status before the handler runs; catching what ``proceed()`` raises and
        raising a ``GRPCError`` instead maps a handler's error to a status.
        """
        await proceed()

    @default_hook
    def on_message_received(self, call: Stream[Any, Any], message: Any) -> Any:
        """A request message, before the handler gets it: return it, or what replaces it."""
        return message

    @default_hook
    def on_message_sent(self, call: Stream[Any, Any], message: Any) -> Any:
        """A reply the handler sends, before it is encoded: return it, or what replaces it."""
        return message

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        """The call ended: ``call.status`` and ``call.status_message`` say how (CANCELLED if
        the client reset it or the connection was lost), ``call.elapsed`` how long it took;
        ``call.messages_received``/``messages_sent`` and ``bytes_received``/``bytes_sent``
        count its messages and their encoded bytes. Runs in the call's task; must not raise."""


@dataclasses.dataclass(frozen=True)
class ServerStats:
    """What a server is doing, read at once (see :meth:`Server.stats`)."""

    #: Connections open now.
    connections: int
    #: Calls whose handler runs now.
    calls: int
    #: Connections accepted since the server started.
    connections_total: int
    #: Connections we ended with an HTTP/2 error, by its name (``ENHANCE_YOUR_CALM`` for
    #: floods and too many pings, ``PROTOCOL_ERROR``, ``FRAME_SIZE_ERROR``...).
    connection_errors: dict[str, int]


class Server:
    """An HTTP/2 gRPC server for any number of services.

    ``handlers`` are service objects (generated ``...Base`` subclasses, or anything with a
    ``__mapping__()``); ``codec`` defaults to :class:`~app_kit.ProtoCodec`, and
    ``status_details_codec`` to :class:`~app_kit.ProtoStatusDetailsCodec` with it.

    ``compression`` is how replies are compressed unless a handler says otherwise
    (:meth:`Stream.set_compression`): None answers in the encoding of the request, ``"identity"``
    never compresses, an encoding name (``"gzip"``) compresses replies to every client that
    lists it in ``grpc-accept-encoding``.

    ``interceptors`` (:class:`ServerInterceptor`, outermost first) run around every call.
    """

    def __init__(
        self,
        handlers: Iterable[ServiceLike],
        *,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
        compression: str | None = None,
        interceptors: Sequence[ServerInterceptor] = (),
    ) -> None:
        for interceptor in interceptors:
            if not isinstance(interceptor, ServerInterceptor):
                raise TypeError(f"{interceptor!r} is not a ServerInterceptor")
        #: The interceptors, and the hooks they override.
        self.interceptors = InterceptorChain(interceptors, inward="received")
        if compression is not None and compression != IDENTITY:
            get_encoding(compression)  # ValueError now, not at the first call
        #: The default encoding of replies (see the class docstring).
        self.compression = compression
        self.mapping: dict[str, Handler] = collect_handlers(handlers)
        self.codec = codec if codec is not None else ProtoCodec()
        if status_details_codec is None and isinstance(self.codec, ProtoCodec):
            status_details_codec = ProtoStatusDetailsCodec()
        self.status_details_codec = status_details_codec
        self.config = config if config is not None else Configuration()
        self._listener: asyncio.AbstractServer | None = None
        #: On trio: the listening sockets, and the scope their accept loops run in.
        self._trio_listeners: list[Any] = []
        self._accepting: Any = None
        self._served: Any = None  # on trio: done when the connections' nursery is
        self._queued_sockets: list[socket.socket] = []  # on trio: taken from the accept queue at close
        self._handshakes: set[Any] = set()  # on trio: the cancel scopes of TLS handshakes under way
        self._runtime: Runtime | None = None
        self._connections: set[ServerProtocol] = set()
        self._tasks: set[Any] = set()
        # Reset budgets shared by the connections from one address (while any is open).
        self._address_budgets: dict[str, AddressBudget] = {}
        # What all connections' incomplete and inflated messages may hold at once.
        config = self.config
        self._receive_budget = ReceiveBudget(
            max(config.max_server_receive_buffer, config.max_receive_message_length + 5)
        )
        self._closing = False
        self._grace_handle: Any = None
        self._grace_ends: float | None = None  # the runtime's time when the grace period ends
        self._grace_over = False
        self._closed = False
        self._closed_waiters: list[Any] = []
        self._idle_waiters: list[Any] = []  # wait_calls_done()
        # Started, or served a connection: wait_closed() has something to wait for.
        self._in_use = False
        self._connections_total = 0
        self._connection_errors: collections.Counter[str] = collections.Counter()

    # Set by start(), for close(): how queued connections are served, and the socket file made.
    _listen_ssl: ssl_module.SSLContext | None = None
    _accept_limit = 0
    _socket_file: tuple[str, int, int] | None = None

    async def start(
        self,
        host: str | Sequence[str] | None = None,
        port: int | None = None,
        *,
        path: str | None = None,
        family: socket.AddressFamily = socket.AF_UNSPEC,
        flags: socket.AddressInfo = socket.AI_PASSIVE,
        sock: socket.socket | None = None,
        backlog: int = 100,
        ssl: ssl_module.SSLContext | None = None,
        reuse_address: bool | None = None,
        reuse_port: bool | None = None,
    ) -> None:
        """Listen on TCP ``host``/``port`` (port 0 picks a free one), a Unix socket ``path``,
        or a ready ``sock``. ``ssl`` serves TLS, with ALPN ``h2`` set on the context.

        ``backlog`` is how many connections the kernel completes before the server accepts
        them (see :meth:`close`). A socket file this call creates at ``path`` is removed when
        the server closes, unless another server has replaced it by then.
        """
        if self._closing:
            raise RuntimeError("the server is closed; it cannot be started")
        if self._listener is not None or self._trio_listeners:
            raise RuntimeError("the server is started already")
        if path is not None and (host is not None or port is not None):
            raise ValueError("path and host/port are mutually exclusive")
        if ssl is not None:
            ssl.set_alpn_protocols(["h2"])
        # Linux queues up to backlog + 1 completed connections per listening socket.
        self._accept_limit = backlog + 1
        self._listen_ssl = ssl
        if running_on_trio():
            await self._start_on_trio(host, port, path, family, sock, backlog, bool(reuse_port))
            self._in_use = True
            self._closed_while_starting()
            return
        self._runtime = loop = asyncio.get_running_loop()
        if ssl is not None and ssl.sslobject_class is ssl_module.SSLObject:  # (a class of the caller's stays)
            ssl.sslobject_class = _HandshakeLoggingSSLObject
        factory = functools.partial(ServerProtocol, self, loop)
        # CPython's selector loops (3.11 to 3.13 at least) accept up to `backlog` connections
        # each time the listening socket is ready and, out of descriptors (EMFILE), log and
        # re-arm a retry once per slot without stopping: retries that multiply every second,
        # thousands of log lines a second and a core's CPU. Told to accept one per readiness
        # (the queue's length set again below), they retry once a second. uvloop accepts in
        # libuv: not affected.
        accept_one = isinstance(loop, selector_events.BaseSelectorEventLoop)
        if path is not None:
            self._listener = await loop.create_unix_server(
                factory,
                path,
                backlog=1 if accept_one else backlog,
                ssl=ssl,
                ssl_handshake_timeout=self._tls_timeout(ssl),
            )
            if not path.startswith("\0"):  # (the abstract namespace has no file)
                made = os.stat(path)
                self._socket_file = (path, made.st_dev, made.st_ino)
        else:
            # loop.create_server's own arguments, passed through unchanged (its overloads cannot
            # express "host and port, or sock").
            options: dict[str, Any] = {
                "host": host,
                "port": port,
                "family": family,
                "flags": flags,
                "sock": sock,
                "backlog": backlog,
                "ssl": ssl,
                "reuse_address": reuse_address,
                "reuse_port": reuse_port,
                "ssl_handshake_timeout": self._tls_timeout(ssl),
            }
            if accept_one:
                options["backlog"] = 1
            self._listener = await loop.create_server(factory, **options)
        if accept_one:
            for listening in self._listener.sockets:  # the kernel's queue: as long as asked
                with listening.dup() as duplicate:  # (asyncio's wrapper has no listen())
                    duplicate.listen(backlog)
        self._in_use = True
        self._closed_while_starting()

    def _closed_while_starting(self) -> None:
        """close() ran while start() opened the listeners: close them too, and say so."""
        if self._closing:
            self._closing = self._closed = False
            self.close()
            raise RuntimeError("the server was closed while it started")

    async def _start_on_trio(
        self,
        host: str | Sequence[str] | None,
        port: int | None,
        path: str | None,
        family: socket.AddressFamily,
        sock: socket.socket | None,
        backlog: int,
        reuse_port: bool,
    ) -> None:
        """Listen with anyio's listeners; accept and serve in a trio system task (the
        connections in one nursery, each connection's calls in its own)."""
        import anyio
        import anyio.abc
        import trio

        from .trio_runtime import TrioRuntime

        listeners: list[anyio.abc.SocketListener] = []
        try:
            if path is not None:
                listeners.append(await anyio.create_unix_listener(path, backlog=backlog))
                if not path.startswith("\0"):
                    made = os.stat(path)
                    self._socket_file = (path, made.st_dev, made.st_ino)
            elif sock is not None:
                sock.listen(backlog)  # (asyncio's create_server listens on a given socket too)
                listeners.append(await anyio.abc.SocketListener.from_socket(sock))
            else:
                for one_host in [host] if host is None or isinstance(host, str) else host:
                    listening = await anyio.create_tcp_listener(
                        local_host=one_host,
                        local_port=port or 0,
                        family=family,  # type: ignore[arg-type]  # (AF_UNSPEC, AF_INET or AF_INET6)
                        backlog=backlog,
                        reuse_port=reuse_port,
                    )
                    listeners.extend(listening.listeners)  # type: ignore[arg-type]  # (TCP listeners)
        except BaseException:
            for listener in listeners:
                await anyio.aclose_forcefully(listener)
            raise
        self._trio_listeners = listeners
        self._runtime = runtime = TrioRuntime.shared()
        self._served = runtime.create_future()
        self._accepting = trio.CancelScope()
        trio.lowlevel.spawn_system_task(self._serve_on_trio, name=f"app_kit server {self!r}")

    async def _serve_on_trio(self) -> None:
        import anyio
        import trio

        try:
            async with trio.open_nursery() as connections:
                with self._accepting:
                    async with trio.open_nursery() as accepting:
                        for listener in self._trio_listeners:
                            accepting.start_soon(self._accept_on_trio, listener, connections)
                for connection in self._queued_sockets:
                    connections.start_soon(self._serve_socket_on_trio, connection)
                self._queued_sockets.clear()
                with trio.CancelScope(shield=True):
                    for listener in self._trio_listeners:
                        await anyio.aclose_forcefully(listener)
        except Exception:
            log.exception("the server failed")
        finally:
            self._served.set_result(None)

    async def _accept_on_trio(self, listener: Any, connections: Any) -> None:
        import anyio

        while True:
            try:
                stream = await listener.accept()
            except anyio.ClosedResourceError:
                return  # close()
            except anyio.BrokenResourceError as broken:  # anyio's word for any OSError of accept()
                error = broken.__cause__
                if not isinstance(error, OSError):
                    raise
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    accept_log.log(logging.ERROR, "cannot accept a connection: %s", error)
                    await anyio.sleep(0.1)
                continue  # else one connection's failure (ECONNABORTED, EPROTO...): accept the next
            connections.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: Any) -> None:
        from .streams import serve_stream

        try:
            await serve_stream(
                stream,
                functools.partial(ServerProtocol, self),
                tls=self._listen_ssl,
                handshake_timeout=self.config.handshake_timeout,
                handshakes=self._handshakes,
            )
        except Exception:
            # Our bug: it ends this connection, not the server's others (as on asyncio).
            log.exception("unexpected error serving a connection")

    async def _serve_socket_on_trio(self, connection: socket.socket) -> None:
        """Serve one connection taken from the accept queue at close."""
        import anyio.abc

        try:
            stream = await anyio.abc.SocketStream.from_socket(connection)
        except OSError as exc:
            connection.close()
            peer_log.log(logging.INFO, "connection queued at close failed: %r", exc)
            return
        await self._serve_stream(stream)

    def _tls_timeout(self, ssl: ssl_module.SSLContext | None) -> float | None:
        return self.config.handshake_timeout if ssl is not None else None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (read the bound address from them)."""
        if self._trio_listeners:
            import anyio.abc

            sockets = (listener.extra(anyio.abc.SocketAttribute.raw_socket) for listener in self._trio_listeners)
            return tuple(sock for sock in sockets if sock.fileno() >= 0)  # (none once closed)
        if self._listener is None:
            return ()
        return tuple(self._listener.sockets)  # type: ignore[attr-defined]

    @property
    def is_closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def close(self, *, grace: float | None = None) -> None:
        """Stop accepting connections and calls; finish the calls in progress.

        No new connection is taken: connections the kernel had already completed into the
        listen backlog are accepted and served like the others (closing a listening socket
        would reset them, and a client that had written its request there could not tell
        whether it ran), then the listening sockets close; a Unix socket file made by
        :meth:`start` is removed first. Every connection gets the two-phase GOAWAY
        (2^31-1 and a PING, then the last stream id received); every call accepted up to
        then is served. After ``grace`` seconds (None: no limit), calls still running are
        cancelled and answered UNAVAILABLE. Idle connections close as soon as the final
        GOAWAY is out. Calling it on a server never started keeps it from starting.

        Calling it again with a grace that ends sooner cuts the grace period short
        (``grace=0``: now, as on a forced exit); otherwise a later call changes nothing.
        """
        if self._closing:
            if grace is not None and self._runtime is not None and self._in_use:
                ends = self._runtime.time() + grace
                if self._grace_ends is None or ends < self._grace_ends:
                    self._schedule_grace_end(grace)
            return
        self._closing = True
        if self._listener is not None:
            # The file first: a Unix client can then no longer connect, even in the moment
            # between the last accept and the close.
            self._remove_socket_file()
            self._take_accept_queue()
            self._listener.close()
        elif self._trio_listeners:
            self._remove_socket_file()
            self._take_accept_queue()
            self._close_trio_listeners()
        for connection in list(self._connections):
            connection.start_shutdown()
        if grace is not None and self._in_use and self._runtime is not None:
            self._schedule_grace_end(grace)
        self._check_closed()

    def _schedule_grace_end(self, grace: float) -> None:
        assert self._runtime is not None
        if self._grace_handle is not None:
            self._grace_handle.cancel()
        self._grace_ends = self._runtime.time() + grace
        if grace <= 0:
            self._grace_handle = None
            self._grace_expired()
        else:
            self._grace_handle = self._runtime.call_later(grace, self._grace_expired)

    def _close_trio_listeners(self) -> None:
        """Close the listening sockets now, as asyncio's close() does (a client connecting
        after close() is refused, not accepted into a backlog nobody serves); end the accept
        loops, and the TLS handshakes under way (no request came on those)."""
        import anyio.abc
        import trio

        for listener in self._trio_listeners:
            sock = listener.extra(anyio.abc.SocketAttribute.raw_socket)
            if sock.fileno() >= 0:
                trio.lowlevel.notify_closing(sock)  # the accept loop waiting on it ends
                sock.close()
        for scope in list(self._handshakes):
            scope.cancel()
        self._accepting.cancel()

    def _take_accept_queue(self) -> None:
        """Accept, without blocking, every connection waiting in the listeners' queues."""
        for listening in self.sockets:
            try:  # asyncio exposes a wrapper without accept(): a duplicate of the same socket
                taker = socket.socket(fileno=os.dup(listening.fileno()))
            except OSError:
                continue
            with taker:
                taker.setblocking(False)
                for _ in range(self._accept_limit):
                    try:
                        connection, _address = taker.accept()
                    except (BlockingIOError, InterruptedError):
                        break  # the queue is empty
                    except ConnectionAbortedError:
                        continue  # reset by its client while queued
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.error("cannot accept the connections queued at close: %s", exc)
                            break
                        raise
                    connection.setblocking(False)
                    if self._listener is None:  # trio: served once the accept loops are over
                        self._queued_sockets.append(connection)
                        continue
                    loop = self._listener.get_loop()
                    task = loop.create_task(self._serve_queued(loop, connection))
                    self._task_started(task)
                    task.add_done_callback(self._task_done)

    async def _serve_queued(self, loop: asyncio.AbstractEventLoop, connection: socket.socket) -> None:
        """Serve one connection taken from the accept queue at close (the TLS handshake first)."""
        ssl = self._listen_ssl
        try:
            await loop.connect_accepted_socket(
                functools.partial(ServerProtocol, self, loop),
                connection,
                ssl=ssl,
                ssl_handshake_timeout=self._tls_timeout(ssl),
            )
        except (OSError, ssl_module.SSLError, TimeoutError) as exc:
            connection.close()
            peer_log.log(logging.INFO, "connection queued at close failed: %r", exc)

    def _remove_socket_file(self) -> None:
        """Remove the Unix socket file start() made, if it is still that file."""
        if self._socket_file is None:
            return
        path, device, inode = self._socket_file
        self._socket_file = None
        with contextlib.suppress(OSError):
            found = os.stat(path)
            # A newer server may have replaced it (its own file at the same path): keep that.
            if stat.S_ISSOCK(found.st_mode) and (found.st_dev, found.st_ino) == (device, inode):
                os.unlink(path)

    def _grace_expired(self) -> None:
        self._grace_over = True
        for connection in list(self._connections):
            connection.abort_calls(Status.UNAVAILABLE, "the server is shutting down")

    async def wait_closed(self) -> None:
        """Return once :meth:`close` was called and every connection and handler is done."""
        if not self._in_use:
            return
        if not self._closed:
            waiter = current_runtime().create_future()
            self._closed_waiters.append(waiter)
            await waiter
        if self._listener is not None:
            await self._listener.wait_closed()
        if self._served is not None and not self._served.done():
            await self._served

    async def wait_calls_done(self) -> None:
        """Return once no handler is running (after :meth:`close`: once those still running
        have ended, or unwound from their cancellation when the grace period ended). A call
        whose status waits for the client's window (with interceptors, or under
        ``max_concurrent_calls``) counts as running until it goes, or the grace period's end
        settles it."""
        if self._tasks:
            waiter = current_runtime().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _check_closed(self) -> None:
        if self._closing and not self._connections and not self._tasks and not self._closed:
            self._closed = True
            for waiter in self._closed_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._closed_waiters.clear()
            if self._grace_handle is not None:
                self._grace_handle.cancel()

    # -- called by connections -------------------------------------------------------

    def stats(self) -> ServerStats:
        """Open connections and running calls now; connections and connection errors so far."""
        return ServerStats(
            connections=len(self._connections),
            calls=len(self._tasks),
            connections_total=self._connections_total,
            connection_errors=dict(self._connection_errors),
        )

    def _connection_opened(self, connection: ServerProtocol) -> None:
        self._in_use = True
        if self._runtime is None:  # served without start() (the testing helpers)
            self._runtime = connection.loop
        self._connections_total += 1
        self._connections.add(connection)
        if self._closing:
            connection.start_shutdown()
            if self._grace_over:  # (taken from the listen backlog after it ended: no call runs on)
                connection.abort_calls(Status.UNAVAILABLE, "the server is shutting down")

    def _connection_error(self, error_code: int) -> None:
        try:
            name = h2.errors.ErrorCodes(error_code).name
        except ValueError:
            name = f"0x{error_code:x}"
        self._connection_errors[name] += 1

    def _connection_closed(self, connection: ServerProtocol) -> None:
        self._connections.discard(connection)
        self._check_closed()

    def _address_budget(self, address: str) -> AddressBudget:
        budget = self._address_budgets.get(address)
        if budget is None:
            budget = self._address_budgets[address] = AddressBudget()
        budget.connections += 1
        return budget

    def _address_left(self, address: str) -> None:
        budget = self._address_budgets.get(address)
        if budget is not None:
            budget.connections -= 1
            if not budget.connections:
                del self._address_budgets[address]

    def _task_started(self, task: Any) -> None:
        self._tasks.add(task)

    def _task_done(self, task: Any) -> None:
        self._tasks.discard(task)
        if not self._tasks and self._idle_waiters:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()
        if self._closing:
            self._check_closed()


class ServerProtocol(ConnectionProtocol):
    """One client connection: routes its requests to handlers, one task per call."""

    connection: ServerConnection
    pause_reading_while_full = True

    def __init__(self, server: Server, loop: Runtime) -> None:
        super().__init__(ServerConnection(server.config, content_subtype=server.codec.content_subtype), loop)
        self._server = server
        self._calls: dict[int, tuple[Stream[object, object], Any]] = {}
        self._peer: Peer | None = None
        self._peer_going_away = False
        self._shutdown_handle: Any = None
        self._idle_handle: Any = None
        self._idle_since = 0.0
        self._age_handle: Any = None
        self._address: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._peer = Peer(transport)
        self._server._connection_opened(self)
        self.connection.share_receive_budget(self._server._receive_budget)
        log.debug("connection from %s", self._peer_address())
        address = self._peer.addr()
        if isinstance(address, tuple) and address:  # TCP: resets also count per peer address
            self._address = address[0]
            self.connection.share_reset_budget(self._server._address_budget(self._address))
        idle_timeout = self.connection.config.idle_timeout
        if idle_timeout is not None:
            self._idle_since = self.loop.time()
            self._idle_handle = self.loop.call_later(idle_timeout, self._idle_check)
        age = self.connection.config.max_connection_age
        if age is not None:
            # Varied (as grpc-core and grpc-go do): clients that connected together do not all
            # reconnect together.
            self._age_handle = self.loop.call_later(age * random.uniform(0.9, 1.1), self._age_reached)

    def on_connection_lost(self, exc: Exception | None) -> None:
        log.debug("connection from %s closed (%d calls running)", self._peer_address(), len(self._calls))
        for handle in (self._shutdown_handle, self._idle_handle, self._age_handle):
            if handle is not None:
                handle.cancel()
        for stream_id, (stream, task) in list(self._calls.items()):
            stream._on_closed("the connection was lost")
            task.cancel()
            if stream._status_queued:  # its status never went
                self._settle(stream_id, Status.CANCELLED, "the connection was lost")
        if self._address is not None:
            self._server._address_left(self._address)
        self._server._connection_closed(self)

    def handle_events(self, events: Sequence[Event]) -> None:
        calls = self._calls
        for event in events:
            kind = type(event)
            if kind is MessagesReceived:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None and not call[0]._on_messages(event.messages):  # type: ignore[attr-defined]
                    self._end_call(event.stream_id, Status.INTERNAL, "more than one request message for a unary method")  # type: ignore[attr-defined]
            elif kind is RequestReceived:
                self._start_call(event)  # type: ignore[arg-type]
            elif kind is EndOfStream:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None:
                    call[0]._on_end()
            elif kind is StreamWritable:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None and call[0]._status_queued:
                    self._settle(event.stream_id)  # type: ignore[attr-defined]  # its status went
                else:  # (a call whose status is queued has no sender left to wake)
                    self.release_writer(event.stream_id)  # type: ignore[attr-defined]
            elif kind is StreamClosed:
                call = calls.get(event.stream_id)  # type: ignore[attr-defined]
                if call is not None:
                    stream, status = call[0], event.status  # type: ignore[attr-defined]
                    if event.by_peer:  # type: ignore[attr-defined]
                        if stream._dispatched:
                            self.connection.forgive_reset()  # a cancelled call, not a rapid reset
                        deadline = stream.deadline
                        if deadline is not None and deadline.time_remaining() <= 0:
                            # The client's reset at its deadline beat our own timer to it:
                            # the call ended as its caller saw it end.
                            status = Status.DEADLINE_EXCEEDED
                    self._end_from_outside(event.stream_id, event.reason, status)  # type: ignore[attr-defined]
            elif kind is GoAwayReceived:
                self._peer_going_away = True
            elif kind is ConnectionClosed:
                if event.error_code:  # type: ignore[attr-defined]
                    self._server._connection_error(event.error_code)  # type: ignore[attr-defined]
                peer_log.log(logging.INFO, "closing connection from %s: %s", self._peer_address(), event.reason)  # type: ignore[attr-defined]
                self.close_transport(event.reason)  # type: ignore[attr-defined]
        self._close_if_done()

    def _reply_encoding(self, request_encoding: str | None, accepted: frozenset[str]) -> str | None:
        """How a call's replies are compressed before its handler says otherwise."""
        default = self._server.compression
        if default is None:
            return request_encoding if request_encoding in accepted else None  # as the client wrote
        if default == IDENTITY:
            return None  # sent as no grpc-encoding at all
        return default if default in accepted else None

    def _start_call(self, event: RequestReceived) -> None:
        head = event.head
        stream_id = event.stream_id
        # The stream may be gone already: reset in the same read as its request.
        handler = self._server.mapping.get(head.path)
        if handler is None:
            self.connection.end_now(stream_id, Status.UNIMPLEMENTED, f"Method not found: {excerpt(head.path)}")
            return
        metadata = head.metadata
        if metadata is None:
            try:
                metadata = head.metadata = decode_metadata(head.headers)  # once per head (read-only)
            except ValueError as exc:
                message = f"invalid request metadata: {excerpt(str(exc), 128)}"
                self.connection.end_now(stream_id, Status.INTERNAL, message)
                return
        server = self._server
        assert self._peer is not None
        limit = server.config.max_concurrent_calls
        # (Health checks are answered whatever the load: a saturated server is not a dead one.)
        shed = limit is not None and len(server._tasks) >= limit and not head.path.startswith(_HEALTH)
        if shed and not server.interceptors.interceptors:
            self.connection.end_now(stream_id, Status.RESOURCE_EXHAUSTED, _shed_message(limit))
            return
        # Positional: a class called with keywords costs CPython 3.11 a dict of them, made
        # and taken apart again (~1,000 instructions for these).
        stream: Stream[object, object] = Stream(
            self,
            stream_id,
            handler,
            head.path,  # method
            metadata,
            head.user_agent,
            Deadline.from_timeout(head.timeout) if head.timeout is not None else None,
            self._peer,
            server.codec,
            server.status_details_codec,
            self._reply_encoding(head.encoding, head.accept_encoding),
            head.encoding,  # request_encoding
            head.accept_encoding,  # accepted_encodings
            server.interceptors,
        )
        interceptors = server.interceptors
        if interceptors.interceptors:
            answer = _serve_call(stream, handler, interceptors)
        else:  # the task runs _answer_call itself: one coroutine less to make, and to resume through
            answer = _answer_call(stream, handler)
        task = self.loop.create_task(answer)
        self._calls[stream_id] = (stream, task)
        task.add_done_callback(functools.partial(self._call_done, stream_id))
        if shed:
            # Its interceptors still see it (metrics count what was shed), but it is not a call
            # running: not among the server's tasks (its connection holds it until it is done).
            self._end_call(stream_id, Status.RESOURCE_EXHAUSTED, _shed_message(limit))
        else:
            server._task_started(task)

    def _call_done(self, stream_id: int, task: Any) -> None:
        calls = self._calls
        call = calls.get(stream_id)
        server = self._server
        if call is None:
            server._task_done(task)
        elif call[0]._status_queued or (server.config.max_concurrent_calls is not None and _status_waits(call[0])):
            pass  # it ends in _settle: until its status goes it counts as running, as in grpc-core
        else:
            del calls[stream_id]
            server._task_done(task)
        if not calls:
            self._idle_since = self.loop.time()
        self.schedule_flush()
        self._close_if_done()

    def flush_call_end(self) -> None:
        """A call's status is queued: write it now if no other call could share the write."""
        if len(self._calls) <= 1:
            self.flush()  # latency: one call in flight has nothing to coalesce with
        else:
            self.schedule_flush()

    def _end_call(self, stream_id: int, status: Status, message: str) -> None:
        """End a call from outside its handler: answer it at once and cancel the handler."""
        stream, task = self._calls[stream_id]
        # Even with its status sent, a call may still have DATA (and the status) queued.
        stream._end_now(status, message)
        stream._on_closed(message)
        self._cancel_handler(stream, task)
        if stream._status_queued:
            self._settle(stream_id)  # with the status just sent instead

    def _end_from_outside(self, stream_id: int, reason: str, status: Status | None = None) -> None:
        """A call is over by what happened outside its handler (a reset, the connection's
        end): the handler hears so, and a call whose status was still queued ends with
        ``status`` (CANCELLED if None): its client never got the one queued."""
        stream, task = self._calls[stream_id]
        stream._on_closed(reason, status)
        self._cancel_handler(stream, task)
        if stream._status_queued:
            self._settle(stream_id, status or Status.CANCELLED, reason)

    def _settle(self, stream_id: int, status: Status | None = None, message: str | None = None) -> None:
        """A call whose handler is done and whose status was queued behind its replies ends
        now: with that status once it went (``status`` None), else with ``status``."""
        calls = self._calls
        stream, task = calls.pop(stream_id)
        if task.done():  # (else _call_done counts it out)
            self._server._task_done(task)
        if not calls:
            self._idle_since = self.loop.time()  # (as _call_done: the connection is idle from now)
        stream._status_queued = False
        if status is not None:
            stream._status, stream._status_message = status, message
        _report_end(stream, self._server.interceptors.interceptors)

    def _cancel_handler(self, stream: Stream[object, object], task: Any) -> None:
        """Cancel the task of a call that is over. One whose handler has not started yet, in
        a server with interceptors, is left to start: it tells them how the call ended (see
        _serve_call), as every call's end reaches them (metrics, access log, spans)."""
        if stream._dispatched or not self._server.interceptors.interceptors:
            task.cancel()

    def close_transport(self, reason: str = "the server closed the connection") -> None:
        """Close the connection; the calls still on it are over now (their handlers hear so),
        whatever closed it: the peer's error, a keepalive PING unanswered, our own error. No
        frame of theirs goes out any more, and the socket's end comes only after the linger."""
        if not self.is_closed:
            for stream_id in list(self._calls):
                self._end_from_outside(stream_id, reason)
        super().close_transport(reason)

    def _close_if_done(self) -> None:
        connection = self.connection
        if self._calls or self._closed or not (connection.shutdown_phase or self._peer_going_away):
            return  # (the common case, in attributes: it runs per call)
        if connection.drained:
            self.close_transport()
        elif self._peer_going_away and not connection.open_streams:
            # Our own GOAWAY first (RFC 9113 §6.8): a stream the client opened meanwhile is then
            # known to it as not processed, safe to send elsewhere.
            connection.finish_shutdown()
            self.flush()
            self.close_transport()

    def _idle_check(self) -> None:
        # One timer per connection, re-armed for the time left, instead of one per call.
        idle_timeout = self.connection.config.idle_timeout
        assert idle_timeout is not None
        self._idle_handle = None
        if self.is_closed:
            return
        remaining = idle_timeout if self._calls else self._idle_since + idle_timeout - self.loop.time()
        if remaining > 0:
            self._idle_handle = self.loop.call_later(remaining, self._idle_check)
            return
        log.debug("closing connection from %s: idle for %ss", self._peer_address(), idle_timeout)
        self.start_shutdown()
        self._close_if_done()

    def _age_reached(self) -> None:
        """``max_connection_age``: the two-phase GOAWAY of a shutdown, for this connection."""
        self._age_handle = None
        if self.is_closed:
            return
        log.debug("closing connection from %s: it reached its maximum age", self._peer_address())
        self.start_shutdown()
        self._close_if_done()
        grace = self.connection.config.max_connection_age_grace
        if grace is not None and not self.is_closed:
            self._age_handle = self.loop.call_later(grace, self._age_grace_over)

    def _age_grace_over(self) -> None:
        self._age_handle = None
        if not self.is_closed:
            self.abort_calls(Status.UNAVAILABLE, "the connection reached its maximum age")

    # -- shutdown --------------------------------------------------------------------

    def start_shutdown(self) -> None:
        """Begin the two-phase GOAWAY; see :meth:`Server.close`."""
        if self.is_closed or self.connection.shutdown_phase:
            return
        self.connection.start_shutdown()
        self.flush()
        self._shutdown_handle = self.loop.call_later(
            self.connection.config.shutdown_ping_timeout, self._finish_shutdown
        )

    def _finish_shutdown(self) -> None:
        self.connection.finish_shutdown()
        self.flush()
        self._close_if_done()

    def abort_calls(self, status: Status, message: str) -> None:
        """Answer every call still running with ``status`` and cancel its handler.

        Calls whose handler is done but whose DATA still waits for the client's window are
        ended too (the data dropped), and no stream is accepted any more: what is left of
        the connection closes at once, whatever the client does.
        """
        for stream_id in list(self._calls):
            self._end_call(stream_id, status, message)
        for stream_id in self.connection.open_stream_ids:
            self.connection.end_now(stream_id, status, message)
        self.connection.finish_shutdown()
        self.flush()
        self._close_if_done()

    def _peer_address(self) -> object:
        return self._peer.addr() if self._peer is not None else None


_HEALTH = "/grpc.health.v1.Health/"


def _shed_message(limit: int | None) -> str:
    return f"the server is running its max_concurrent_calls ({limit}) calls: try again later"


async def _send_returned(stream: Stream[object, object], handler: Handler, returned: object) -> None:
    """A handler returned a value (grpcio's habit): the reply of a unary-response method."""
    if handler.cardinality.server_streaming:
        log.warning(
            "handler of %s returned a %s, which is ignored: a streaming method sends its replies"
            " with stream.send_message()",
            stream.method,
            type(returned).__name__,
        )
    elif stream._sent:
        log.warning("handler of %s sent its reply and also returned one: the returned one is ignored", stream.method)
    elif not stream.closed:
        await stream.send_message(returned)


async def _run_handler(stream: Stream[object, object], handler: Handler) -> None:
    """The handler, and the reply it returned if any: both within the call's deadline."""
    returned = await handler.func(stream)
    if returned is not None:
        await _send_returned(stream, handler, returned)


def _intercepted(
    stream: Stream[object, object],
    handler: Handler,
    interceptors: tuple[ServerInterceptor, ...],
    *,
    instead: tuple[Status, str | None] | None = None,
) -> Proceed:
    """The handler inside the interceptors: what the outermost one's ``proceed`` runs
    (``instead``: no handler, the call ends with that status — its deadline passed on
    arrival, or it ended before its handler could start)."""

    async def proceed(index: int) -> None:
        if index == len(interceptors):
            if instead is not None:
                raise GRPCError(*instead)
            await _run_handler(stream, handler)
            return
        stream._entered = index + 1
        await interceptors[index].intercept(stream, functools.partial(proceed, index + 1))

    return functools.partial(proceed, 0)


_EXPIRED = (Status.DEADLINE_EXCEEDED, "Deadline exceeded")
_OK = Status.OK  # (an Enum member read off its class costs a __getattr__ hook on 3.11)


async def _serve_call(stream: Stream[object, object], handler: Handler, interceptors: InterceptorChain) -> None:
    """Run one call's handler inside its interceptors and end it with a status (without
    interceptors, ServerProtocol._start_call runs _answer_call alone)."""
    try:
        if stream.closed:
            # Ended before its handler started (the core refused what came in the request's
            # read; a reset in the same read): the interceptors still see it, around no handler.
            with contextlib.suppress(GRPCError):
                await _intercepted(
                    stream,
                    handler,
                    interceptors.interceptors,
                    instead=(stream._status or Status.UNKNOWN, stream._status_message),
                )()
            return
        await _answer_call(
            stream,
            handler,
            _intercepted(stream, handler, interceptors.interceptors),
            _intercepted(stream, handler, interceptors.interceptors, instead=_EXPIRED),
        )
        _status_waits(stream)
    finally:
        if not stream._status_queued:
            _report_end(stream, interceptors.interceptors)


def _status_waits(stream: Stream[object, object]) -> bool:
    """Whether a call whose handler is done still has its status queued behind its replies
    (for the client's window, or only for this turn's flush). If so, the call is over for its
    client when that goes, or ends as a reset, the grace period's end or the connection's loss
    says first: its protocol settles it then (StreamWritable once the status went:
    ServerProtocol._settle), and tells its interceptors."""
    state = stream._connection.sender_state(stream._stream_id)
    if state.pending_trailers is None:
        return False
    stream._status_queued = True
    state.over_limit = True
    return True


def _report_end(stream: Stream[object, object], interceptors: tuple[ServerInterceptor, ...]) -> None:
    """Tell the interceptors that started for a call how it ended (once per call)."""
    stream._ended_at = time.perf_counter()
    if stream._status is None:  # (every end records one; this is the last line of defence)
        stream._status, stream._status_message = Status.UNKNOWN, "the call ended without a status"
    for interceptor in reversed(interceptors[: stream._entered]):
        try:
            interceptor.on_call_end(stream)
        except Exception:
            log.exception("%r failed in on_call_end of %s", interceptor, stream.method)


async def _answer_call(
    stream: Stream[object, object],
    handler: Handler,
    run: Proceed | None = None,
    run_expired: Proceed | None = None,
) -> None:
    """Run one handler and end its call with the status its outcome stands for.

    ``run_expired`` runs instead when the deadline had passed on arrival (the interceptors,
    around no handler): they hear of the call too."""
    status = _OK
    message: str | None = None
    details = None
    trailers: MetadataLike | None = None
    deadline = stream.deadline
    stream._dispatched = True
    try:
        if deadline is None:
            # (_run_handler's body, not a call of it: one coroutine less; run() returns None.)
            returned = await (handler.func(stream) if run is None else run())
            if returned is not None:
                await _send_returned(stream, handler, returned)
        elif deadline.time_remaining() <= 0:
            # Expired before dispatch (grpc-timeout 1n): a handler that never yields would
            # otherwise finish before the timeout could cancel it.
            status, message = Status.DEADLINE_EXCEEDED, "Deadline exceeded"
            if run_expired is not None:
                await run_expired()  # raises the same, through the interceptors
        else:
            async with deadline_scope(stream._protocol.loop, deadline.time_remaining()) as scope:
                returned = await (handler.func(stream) if run is None else run())  # (as above)
                if returned is not None:
                    await _send_returned(stream, handler, returned)
    except GRPCError as exc:
        status, message, details, trailers = exc.status, exc.message, exc.details, exc.trailing_metadata
    except NotImplementedError:
        status, message = Status.UNIMPLEMENTED, "Method not implemented"
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Reset by the client or ended by the server: the call is answered already, if
            # anybody is left to answer.
            raise
        # Not ours: the handler awaited something cancelled elsewhere. Its call still ends.
        log.error("handler of %s ended in a CancelledError it did not ask for", stream.method, exc_info=True)
        status, message = Status.UNKNOWN, "Unexpected error"
    except TimeoutError:
        if stream.deadline is not None and scope.expired():
            status, message = Status.DEADLINE_EXCEEDED, "Deadline exceeded"
        else:
            log.exception("error in handler of %s", stream.method)
            status, message = Status.UNKNOWN, "Unexpected error"
    except ProtocolError as exc:
        log.error("handler of %s misused its stream: %s", stream.method, exc)
        status, message = Status.INTERNAL, "Internal error"
    except Exception:
        log.exception("error in handler of %s", stream.method)
        status, message = Status.UNKNOWN, "Unexpected error"
    else:
        if stream._state in TERMINAL or status is not _OK:  # (stream.closed, without its call)
            pass
        elif deadline is not None and deadline.time_remaining() <= 0:
            status, message = Status.DEADLINE_EXCEEDED, "Deadline exceeded"  # it never yielded
        elif not stream._sent and not handler.cardinality.server_streaming:
            log.error("handler of unary method %s returned without sending a reply", stream.method)
            status, message = Status.INTERNAL, "The handler sent no reply"
    if stream._state in TERMINAL:
        return
    try:
        stream._send_status(status, message, details, trailers)
    except Exception:
        # The outcome cannot be said as raised (details that are no message, status OK from a
        # unary handler without a reply, ...): the call still ends, with INTERNAL.
        log.exception("could not send the status of %s; answering INTERNAL", stream.method)
        stream._end_now(Status.INTERNAL, "Internal error: the status could not be sent")
