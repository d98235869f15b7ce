"""Same-output, constant-cost replacements for hyperframe's frame-payload repr.

h2 formats ``repr(frame)`` for a trace log on every frame it receives, whether or not
anything logs it. For a DATA frame hyperframe first serializes the whole body again (a copy
of the payload) and then hex-encodes all of it, only to keep its first 20 hex digits: for
large messages that was a quarter of the server's CPU. These versions look at only the
bytes they show, so the text is identical (a test pins that). Installed once, at import;
worth removing when h2 stops formatting unused log arguments.
"""

from __future__ import annotations

import binascii

import hyperframe.frame

__all__ = ["data_body_repr", "raw_data_repr"]


def raw_data_repr(data: bytes | None) -> str:
    """What ``hyperframe.frame._raw_data_repr`` returns, at the cost of 11 bytes."""
    if not data:
        return "None"
    shown = binascii.hexlify(data[:11]).decode("ascii")
    if len(shown) > 20:
        shown = shown[:20] + "..."
    return "<hex:" + shown + ">"


def data_body_repr(frame: hyperframe.frame.DataFrame) -> str:
    """What ``Frame._body_repr`` gives for a DATA frame, without re-serializing its payload."""
    head = frame.serialize_padding_data() + bytes(frame.data[:11])
    if len(head) < 11 and frame.pad_length:
        head += b"\0" * min(frame.pad_length, 11 - len(head))  # the padding follows the data
    return raw_data_repr(head)


if hasattr(hyperframe.frame, "_raw_data_repr"):
    hyperframe.frame._raw_data_repr = raw_data_repr
if "_body_repr" not in vars(hyperframe.frame.DataFrame):
    hyperframe.frame.DataFrame._body_repr = data_body_repr  # type: ignore[method-assign,assignment]
