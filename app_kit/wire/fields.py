"""What makes a received HTTP/2 field (header) malformed: RFC 9113 §8.2.1 and §8.3."""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["BAD_FIELD_VALUE", "FIELD_NAME", "malformed_field"]

#: RFC 9110 token characters, lower-case only (RFC 9113 §8.2.1 forbids upper case).
FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
#: RFC 9113 §8.2.1: no NUL, CR or LF anywhere. (Whitespace at an end, which it forbids too,
#: is taken, and stripped from metadata: PROTOCOL-HTTP2 says a receiver may strip it, and
#: grpc-core sends it, in metadata and in grpc-message.)
BAD_FIELD_VALUE = re.compile(rb"[\x00\r\n]")


def malformed_field(headers: Iterable[tuple[bytes, bytes]], pseudo: bytes = b"") -> str | None:
    """Why a received field list is malformed, or None: a name not of lower-case token
    characters, a value with NUL, CR or LF, a pseudo-header other than ``pseudo`` (or one after
    a regular field, or twice), no ``pseudo`` when one is named."""
    regular = seen = False
    for name, value in headers:
        if BAD_FIELD_VALUE.search(value):
            return f"invalid characters in the value of {_shown(name)}"
        if name[:1] == b":":
            if name != pseudo or regular or seen:
                return f"unexpected pseudo-header {_shown(name)}"
            seen = True
        elif not FIELD_NAME.match(name):
            return f"invalid field name {_shown(name)}"
        else:
            regular = True
    if pseudo and not seen:
        return f"no {pseudo.decode('ascii')} pseudo-header"  # (RFC 9113 §8.3.2: a response has one)
    return None


def _shown(name: bytes) -> str:
    # A peer's bytes in our message: escaped, and no more than 64 of them.
    return repr(name[:64].decode("latin-1").encode("ascii", "backslashreplace").decode("ascii"))
