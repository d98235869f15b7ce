"""A fresh-eyes review of TLS reloading without a restart: ``server_tls(reload_interval=...)``
(APP_TLS_RELOAD_INTERVAL) and ``client_tls(reload_interval=...)``, beyond tests/test_tls_reload.py.

Files are updated as real writers update them: in place and not atomically (the key before the
certificate and the reverse, a certificate read halfway), with timestamps kept (``cp -p``,
``rsync -t --inplace``, ``tar x``), with intermediates in the chain, encrypted keys, rotated client
CAs, RSA to ECDSA. Every handshake is a real one over a real socket: anyio streams, blocking ``ssl``
sockets (for TLS 1.3 session resumption), grpcio, and ``python -m app_kit run`` processes on
asyncio, uvloop and trio under a continuous grpcio load.

The seven defects it found (each a strict xfail first) are fixed: a rewrite keeping its
timestamps unnoticed; a client whose CA was taken out resuming a TLS 1.3 session; settings made
on the server's context lost at a reload (now ``configure=``); ``check_hostname`` and added roots
ignored on the client's reloading context; the client's warnings on the server's logger;
``root_certificates`` trusted besides the system's CAs instead of in their place.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import pathlib
import pickle
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio
import grpc
import pytest
import trio
import trustme
import uvloop
from anyio.streams.tls import TLSAttribute
from cryptography.hazmat.primitives import serialization
from google.protobuf.wrappers_pb2 import BytesValue, StringValue

from app_kit import Cardinality, Channel, GRPCError, Handler, Stream, client_tls, server_tls
from app_kit.aio.client import method_for
from examples.interop.empty_pb2 import Empty

from .conftest import running_server
from .process import AppProcess
from .services import EchoService

pytestmark = pytest.mark.anyio

INTERVAL = 0.2
REFUSED = (ssl.SSLError, anyio.BrokenResourceError, anyio.EndOfStream, OSError)


# -- helpers -----------------------------------------------------------------------------------


def pem_pair(ca: trustme.CA, name: str, *, key_type: trustme.KeyType = trustme.KeyType.ECDSA) -> tuple[bytes, bytes]:
    """A certificate for 127.0.0.1 named ``name`` (its chain: intermediates of a child CA
    included) and its key, as PEM."""
    leaf = ca.issue_cert("127.0.0.1", common_name=name, key_type=key_type)
    return b"".join(blob.bytes() for blob in leaf.cert_chain_pems), leaf.private_key_pem.bytes()


def encrypted(key_pem: bytes, password: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(password)
    )


def rewrite_in_place(path: pathlib.Path, content: bytes) -> None:
    """Truncated, then written: the same inode, as ``cat a b > file`` or an editor without backup does."""
    with open(path, "r+b" if path.exists() else "wb") as file:
        file.truncate(0)
        file.write(content)


def replace_atomically(path: pathlib.Path, content: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def common_name(cert: Mapping[str, object] | None) -> str:
    assert cert is not None
    subject = cert["subject"]
    assert isinstance(subject, tuple)
    return str(next(value for field in subject for key, value in field if key == "commonName"))


def client_context(
    ca: trustme.CA, client: trustme.LeafCert | None = None, *, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        client.configure_cert(context)
    if maximum is not None:
        context.maximum_version = maximum
    return context


async def served(port: int, context: ssl.SSLContext) -> str:
    """The common name of the certificate a new connection is served; the server's SETTINGS read
    (under TLS 1.3 a refused client certificate shows only then)."""
    async with await anyio.connect_tcp(
        "127.0.0.1", port, tls=True, ssl_context=context, tls_standard_compatible=False
    ) as stream:
        assert stream.extra(TLSAttribute.alpn_protocol) == "h2"
        name = common_name(stream.extra(TLSAttribute.peer_certificate))
        with anyio.fail_after(5):
            await stream.receive()
        return name


async def refused(port: int, context: ssl.SSLContext) -> bool:
    try:
        await served(port, context)
    except REFUSED:
        return True
    return False


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s")
        await anyio.sleep(INTERVAL / 2)


async def serves(port: int, context: ssl.SSLContext, name: str) -> bool:
    return await served(port, context) == name


def port_of(server: object) -> int:
    return int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]


@dataclass
class Handshake:
    alive: bool  # the server's SETTINGS came: the connection was accepted
    name: str | None
    session: ssl.SSLSession | None
    reused: bool


def blocking_handshake(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> Handshake:
    """A handshake on a blocking socket (asyncio's and anyio's streams cannot offer a session),
    then the server's SETTINGS read: TLS 1.3 tickets come with them."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            tls = context.wrap_socket(raw, server_hostname="127.0.0.1", session=session)
        except (ssl.SSLError, OSError):
            return Handshake(False, None, None, False)
        with tls:
            try:
                alive = len(tls.recv(1024)) > 0
            except (ssl.SSLError, OSError):
                alive = False
            if not alive:
                return Handshake(False, None, None, False)
            return Handshake(True, common_name(tls.getpeercert()), tls.session, bool(tls.session_reused))


