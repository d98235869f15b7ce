"""A renewed TLS certificate is served without a restart (server_tls's reload_interval, the App's
APP_TLS_RELOAD_INTERVAL), and a client's renewed certificate and trust bundle are used by its next
connections (client_tls's reload_interval): files replaced as a Kubernetes Secret volume replaces them (a symbolic
link ``..data`` swapped to a new directory), over real sockets, on asyncio, uvloop and trio.
Each handshake below is a real one; the certificate a client was served is read from it."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import ssl
import time
from collections.abc import Callable, Mapping

import anyio
import grpc
import pytest
import trustme
import uvloop
from anyio.streams.tls import TLSAttribute
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from app_kit import AppSettings, Cardinality, Channel, GRPCError, Handler, Status, Stream, client_tls, server_tls
from app_kit.aio.client import method_for

from .conftest import running_server
from .services import EchoService

pytestmark = pytest.mark.anyio

INTERVAL = 0.2


class SecretVolume:
    """A directory laid out as kubelet lays out a mounted Secret: ``tls.crt`` -> ``..data/tls.crt``,
    ``..data`` -> ``..<version>``; an update writes a new version and swaps ``..data`` at once."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.versions = 0
        for name in ("tls.crt", "tls.key", "ca.crt"):
            (root / name).symlink_to(f"..data/{name}")

    def publish(self, files: dict[str, bytes]) -> None:
        self.versions += 1
        version = self.root / f"..v{self.versions}"
        version.mkdir()
        for name, content in files.items():
            (version / name).write_bytes(content)
        link = self.root / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.root / "..data")

    @property
    def cert(self) -> pathlib.Path:
        return self.root / "tls.crt"

    @property
    def key(self) -> pathlib.Path:
        return self.root / "tls.key"

    @property
    def ca(self) -> pathlib.Path:
        return self.root / "ca.crt"


def issued(ca: trustme.CA, name: str, *, key_of: trustme.LeafCert | None = None) -> dict[str, bytes]:
    """A server certificate for 127.0.0.1 whose common name says which it is (with another's
    key when ``key_of`` is given: a half-finished update)."""
    leaf = ca.issue_cert("127.0.0.1", common_name=name)
    key = (key_of or leaf).private_key_pem.bytes()
    return {"tls.crt": b"".join(blob.bytes() for blob in leaf.cert_chain_pems), "tls.key": key}


def common_name(cert: Mapping[str, object] | None) -> str:
    assert cert is not None
    subject = cert["subject"]
    assert isinstance(subject, tuple)
    return next(value for field in subject for key, value in field if key == "commonName")


async def served_name(port: int, ca: trustme.CA, client: trustme.LeafCert | None = None) -> str:
    """The common name of the certificate a new connection's handshake is served."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    if client is not None:
        client.configure_cert(context)
    async with await anyio.connect_tcp(
        "127.0.0.1", port, tls=True, ssl_context=context, tls_standard_compatible=False
    ) as stream:
        assert stream.extra(TLSAttribute.alpn_protocol) == "h2"  # the new context offers h2 too
        return common_name(stream.extra(TLSAttribute.peer_certificate))


async def eventually(check: Callable[[], object], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[misc]
        if time.monotonic() > deadline:
            raise AssertionError("not within time")
        await anyio.sleep(INTERVAL / 2)


def grpcio_call(port: int, ca: trustme.CA, channel: grpc.Channel | None = None) -> bytes:
    """An echo through grpcio (ALPN h2 and the certificate checked as grpcio checks them)."""
    own = channel is None
    if channel is None:
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.cert_pem.bytes()))
    try:
        echo = channel.unary_unary(
            "/test.Echo/Unary",
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        reply: BytesValue = echo(BytesValue(value=b"hi"), timeout=10)
        return reply.value
    finally:
        if own:
            channel.close()


@pytest.mark.backends
async def test_a_renewed_certificate_is_served_to_new_connections(
    backend: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path)
    volume.publish(issued(ca, "first"))
    context = server_tls(certificate_chain=volume.cert, private_key=volume.key, reload_interval=INTERVAL)
    with caplog.at_level(logging.INFO, logger="app_kit.server"):
        async with running_server([EchoService()], ssl=context) as (server, _):
            port = server.sockets[0].getsockname()[1]
            assert await served_name(port, ca) == "first"
            channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.cert_pem.bytes()))
            try:
                assert await anyio.to_thread.run_sync(grpcio_call, port, ca, channel) == b"hi"
                volume.publish(issued(ca, "second"))
                # Looked at no more than once per interval: at once, still the first.
                assert await served_name(port, ca) == "first"
                await eventually(lambda: _is(served_name(port, ca), "second"))
                # A connection open before keeps its certificate and serves on; a new one works.
                assert await anyio.to_thread.run_sync(grpcio_call, port, ca, channel) == b"hi"
                assert await anyio.to_thread.run_sync(grpcio_call, port, ca) == b"hi"
            finally:
                channel.close()
    assert any("TLS files reloaded" in record.getMessage() for record in caplog.records)


async def _is(name: object, expected: str) -> bool:
    return await name == expected  # type: ignore[misc]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_an_update_that_cannot_be_used_yet_keeps_the_previous_certificate(
    loop: str, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key that does not match its certificate (a writer halfway through), a file missing:
    logged once at WARNING, the previous certificate served, the update taken once it is whole."""
    run = uvloop.run if loop == "uvloop" else asyncio.run
    run(_an_update_that_cannot_be_used_yet(tmp_path, caplog))


