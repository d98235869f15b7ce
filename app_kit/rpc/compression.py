"""Message compression named by ``grpc-encoding``: ``gzip`` and ``identity``."""

from __future__ import annotations

import zlib

__all__ = [
    "ACCEPT_ENCODING",
    "SUPPORTED_ENCODINGS",
    "DecompressedTooLarge",
    "DecompressionError",
    "compress",
    "decompress",
]

#: Encodings this implementation reads and writes.
SUPPORTED_ENCODINGS = frozenset({"gzip", "identity"})
#: The ``grpc-accept-encoding`` value advertising them.
ACCEPT_ENCODING = b"gzip,identity"


class DecompressionError(Exception):
    """A compressed message is corrupt."""


class DecompressedTooLarge(DecompressionError):
    """A compressed message inflates past the allowed size."""


def compress(encoding: str, data: bytes) -> bytes:
    """Compress one message payload."""
    if encoding == "gzip":
        # gzip wrapper (wbits 31) as the gRPC compression spec names it; level 6 is zlib's
        # default trade-off.
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        return compressor.compress(data) + compressor.flush()
    raise ValueError(f"unsupported encoding {encoding!r}")


def decompress(encoding: str, data: bytes, max_length: int) -> bytes:
    """Inflate one message payload, never producing more than ``max_length`` bytes.

    The cap is applied while inflating, so a small "zip bomb" cannot make us allocate
    the size it would expand to.
    """
    if encoding != "gzip":
        raise ValueError(f"unsupported encoding {encoding!r}")
    inflater = zlib.decompressobj(31)
    try:
        result = inflater.decompress(data, max_length + 1)
    except zlib.error as exc:
        raise DecompressionError(f"corrupt gzip data: {exc}") from None
    if len(result) > max_length:
        raise DecompressedTooLarge(f"decompressed message larger than max ({max_length} bytes)")
    if not inflater.eof or inflater.unused_data:
        raise DecompressionError("truncated or trailing gzip data")
    return result
