"""TLS contexts for gRPC (ALPN h2): a client's, with the caller's roots and client certificate,
and a server's that serves a renewed certificate without a restart."""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

__all__ = ["client_tls", "server_tls"]

_server_log = logging.getLogger("app_kit.server")
_client_log = logging.getLogger("app_kit.client")

#: What ``configure`` is: called with each context built from the files (the first and each
#: reloaded one), to set what the arguments do not (ciphers, more CAs, verify flags).
Configure = Callable[[ssl.SSLContext], None]


def client_tls(
    *,
    root_certificates: str | bytes | os.PathLike[str] | None = None,
    certificate_chain: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    password: str | bytes | None = None,
    reload_interval: float | None = None,
    configure: Configure | None = None,
) -> ssl.SSLContext:
    """A new client TLS context that offers ALPN ``h2`` and verifies the server.

    ``root_certificates``: a PEM file, or PEM text (str or bytes), of the certificates to
    trust instead of the system's (as grpcio's ``root_certificates``). ``certificate_chain``
    and ``private_key`` (PEM files; the key may be in the chain's file) present a client
    certificate: mutual TLS; ``password`` opens an encrypted key (without it, an encrypted key
    raises ``ValueError``).

    ``reload_interval``: when a connection is made, at most once per this many seconds, the
    files given are looked at; when they changed (a renewed client certificate, a rotated
    trust bundle) they are read again into a new context, which new connections use
    (connections open already keep theirs). Files that cannot be used yet are logged at
    WARNING and the previous ones used. ``None`` (the default): read once. ``configure`` is
    called with each context built, the first included: what it sets holds after a reload,
    what is set on the returned context afterwards holds only until one.

    :class:`~app_kit.Channel` uses a context as given and never changes it; one made
    elsewhere must offer ALPN ``h2`` itself (``context.set_alpn_protocols(["h2"])``).
    """
    if private_key is not None and certificate_chain is None:
        raise ValueError("private_key goes with certificate_chain")
    if reload_interval is not None and not reload_interval > 0:
        raise ValueError("reload_interval must be positive or None")
    pem: str | None = None
    roots: str | None = None
    if isinstance(root_certificates, bytes):
        pem = root_certificates.decode("ascii")
    elif isinstance(root_certificates, str) and "-----BEGIN" in root_certificates:
        pem = root_certificates
    elif root_certificates is not None:
        roots = os.fspath(root_certificates)
    chain = None if certificate_chain is None else os.fspath(certificate_chain)
    key = None if private_key is None else os.fspath(private_key)
    files = [path for path in (roots, chain, key) if path is not None]

    def finish(context: ssl.SSLContext) -> ssl.SSLContext:
        if chain is not None:
            context.load_cert_chain(chain, key, password if password is not None else _no_password)
        context.set_alpn_protocols(["h2"])
        if configure is not None:
            configure(context)
        return context

    def build() -> ssl.SSLContext:
        # Given roots are trusted alone: the system's are loaded only without them.
        return finish(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=roots, cadata=pem))

    signature = _signature(files)
    if reload_interval is None or not files:
        return build()
    # The first context is the one returned (as create_default_context makes one: a client
    # protocol's defaults, then the roots), so that what is set on it holds until a reload.
    context = _ReloadingClientContext()
    if roots is None and pem is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cafile=roots, cadata=pem)
    context._reloader = _Reloader(build, files, signature, reload_interval, finish(context), _client_log)
    return context


def server_tls(
    *,
    certificate_chain: str | os.PathLike[str],
    private_key: str | os.PathLike[str] | None = None,
    password: str | bytes | None = None,
    client_ca: str | os.PathLike[str] | None = None,
    reload_interval: float | None = 60.0,
    configure: Configure | None = None,
) -> ssl.SSLContext:
    """A new server TLS context (ALPN ``h2``) that serves a renewed certificate without a restart.

    ``certificate_chain`` and ``private_key`` are PEM files (the key may be in the chain's
    file); ``password`` opens an encrypted key (without it, an encrypted key raises
    ``ValueError`` instead of OpenSSL asking on the terminal). ``client_ca``: a PEM file of the
    CAs whose certificates every client must present (mutual TLS, grpcio's
    ``require_client_auth``); TLS session resumption is then off, so that a client whose CA
    was taken out of the file cannot come back on a session from before.

    ``reload_interval``: at a new connection's handshake, at most once per this many seconds,
    the files are looked at (their inode, size and times); when they changed — cert-manager
    renewing a mounted Secret, say — they are read again into a new context, and new
    connections are served its certificate (and CAs); connections open already keep theirs.
    Files that cannot be used yet (a key that does not match its certificate halfway through
    an update) are logged at WARNING and the previous certificate is served until they can.
    ``None``: read once. The files are read on the event loop, in the handshake that finds
    them changed (a millisecond). The context's ``sni_callback`` does this: set another and
    the files are read once. ``configure`` is called with each context built, the first
    included: what it sets holds after a reload, what is set on the returned context
    afterwards holds only until one.
    """
    files = [os.fspath(certificate_chain)]
    if private_key is not None:
        files.append(os.fspath(private_key))
    if client_ca is not None:
        files.append(os.fspath(client_ca))

    def build() -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        key = None if private_key is None else files[1]
        context.load_cert_chain(files[0], key, password if password is not None else _no_password)
        if client_ca is not None:
            context.load_verify_locations(cafile=files[-1])
            context.verify_mode = ssl.CERT_REQUIRED
            # A resumed session skips the client's certificate, and sessions (kept by the first
            # context, whose ticket keys and cache a reload does not replace) outlive a reload.
            context.num_tickets = 0
            context.options |= ssl.OP_NO_TICKET
        context.set_alpn_protocols(["h2"])
        if configure is not None:
            configure(context)
        return context

    if reload_interval is not None and not reload_interval > 0:
        raise ValueError("reload_interval must be positive or None")
    signature = _signature(files)
    context = build()
    if reload_interval is not None:
        reloader = _Reloader(build, files, signature, reload_interval, context, _server_log)
        context.sni_callback = reloader.sni_callback
    return context


