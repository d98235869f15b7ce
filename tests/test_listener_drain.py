"""Closing the server resets nothing the kernel accepted, and removes the Unix socket it made.

A connection completed by the kernel waits in the listener's accept queue until the server
accepts it; closing a listening socket resets every connection still queued (Linux sends RST),
and a client that already wrote its request there cannot know whether it ran. Here the
connections are made and their requests written without letting the event loop run, so
they are all in the queue when ``Server.close()`` is called.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import ssl
import tempfile
from collections.abc import Iterator

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trustme
from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue

from app_kit import Server
from app_kit.rpc.framing import frame_message
from app_kit.wire.h2_internals import GoAwayTolerantStateMachine

from .services import EchoService

pytestmark = pytest.mark.anyio

BACKLOG = 16
SLEEP = 0.2  # each queued call is still running when the server closes


class QueuedClient:
    """One h2 client on a plain blocking socket: connects and writes its request at once
    (the kernel completes the connection into the listen backlog without the server), then
    reads everything the server sends, on the event loop, until the end of the connection."""

    def __init__(self, address: str | tuple[str, int], tls: ssl.SSLContext | None) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(address)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.state_machine = GoAwayTolerantStateMachine()  # keep reading after GOAWAY, as gRPC clients do
        self.h2.initiate_connection()
        self.h2.send_headers(
            1,
            [
                (b":method", b"POST"),
                (b":scheme", b"https" if tls else b"http"),
                (b":path", b"/test.Echo/Sleep"),
                (b":authority", b"localhost"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
        )
        self.h2.send_data(1, frame_message(DoubleValue(value=SLEEP).SerializeToString()), end_stream=True)
        self.tls: ssl.SSLObject | None = None
        self.tls_closed = False
        if tls is None:
            self.sock.sendall(self.h2.data_to_send())  # the whole request, before any accept
        else:
            self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
            self.sock.sendall(self.outgoing.read())  # the ClientHello, before any accept
        self.sock.setblocking(False)
        self.events: list[h2.events.Event] = []
        self.reset = False
        self.eof = False

    async def _send(self, data: bytes) -> None:
        if self.tls is not None:
            if data:
                self.tls.write(data)
            data = self.outgoing.read()
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _recv(self) -> bytes:
        """Plaintext received (b"" at the end of the connection)."""
        loop = asyncio.get_running_loop()
        while not self.tls_closed:
            data = await loop.sock_recv(self.sock, 65536)
            if self.tls is None or not data:
                return data
            self.incoming.write(data)
            plain = b""
            try:
                while chunk := self.tls.read(65536):
                    plain += chunk
                self.tls_closed = True  # b"" from read(): the server's close_notify
                return plain
            except ssl.SSLWantReadError:
                if plain:
                    return plain
        return b""

    async def _handshake(self) -> None:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._send(b"")
                data = await loop.sock_recv(self.sock, 65536)
                if not data:
                    raise ConnectionError("the server closed the connection during the TLS handshake") from None
                self.incoming.write(data)
        await self._send(self.h2.data_to_send())

    async def run(self) -> None:
        try:
            if self.tls is not None:
                await self._handshake()
            while data := await self._recv():
                self.events += self.h2.receive_data(data)
                await self._send(self.h2.data_to_send())  # SETTINGS and PING acks
            self.eof = True
        except ConnectionResetError:
            self.reset = True
        finally:
            self.sock.close()

    def summary(self) -> dict[str, object]:
        """What a client can tell of its call: status, reply, and the GOAWAYs' last stream ids."""
        trailers = [dict(e.headers) for e in self.events if isinstance(e, h2.events.TrailersReceived)]
        data = b"".join(e.data for e in self.events if isinstance(e, h2.events.DataReceived))
        return {
            "reset": self.reset,
            "eof": self.eof,
            "grpc-status": trailers[0].get(b"grpc-status") if trailers else None,
            "reply": DoubleValue.FromString(data[5:]).value if data else None,
            "goaway": [e.last_stream_id for e in self.events if isinstance(e, h2.events.ConnectionTerminated)],
        }


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2"])
    return server, client


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as directory:  # short: a Unix socket path has ~100 bytes
        yield os.path.join(directory, "s")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls"])