async def _an_update_that_cannot_be_used_yet(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path)
    volume.publish(issued(ca, "first"))
    context = server_tls(certificate_chain=volume.cert, private_key=volume.key, reload_interval=INTERVAL)
    with caplog.at_level(logging.INFO, logger="app_kit.server"):
        async with running_server([EchoService()], ssl=context) as (server, _):
            port = server.sockets[0].getsockname()[1]
            second = ca.issue_cert("127.0.0.1", common_name="second")
            volume.publish(issued(ca, "third", key_of=second))  # the key of another certificate
            for _ in range(4):
                await anyio.sleep(INTERVAL)
                assert await served_name(port, ca) == "first"
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot be used" in r.message]
            assert len(warnings) == 1, [r.message for r in warnings]  # once per reason, not per look
            volume.publish({"tls.crt": issued(ca, "fourth")["tls.crt"]})  # no key file at all
            for _ in range(3):
                await anyio.sleep(INTERVAL)
                assert await served_name(port, ca) == "first"
            volume.publish(issued(ca, "fifth"))
            await eventually(lambda: _is(served_name(port, ca), "fifth"))
            assert await anyio.to_thread.run_sync(grpcio_call, port, ca) == b"hi"


async def test_renewed_client_cas_are_required_of_new_connections(tmp_path: pathlib.Path) -> None:
    """Mutual TLS: the CAs that sign clients' certificates move with the files too."""
    old_ca, new_ca, server_ca = trustme.CA(), trustme.CA(), trustme.CA()
    old_client = old_ca.issue_cert("old-client", common_name="old-client")
    new_client = new_ca.issue_cert("new-client", common_name="new-client")
    volume = SecretVolume(tmp_path)
    volume.publish({**issued(server_ca, "first"), "ca.crt": old_ca.cert_pem.bytes()})
    context = server_tls(
        certificate_chain=volume.cert, private_key=volume.key, client_ca=volume.ca, reload_interval=INTERVAL
    )
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = server.sockets[0].getsockname()[1]
        assert await served_name(port, server_ca, old_client) == "first"
        with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
            await _handshake_and_read(port, server_ca, new_client)
        volume.publish({**issued(server_ca, "second"), "ca.crt": new_ca.cert_pem.bytes()})
        await eventually(lambda: _is(served_name(port, server_ca, new_client), "second"))
        with pytest.raises((ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)):
            await _handshake_and_read(port, server_ca, old_client)