# -- the server: files updated in place, as real writers update them ------------------------


async def test_in_place_non_atomic_updates_keep_the_previous_certificate_until_whole(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate rewritten before its key, the key before its certificate, a certificate
    read halfway through its writing, a chain with an intermediate: every handshake meanwhile is
    served the previous certificate, the update is taken once whole; one WARNING per reason, one
    INFO per reload, nothing at ERROR."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(root, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL)
    trusting_root = client_context(root)

    async def after_a_look() -> str:
        await anyio.sleep(INTERVAL * 1.2)
        return await served(port, trusting_root)

    with caplog.at_level(logging.INFO, logger="app_kit"):
        async with running_server([EchoService()], ssl=context) as (server, _):
            port = port_of(server)
            # The certificate first: a look between the two writes finds a key that does not match.
            second_cert, second_key = pem_pair(root, "second")
            rewrite_in_place(cert, second_cert)
            assert await after_a_look() == "first"
            rewrite_in_place(key, second_key)
            await eventually(lambda: serves(port, trusting_root, "second"))
            # The key first.
            third_cert, third_key = pem_pair(root, "third")
            rewrite_in_place(key, third_key)
            assert await after_a_look() == "second"
            rewrite_in_place(cert, third_cert)
            await eventually(lambda: serves(port, trusting_root, "third"))
            # From an intermediate (the client trusts the root only: the chain must be served),
            # the certificate read halfway through its writing.
            fourth_cert, fourth_key = pem_pair(intermediate, "fourth")
            assert fourth_cert.count(b"BEGIN CERTIFICATE") == 2
            rewrite_in_place(key, fourth_key)
            rewrite_in_place(cert, fourth_cert[: len(fourth_cert) // 3])
            assert await after_a_look() == "third"
            rewrite_in_place(cert, fourth_cert)
            await eventually(lambda: serves(port, trusting_root, "fourth"))
            assert await anyio.to_thread.run_sync(grpcio_echo, port, root) == b"hi"
    records = [r for r in caplog.records if "TLS files" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in records]
    assert sum("reloaded" in r.getMessage() for r in records if r.levelno == logging.INFO) == 3
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 3, warnings  # one per unusable update (the first two alike: logged again after a reload)


def grpcio_echo(port: int, ca: trustme.CA) -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(ca.cert_pem.bytes())) as channel:
        echo = channel.unary_unary(
            "/test.Echo/Unary",
            request_serializer=BytesValue.SerializeToString,
            response_deserializer=BytesValue.FromString,
        )
        reply: BytesValue = echo(BytesValue(value=b"hi"), timeout=10)
        return reply.value


async def test_unusable_updates_of_every_kind_never_fail_a_handshake(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An encrypted key (password given) renewed with the same password is taken; one encrypted
    with another password, an empty file, garbage, a directory where the certificate was, a
    missing file: the previous certificate is served, each handshake succeeds, each reason is
    logged once at WARNING (nothing escapes the sni_callback, nothing at ERROR)."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(ca, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(encrypted(first_key, b"pw"))
    context = server_tls(certificate_chain=cert, private_key=key, password="pw", reload_interval=INTERVAL)
    trusting = client_context(ca)
    with caplog.at_level(logging.INFO, logger="app_kit"):
        async with running_server([EchoService()], ssl=context) as (server, _):
            port = port_of(server)
            second_cert, second_key = pem_pair(ca, "second")
            replace_atomically(key, encrypted(second_key, b"pw"))
            replace_atomically(cert, second_cert)
            await eventually(lambda: serves(port, trusting, "second"))
            caplog.clear()
            third_cert, third_key = pem_pair(ca, "third")
            replace_atomically(cert, third_cert)
            unusable: list[Callable[[], None]] = [
                lambda: replace_atomically(key, encrypted(third_key, b"another password")),
                lambda: replace_atomically(key, b""),
                lambda: replace_atomically(key, b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n"),
                lambda: key.unlink(),
            ]
            for update in unusable:
                update()
                for _ in range(3):
                    await anyio.sleep(INTERVAL * 0.6)
                    assert await served(port, trusting) == "second"
            replace_atomically(key, encrypted(third_key, b"pw"))
            cert.unlink()
            cert.mkdir()  # a directory where the certificate was
            for _ in range(3):
                await anyio.sleep(INTERVAL * 0.6)
                assert await served(port, trusting) == "second"
            cert.rmdir()
            cert.write_bytes(third_cert)
            await eventually(lambda: serves(port, trusting, "third"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert 3 <= len(warnings) <= 5, warnings  # one per distinct reason (some reasons are alike)
    assert len(set(warnings)) == len(warnings), warnings


async def test_an_in_place_rewrite_of_equal_size_within_the_same_second_is_noticed(tmp_path: pathlib.Path) -> None:
    """The signature holds nanoseconds: same size, same inode, the same second: noticed."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    (first_cert, first_key), (second_cert, second_key) = pems_of_equal_sizes(ca)
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL)
    trusting = client_context(ca)
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        await anyio.sleep(INTERVAL * 1.2)
        assert await served(port, trusting) == "v1"  # looked at: the signature is the first files'
        before = (os.stat(cert).st_ino, os.stat(cert).st_size)
        rewrite_in_place(key, second_key)
        rewrite_in_place(cert, second_cert)
        assert (os.stat(cert).st_ino, os.stat(cert).st_size) == before
        await eventually(lambda: serves(port, trusting, "v2"))


def pems_of_equal_sizes(ca: trustme.CA) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """Two certificates ("v1", "v2") and keys whose files are of equal sizes (as renewals by the
    same CA often are)."""
    first = pem_pair(ca, "v1")
    for _ in range(200):
        second = pem_pair(ca, "v2")
        if (len(second[0]), len(second[1])) == (len(first[0]), len(first[1])):
            return first, second
    raise AssertionError("no certificate of equal size")


async def test_an_in_place_rewrite_that_keeps_its_timestamps_is_noticed(tmp_path: pathlib.Path) -> None:
    """``cp -p new.crt tls.crt`` (or ``rsync -t --inplace``, ``tar x``) writes the same inode and
    sets the mtime of its source; two renewals of equal size whose sources have the same mtime
    (build tools that normalise timestamps, archives with second-granularity times, a coarse
    filesystem clock) leave (dev, ino, size, mtime) unchanged. The inode's ctime changes with
    every write and cannot be set: with it in the signature the update is seen."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    (first_cert, first_key), (second_cert, second_key) = pems_of_equal_sizes(ca)
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    kept = {path: os.stat(path) for path in (cert, key)}
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL)
    trusting = client_context(ca)
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        await anyio.sleep(INTERVAL * 1.2)
        assert await served(port, trusting) == "v1"
        for path, content in ((key, second_key), (cert, second_cert)):
            rewrite_in_place(path, content)
            os.utime(path, ns=(kept[path].st_atime_ns, kept[path].st_mtime_ns))  # what cp -p does
            assert os.stat(path).st_ctime_ns != kept[path].st_ctime_ns
        await eventually(lambda: serves(port, trusting, "v2"), seconds=INTERVAL * 8)


@pytest.mark.backends
async def test_many_concurrent_handshakes_during_a_rotation_all_succeed(backend: str, tmp_path: pathlib.Path) -> None:
    """40 handshakes at once, several times, while the files are swapped: none fails, each is
    served the old or the new certificate, and after it only the new."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(ca, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL / 4)
    trusting = client_context(ca)
    names: list[str] = []
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)

        async def one() -> None:
            names.append(await served(port, trusting))

        second_cert, second_key = pem_pair(ca, "second")
        for wave in range(6):
            if wave == 2:
                # non-atomic, mid-wave: some looks find a key that does not match
                rewrite_in_place(cert, second_cert)
            if wave == 3:
                rewrite_in_place(key, second_key)
            async with anyio.create_task_group() as group:
                for _ in range(40):
                    group.start_soon(one)
            await anyio.sleep(INTERVAL / 3)
        await eventually(lambda: serves(port, trusting, "second"))
    assert len(names) == 240
    assert set(names) == {"first", "second"}
    assert names.index("second") > 0 and "first" not in names[-40:]


@pytest.mark.parametrize("maximum", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_rotation_from_rsa_to_ecdsa_serves_tls12_and_tls13_clients(
    maximum: ssl.TLSVersion, tmp_path: pathlib.Path
) -> None:
    """The key type changes with the renewal (RSA to ECDSA): TLS 1.2's cipher choice and 1.3's
    signature are made with the new certificate."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(ca, "rsa", key_type=trustme.KeyType.RSA)
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL)
    trusting = client_context(ca, maximum=maximum)
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        assert await served(port, trusting) == "rsa"
        second_cert, second_key = pem_pair(ca, "ecdsa", key_type=trustme.KeyType.ECDSA)
        replace_atomically(key, second_key)
        replace_atomically(cert, second_cert)
        await eventually(lambda: serves(port, trusting, "ecdsa"))


# -- sessions: TLS 1.3 tickets across a rotation ------------------------------------------------


async def test_a_session_from_before_a_certificate_rotation_still_connects(tmp_path: pathlib.Path) -> None:
    """A client offering a ticket from before the renewal gets a working connection; a client
    without one is served the new certificate."""
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(ca, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = server_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL)
    trusting = client_context(ca)
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        before = await anyio.to_thread.run_sync(blocking_handshake, port, trusting)
        assert before.alive and before.name == "first" and before.session is not None
        second_cert, second_key = pem_pair(ca, "second")
        replace_atomically(key, second_key)
        replace_atomically(cert, second_cert)
        await eventually(lambda: serves(port, trusting, "second"))
        again = await anyio.to_thread.run_sync(blocking_handshake, port, trusting, before.session)
        assert again.alive


async def test_a_removed_client_ca_cannot_get_in_by_resuming_a_session(tmp_path: pathlib.Path) -> None:
    """Mutual TLS: the client CAs are rotated (a CA removed: compromised, or its clients cut off).
    A fresh handshake by one of its clients is refused; one that offers the session ticket it got
    before the rotation is resumed without a certificate: accepted, for the ticket's lifetime
    (7200 s by default). Tickets are decrypted with the first context's keys (OpenSSL's
    session_ctx, which SSL_set_SSL_CTX leaves), whose session id context is "Python" for every
    context. A restart, which the reload replaces, ends them all."""
    server_ca, old_ca, new_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key, cas = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    first_cert, first_key = pem_pair(server_ca, "server")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    cas.write_bytes(old_ca.cert_pem.bytes())
    context = server_tls(certificate_chain=cert, private_key=key, client_ca=cas, reload_interval=INTERVAL)
    cut_off = client_context(server_ca, old_ca.issue_cert("cut-off"))
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        before = await anyio.to_thread.run_sync(blocking_handshake, port, cut_off)
        assert before.alive
        replace_atomically(cas, new_ca.cert_pem.bytes())
        await eventually(lambda: refused(port, cut_off))  # fresh handshakes: refused
        resumed = await anyio.to_thread.run_sync(blocking_handshake, port, cut_off, before.session)
        assert not resumed.alive, f"accepted (session reused: {resumed.reused})"


# -- settings a user makes on the returned contexts ----------------------------------------------


async def test_client_cas_a_user_adds_to_the_server_context_survive_a_renewal(tmp_path: pathlib.Path) -> None:
    """``context = server_tls(..., client_ca=...)`` then ``context.load_verify_locations(...)``
    (a second CA during a migration, or CRLs with ``verify_flags``): honoured until the server
    certificate is renewed, then every client of that CA is refused (the verify store is
    SSL_CTX's, so the new context's; verify_mode, options and ciphers are the connection's and
    stay). Fixed by ``configure``: called with each context built, it holds after a reload (and
    the docstring now says what is set on the returned context holds only until one)."""
    server_ca, files_ca, added_ca = trustme.CA(), trustme.CA(), trustme.CA()
    cert, key, cas = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    first_cert, first_key = pem_pair(server_ca, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    cas.write_bytes(files_ca.cert_pem.bytes())
    context = server_tls(
        certificate_chain=cert,
        private_key=key,
        client_ca=cas,
        reload_interval=INTERVAL,
        configure=lambda made: made.load_verify_locations(cadata=added_ca.cert_pem.bytes().decode()),
    )
    of_the_files = client_context(server_ca, files_ca.issue_cert("files"))
    of_the_added = client_context(server_ca, added_ca.issue_cert("added"))
    async with running_server([EchoService()], ssl=context) as (server, _):
        port = port_of(server)
        assert await served(port, of_the_added) == "first"
        second_cert, second_key = pem_pair(server_ca, "second")
        replace_atomically(key, second_key)
        replace_atomically(cert, second_cert)
        await eventually(lambda: serves(port, of_the_files, "second"))
        assert not await refused(port, of_the_added)


@pytest.mark.parametrize(
    "reload_interval",
    [
        None,
        60.0,
    ],
)
async def test_check_hostname_false_on_the_client_context_applies(
    reload_interval: float | None, tmp_path: pathlib.Path
) -> None:
    """A user dialling by address a server whose certificate names another host turns the name
    check off on the context client_tls returned, as on any SSLContext: it applies without
    reload_interval, and is silently ignored with it (the default as soon as a file is given)."""
    ca = trustme.CA()
    cert, key, roots = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "roots.pem"
    leaf = ca.issue_cert("other.example")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    roots.write_bytes(ca.cert_pem.bytes())
    context = client_tls(root_certificates=roots, reload_interval=reload_interval)
    context.check_hostname = False
    async with running_server([EchoService()], ssl=server_tls(certificate_chain=cert, private_key=key)) as (server, _):
        assert await echo_through_channel(port_of(server), context) == b"hi"


async def echo_through_channel(port: int, context: ssl.SSLContext, server_hostname: str | None = None) -> bytes:
    async with Channel("127.0.0.1", port, ssl=context, server_hostname=server_hostname) as channel:
        call = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
        return (await call(BytesValue(value=b"hi"), timeout=5)).value


@pytest.mark.parametrize(
    "reload_interval",
    [
        None,
        60.0,
    ],
)
async def test_roots_a_user_adds_to_the_client_context_apply(
    reload_interval: float | None, tmp_path: pathlib.Path
) -> None:
    """``context.load_verify_locations(cafile=...)`` on the returned context (a second CA while
    servers move to it): applies without reload_interval, is silently ignored with it."""
    files_ca, added_ca = trustme.CA(), trustme.CA()
    cert, key, roots = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "roots.pem"
    served_cert, served_key = pem_pair(added_ca, "server")
    cert.write_bytes(served_cert)
    key.write_bytes(served_key)
    roots.write_bytes(files_ca.cert_pem.bytes())
    context = client_tls(root_certificates=roots, reload_interval=reload_interval)
    context.load_verify_locations(cadata=added_ca.cert_pem.bytes().decode())
    async with running_server([EchoService()], ssl=server_tls(certificate_chain=cert, private_key=key)) as (server, _):
        assert await echo_through_channel(port_of(server), context) == b"hi"


@pytest.mark.parametrize(
    "reload_interval",
    [
        None,
        60.0,
    ],
)
async def test_root_certificates_are_trusted_instead_of_the_systems(
    reload_interval: float | None, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The docstring: "the certificates to trust instead of the system's". The context is
    create_default_context(SERVER_AUTH), which loads the system's CAs before the roots are
    added: a server with a certificate from any public CA is trusted too. The system's CAs are
    stood in for by SSL_CERT_FILE (OpenSSL reads it when it loads them)."""
    system_ca, own_ca = trustme.CA(), trustme.CA()
    system_bundle, roots = tmp_path / "system.pem", tmp_path / "roots.pem"
    system_bundle.write_bytes(system_ca.cert_pem.bytes())
    roots.write_bytes(own_ca.cert_pem.bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(system_bundle))
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    served_cert, served_key = pem_pair(system_ca, "publicly trusted")
    cert.write_bytes(served_cert)
    key.write_bytes(served_key)
    async with running_server([EchoService()], ssl=server_tls(certificate_chain=cert, private_key=key)) as (server, _):
        port = port_of(server)
        system = ssl.create_default_context()
        system.set_alpn_protocols(["h2"])
        assert await served(port, system) == "publicly trusted"  # the stand-in is the system's store
        with pytest.raises(GRPCError):
            await echo_through_channel(port, client_tls(root_certificates=roots, reload_interval=reload_interval))


def test_a_clients_reload_warning_is_logged_as_the_clients(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(ca, "client")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    context = client_tls(certificate_chain=cert, private_key=key, reload_interval=INTERVAL / 4)
    replace_atomically(key, pem_pair(ca, "another")[1])  # a key that does not match
    time.sleep(INTERVAL / 2)
    with caplog.at_level(logging.INFO, logger="app_kit"):
        context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="example.test")  # a new connection
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot be used" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].name != "app_kit.server"


def test_the_client_context_copies_and_pickles_as_a_plain_one_does(tmp_path: pathlib.Path) -> None:
    """Neither can be copied or pickled (an SSLContext never can): the same TypeError, not a
    half-made copy without its reloader."""
    roots = tmp_path / "roots.pem"
    roots.write_bytes(trustme.CA().cert_pem.bytes())
    for context in (client_tls(root_certificates=roots, reload_interval=None), client_tls(root_certificates=roots)):
        for operation in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="cannot pickle"):
                operation(context)


# -- the client: a renewed client certificate on asyncio, uvloop and trio, with server_hostname --


class WhoAmI:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/t.W/Who": Handler(self.who, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def who(self, stream: Stream[StringValue, StringValue]) -> None:
        await stream.recv_message()
        await stream.send_message(StringValue(value=common_name(stream.peer.cert())))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop", "trio"])
def test_a_renewed_client_certificate_with_a_server_name_override(loop: str, tmp_path: pathlib.Path) -> None:
    """grpc-style ``server_hostname`` (the server's certificate names api.internal only, the
    address dialled is 127.0.0.1): the reloading context gets it, on each loop; the renewed
    client certificate (in place, not atomically) is presented by new connections, while the
    files are halfway the previous one is."""
    runner: Callable[[Callable[[], Awaitable[None]]], None] = {
        "asyncio": lambda main: asyncio.run(main()),
        "uvloop": lambda main: uvloop.run(main()),
        "trio": lambda main: trio.run(main),
    }[loop]
    runner(lambda: _renewed_client_certificate(tmp_path))


async def _renewed_client_certificate(tmp_path: pathlib.Path) -> None:
    clients_ca, servers_ca = trustme.CA(), trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    servers_ca.issue_cert("api.internal").configure_cert(server_context)
    clients_ca.configure_trust(server_context)
    server_context.verify_mode = ssl.CERT_REQUIRED
    cert, key, roots = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "ca.crt"
    first_cert, first_key = pem_pair(clients_ca, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(first_key)
    roots.write_bytes(servers_ca.cert_pem.bytes())
    context = client_tls(root_certificates=roots, certificate_chain=cert, private_key=key, reload_interval=INTERVAL)

    async def who(port: int) -> str:
        async with Channel("127.0.0.1", port, ssl=context, server_hostname="api.internal") as channel:
            call = method_for(channel, "/t.W/Who", Cardinality.UNARY_UNARY, StringValue, StringValue)
            return (await call(StringValue(), timeout=5)).value

    async with running_server([WhoAmI()], ssl=server_context) as (server, _):
        port = port_of(server)
        assert await who(port) == "first"
        second_cert, second_key = pem_pair(clients_ca, "second")
        rewrite_in_place(cert, second_cert)  # the key does not match yet
        await anyio.sleep(INTERVAL * 1.2)
        assert await who(port) == "first"
        rewrite_in_place(key, second_key)
        await anyio.sleep(INTERVAL * 1.2)
        assert await who(port) == "second"


# -- a whole App process: a rotation under continuous grpcio calls --------------------------------


class Callers:
    """grpcio callers in threads until stopped: one on a long-lived channel, one on a new channel
    (a new connection: its own subchannel pool) each call. Every outcome is kept."""

    def __init__(self, port: int, ca: trustme.CA) -> None:
        self.credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        self.target = f"127.0.0.1:{port}"
        self.stop = threading.Event()
        self.successes = {"long-lived": 0, "new": 0}
        self.failures: list[str] = []

    def _call(self, channel: grpc.Channel) -> None:
        method = channel.unary_unary(
            "/grpc.testing.TestService/EmptyCall",
            request_serializer=Empty.SerializeToString,
            response_deserializer=Empty.FromString,
        )
        method(Empty(), timeout=10)

    def long_lived(self) -> None:
        with grpc.secure_channel(self.target, self.credentials) as channel:
            self._run("long-lived", lambda: self._call(channel))

    def new_each_time(self) -> None:
        def once() -> None:
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.secure_channel(self.target, self.credentials, options=options) as channel:
                self._call(channel)

        self._run("new", once)

    def _run(self, kind: str, call: Callable[[], None]) -> None:
        while not self.stop.is_set():
            try:
                call()
                self.successes[kind] += 1
            except grpc.RpcError as error:
                self.failures.append(f"{kind}: {error}")

    async def until(self, wanted: int, seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        start = dict(self.successes)
        while min(self.successes[kind] - start[kind] for kind in start) < wanted:
            assert not self.failures, self.failures
            assert time.monotonic() < deadline, f"{self.successes}"
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("loop", ["uvloop", "trio"])  # (asyncio too when written)
async def test_an_app_process_rotates_under_continuous_grpcio_calls(loop: str, tmp_path: pathlib.Path) -> None:
    """``python -m app_kit run --loop LOOP`` with APP_TLS_* (an encrypted key and its password),
    APP_TLS_RELOAD_INTERVAL=0.2: the key, then the certificate (now from an intermediate) are
    rewritten in place while grpcio calls go on, on a long-lived channel and on a new
    connection each call. No call fails; new connections get the new certificate; the reload is
    logged once at INFO; nothing at ERROR."""
    root = trustme.CA()
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first_cert, first_key = pem_pair(root, "first")
    cert.write_bytes(first_cert)
    key.write_bytes(encrypted(first_key, b"s3cret"))
    env = {
        "APP_TLS_CERT_FILE": str(cert),
        "APP_TLS_KEY_FILE": str(key),
        "APP_TLS_KEY_PASSWORD": "s3cret",
        "APP_TLS_RELOAD_INTERVAL": str(INTERVAL),
        "APP_LOG_LEVEL": "INFO",
    }
    trusting_root = client_context(root)
    async with AppProcess("tests.apps.interop_app:app", "--port", "0", "--loop", loop, env=env) as app:
        port = await app.ready()
        callers = Callers(port, root)
        threads = [asyncio.create_task(asyncio.to_thread(run)) for run in (callers.long_lived, callers.new_each_time)]
        try:
            await callers.until(3)
            assert await served(port, trusting_root) == "first"
            second_cert, second_key = pem_pair(root.create_child_ca(), "second")
            rewrite_in_place(key, encrypted(second_key, b"s3cret"))
            await callers.until(5)  # several looks find the key not matching its certificate
            await asyncio.sleep(INTERVAL * 1.5)
            rewrite_in_place(cert, second_cert)
            await eventually(lambda: serves(port, trusting_root, "second"))
            await callers.until(5)
        finally:
            callers.stop.set()
            await asyncio.gather(*threads)
        assert not callers.failures, callers.failures
        app.signal()
        assert await app.wait() == 0
    log = app.log
    assert log.count("TLS files reloaded") == 1, log
    assert " ERROR " not in log and "Traceback" not in log, log
    assert log.count("cannot be used") >= 1, log