async def test_connections_in_the_accept_queue_are_served_not_reset(
    transport: str, secure: bool, tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], socket_path: str
) -> None:
    server_tls, client_tls = tls_contexts if secure else (None, None)
    server = Server([EchoService()])
    address: str | tuple[str, int]
    if transport == "unix":
        await server.start(path=socket_path, backlog=BACKLOG, ssl=server_tls)
        address = socket_path
    else:
        await server.start("127.0.0.1", 0, backlog=BACKLOG, ssl=server_tls)
        address = server.sockets[0].getsockname()[:2]
    # No await from here to close(): the loop never runs the listener's accept, so every
    # connection (and its request, or its ClientHello) waits in the kernel's queue.
    clients = [QueuedClient(address, client_tls) for _ in range(BACKLOG)]
    server.close(grace=5)
    async with asyncio.timeout(10):
        await asyncio.gather(*(client.run() for client in clients))
        await server.wait_closed()
    expected = {"reset": False, "eof": True, "grpc-status": b"0", "reply": SLEEP, "goaway": [2**31 - 1, 1]}
    assert [client.summary() for client in clients] == [expected] * BACKLOG
    # And the listener is gone: nothing new is taken.
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1) if transport == "tcp" else _unix_connect(socket_path)


def _unix_connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)


async def test_an_idle_queued_connection_gets_goaway_and_closes() -> None:
    """A connection that sent nothing yet gets the two-phase GOAWAY (last stream 0), not a reset."""
    server = Server([EchoService()])
    await server.start("127.0.0.1", 0)
    sock = socket.create_connection(server.sockets[0].getsockname()[:2])
    server.close(grace=5)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.state_machine = GoAwayTolerantStateMachine()
    conn.initiate_connection()
    await loop.sock_sendall(sock, conn.data_to_send())
    events: list[h2.events.Event] = []
    async with asyncio.timeout(10):
        while data := await loop.sock_recv(sock, 65536):
            events += conn.receive_data(data)
            await loop.sock_sendall(sock, conn.data_to_send())
        await server.wait_closed()
    sock.close()
    goaways = [e.last_stream_id for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways == [2**31 - 1, 0]


# -- the Unix socket file --------------------------------------------------------------


async def _call(path: str) -> bytes:
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        unary = channel.unary_unary("/test.Echo/Unary", BytesValue.SerializeToString, BytesValue.FromString)
        reply: BytesValue = await unary(BytesValue(value=b"hi"), timeout=5)
        return reply.value


async def test_the_socket_file_is_removed_on_close(socket_path: str) -> None:
    server = Server([EchoService()])
    await server.start(path=socket_path)
    assert await _call(socket_path) == b"hi"
    server.close(grace=1)
    await server.wait_closed()
    assert not os.path.exists(socket_path)


async def test_a_newer_servers_socket_file_is_left_alone(socket_path: str) -> None:
    old, new = Server([EchoService()]), Server([EchoService()])
    await old.start(path=socket_path)
    await new.start(path=socket_path)  # a new process taking over the path (asyncio replaces the file)
    old.close(grace=1)
    await old.wait_closed()
    assert os.path.exists(socket_path)
    assert await _call(socket_path) == b"hi"  # the newer server still serves there
    new.close(grace=1)
    await new.wait_closed()
    assert not os.path.exists(socket_path)


async def test_a_file_put_in_place_of_the_socket_is_left_alone(socket_path: str) -> None:
    server = Server([EchoService()])
    await server.start(path=socket_path)
    os.unlink(socket_path)
    pathlib.Path(socket_path).write_text("not ours")
    server.close(grace=1)
    await server.wait_closed()
    assert pathlib.Path(socket_path).read_text() == "not ours"


async def test_a_socket_passed_in_is_not_unlinked(socket_path: str) -> None:
    listening = socket.socket(socket.AF_UNIX)
    listening.bind(socket_path)
    server = Server([EchoService()])
    await server.start(sock=listening)
    assert await _call(socket_path) == b"hi"
    server.close(grace=1)
    await server.wait_closed()
    assert os.path.exists(socket_path)  # the caller made it; the caller removes it