async def _handshake_and_read(port: int, ca: trustme.CA, client: trustme.LeafCert) -> None:
    """A handshake, then a read: under TLS 1.3 a refused client certificate shows at the read."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["h2"])
    client.configure_cert(context)
    async with await anyio.connect_tcp(
        "127.0.0.1", port, tls=True, ssl_context=context, tls_standard_compatible=False
    ) as stream:
        with anyio.fail_after(5):
            await stream.receive()  # the server's SETTINGS if accepted


async def test_read_once_without_a_reload_interval(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    volume = SecretVolume(tmp_path)
    volume.publish(issued(ca, "first"))
    context = server_tls(certificate_chain=volume.cert, private_key=volume.key, reload_interval=None)
    assert context.sni_callback is None
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = server.sockets[0].getsockname()[1]
        volume.publish(issued(ca, "second"))
        await anyio.sleep(INTERVAL * 3)
        assert await served_name(port, ca) == "first"
    with pytest.raises(ValueError, match="reload_interval"):
        server_tls(certificate_chain=volume.cert, private_key=volume.key, reload_interval=0)


def test_an_encrypted_key_without_its_password_fails_saying_so_on_either_side(tmp_path: pathlib.Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match="encrypted"):
        server_tls(certificate_chain=tmp_path / "cert.pem", private_key=tmp_path / "key.pem")
    context = server_tls(certificate_chain=tmp_path / "cert.pem", private_key=tmp_path / "key.pem", password="secret")
    assert context.sni_callback is not None
    # A client's too (OpenSSL asked for the password on the terminal: a process that hangs).
    with pytest.raises(ValueError, match="encrypted"):
        client_tls(certificate_chain=tmp_path / "cert.pem", private_key=tmp_path / "key.pem")
    client_tls(certificate_chain=tmp_path / "cert.pem", private_key=tmp_path / "key.pem", password=b"secret")


def test_the_apps_setting(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """APP_TLS_RELOAD_INTERVAL: 60 s by default, 0 reads the files once, negative is refused."""
    ca = trustme.CA()
    volume = SecretVolume(tmp_path)
    volume.publish(issued(ca, "first"))
    monkeypatch.setenv("APP_TLS_CERT_FILE", str(volume.cert))
    monkeypatch.setenv("APP_TLS_KEY_FILE", str(volume.key))
    settings = AppSettings()
    assert settings.tls_reload_interval == 60.0
    context = settings.ssl_context()
    assert context is not None and context.sni_callback is not None
    monkeypatch.setenv("APP_TLS_RELOAD_INTERVAL", "0")
    context = AppSettings().ssl_context()
    assert context is not None and context.sni_callback is None
    monkeypatch.setenv("APP_TLS_RELOAD_INTERVAL", "-1")
    with pytest.raises(Exception, match="tls_reload_interval"):
        AppSettings()


class WhoAmI:
    """Answers with the common name of the client's certificate."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.W/Who": Handler(self.who, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def who(self, stream: Stream[StringValue, StringValue]) -> None:
        await stream.recv_message()
        await stream.send_message(StringValue(value=common_name(stream.peer.cert())))


@pytest.mark.backends
async def test_a_clients_renewed_certificate_and_trust_bundle_are_used_by_new_connections(
    backend: str, tmp_path: pathlib.Path
) -> None:
    """client_tls(reload_interval=...): a client certificate renewed in its files (mutual TLS
    with short-lived certificates), and a rotated trust bundle, are used by the next connection."""
    clients_ca, old_servers_ca, new_servers_ca = trustme.CA(), trustme.CA(), trustme.CA()

    def mutual(servers_ca: trustme.CA) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        servers_ca.issue_cert("127.0.0.1").configure_cert(context)
        clients_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_files(name: str, servers_ca: trustme.CA) -> dict[str, bytes]:
        return {**issued(clients_ca, name), "ca.crt": servers_ca.cert_pem.bytes()}

    volume = SecretVolume(tmp_path)
    volume.publish(client_files("first", old_servers_ca))
    context = client_tls(
        root_certificates=volume.ca, certificate_chain=volume.cert, private_key=volume.key, reload_interval=INTERVAL
    )

    async def who(port: int) -> str:
        async with Channel("127.0.0.1", port, ssl=context) as channel:
            call = method_for(channel, "/t.W/Who", Cardinality.UNARY_UNARY, StringValue, StringValue)
            return (await call(StringValue(), timeout=5)).value

    async with (
        running_server([WhoAmI()], ssl=mutual(old_servers_ca)) as (old_server, _),
        running_server([WhoAmI()], ssl=mutual(new_servers_ca)) as (new_server, _),
    ):
        old_port = old_server.sockets[0].getsockname()[1]
        new_port = new_server.sockets[0].getsockname()[1]
        assert await who(old_port) == "first"
        with pytest.raises(GRPCError) as info:
            await who(new_port)  # a CA it does not trust yet
        assert info.value.status is Status.UNAVAILABLE
        volume.publish(client_files("second", new_servers_ca))
        await anyio.sleep(INTERVAL * 1.5)
        assert await who(new_port) == "second"
        with pytest.raises(GRPCError):
            await who(old_port)


def test_a_client_context_without_files_is_a_plain_one() -> None:
    """Nothing to look at (the system's roots, PEM text): the plain context, as before."""
    assert type(client_tls()) is ssl.SSLContext
    assert type(client_tls(root_certificates=trustme.CA().cert_pem.bytes())) is ssl.SSLContext
    assert type(client_tls(reload_interval=None)) is ssl.SSLContext
