"""Session 14: a fresh-eyes review of TLS serving and the TLS client, over real sockets.

Hostile and broken peers against a TLS port (silent, trickling, renegotiating, leaving
mid-call), mutual TLS and the peer's identity, certificate rotation, our Channel against
grpcio's TLS server, and the App's TLS files. The eight defects it found are fixed (the last,
failed handshakes unlogged on asyncio and uvloop, in session 15).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import select
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
import trio
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value

from app_kit import (
    App,
    AppSettings,
    Cardinality,
    Channel,
    Configuration,
    GRPCError,
    Handler,
    Server,
    StartupError,
    Status,
    Stream,
    client_tls,
)
from app_kit.aio.client import method_for
from app_kit.observe.access_log import AccessLog

from .frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HANDSHAKE,
    HEADERS,
    PREFACE,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    request_block,
)
from .process import ROOT
from .services import EchoService

pytestmark = pytest.mark.anyio

CA = trustme.CA()
LOCALHOST = CA.issue_cert("localhost", common_name="first")


def server_context(cert: trustme.LeafCert = LOCALHOST, *, require_client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        CA.configure_trust(context)
    return context


def raw_client_context() -> ssl.SSLContext:
    """A plain client context (for raw ssl sockets) that trusts CA and offers ALPN h2."""
    context = ssl.create_default_context()
    CA.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    return context


def port_of(server: Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


class Sleeper:
    """One unary method that sleeps (on either backend) and says how it ended."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0
        self.peers: list[object] = []
        self.certs: list[dict[str, Any] | None] = []

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.S/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)}

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.started += 1
        self.certs.append(stream.peer.cert())
        try:
            await anyio.sleep(request.value)
        except BaseException:
            self.cancelled += 1
            self.peers.append(stream.peer.addr())  # what a handler's cleanup (or a log) reads
            raise
        await stream.send_message(request)


def sleep_request(seconds: float) -> bytes:
    """A raw HTTP/2 connection's first bytes: the handshake and one call to /t.S/Sleep."""
    message = DoubleValue(value=seconds).SerializeToString()
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    return (
        HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block(path="/t.S/Sleep")) + frame(DATA, END_STREAM, 1, body)
    )


def client_hello() -> bytes:
    """A real TLS ClientHello (offering h2), as its client would send it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = raw_client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def wait_all_closed(socks: list[socket.socket], timeout: float) -> float:
    """Seconds until the server closed every one of ``socks`` (EOF or reset); inf past ``timeout``."""
    started = time.monotonic()
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while selector.get_map():
            left = started + timeout - time.monotonic()
            if left <= 0:
                return float("inf")
            for key, _ in selector.select(left):
                try:
                    data = key.fileobj.recv(1)  # type: ignore[union-attr]
                except OSError:
                    data = b""
                if not data:
                    selector.unregister(key.fileobj)
    return time.monotonic() - started


def trickle(port: int, hello: bytes, interval: float, timeout: float) -> tuple[float, int]:
    """Send ``hello`` a byte at a time; (seconds until the server closed, bytes sent by then)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        for sent in range(len(hello)):
            readable, _, _ = select.select([sock], [], [], interval)
            if readable:
                try:
                    if not sock.recv(1):
                        return time.monotonic() - started, sent
                except OSError:
                    return time.monotonic() - started, sent
            if time.monotonic() - started > timeout:
                break
            try:
                sock.sendall(hello[sent : sent + 1])
            except OSError:
                return time.monotonic() - started, sent
        return float("inf"), len(hello)