def _no_password() -> str:
    # Given instead of None: OpenSSL would ask for one on the terminal (a start that hangs).
    raise ValueError("the private key is encrypted: give its password")


_Signature = tuple[tuple[int, int, int, int, int], ...]


def _signature(files: list[str]) -> _Signature | None:
    """What changes when one of ``files`` is replaced or rewritten (None: one is missing).

    Followed through symbolic links: a Secret's volume replaces its files by swapping a link.
    The change time too: a rewrite that keeps size and modification time (``cp -p``,
    ``rsync -t``) still changes it, and nothing sets it back."""
    try:
        stats = [os.stat(path) for path in files]
    except OSError:
        return None
    return tuple((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) for stat in stats)


class _Reloader:
    """The newest context that could be built from a context's files, looked for at most once
    per ``interval`` seconds, when a connection is made."""

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        files: list[str],
        signature: _Signature | None,
        interval: float,
        first: ssl.SSLContext,
        log: logging.Logger,
    ) -> None:
        self._log = log
        self._build = build
        self._files = files
        self._signature = signature
        self._interval = interval
        self._looked_at = time.monotonic()
        self.first = first
        self._newest = first
        # A server's own sni_callback (set by configure): still called, after the swap.
        self._user_sni = first.sni_callback
        self._failure = ""  # the last reason the changed files could not be used (logged once)

    def newest(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._looked_at >= self._interval:
            self._looked_at = now
            try:
                self._look()
            except Exception:  # never fail a handshake for this: the previous context stays
                self._log.exception("cannot look at the TLS files %s", ", ".join(self._files))
        return self._newest

    def sni_callback(self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> int | None:
        """A server's: called in every handshake (with or without SNI), before the certificate
        is chosen. OpenSSL's SSL_set_SSL_CTX then gives the connection the new context's
        certificate, key and verification (the client CAs); its ALPN too, hence h2 on each."""
        newest = self.newest()
        if newest is not self.first:
            ssl_object.context = newest
        user = self._user_sni
        return None if user is None else user(ssl_object, server_name, newest)  # type: ignore[arg-type]  # (None: no SNI, as ssl passes it)

    def _look(self) -> None:
        signature = _signature(self._files)
        if signature == self._signature:
            return
        try:
            if signature is None:
                raise FileNotFoundError("a file is missing")
            newest = self._build()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reason = str(exc) or type(exc).__name__
            if reason != self._failure:
                self._failure = reason
                self._log.warning(
                    "TLS files %s changed but cannot be used (%s): still using the previous ones;"
                    " looked at again every %ss",
                    ", ".join(self._files),
                    reason,
                    self._interval,
                )
            return
        self._signature = signature
        self._newest = newest
        self._user_sni = newest.sni_callback
        self._failure = ""
        self._log.info("TLS files reloaded: %s", ", ".join(self._files))


class _ReloadingClientContext(ssl.SSLContext):
    """A client context that makes each connection with the newest of :class:`_Reloader`'s
    contexts (itself until a reload): asyncio's, uvloop's and trio's TLS layers all make
    theirs with ``wrap_bio``."""

    _reloader: _Reloader

    def __new__(cls) -> _ReloadingClientContext:
        return super().__new__(cls, ssl.PROTOCOL_TLS_CLIENT)

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        newest = self._reloader.newest()
        if newest is self:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        return newest.wrap_bio(incoming, outgoing, server_side, server_hostname, session)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        newest = self._reloader.newest()
        if newest is self:
            return super().wrap_socket(*args, **kwargs)
        return newest.wrap_socket(*args, **kwargs)
