"""Hand-built HTTP/2 frames and a raw socket peer that reads every frame back."""

from __future__ import annotations

import asyncio
import os

import hpack
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 2, 3, 4, 6, 7, 8, 9
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big") + payload


def request_block(
    encoder: hpack.Encoder | None = None,
    path: str = "/test.Sleeper/Sleep",
    extra: list[tuple[str, str]] | None = None,
) -> bytes:
    encoder = encoder or hpack.Encoder()
    return encoder.encode(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(extra or []),
        ]
    )


HANDSHAKE = PREFACE + frame(SETTINGS, 0, 0)


def held_messages(streams: int, held: int, first_stream: int = 1) -> bytes:
    """A connection's handshake, then ``streams`` calls to ``/r.R/Count`` (tests/services.py's
    ByteCounter) each holding ``held`` bytes of a 64 KiB message, in one DATA frame."""
    encoder = hpack.Encoder()
    piece = b"\x00" + (64 * 1024).to_bytes(4, "big") + bytes(held - 5)
    parts = [HANDSHAKE]
    for index in range(streams):
        stream_id = first_stream + 2 * index
        parts.append(frame(HEADERS, END_HEADERS, stream_id, request_block(encoder, path="/r.R/Count")))
        parts.append(frame(DATA, 0, stream_id, piece))
    return b"".join(parts)


def trailer_statuses(frames: list[Frame]) -> dict[int, bytes]:
    """The grpc-status each stream was ended with in ``frames``, by stream id."""
    decoder, statuses = hpack.Decoder(), {}
    for f in frames:  # every header block in order: HPACK state is per connection
        if isinstance(f, HeadersFrame):
            for name, value in decoder.decode(f.data, raw=True):
                if name == b"grpc-status":
                    statuses[f.stream_id] = value
    return statuses


def whole_request(path: str, body: bytes, stream_id: int = 1, encoder: hpack.Encoder | None = None) -> bytes:
    """A call's request in two frames: HEADERS, then ``body`` as one gRPC message with
    END_STREAM (``encoder``: the connection's, for a second request on it)."""
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    block = request_block(encoder, path)
    return frame(HEADERS, END_HEADERS, stream_id, block) + frame(DATA, END_STREAM, stream_id, message)


def flood(kind: str, count: int) -> bytes:
    """A connection that opens with ``count`` frames of one flood: rapid reset, PING, SETTINGS, empty DATA."""
    encoder = hpack.Encoder()
    parts = [HANDSHAKE]
    if kind == "rapid reset":
        for index in range(count):
            stream_id = 2 * index + 1
            parts.append(frame(HEADERS, END_HEADERS, stream_id, request_block(encoder)))
            parts.append(frame(RST_STREAM, 0, stream_id, b"\x00\x00\x00\x08"))
    elif kind == "malformed requests":  # each answered with RST_STREAM PROTOCOL_ERROR ("MadeYouReset")
        for index in range(count):
            block = request_block(encoder, extra=[("X-Upper-Case", "1")])
            parts.append(frame(HEADERS, END_HEADERS | END_STREAM, 2 * index + 1, block))
    elif kind == "unknown method":  # each answered at once; over the concurrency limit, refused
        for index in range(count):
            block = request_block(encoder, path="/x.y/z")
            parts.append(frame(HEADERS, END_HEADERS | END_STREAM, 2 * index + 1, block))
    elif kind == "WINDOW_UPDATE":
        parts += [frame(WINDOW_UPDATE, 0, 0, (1).to_bytes(4, "big"))] * count
    elif kind == "PRIORITY":
        parts.append(frame(HEADERS, END_HEADERS, 1, request_block(encoder)))
        parts += [frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10")] * count
    elif kind == "padded empty DATA":  # 1 byte of padding each, no data
        parts.append(frame(HEADERS, END_HEADERS, 1, request_block(encoder)))
        parts += [frame(DATA, 0x8, 1, b"\x00")] * count
    elif kind == "PING":
        parts += [frame(PING, 0, 0, index.to_bytes(8, "big")) for index in range(count)]
    elif kind == "SETTINGS":
        parts += [frame(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64")] * count
    elif kind == "empty DATA":
        parts.append(frame(HEADERS, END_HEADERS, 1, request_block(encoder)))
        parts += [frame(DATA, 0, 1)] * count
    else:
        raise ValueError(kind)
    return b"".join(parts)


class RawPeer:
    """Writes bytes, collects every frame the server sends until it closes the connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frames: list[Frame] = []
        self.closed = asyncio.Event()

    async def __aenter__(self) -> RawPeer:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.writer.close()

    async def _read(self) -> None:
        buffer = b""
        try:
            while chunk := await self.reader.read(1 << 16):
                buffer += chunk
                while len(buffer) >= 9:
                    parsed, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    parsed.parse_body(memoryview(buffer[9 : 9 + length]))
                    self.frames.append(parsed)
                    buffer = buffer[9 + length :]
        except (ConnectionError, OSError):
            pass
        self.closed.set()

    async def send(self, data: bytes) -> bool:
        """Write; False once the server has stopped reading and closed."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def wait_closed(self, timeout: float = 5) -> None:
        await asyncio.wait_for(self.closed.wait(), timeout)

    @property
    def goaways(self) -> list[GoAwayFrame]:
        return [f for f in self.frames if isinstance(f, GoAwayFrame)]

    def trailer_statuses(self) -> dict[int, bytes]:
        """The grpc-status each stream was ended with so far, by stream id."""
        return trailer_statuses(self.frames)


def process_cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def reset_peak_rss(pid: int) -> None:
    """Start measuring the peak RSS (VmHWM) of ``pid`` afresh (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as file:
        file.write("5")


def process_peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")