def frame_types(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in ``data``, in order."""
    kinds, offset = [], 0
    while offset + 9 <= len(data):
        kinds.append(data[offset + 3])
        offset += 9 + int.from_bytes(data[offset : offset + 3], "big")
    return kinds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def sleep_call(channel: Channel, seconds: float = 0.0, timeout: float | None = 3) -> float:
    method = method_for(channel, "/t.S/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
    reply = await method(DoubleValue(value=seconds), timeout=timeout)
    return reply.value


def tls_channel(port: int, **options: Any) -> Channel:
    return Channel("127.0.0.1", port, ssl=client_tls(root_certificates=CA.cert_pem.bytes()), **options)


def app_kit_records(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("app_kit") and r.levelno >= level]


# -- 1. hostile and broken peers against a TLS port ----------------------------------------------


@pytest.mark.backends
async def test_silent_and_trickling_tls_peers_are_dropped_at_the_handshake_timeout_while_others_are_served(
    backend: str,
) -> None:
    """200 peers that connect and never send a ClientHello, and one that trickles its ClientHello
    a byte every 50 ms, are all closed once handshake_timeout (1 s) is over — the trickler too: the
    timeout bounds the whole handshake, not the wait for each byte — while a real client is
    served at once meanwhile; the server's file descriptors go back to what they were."""
    server = Server([Sleeper()], config=Configuration(handshake_timeout=1.0))
    await server.start("127.0.0.1", 0, ssl=server_context(), backlog=512)
    port = port_of(server)
    fds_before = open_fds()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        async with anyio.create_task_group() as group:
            trickled: list[tuple[float, int]] = []

            async def run_trickler() -> None:
                trickled.append(await anyio.to_thread.run_sync(trickle, port, client_hello(), 0.05, 5.0))

            group.start_soon(run_trickler)
            started = time.monotonic()
            async with tls_channel(port, server_hostname="localhost") as channel:
                assert await sleep_call(channel) == 0.0
            assert time.monotonic() - started < 0.8, "a real client waited behind the silent ones"
            took = await anyio.to_thread.run_sync(wait_all_closed, silent, 4.0)
        assert 0.7 < took < 3.0, f"silent TLS peers closed after {took:.2f}s (handshake_timeout 1 s)"
        trickle_took, bytes_sent = trickled[0]
        assert trickle_took < 3.0 and bytes_sent < 60, (trickle_took, bytes_sent)
    finally:
        for sock in silent:
            sock.close()
        server.close(grace=0.5)
        await server.wait_closed()
    assert open_fds() <= fds_before + 1  # (the listening socket is closed too)
    assert server.stats().connections_total == 1  # no HTTP/2 connection was ever made for the others


@pytest.mark.backends
async def test_a_tls_peer_that_leaves_mid_call_by_close_notify_or_reset_cancels_the_call_quietly(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """close_notify (TLS's own close) and a TCP reset in the middle of a call: the handler is
    cancelled at once, nothing is logged above INFO, and the server goes on serving."""
    caplog.set_level(logging.DEBUG, logger="app_kit")
    sleeper = Sleeper()

    def leave(port: int, how: str) -> None:
        tls = raw_client_context().wrap_socket(
            socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"
        )
        tls.sendall(sleep_request(30))
        time.sleep(0.2)
        if how == "close_notify":
            with contextlib.suppress(ssl.SSLError):  # (the server's SETTINGS came after our close_notify)
                tls.unwrap()
        else:
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()

    server = Server([sleeper])
    await server.start("127.0.0.1", 0, ssl=server_context())
    try:
        for expected, how in enumerate(("close_notify", "reset"), start=1):
            await anyio.to_thread.run_sync(leave, port_of(server), how)
            with anyio.fail_after(2):
                while sleeper.cancelled < expected or server.stats().connections:
                    await anyio.sleep(0.02)
        async with tls_channel(port_of(server), server_hostname="localhost") as channel:
            assert await sleep_call(channel) == 0.0
    finally:
        server.close(grace=0.5)
        await server.wait_closed()
    assert sleeper.started == 3
    assert not app_kit_records(caplog, logging.WARNING), [r.getMessage() for r in caplog.records]


async def test_tls_clients_without_alpn_h2_are_served_http2_and_an_http1_client_is_told_goaway() -> None:
    """Unlike grpc-core (which closes a connection whose client did not select ALPN h2 right
    after the handshake), a TLS client that offers no ALPN and speaks HTTP/2 is served; one
    that offers only http/1.1 gets no ALPN, then our SETTINGS and GOAWAY for its HTTP/1 request,
    and the connection closes: no hang, no traceback."""
    sleeper = Sleeper()

    def exchange(alpn: list[str] | None, data: bytes) -> tuple[str | None, bytes]:
        context = ssl.create_default_context()
        CA.configure_trust(context)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        with (
            socket.create_connection(("127.0.0.1", port)) as sock,
            context.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.settimeout(3)
            tls.sendall(data)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := tls.recv(65536):
                    received += chunk
                    if data.startswith(PREFACE) and len(received) > 100:
                        break
            return tls.selected_alpn_protocol(), received

    async with contextlib.AsyncExitStack() as stack:
        server = Server([sleeper])
        await server.start("127.0.0.1", 0, ssl=server_context())
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close, grace=0.5)
        port = port_of(server)
        alpn, received = await anyio.to_thread.run_sync(exchange, None, sleep_request(0))
        assert alpn is None and sleeper.started == 1 and received
        alpn, received = await anyio.to_thread.run_sync(exchange, ["http/1.1"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert alpn is None
        kinds = frame_types(received)
        assert kinds[0] == SETTINGS and kinds[-1] == GOAWAY, kinds  # then EOF


# -- 2. mutual TLS --------------------------------------------------------------------------------


def spiffe_cert(tmp_path: Path) -> tuple[Path, str]:
    """A client certificate from CA whose identity is a SPIFFE ID (a URI SAN), as a mesh issues."""
    spiffe_id = "spiffe://cluster.local/ns/billing/sa/worker"
    ca_key = serialization.load_pem_private_key(CA.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(CA.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path = tmp_path / "client.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    return path, spiffe_id


async def test_mtls_the_handler_reads_a_mesh_identity_and_a_client_of_another_ca_is_refused(tmp_path: Path) -> None:
    """A SPIFFE ID (URI SAN) reaches the handler in ``stream.peer.cert()["subjectAltName"]``;
    a client whose certificate another CA issued is refused at the handshake (UNAVAILABLE) and no
    handler runs."""
    client_pem, spiffe_id = spiffe_cert(tmp_path)
    stranger = trustme.CA().issue_cert("intruder")
    stranger_pem = tmp_path / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(stranger_pem))
    sleeper = Sleeper()
    server = Server([sleeper])
    await server.start("127.0.0.1", 0, ssl=server_context(require_client=True))
    try:
        roots = CA.cert_pem.bytes()
        mesh = client_tls(root_certificates=roots, certificate_chain=client_pem)
        async with Channel("127.0.0.1", port_of(server), ssl=mesh, server_hostname="localhost") as channel:
            assert await sleep_call(channel) == 0.0
        cert = sleeper.certs[0]
        assert cert is not None and ("URI", spiffe_id) in cert["subjectAltName"]
        intruder = client_tls(root_certificates=roots, certificate_chain=stranger_pem)
        async with Channel("127.0.0.1", port_of(server), ssl=intruder, server_hostname="localhost") as channel:
            with pytest.raises(GRPCError) as info:
                await sleep_call(channel, timeout=2)
        assert info.value.status is Status.UNAVAILABLE
        assert sleeper.started == 1
    finally:
        server.close(grace=0.5)
        await server.wait_closed()


def _refused_handshakes(loop_name: str, server_ssl: ssl.SSLContext) -> list[str]:
    """What app_kit logs while three clients fail their handshakes with a Server on ``loop_name``
    (asyncio or uvloop) and one succeeds: one without the certificate ``server_ssl`` may ask for,
    one that does not trust the server's CA, one that sends no TLS at all."""
    from app_kit.aio import eventloop

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("app_kit")
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)

    def clients(port: int) -> None:
        untrusting = ssl.create_default_context()  # the system's roots: not our CA
        untrusting.set_alpn_protocols(["h2"])
        for context in (raw_client_context(), untrusting, None):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(3)
                with contextlib.suppress(OSError):  # TLS 1.3: a refusal comes after our handshake
                    if context is None:
                        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\0" * 64)
                        sock.recv(100)
                        continue
                    with context.wrap_socket(sock, server_hostname="localhost") as tls:
                        tls.sendall(HANDSHAKE)
                        tls.recv(100)

    async def main() -> None:
        server = Server([Sleeper()])
        await server.start("127.0.0.1", 0, ssl=server_ssl)
        try:
            await asyncio.get_running_loop().run_in_executor(None, clients, port_of(server))
            await asyncio.sleep(0.1)
        finally:
            server.close(grace=0.5)
            await server.wait_closed()

    try:
        eventloop.run(main(), loop=loop_name)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    return [r.getMessage() for r in records if r.levelno >= logging.INFO]


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_refused_tls_handshakes_are_logged_on_asyncio_and_uvloop(loop_name: str) -> None:
    """asyncio's and uvloop's TLS layers report a failed handshake only in debug mode: a server
    refusing a client for lacking the certificate mutual TLS asks for logged nothing at any level
    (trio's said "TLS handshake failed"). Now each reason is logged at INFO, rate-limited."""
    said = _refused_handshakes(loop_name, server_context(require_client=True))
    failed = [line for line in said if line.startswith("TLS handshake failed")]
    assert len(failed) == 3, said
    assert "CERTIFICATE" in failed[0].upper(), failed  # the client without one
    assert "ALERT" in failed[1].upper(), failed  # the client that refused our certificate
    assert "WRONG_VERSION_NUMBER" in failed[2].upper() or "HTTP" in failed[2].upper(), failed


def test_a_context_with_its_own_tls_object_class_keeps_it() -> None:
    """The logging class is installed only where the context has the standard one."""

    class Own(ssl.SSLObject):
        pass

    context = server_context()
    context.sslobject_class = Own
    _refused_handshakes("asyncio", context)
    assert context.sslobject_class is Own


def test_failed_tls_handshakes_are_logged_at_a_bounded_rate_on_trio(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="app_kit")

    def garbage(port: int, count: int) -> None:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"\x16\x03\x01\x00\x05hello" * 4)
                sock.settimeout(2)
                with contextlib.suppress(OSError):
                    sock.recv(100)

    async def main() -> None:
        server = Server([Sleeper()])
        await server.start("127.0.0.1", 0, ssl=server_context())
        try:
            await trio.to_thread.run_sync(garbage, port_of(server), 60)
        finally:
            server.close(grace=0.5)
            await server.wait_closed()

    trio.run(main)
    lines = [r for r in app_kit_records(caplog) if "handshake" in r.getMessage().lower()]
    assert 1 <= len(lines) <= 22, f"{len(lines)} lines for 60 garbage connections"


class StallingProxy:
    """A TCP relay that stops reading the server when told (the server's writes then block). It
    relays whole TLS records only: a client left with part of one would wait for the rest (and
    s_client then stops reading its commands)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.stalled = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for args in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                self.threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, records: bool) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while not (records and self.stalled.is_set()):
                data = source.recv(65536)
                if not data:
                    return
                if not records:
                    sink.sendall(data)
                    continue
                pending += data
                end = 0  # relay whole records only
                while end + 5 <= len(pending) and end + 5 + int.from_bytes(pending[end + 3 : end + 5]) <= len(pending):
                    end += 5 + int.from_bytes(pending[end + 3 : end + 5])
                sink.sendall(pending[:end])
                pending = pending[end:]

    def close(self) -> None:
        for sock in [self.listener, *self.sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self.threads:
            thread.join(2)


def test_a_renegotiating_client_gets_no_traceback_logged_on_trio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # openssl s_client renegotiates (CI installs the openssl package when it is missing).
    assert shutil.which("openssl") is not None, "needs the openssl command: apt-get install openssl"
    caplog.set_level(logging.DEBUG, logger="app_kit")
    roots = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(roots))
    count = Int64Value(value=100_000).SerializeToString()  # 1.6 GB of replies: the writer blocks
    request = (
        PREFACE
        + frame(SETTINGS, 0, 0, (4).to_bytes(2, "big") + (2**31 - 1).to_bytes(4, "big"))
        + frame(WINDOW_UPDATE, 0, 0, (2**31 - 1 - 65535).to_bytes(4, "big"))
        + frame(HEADERS, END_HEADERS, 1, request_block(path="/test.Echo/Big"))
        + frame(DATA, END_STREAM, 1, b"\x00" + len(count).to_bytes(4, "big") + count)
    )
    errors: list[logging.LogRecord] = []

    async def main() -> None:
        service = EchoService()
        server = Server([service])
        await server.start("127.0.0.1", 0, ssl=server_context())
        proxy = StallingProxy(("127.0.0.1", port_of(server)))
        s_client = subprocess.Popen(
            [
                *("openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-tls1_2", "-alpn", "h2"),
                *("-CAfile", str(roots), "-servername", "localhost"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert s_client.stdin is not None and s_client.stdout is not None
        shaken = threading.Event()

        def watch(out: Any) -> None:  # s_client prints its session once the handshake is done
            for line in iter(out.readline, b""):
                if line.startswith(b"    Verify return code"):
                    shaken.set()

        watcher = threading.Thread(target=watch, args=(s_client.stdout,), daemon=True)
        watcher.start()
        try:
            with trio.fail_after(5):
                while not shaken.is_set():
                    await trio.sleep(0.02)
                proxy.stalled.set()  # the server's replies stop leaving: its writer will block in send
                s_client.stdin.write(request)
                s_client.stdin.flush()
                sent: object = 0
                while not sent or sent != service.observed.get("sent"):  # the handler stopped for 0.2 s
                    sent = service.observed.get("sent")
                    await trio.sleep(0.2)
                s_client.stdin.write(b"R\n")  # s_client's command: renegotiate
                s_client.stdin.flush()
            with trio.move_on_after(2):
                while not app_kit_records(caplog, logging.ERROR):
                    await trio.sleep(0.2)
                    s_client.stdin.write(frame(SETTINGS, 0, 0))  # its ClientHello goes with its next write
                    s_client.stdin.flush()
            errors.extend(app_kit_records(caplog, logging.ERROR))
        finally:
            s_client.kill()
            s_client.wait()
            watcher.join(2)  # (its pipe ended with s_client)
            s_client.stdout.close()
            s_client.stdin.close()
            proxy.close()
            server.close(grace=0)
            await server.wait_closed()

    trio.run(main)
    assert not errors, [(r.getMessage(), r.exc_info and repr(r.exc_info[1])) for r in errors]


async def test_a_tls_connection_costs_what_the_readme_says_on_asyncio() -> None:
    # ~290 KiB (documented): asyncio's SSLProtocol holds a 256 KiB buffer per connection from its
    # accept; uvloop ~35 KiB, trio ~45 KiB.
    count = 30

    def connect(port: int) -> list[ssl.SSLSocket]:
        context = raw_client_context()
        return [
            context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
            for _ in range(count)
        ]

    server = Server([Sleeper()])
    await server.start("127.0.0.1", 0, ssl=server_context())
    clients: list[ssl.SSLSocket] = []
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        clients = await anyio.to_thread.run_sync(connect, port_of(server))
        with anyio.fail_after(3):
            while server.stats().connections < count:
                await anyio.sleep(0.01)
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
        for client in clients:
            client.close()
        server.close(grace=0.5)
        await server.wait_closed()
    assert per_connection < 400 * 1024, f"{per_connection / 1024:.0f} KiB per TLS connection"


@pytest.mark.backends
async def test_the_peer_of_a_tls_call_ended_by_a_disconnect_is_still_known(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app_kit.access")
    sleeper = Sleeper()

    def call_then_leave(port: int) -> None:
        with (
            socket.create_connection(("127.0.0.1", port)) as sock,
            raw_client_context().wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            tls.sendall(sleep_request(30))
            time.sleep(0.2)

    server = Server([sleeper], interceptors=[AccessLog()])
    await server.start("127.0.0.1", 0, ssl=server_context())
    try:
        await anyio.to_thread.run_sync(call_then_leave, port_of(server))
        with anyio.fail_after(2):
            while not sleeper.peers or server.stats().connections:
                await anyio.sleep(0.02)
    finally:
        server.close(grace=0.5)
        await server.wait_closed()
    logged = [getattr(r, "peer", None) for r in caplog.records if r.name == "app_kit.access"]
    assert isinstance(sleeper.peers[0], tuple) and logged and str(logged[0]).startswith("127.0.0.1:"), (
        sleeper.peers,
        logged,
    )


# -- 3. certificate rotation ----------------------------------------------------------------------


@pytest.mark.backends
async def test_a_certificate_reloaded_into_the_servers_context_reaches_new_connections(backend: str) -> None:
    """Rotation is not built in (the App reads APP_TLS_* once, at start); what works is loading
    the new pair into the same SSLContext the server was given: the server keeps that context
    (it does not copy it), so new handshakes present the new certificate, open ones go on."""
    second = CA.issue_cert("localhost", common_name="second")
    context = server_context(LOCALHOST)

    def served_common_name(port: int) -> str:
        with (
            socket.create_connection(("127.0.0.1", port)) as sock,
            raw_client_context().wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            cert: Any = tls.getpeercert()
            return next(value for field in cert["subject"] for key, value in field if key == "commonName")

    server = Server([Sleeper()])
    await server.start("127.0.0.1", 0, ssl=context)
    try:
        async with tls_channel(port_of(server), server_hostname="localhost") as channel:
            assert await sleep_call(channel) == 0.0
            assert await anyio.to_thread.run_sync(served_common_name, port_of(server)) == "first"
            second.configure_cert(context)  # load_cert_chain on the live context
            assert await anyio.to_thread.run_sync(served_common_name, port_of(server)) == "second"
            assert await sleep_call(channel) == 0.0  # the open connection is not disturbed
    finally:
        server.close(grace=0.5)
        await server.wait_closed()


# -- 4. our Channel against grpcio's TLS server ---------------------------------------------------


@contextlib.contextmanager
def grpcio_server(cert: trustme.LeafCert | None) -> Iterator[int]:
    """A grpcio server answering /t.S/Sleep (without sleeping), over TLS with ``cert`` (or plaintext)."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(
        lambda request, _: request,
        request_deserializer=DoubleValue.FromString,
        response_serializer=DoubleValue.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {"Sleep": handler}),))
    if cert is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        pair = (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


async def failure(port: int, context: ssl.SSLContext | None, name: str | None) -> tuple[GRPCError, float]:
    started = time.monotonic()
    async with Channel("127.0.0.1", port, ssl=context, server_hostname=name) as channel:
        with pytest.raises(GRPCError) as info:
            await sleep_call(channel, timeout=3)
    return info.value, time.monotonic() - started


async def test_our_channel_against_grpcios_tls_server_says_why_it_cannot_connect() -> None:
    """Against grpc-core: the name override works, and a wrong name, an expired certificate, an
    unknown CA, TLS to a plaintext port and plaintext to a TLS port each fail UNAVAILABLE at once
    with the reason in the message."""
    roots = CA.cert_pem.bytes()
    expired = CA.issue_cert("api.internal", not_after=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1))
    with grpcio_server(CA.issue_cert("api.internal")) as port:
        async with Channel(
            "127.0.0.1", port, ssl=client_tls(root_certificates=roots), server_hostname="api.internal"
        ) as ok:
            assert await sleep_call(ok, 1.5) == 1.5
        cases = [
            (client_tls(root_certificates=roots), "wrong.internal", "Hostname mismatch"),
            (client_tls(root_certificates=trustme.CA().cert_pem.bytes()), "api.internal", "unable to get local issuer"),
            (None, None, "closed before the server's HTTP/2 SETTINGS"),
        ]
        for context, name, reason in cases:
            error, took = await failure(port, context, name)
            assert error.status is Status.UNAVAILABLE and reason in (error.message or ""), error.message
            assert took < 1.0
    with grpcio_server(expired) as port:
        error, took = await failure(port, client_tls(root_certificates=roots), "api.internal")
        assert "certificate has expired" in (error.message or "") and took < 1.0, error.message
    with grpcio_server(None) as port:
        error, took = await failure(port, client_tls(root_certificates=roots), "localhost")
        assert "WRONG_VERSION_NUMBER" in (error.message or "") and took < 1.0, error.message


