"""gRPC message framing: a 1-byte compressed flag, a 4-byte big-endian length, the payload."""

from __future__ import annotations

__all__ = ["FramingError", "MessageDecoder", "MessageTooLarge", "frame_message"]

_PREFIX = 5


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

    The length prefix is checked against ``max_length`` as soon as it arrives, before
    any of the message is buffered.
    """

    __slots__ = ("_buffer", "_max_length")

    def __init__(self, max_length: int) -> None:
        self._buffer = bytearray()
        self._max_length = max_length

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._buffer)

    def feed(self, data: bytes) -> tuple[list[tuple[bool, bytes, int]], int]:
        """Take one DATA payload; return the messages it completes and the bytes it left over.

        Each message is ``(compressed, payload, share)``, where ``share`` is how many bytes of
        ``data`` belong to that message (for flow control: they are acknowledged when the
        application consumes the message). The second value counts the bytes of ``data``
        that only went into the buffer of a still incomplete message.
        """
        buffer = self._buffer
        carried = len(buffer)
        if not carried and len(data) >= _PREFIX:
            # Fast path: a frame that starts on a message boundary needs no copy into the buffer.
            view = data
        else:
            buffer += data
            view = buffer
        size = len(view)
        messages = []
        position = 0
        consumed_from_data = 0
        while size - position >= _PREFIX:
            flag = view[position]
            if flag > 1:
                raise FramingError(f"invalid compressed flag {flag} in message prefix")
            length = int.from_bytes(view[position + 1 : position + 5], "big")
            if length > self._max_length:
                raise MessageTooLarge(length, self._max_length)
            end = position + _PREFIX + length
            if end > size:
                break
            messages.append((flag == 1, bytes(view[position + _PREFIX : end]), end - carried - consumed_from_data))
            consumed_from_data = end - carried
            position = end
        if view is buffer:
            del buffer[:position]
        elif position < size:
            buffer += memoryview(data)[position:]
        return messages, len(data) - consumed_from_data
