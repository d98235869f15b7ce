"""TLS for clients: a context for gRPC (ALPN h2), with the caller's roots and client certificate."""

from __future__ import annotations

import os
import ssl

__all__ = ["client_tls"]


def client_tls(
    *,
    root_certificates: str | bytes | os.PathLike[str] | None = None,
    certificate_chain: str | os.PathLike[str] | None = None,
    private_key: str | os.PathLike[str] | None = None,
    password: str | bytes | None = None,
) -> ssl.SSLContext:
    """A new client TLS context that offers ALPN ``h2`` and verifies the server.

    ``root_certificates``: a PEM file, or PEM text (str or bytes), of the certificates to
    trust instead of the system's. ``certificate_chain`` and ``private_key`` (PEM files; the
    key may be in the chain's file) present a client certificate: mutual TLS.

    :class:`~app_kit.Channel` uses a context as given and never changes it; one made
    elsewhere must offer ALPN ``h2`` itself (``context.set_alpn_protocols(["h2"])``).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if root_certificates is not None:
        if isinstance(root_certificates, bytes):
            context.load_verify_locations(cadata=root_certificates.decode("ascii"))
        elif isinstance(root_certificates, str) and "-----BEGIN" in root_certificates:
            context.load_verify_locations(cadata=root_certificates)
        else:
            context.load_verify_locations(cafile=os.fspath(root_certificates))
    if certificate_chain is not None:
        context.load_cert_chain(
            os.fspath(certificate_chain), None if private_key is None else os.fspath(private_key), password
        )
    elif private_key is not None:
        raise ValueError("private_key goes with certificate_chain")
    context.set_alpn_protocols(["h2"])
    return context
