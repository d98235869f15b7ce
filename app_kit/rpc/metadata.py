"""Custom metadata (HTTP/2 headers the application reads and writes) and ``grpc-message``."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from typing import TypeAlias
from urllib.parse import quote, unquote_to_bytes

from multidict import MultiDict, MultiDictProxy

__all__ = [
    "Metadata",
    "MetadataLike",
    "decode_grpc_message",
    "decode_metadata",
    "encode_grpc_message",
    "encode_metadata",
    "excerpt",
    "shorten_grpc_message",
]

#: Received metadata: lower-case keys; ``-bin`` values are bytes, all others str.
Metadata: TypeAlias = MultiDictProxy[str | bytes]
#: What a caller may pass as metadata to send.
MetadataLike: TypeAlias = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]

_KEY_RE = re.compile(rb"[0-9a-z_.\-]+\Z")
# Headers that belong to HTTP/2 or to the gRPC protocol itself; never custom metadata.
_RESERVED_KEYS = frozenset(
    {
        "te",
        "content-type",
        "user-agent",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


_RESERVED_NAMES = frozenset(key.encode("ascii") for key in _RESERVED_KEYS)  # as received

_EMPTY: Metadata = MultiDictProxy(MultiDict())


def decode_metadata(headers: Iterable[tuple[bytes, bytes]], *, lenient: bool = False) -> Metadata:
    """Build the metadata multidict from received header fields.

    Pseudo-headers, ``grpc-*`` keys and HTTP's own headers are left out. Values of keys
    ending in ``-bin`` are base64-decoded (padded or not; several joined by ``,`` are several
    values, as PROTOCOL-HTTP2 says to split them); an invalid one raises :class:`ValueError`,
    or is left out if ``lenient``. Other values outside printable ASCII (obs-text, a tab,
    control characters: valid HTTP, not gRPC's ASCII-Value) are left out: PROTOCOL-HTTP2 lets
    a receiver drop them, and a value kept must be one the application can send back.
    Whitespace at either end of a value is stripped (PROTOCOL-HTTP2 again).
    """
    result: MultiDict[str | bytes] | None = None
    for name, value in headers:
        if name[:1] == b":" or name[:5] == b"grpc-" or name in _RESERVED_NAMES:
            continue
        key = name.decode("ascii")
        if result is None:
            result = MultiDict()
        if key.endswith("-bin"):
            try:
                if b"," in value:
                    for part in value.split(b","):
                        result.add(key, _b64decode(key, part.strip(b" ")))
                else:
                    result.add(key, _b64decode(key, value))
            except ValueError:
                if not lenient:
                    raise
        else:
            value = value.strip(b" \t")
            if _ASCII_VALUE.match(value):
                result.add(key, value.decode("ascii"))
    # None custom (the common case): one read-only instance serves every call.
    return _EMPTY if result is None else MultiDictProxy(result)


_ASCII_VALUE = re.compile(rb"[\x20-\x7e]*\Z")  # PROTOCOL-HTTP2's ASCII-Value


def _b64decode(key: str, value: bytes) -> bytes:
    # Peers may omit the padding; restore it so that the strict decoder accepts the value.
    value = value.rstrip(b"=")
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"metadata {key!r} is not valid base64") from None


def encode_metadata(metadata: MetadataLike | None, *, trailers: bool = False) -> list[tuple[bytes, bytes]]:
    """Validate metadata to send and turn it into header fields.

    Keys must be lower-case ``[0-9a-z_.-]`` and not reserved (``grpc-*``, HTTP's own), but
    for a server's ``trailers`` ``grpc-retry-pushback-ms``, which the application sets (gRFC
    A6: how long a client should wait before retrying; a negative value: never).
    ``-bin`` keys take bytes (sent base64-encoded without padding), others printable ASCII
    str. Violations raise :class:`ValueError` / :class:`TypeError` in the caller.
    """
    if not metadata:
        return []
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    fields = []
    for key, value in items:
        raw_key = key.encode("ascii", "replace") if isinstance(key, str) else b""
        if not _KEY_RE.match(raw_key):
            raise ValueError(f"invalid metadata key {key!r}: lower-case [0-9a-z_.-] expected")
        if (raw_key.startswith(b"grpc-") and not (trailers and raw_key == b"grpc-retry-pushback-ms")) or (
            key in _RESERVED_KEYS
        ):
            raise ValueError(f"metadata key {key!r} is reserved by the protocol")
        if key.endswith("-bin"):
            if not isinstance(value, bytes | bytearray | memoryview):
                raise TypeError(f"metadata {key!r} is binary and takes bytes, got {type(value).__name__}")
            fields.append((raw_key, base64.b64encode(value).rstrip(b"=")))
        else:
            if not isinstance(value, str):
                raise TypeError(f"metadata {key!r} takes str, got {type(value).__name__}")
            if not (value.isascii() and value.isprintable()):
                raise ValueError(f"metadata {key!r} must be printable ASCII; use a -bin key for other data")
            if value[:1] == " " or value[-1:] == " ":
                # RFC 9113 §8.2.1: a peer must treat such a field as malformed (h2's checks do).
                raise ValueError(f"metadata {key!r} has whitespace at an end, which HTTP/2 forbids")
            fields.append((raw_key, value.encode("ascii")))
    return fields


# grpc-message carries UTF-8, percent-encoding every byte outside printable ASCII and '%'.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("%"))


def excerpt(text: str, limit: int = 64) -> str:
    """Peer-supplied text fit for a status message: escaped to ASCII, at most ``limit``
    characters of it, so that an answer never echoes (and amplifies) what a peer sent."""
    shown = text[:limit].encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in shown)
    return shown if len(text) <= limit else f"{shown}... ({len(text)} characters)"


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode a status message for the ``grpc-message`` trailer."""
    value = quote(message, safe=_MESSAGE_SAFE, encoding="utf-8").encode("ascii")
    if value[:1] == b" " or value[-1:] == b" ":
        # RFC 9113 §8.2.1: a field value with whitespace at an end is malformed (a strict peer
        # refuses the whole response): those spaces go as %20 ("... must not be empty: ").
        stripped = value.strip(b" ")
        head = b"%20" * (len(value) - len(value.lstrip(b" ")))
        tail = b"%20" * (len(value) - len(value.rstrip(b" "))) if stripped else b""
        value = head + stripped + tail
    return value


def shorten_grpc_message(value: bytes, size: int) -> bytes:
    """An encoded ``grpc-message`` cut to at most ``size`` bytes, at a character's boundary."""
    cut = value[: max(size, 0)]
    escape = cut.rfind(b"%", len(cut) - 2)
    if escape != -1:
        cut = cut[:escape]  # not half an escape
    # Nor half a character: decoded, its broken end dropped, encoded again.
    return encode_grpc_message(unquote_to_bytes(cut).decode("utf-8", "ignore").rstrip(" "))


def decode_grpc_message(value: bytes) -> str:
    """Decode a ``grpc-message`` value; malformed escapes are kept as they are."""
    return unquote_to_bytes(value).decode("utf-8", "replace")
