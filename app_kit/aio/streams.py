"""The adapter on anyio byte streams, for trio: the same protocols, another transport.

On asyncio the protocols (:class:`~app_kit.aio.transport.ConnectionProtocol` and its server
and client kinds) are driven by asyncio's transports. On trio, :class:`StreamTransport` drives
them from an anyio byte stream (TCP, Unix, TLS): one task reads and feeds the protocol,
another writes what it queued. It has the transport methods the protocols call, with the
same meaning (write-buffer limits that pause and resume the writer, half-close, abort).

:func:`serve_stream` runs one connection in its own nursery, with its own
:class:`~app_kit.aio.runtime.TrioRuntime`: every task the connection starts (its handlers)
ends before the connection's task does.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import trio
from anyio.streams.tls import TLSAttribute, TLSStream

from ..wire.logs import RateLimitedLogger
from .trio_runtime import TrioRuntime

if TYPE_CHECKING:
    from .transport import ConnectionProtocol

__all__ = ["StreamTransport", "open_connection", "serve_stream"]

log = logging.getLogger("app_kit.transport")
peer_log = RateLimitedLogger(log)  # what peers cause: a flood of them must not flood the log

# How a connection ends under us. BusyResourceError: a TLS 1.2 peer renegotiating while our
# writer waits (OpenSSL must write its refusal from the reader): refused, as on asyncio.
_LOST = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.BusyResourceError, ssl.SSLError)

_READ_SIZE = 65536


class StreamTransport:
    """An asyncio-transport-shaped writer and reader over an anyio byte stream."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: ConnectionProtocol) -> None:
        self._stream = stream
        self._protocol = protocol
        self._out = bytearray()
        self._in_flight = 0  # bytes handed to the stream's send() that it has not finished
        self._high = 65536
        self._low = 16384
        self._write_paused = False
        self._closing = False  # close() or write_eof(): nothing more is written after the buffer
        self._eof_wanted = False
        self._aborted = False
        # trio's own primitives, not anyio's wrappers of them: this module runs only on trio,
        # and per connection they are memory (an idle connection holds all of them).
        self._reading = trio.Event()
        self._reading.set()
        self._has_output = trio.Event()
        self._lost = False
        self._scope: trio.CancelScope | None = None

    # -- what the protocols call -----------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Pause the protocol's writing over ``high`` buffered bytes, resume under ``low``."""
        if high is not None:
            self._high = high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_size(self) -> int:
        """Bytes written and not yet sent."""
        return len(self._out) + self._in_flight

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; the writer task sends it."""
        self.writelines((data,))

    def writelines(self, buffers: Iterable[bytes | bytearray | memoryview]) -> None:
        """Queue each of ``buffers``, in order; the writer task sends them."""
        if self._closing or self._lost:
            return
        out = self._out
        for data in buffers:
            out += data
        self._has_output.set()
        if not self._write_paused and len(out) + self._in_flight > self._high:
            self._write_paused = True
            self._protocol.pause_writing()

    def can_write_eof(self) -> bool:
        """Whether the stream can be half-closed (TCP and Unix, not TLS)."""
        return not isinstance(self._stream, TLSStream)

    def write_eof(self) -> None:
        """Send what is buffered, then half-close."""
        self._closing = self._eof_wanted = True
        self._has_output.set()

    def close(self) -> None:
        """Send what is buffered, then close."""
        self._closing = True
        self._eof_wanted = False
        self._has_output.set()
        if self._writer_done:  # half-closed already: nothing left to send
            self._stop()

    def abort(self) -> None:
        """Close now, dropping what is buffered."""
        self._aborted = self._closing = True
        self._out.clear()
        self._stop()

    def is_closing(self) -> bool:
        """Whether close(), write_eof() or abort() was called, or the stream is gone."""
        return self._closing or self._lost

    def pause_reading(self) -> None:
        """Stop feeding the protocol until :meth:`resume_reading`."""
        if self._reading.is_set():
            self._reading = trio.Event()

    def resume_reading(self) -> None:
        """Feed the protocol again."""
        self._reading.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, ``socket``, ``ssl_object``, as asyncio's transports."""
        stream = self._stream
        try:
            if name == "peername":
                return stream.extra(anyio.abc.SocketAttribute.remote_address)
            if name == "sockname":
                return stream.extra(anyio.abc.SocketAttribute.local_address)
            if name == "socket":
                return stream.extra(anyio.abc.SocketAttribute.raw_socket)
            if name == "ssl_object":
                return stream.extra(TLSAttribute.ssl_object)
        except anyio.TypedAttributeLookupError:
            return default
        return default

    # -- running ---------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def run(self) -> None:
        """Read and write until the connection ends; tell the protocol (``connection_lost``)."""
        try:
            with trio.CancelScope() as self._scope:
                self._protocol.connection_made(self)  # type: ignore[arg-type]
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self._write_all)
                    await self._read_all()
        finally:
            self._lost = True
            self._out.clear()
            with trio.CancelScope(shield=True):
                await anyio.aclose_forcefully(self._stream)
            self._protocol.connection_lost(self._error)

    _error: Exception | None = None
    _writer_done = False

    def _stop(self, error: Exception | None = None) -> None:
        if error is not None and self._error is None:
            self._error = error
        if self._scope is not None:
            self._scope.cancel()

    async def _read_all(self) -> None:
        stream = self._stream
        protocol = self._protocol
        try:
            while True:
                if not self._reading.is_set():
                    await self._reading.wait()
                data = await stream.receive(_READ_SIZE)
                protocol.data_received(data)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            protocol.eof_received()
        except _LOST as exc:
            self._stop(exc)
            return
        # The peer closed its side: send what is queued, then close (asyncio's eof_received
        # returning False).
        self._closing = True
        self._has_output.set()
        if self._writer_done:
            self._stop()

    @trio.lowlevel.enable_ki_protection
    async def _write_all(self) -> None:
        stream = self._stream
        try:
            while True:
                if not self._out:
                    if self._closing:
                        break
                    self._has_output = trio.Event()
                    await self._has_output.wait()
                    continue
                data = bytes(self._out)
                self._out.clear()
                self._in_flight = len(data)
                await stream.send(data)
                self._in_flight = 0
                if self._write_paused and len(self._out) <= self._low:
                    self._write_paused = False
                    self._protocol.resume_writing()
            if self._eof_wanted and not self._aborted and isinstance(stream, anyio.abc.SocketStream):
                await stream.send_eof()
                # Reading goes on, and input is discarded, until the peer closes or close().
                self._writer_done = True
                return
        except _LOST as exc:
            self._stop(exc)
            return
        except anyio.EndOfStream:
            # A TLS stream's, when the peer left without close_notify while we wrote (a
            # client that only completes a handshake): as lost as a reset.
            self._stop(ConnectionResetError("the peer closed the TLS connection"))
            return
        self._writer_done = True
        self._stop()


