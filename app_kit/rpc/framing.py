"""gRPC message framing: a 1-byte compressed flag, a 4-byte big-endian length, the payload."""

from __future__ import annotations

import struct
from typing import Any

__all__ = ["SMALL_PREFIXES", "FramingError", "MessageDecoder", "MessageTooLarge", "frame_message", "pack_prefix"]

_PREFIX = 5
_unpack_prefix = struct.Struct(">BI").unpack_from
#: ``pack_prefix(flag, length)``: a message's 5-byte prefix (flag 1: compressed).
pack_prefix = struct.Struct(">BI").pack
#: The prefixes of uncompressed messages shorter than 256 bytes, by length, made once: packing
#: one per message was 5 % of a streamed reply's cost.
SMALL_PREFIXES = tuple(pack_prefix(0, length) for length in range(256))
#: Pieces of an incomplete message shorter than this are gathered into one bytearray: kept
#: as a bytes object each, a piece costs ~50 bytes of heap besides its own (a 2-byte DATA
#: frame ~25 times what ``max_connection_receive_buffer`` counts for it). From this size on,
#: a piece is kept as it came, for at most ~10 % more.
_SMALL_PIECE = 512


class FramingError(Exception):
    """The peer's DATA does not follow the gRPC length-prefixed message framing."""


class MessageTooLarge(FramingError):
    """A length prefix announces more than the receive limit allows."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"received message larger than max ({length} vs. {limit})")
        self.length = length
        self.limit = limit


def frame_message(payload: bytes, compressed: bool = False) -> bytes:
    """Prefix one message payload for the wire."""
    return (b"\x01" if compressed else b"\x00") + len(payload).to_bytes(4, "big") + payload


class MessageDecoder:
    """Splits one stream's DATA payload, however it is cut into frames, into messages.

    The length prefix is checked against ``max_length`` as soon as it arrives, before any of
    the message is buffered. The pieces of a message spread over many frames are kept as
    they came and joined once, when it is complete: one copy, however large the message.
    Small pieces are the exception: those of a run of them go into one bytearray as they
    come (see ``_SMALL_PIECE``), so that the heap an incomplete message holds stays within a
    small factor of its bytes, however finely the peer cuts it.
    """

    __slots__ = ("_chunks", "_compressed", "_length", "_max_length", "_missing", "_prefix")

    def __init__(self, max_length: int) -> None:
        self._max_length = max_length
        self._prefix = b""  # an incomplete length prefix
        self._chunks: list[bytes | bytearray | memoryview] = []  # the pieces of the message being received
        self._missing = -1  # bytes of that message still to come; -1 while reading a prefix
        self._length = 0  # the length its prefix announced
        self._compressed = False

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message received so far (0 exactly between messages)."""
        if self._missing < 0:
            return len(self._prefix)
        return _PREFIX + self._length - self._missing

    def feed(self, data: bytes | memoryview) -> tuple[list[tuple[bytes, int]], list[int], int]:
        """Take one DATA payload; return the messages it completes and the bytes it left over.

        Returns ``(messages, compressed, leftover)``. Each message is ``(payload, share)``, where
        ``share`` is how many bytes of ``data`` belong to it (for flow control: they are
        acknowledged when the application consumes the message). ``compressed`` lists the
        positions in ``messages`` of compressed ones (usually none: then the list goes up
        as it is). ``leftover`` counts the bytes of ``data`` that only went into an
        incomplete message.
        """
        messages: list[tuple[Any, int]] = []  # (bytes; memoryview slices while data is a view)
        compressed: list[int] = []
        size = len(data)
        position = 0
        share_start = 0  # where the share of the next completed message starts in data
        prefix: bytes | memoryview
        payload: bytes | memoryview
        if self._missing < 0 and not self._prefix:
            # The common case first: whole messages, back to back from the frame's start.
            limit = self._max_length
            while size - position >= _PREFIX:
                flag, length = _unpack_prefix(data, position)
                end = position + _PREFIX + length
                if flag > 1 or length > limit or end > size:
                    break  # the general loop below reports it, or buffers the partial message
                if flag:
                    compressed.append(len(messages))
                messages.append((data[position + _PREFIX : end], end - position))
                position = end
            share_start = position
        while position < size:
            if self._missing < 0:
                if self._prefix or size - position < _PREFIX:
                    take = _PREFIX - len(self._prefix)
                    self._prefix += data[position : position + take]
                    position += min(take, size - position)
                    if len(self._prefix) < _PREFIX:
                        break
                    prefix, self._prefix = self._prefix, b""
                else:
                    prefix = data[position : position + _PREFIX]
                    position += _PREFIX
                flag = prefix[0]
                if flag > 1:
                    raise FramingError(f"invalid compressed flag {flag} in message prefix")
                length = int.from_bytes(prefix[1:5], "big")
                if length > self._max_length:
                    raise MessageTooLarge(length, self._max_length)
                self._compressed = flag == 1
                self._missing = self._length = length
                if length == 0:
                    if self._compressed:
                        compressed.append(len(messages))
                    messages.append((b"", position - share_start))
                    share_start = position
                    self._missing = -1
                continue
            end = position + self._missing
            if end > size:
                chunks = self._chunks
                if size - position >= _SMALL_PIECE:
                    # As it came (a whole payload: not even copied); out of a view (of a frame
                    # joined from many reads), a copy: a view would hold all that frame.
                    chunks.append(data[position:] if type(data) is not memoryview else bytes(data[position:]))
                elif chunks and type(chunks[-1]) is bytearray:
                    chunks[-1] += data[position:]  # (a bytearray: extended in place)
                else:
                    chunks.append(bytearray(data[position:]))
                self._missing -= size - position
                position = size
                break
            if self._chunks:
                self._chunks.append(data[position:end])
                payload = b"".join(self._chunks)
                self._chunks = []
            else:
                payload = data[position:end]
            position = end
            if self._compressed:
                compressed.append(len(messages))
            messages.append((payload, position - share_start))
            share_start = position
            self._missing = -1
        if type(data) is memoryview and messages:
            # A view of a frame joined from many reads (see GrpcConnection.receive_data): the
            # messages handed over are bytes, each copied out of it once.
            messages = [(bytes(payload), share) for payload, share in messages]
        return messages, compressed, size - share_start