@pytest.mark.backends
async def test_our_tls_handshake_is_bounded_by_the_deadline_and_by_the_connect_timeout(backend: str) -> None:
    """A server that accepts TCP and never answers the ClientHello: a call with a deadline ends
    DEADLINE_EXCEEDED at it; one without ends UNAVAILABLE ('timed out') at connect_min_timeout."""
    with socket.create_server(("127.0.0.1", 0)) as black_hole:
        port = black_hole.getsockname()[1]
        started = time.monotonic()
        async with tls_channel(port, server_hostname="localhost") as channel:
            with pytest.raises(GRPCError) as info:
                await sleep_call(channel, timeout=0.3)
        assert info.value.status is Status.DEADLINE_EXCEEDED and time.monotonic() - started < 1.0
        config = Configuration(connect_min_timeout=0.3, connect_initial_backoff=0.1)
        started = time.monotonic()
        async with tls_channel(port, server_hostname="localhost", config=config) as channel:
            with pytest.raises(GRPCError) as info:
                await sleep_call(channel, timeout=None)
        assert info.value.status is Status.UNAVAILABLE and "timed out" in (info.value.message or "")
        assert time.monotonic() - started < 1.0


# -- 5. the App's TLS files -----------------------------------------------------------------------


@pytest.fixture
def pem_files(tmp_path: Path) -> Callable[[str], Path]:
    """Write one of LOCALHOST's PEM parts (or another key, or an encrypted key) to a file."""
    other = CA.issue_cert("localhost")

    def write(kind: str) -> Path:
        path = tmp_path / f"{kind}.pem"
        if kind == "cert":
            LOCALHOST.cert_chain_pems[0].write_to_path(str(path))
        elif kind == "key":
            LOCALHOST.private_key_pem.write_to_path(str(path))
        elif kind == "other-key":
            other.private_key_pem.write_to_path(str(path))
        elif kind == "encrypted-key":
            key = serialization.load_pem_private_key(LOCALHOST.private_key_pem.bytes(), password=None)
            encryption = serialization.BestAvailableEncryption(b"secret")
            path.write_bytes(
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
            )
        return path

    return write