@trio.lowlevel.enable_ki_protection
async def serve_stream(
    stream: anyio.abc.ByteStream,
    make_protocol: Callable[[TrioRuntime], ConnectionProtocol],
    *,
    tls: ssl.SSLContext | None = None,
    handshake_timeout: float | None = None,
    handshakes: set[anyio.CancelScope] | None = None,
) -> None:
    """Run one connection to its end: the TLS handshake if ``tls``, then the protocol
    ``make_protocol`` returns for the connection's own runtime, then its tasks.

    The scope of a handshake under way is in ``handshakes`` (a server's close() cancels them:
    no request came on those connections yet)."""
    if tls is not None:
        with anyio.move_on_after(handshake_timeout if handshake_timeout is not None else float("inf")) as scope:
            if handshakes is not None:
                handshakes.add(scope)
            try:
                stream = await TLSStream.wrap(stream, server_side=True, ssl_context=tls, standard_compatible=False)
            except (OSError, ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream) as exc:
                peer_log.log(logging.INFO, "TLS handshake failed: %r", exc)
                await anyio.aclose_forcefully(stream)
                return
            finally:
                if handshakes is not None:
                    handshakes.discard(scope)
        if not isinstance(stream, TLSStream):
            peer_log.log(logging.INFO, "closing connection: no TLS handshake within %ss", handshake_timeout)
            await anyio.aclose_forcefully(stream)
            return
    # The connection's tasks (its handlers) in its own nursery; its callbacks and timers on
    # the run's shared scheduler (one task for them all: an idle connection holds no task of
    # its own for them).
    async with trio.open_nursery() as nursery:
        runtime = TrioRuntime(nursery, scheduler=TrioRuntime.shared())
        transport = StreamTransport(stream, make_protocol(runtime))
        await transport.run()
        await runtime.wait_tasks()


async def open_connection(
    make_protocol: Callable[[TrioRuntime], ConnectionProtocol],
    *,
    host: str | None = None,
    port: int | None = None,
    path: str | None = None,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    handshake_timeout: float | None = None,
) -> ConnectionProtocol:
    """Connect (TCP to ``host``:``port``, or Unix ``path``; TLS if ``tls``, its handshake
    within ``handshake_timeout``, else TimeoutError) and run the connection in this trio
    run's shared runtime; return its protocol, connection made."""
    if path is not None:
        stream: anyio.abc.ByteStream = await anyio.connect_unix(path)
    else:
        assert host is not None and port is not None
        stream = await anyio.connect_tcp(host, port)
    if tls is not None:
        try:
            with anyio.fail_after(handshake_timeout):
                stream = await TLSStream.wrap(
                    stream,
                    hostname=server_hostname or (host if path is None else "localhost"),
                    ssl_context=tls,
                    standard_compatible=False,
                )
        except BaseException:
            await anyio.aclose_forcefully(stream)
            raise
    made = TrioRuntime.shared().create_future()

    def make(runtime: TrioRuntime) -> ConnectionProtocol:
        protocol = make_protocol(runtime)
        if made.cancelled():  # the caller gave up meanwhile: nobody's connection
            runtime.call_soon(_discard, protocol)
        else:
            made.set_result(protocol)
        return protocol

    TrioRuntime.shared().create_task(serve_stream(stream, make))
    try:
        protocol: ConnectionProtocol = await made
    except BaseException:
        if made.done() and not made.cancelled():
            _discard(made.result())
        made.cancel()
        raise
    return protocol


def _discard(protocol: ConnectionProtocol) -> None:
    protocol.connection.close(0, "connection attempt cancelled")
    protocol.close_transport()
