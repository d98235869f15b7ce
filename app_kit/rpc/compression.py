"""Message compression named by ``grpc-encoding``: a registry of encodings.

``identity`` (no compression), ``gzip`` and ``deflate`` come built in, from the standard
library's zlib. Another encoding (zstd, snappy, ...) is one :class:`Encoding` passed to
:func:`register_encoding`, typically at import time of the module that provides it: from then
on servers accept it in requests and advertise it in ``grpc-accept-encoding``, and servers and
channels may compress with it. The core never needs to know its name.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable

__all__ = [
    "IDENTITY",
    "DecompressedTooLarge",
    "DecompressionError",
    "Encoding",
    "accept_encoding",
    "compress",
    "decompress",
    "get_encoding",
    "is_supported",
    "register_encoding",
    "registered_encodings",
    "unregister_encoding",
]

#: The name of "no compression".
IDENTITY = "identity"
# RFC 9110 §5.6.2 tchar, lower case (names are compared as sent).
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+\Z")


class DecompressionError(Exception):
    """A compressed message is corrupt."""


class DecompressedTooLarge(DecompressionError):
    """A compressed message inflates past the allowed size."""


@dataclasses.dataclass(frozen=True, slots=True)
class Encoding:
    """One message encoding: its ``grpc-encoding`` name and its two directions.

    ``decompress(data, max_length)`` must never produce (or allocate for) more than
    ``max_length`` bytes: it raises :class:`DecompressedTooLarge` as soon as the output would
    exceed it, and :class:`DecompressionError` for corrupt input. A small compressed message
    can expand a thousandfold; the cap is what keeps a peer from choosing our memory use.
    """

    #: The token sent in ``grpc-encoding`` (lower case, e.g. ``"zstd"``).
    name: str
    #: Compress one message payload.
    compress: Callable[[bytes], bytes]
    #: Inflate one message payload, producing at most ``max_length`` bytes.
    decompress: Callable[[bytes, int], bytes]


def _zlib_encoding(name: str, wbits: int) -> Encoding:
    """An encoding over zlib's deflate: ``wbits`` 31 is the gzip wrapper, 15 the zlib one."""

    def compress_payload(data: bytes) -> bytes:
        # Level 6 is zlib's default trade-off between CPU and size.
        compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
        return compressor.compress(data) + compressor.flush()

    def decompress_payload(data: bytes, max_length: int) -> bytes:
        inflater = zlib.decompressobj(wbits)
        try:
            # max_length + 1 tells "exactly at the limit" from "over it" without inflating more.
            result = inflater.decompress(data, max_length + 1)
        except zlib.error as exc:
            raise DecompressionError(f"corrupt {name} data: {exc}") from None
        if len(result) > max_length:
            raise DecompressedTooLarge(f"decompressed message larger than max ({max_length} bytes)")
        if not inflater.eof or inflater.unused_data:
            raise DecompressionError(f"truncated or trailing {name} data")
        return result

    return Encoding(name, compress_payload, decompress_payload)


# gzip and deflate as gRPC's compression spec names them: deflate is the zlib format
# (RFC 1950), as in HTTP's content codings, not raw deflate.
_registry: dict[str, Encoding] = {
    "gzip": _zlib_encoding("gzip", 31),
    "deflate": _zlib_encoding("deflate", 15),
}
_accept_value = b""


def _refresh() -> None:
    global _accept_value
    _accept_value = ",".join([*_registry, IDENTITY]).encode("ascii")


_refresh()


def register_encoding(encoding: Encoding) -> None:
    """Make ``encoding`` known to every server and channel created from now on.

    Registering a name again replaces its implementation. Connections made before keep the
    ``grpc-accept-encoding`` they advertised; register before serving.
    """
    name = encoding.name
    if not _TOKEN.match(name):
        raise ValueError(f"invalid encoding name {name!r}: a lower-case HTTP token (RFC 9110 5.6.2)")
    if name == IDENTITY:
        raise ValueError("identity is built in and cannot be replaced")
    _registry[name] = encoding
    _refresh()


def unregister_encoding(name: str) -> None:
    """Forget a registered encoding (the built-in ones included)."""
    _registry.pop(name, None)
    _refresh()


def registered_encodings() -> tuple[str, ...]:
    """The names of the encodings that compress, in registration order (identity not included)."""
    return tuple(_registry)


def is_supported(name: str) -> bool:
    """Whether messages in encoding ``name`` can be read and written (identity included)."""
    return name == IDENTITY or name in _registry


def get_encoding(name: str) -> Encoding:
    """The registered encoding ``name``; :class:`ValueError` if there is none."""
    try:
        return _registry[name]
    except KeyError:
        raise ValueError(f"unsupported encoding {name!r}; registered: {', '.join(_registry) or 'none'}") from None


def accept_encoding() -> bytes:
    """The ``grpc-accept-encoding`` value advertising every registered encoding."""
    return _accept_value


def compress(encoding: str, data: bytes) -> bytes:
    """Compress one message payload with the registered ``encoding``."""
    return get_encoding(encoding).compress(data)


def decompress(encoding: str, data: bytes, max_length: int) -> bytes:
    """Inflate one message payload, never producing more than ``max_length`` bytes.

    The cap is applied while inflating, so a small "zip bomb" cannot make us allocate
    the size it would expand to. What a registered encoding returns is checked: more than
    ``max_length`` raises :class:`DecompressedTooLarge` (one passing the limit on to an API
    where 0 means "no limit" would otherwise inflate unbounded just when a budget is full), and
    anything but bytes :class:`DecompressionError`.
    """
    decompress = get_encoding(encoding).decompress
    if not data:
        # Flagged compressed but empty: no compressor writes it, yet it can only be the empty
        # message, as grpc-core reads it (some senders flag every message, empty ones too).
        return b""
    inflated = decompress(data, max_length)
    if type(inflated) is not bytes:  # (bytes itself: the codecs parse it, and callers count it)
        if not isinstance(inflated, (bytes, bytearray, memoryview)):
            raise DecompressionError(f"{encoding} decompress returned {type(inflated).__name__}, not bytes")
        inflated = bytes(inflated)
    if len(inflated) > max_length:
        raise DecompressedTooLarge(f"{encoding} message inflates past {max_length} bytes")
    return inflated