async def test_the_app_serves_its_tls_files_and_names_both_when_they_do_not_match(
    pem_files: Callable[[str], Path],
) -> None:
    """APP_TLS_CERT_FILE / APP_TLS_KEY_FILE: served over TLS (ALPN h2) to a grpcio client; a
    key of another certificate fails start-up naming both files and the mismatch."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = AppSettings(port=0, tls_cert_file=pem_files("cert"), tls_key_file=pem_files("key"))
    async with App(AppSettings, name="tls").serve(settings) as running:
        port = running.server.sockets[0].getsockname()[1]
        credentials = grpc.ssl_channel_credentials(root_certificates=CA.cert_pem.bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    mismatched = AppSettings(port=0, tls_cert_file=pem_files("cert"), tls_key_file=pem_files("other-key"))
    with pytest.raises(StartupError) as info:
        async with App(AppSettings, name="tls").serve(mismatched):
            pass
    message = str(info.value)
    assert "cert.pem" in message and "other-key.pem" in message and "key values mismatch" in message, message


async def test_the_app_takes_a_key_password_and_a_client_ca_for_mutual_tls(
    tmp_path: Path, pem_files: Callable[[str], Path]
) -> None:
    """APP_TLS_KEY_PASSWORD opens an encrypted key; APP_TLS_CLIENT_CA_FILE requires a client
    certificate its CAs signed (a client without one is refused at the handshake);
    APP_HANDSHAKE_TIMEOUT reaches the server."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client_pem, _ = spiffe_cert(tmp_path)
    ca_file = tmp_path / "clients-ca.pem"
    CA.cert_pem.write_to_path(str(ca_file))
    settings = AppSettings(
        port=0,
        tls_cert_file=pem_files("cert"),
        tls_key_file=pem_files("encrypted-key"),
        tls_key_password="secret",  # type: ignore[arg-type]  # (pydantic makes it a SecretStr)
        tls_client_ca_file=ca_file,
        handshake_timeout=2.5,
    )
    assert "secret" not in repr(settings)
    async with App(AppSettings, name="tls").serve(settings) as running:
        assert running.server.config.handshake_timeout == 2.5
        port = running.server.sockets[0].getsockname()[1]
        roots, chain = CA.cert_pem.bytes(), client_pem.read_bytes()
        key = chain[: chain.index(b"-----BEGIN CERTIFICATE-----")]
        certificate = chain[len(key) :]
        for credentials, served in [
            (grpc.ssl_channel_credentials(roots, private_key=key, certificate_chain=certificate), True),
            (grpc.ssl_channel_credentials(roots), False),
        ]:
            async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
                if served:
                    assert (await check).status == health_pb2.HealthCheckResponse.SERVING
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await check
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_encrypted_key_fails_start_up_saying_so(tmp_path: Path, pem_files: Callable[[str], Path]) -> None:
    (tmp_path / "tls_app.py").write_text("from app_kit import App\napp = App(name='tls')\n")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)]),
        "APP_TLS_CERT_FILE": str(pem_files("cert")),
        "APP_TLS_KEY_FILE": str(pem_files("encrypted-key")),
    }
    result = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", "tls_app:app", "--port", "0"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
        start_new_session=True,  # no controlling terminal: OpenSSL cannot prompt on it
    )
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "Enter PEM pass phrase" not in output and any(
        word in output.lower() for word in ("encrypted", "password", "passphrase")
    ), output


async def test_a_certificate_file_without_a_certificate_is_named_alone(pem_files: Callable[[str], Path]) -> None:
    swapped = AppSettings(port=0, tls_cert_file=pem_files("key"), tls_key_file=pem_files("cert"))
    with pytest.raises(StartupError) as info:
        async with App(AppSettings, name="tls").serve(swapped):
            pass
    message = str(info.value)
    assert "PEM lib" not in message and "tls_key_file" not in message, message
