"""A TCP relay that re-cuts the byte stream, so that tests see reads the way a real network makes them.

Over loopback a peer's write usually arrives as one read, so code that mishandles a frame header
or a message prefix split across two reads passes every test. On a network TCP segments are
~1448 bytes, and proxies and TLS re-cut them anywhere. This relay sits between a client and a
server and forwards both directions, cutting the bytes at random offsets into writes of 1 to
1448 bytes (a share of them 1 to 9 bytes, so 9-byte HTTP/2 frame headers and 5-byte gRPC
message prefixes are split at every offset), with TCP_NODELAY on both sockets and now and then a
short pause, so that the cuts reach the reader.

Use it as::

    async with segmenting_relay("127.0.0.1", server_port, seed=1234) as relay_port:
        ...  # connect to 127.0.0.1:relay_port

or ``async with SegmentingRelay(...) as relay`` for its counters (``relay.port``,
``relay.connections``, ``relay.error_goaways`` ...).

The cuts of each direction of each connection are a function of the seed and the stream offset
only (the sender's own write boundaries come on top). The seed is printed (pytest shows it with a
failure's captured output); ``RELAY_SEED=<seed>`` in the environment fixes it for a re-run.

Half-close is forwarded (EOF on one side shuts down writing on the other; the other direction
goes on), and so is a reset (either side reset or unwritable: both sides are reset). Leaving the
context closes the listener and resets every connection still open; no task outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import socket
import struct
from collections.abc import AsyncIterator

import h2.errors

__all__ = ["MSS", "Goaway", "SegmentingRelay", "segmenting_relay"]

#: The usual TCP payload per segment on an Ethernet path with timestamps.
MSS = 1448
_READ_SIZE = 256 * 1024
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_GOAWAY = 0x7
_UP, _DOWN = "client->upstream", "upstream->client"


def _seed_from_environment() -> int:
    value = os.environ.get("RELAY_SEED")
    return int(value) if value else random.SystemRandom().randrange(2**32)


@dataclasses.dataclass(frozen=True)
class Goaway:
    """A GOAWAY frame seen passing through the relay."""

    direction: str
    connection: int
    last_stream_id: int
    error_code: int
    debug: bytes

    def __str__(self) -> str:
        try:
            name = h2.errors.ErrorCodes(self.error_code).name
        except ValueError:
            name = str(self.error_code)
        return (
            f"GOAWAY {name} {self.direction} on connection {self.connection} "
            f"(last stream {self.last_stream_id}, debug {self.debug!r})"
        )


class _Cutter:
    """Where one direction of one connection is cut, and where it pauses.

    The cut offsets depend on the seed and the stream offset only, not on how reads arrive.
    """

    def __init__(self, seed: str, relay: SegmentingRelay) -> None:
        self._cuts = random.Random(seed + "/cuts")
        self._pauses = random.Random(seed + "/pauses")
        self._max_piece = relay.max_piece
        self._small_share = relay.small_share
        self._full_share = relay.small_share + relay.full_share
        self._pause_share = relay.pause_share
        self._max_pause = relay.max_pause
        self._left = self._next_piece()

    def _next_piece(self) -> int:
        draw = self._cuts.random()
        if draw < self._small_share:
            return self._cuts.randint(1, 9)
        if draw < self._full_share:
            return self._max_piece
        return self._cuts.randint(1, self._max_piece)

    def pieces(self, data: bytes) -> list[bytes]:
        """Cut ``data`` (the next bytes of the stream) into the pieces to write."""
        pieces = []
        position, size = 0, len(data)
        while position < size:
            take = min(self._left, size - position)
            pieces.append(data[position : position + take])
            position += take
            self._left -= take
            if not self._left:
                self._left = self._next_piece()
        return pieces

    def pause(self) -> float:
        """Seconds to wait after a piece: mostly 0 (which still lets the reader run)."""
        if self._pauses.random() < self._pause_share:
            return self._pauses.uniform(0, self._max_pause)
        return 0.0


class _GoawayWatcher:
    """Follows the HTTP/2 frames of one direction, to report GOAWAYs; gives up on non-HTTP/2 bytes."""

    def __init__(self, direction: str, connection: int, *, preface: bool) -> None:
        self._direction = direction
        self._connection = connection
        self._preface_left = _PREFACE if preface else b""
        self._buffer = bytearray()
        self._skip = 0
        self._on = True

    def feed(self, data: bytes) -> list[Goaway]:
        if not self._on:
            return []
        if self._preface_left:
            length = min(len(self._preface_left), len(data))
            if data[:length] != self._preface_left[:length]:
                self._on = False  # not cleartext HTTP/2 (TLS, say): nothing to watch
                return []
            self._preface_left = self._preface_left[length:]
            data = data[length:]
        if self._skip >= len(data):
            self._skip -= len(data)
            return []
        buffer = self._buffer
        buffer += data[self._skip :]
        self._skip = 0
        found = []
        position = 0
        while len(buffer) - position >= 9:
            length = int.from_bytes(buffer[position : position + 3], "big")
            if buffer[position + 3] != _GOAWAY:
                end = position + 9 + length
                if end > len(buffer):
                    self._skip = end - len(buffer)
                    position = len(buffer)
                    break
                position = end
                continue
            if len(buffer) - position < 9 + length:
                break
            payload = bytes(buffer[position + 9 : position + 9 + length])
            position += 9 + length
            if length >= 8:
                last, code = struct.unpack(">II", payload[:8])
                found.append(Goaway(self._direction, self._connection, last & 0x7FFFFFFF, code, payload[8:]))
        del buffer[:position]
        return found


class SegmentingRelay:
    """Listens on ``host``:0 and relays each connection to the upstream, re-cut both ways.

    ``max_piece`` is the largest write; a ``small_share`` of the pieces are 1 to 9 bytes, a
    ``full_share`` are ``max_piece`` and the rest are 1 to ``max_piece``. After a
    ``pause_share`` of the pieces the relay pauses up to ``max_pause`` seconds.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        seed: int | None = None,
        host: str = "127.0.0.1",
        max_piece: int = MSS,
        small_share: float = 0.25,
        full_share: float = 0.35,
        pause_share: float = 0.02,
        max_pause: float = 0.002,
    ) -> None:
        if max_piece < 1:
            raise ValueError("max_piece must be at least 1")
        self.upstream = (upstream_host, upstream_port)
        self.seed = _seed_from_environment() if seed is None else seed
        self.host = host
        self.max_piece = max_piece
        self.small_share = small_share
        self.full_share = full_share
        self.pause_share = pause_share
        self.max_pause = max_pause
        self.port = 0
        #: Connections accepted so far.
        self.connections = 0
        #: Connections that ended in a reset (from either side, or by the relay's exit).
        self.resets = 0
        #: Bytes and pieces forwarded, per direction.
        self.bytes = {_UP: 0, _DOWN: 0}
        self.pieces = {_UP: 0, _DOWN: 0}
        #: How many pieces of each size from 1 to 9 were written.
        self.small_pieces = dict.fromkeys(range(1, 10), 0)
        #: GOAWAY frames seen passing, either way.
        self.goaways: list[Goaway] = []
        self._listener: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures: list[BaseException] = []

    @property
    def error_goaways(self) -> list[Goaway]:
        """The GOAWAYs with an error code other than NO_ERROR."""
        return [goaway for goaway in self.goaways if goaway.error_code]

    def describe(self) -> str:
        """A line for assertion messages: the seed and what passed."""
        goaways = "; ".join(map(str, self.goaways[:3])) or "none"
        if len(self.goaways) > 3:
            goaways += f"; and {len(self.goaways) - 3} more"
        return (
            f"relay seed={self.seed} (RELAY_SEED={self.seed} to repeat the cuts): {self.connections} connection(s), "
            f"{self.resets} reset, bytes {self.bytes}, pieces {self.pieces}, GOAWAYs: {goaways}"
        )

    async def __aenter__(self) -> SegmentingRelay:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.host, 0))
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        print(f"segmenting relay {self.host}:{self.port} -> {self.upstream[0]}:{self.upstream[1]} seed={self.seed}")
        self._spawn(self._accept(loop, listener))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, reset every connection and wait for every task to end."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Every task only waits on cancellable socket operations and sleeps, so this is prompt.
        await asyncio.gather(*tasks, return_exceptions=True)
        listener.close()
        if self._failures:
            raise RuntimeError(f"the relay itself failed ({self.describe()})") from self._failures[0]

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failures.append(task.exception())  # type: ignore[arg-type]

    async def _accept(self, loop: asyncio.AbstractEventLoop, listener: socket.socket) -> None:
        while True:
            client = await _accept_one(loop, listener)
            self.connections += 1
            self._spawn(self._serve(loop, client, self.connections))

    async def _serve(self, loop: asyncio.AbstractEventLoop, client: socket.socket, index: int) -> None:
        client.setblocking(False)
        upstream: socket.socket | None = None
        reset = True
        try:
            host, port = self.upstream
            (family, kind, proto, _, address), *_ = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            upstream = socket.socket(family, kind, proto)
            upstream.setblocking(False)
            try:
                await loop.sock_connect(upstream, address)
            except OSError:
                return  # nothing to relay to: the client is reset
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            broken: list[bool] = []  # shared by the two directions: whether either saw an error
            pumps = {
                asyncio.ensure_future(self._pump(loop, client, upstream, _UP, index, broken)),
                asyncio.ensure_future(self._pump(loop, upstream, client, _DOWN, index, broken)),
            }
            try:
                while pumps:
                    done, pumps = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                    if not all(task.result() for task in done):
                        return  # a reset either way, or an unwritable side: reset both
                reset = False
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            if reset:
                self.resets += 1
            for sock in (client, upstream):
                if sock is not None:
                    _close(sock, reset=reset)

    async def _pump(
        self,
        loop: asyncio.AbstractEventLoop,
        source: socket.socket,
        sink: socket.socket,
        direction: str,
        index: int,
        broken: list[bool],
    ) -> bool:
        """Forward one direction until EOF (True, after shutting down ``sink`` for writing) or an error (False)."""
        cutter = _Cutter(f"{self.seed}/{index}/{direction}", self)
        watcher = _GoawayWatcher(direction, index, preface=direction == _UP)
        small = self.small_pieces
        try:
            while True:
                data = await loop.sock_recv(source, _READ_SIZE)
                if not data:
                    if broken:
                        # A reset is reported once per socket: when the other direction's send
                        # took it, this read sees a mere EOF. Pass the reset on, not an EOF.
                        return False
                    sink.shutdown(socket.SHUT_WR)
                    return True
                self.bytes[direction] += len(data)
                self.goaways += watcher.feed(data)
                for piece in cutter.pieces(data):
                    await loop.sock_sendall(sink, piece)
                    self.pieces[direction] += 1
                    if len(piece) < 10:
                        small[len(piece)] += 1
                    pause = cutter.pause()
                    if pause:
                        await asyncio.sleep(pause)
                    else:
                        # Two turns of the loop: in the second, a reader on this loop (our server,
                        # our client) whose socket this piece made readable runs before we write
                        # again, so it reads this piece alone rather than glued to the next.
                        await asyncio.sleep(0)
                        await asyncio.sleep(0)
        except OSError:  # reset, broken pipe, not connected
            broken.append(True)
            return False


def _close(sock: socket.socket, *, reset: bool) -> None:
    if reset:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextlib.asynccontextmanager
async def segmenting_relay(
    upstream_host: str, upstream_port: int, *, seed: int | None = None, **options: float
) -> AsyncIterator[int]:
    """Run a :class:`SegmentingRelay` to ``upstream_host``:``upstream_port``; yield its port."""
    async with SegmentingRelay(upstream_host, upstream_port, seed=seed, **options) as relay:  # type: ignore[arg-type]
        yield relay.port


async def _accept_one(loop: asyncio.AbstractEventLoop, listener: socket.socket) -> socket.socket:
    """``loop.sock_accept`` without its race: on CPython 3.11 a connection arriving as the
    accept is cancelled (the relay stopping) sets a result on the cancelled future, and the
    InvalidStateError reaches the loop's exception handler (a test failed of it)."""
    while True:
        try:
            return listener.accept()[0]
        except BlockingIOError:
            pass
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(listener.fileno(), _settle, readable)
        try:
            await readable
        finally:
            loop.remove_reader(listener.fileno())


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
