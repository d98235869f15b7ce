"""A scripted HTTP/2 server (plain h2) for client behaviour grpcio servers never show on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events

from app_kit.rpc.framing import frame_message

from .frames import GOAWAY, PREFACE, frame


class FakeConnection(asyncio.Protocol):
    def __init__(
        self, script: Callable[[FakeConnection, int, int], None], log: list[int], ping_on_data: bool = False
    ) -> None:
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.script = script
        self.log = log
        # Like grpc-go's BDP estimation, only more eager: a PING for every DATA frame received.
        self.ping_on_data = ping_on_data
        self.pings_sent = 0
        # What the client sent, per stream: its request headers, its DATA; and its resets.
        self.request_headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.request_data: dict[int, bytearray] = {}
        self.resets: list[tuple[int, int]] = []
        # Every byte the client sent, to read its frames off the wire (see frames_on_wire).
        self.wire = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.wire += data
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.request_headers[event.stream_id] = list(event.headers or [])
            elif isinstance(event, h2.events.StreamReset):
                self.resets.append((event.stream_id, int(event.error_code or 0)))
            if isinstance(event, h2.events.DataReceived):
                self.request_data.setdefault(event.stream_id, bytearray()).extend(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if self.ping_on_data:
                    self.conn.ping(self.pings_sent.to_bytes(8, "big"))
                    self.pings_sent += 1
            if isinstance(event, h2.events.StreamEnded):
                self.log.append(event.stream_id)
                self.script(self, event.stream_id, len(self.log))
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def frames_on_wire(self) -> list[tuple[int, int]]:
        """(type, stream id) of every whole frame the client sent, after its preface."""
        frames, offset = [], len(PREFACE)
        while offset + 9 <= len(self.wire):
            length = int.from_bytes(self.wire[offset : offset + 3], "big")
            stream_id = int.from_bytes(self.wire[offset + 5 : offset + 9], "big") & 0x7FFFFFFF
            frames.append((self.wire[offset + 3], stream_id))
            offset += 9 + length
        return frames

    def flush(self) -> None:
        """Write what h2 queued (for replies sent outside :meth:`data_received`)."""
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def send_goaway(self, last_stream_id: int) -> None:
        """A graceful GOAWAY (NO_ERROR) built by hand: h2's ``close_connection`` would stop it
        from answering the streams up to ``last_stream_id``, which the GOAWAY promises to finish."""
        self.flush()
        self.transport.write(frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + bytes(4)))  # type: ignore[attr-defined]

    def reply(self, stream_id: int, payload: bytes, status: int = 0) -> None:
        self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        self.conn.send_data(stream_id, frame_message(payload))
        self.conn.send_headers(stream_id, [(b"grpc-status", str(status).encode())], end_stream=True)


@contextlib.asynccontextmanager
async def fake_server(
    script: Callable[[FakeConnection, int, int], None], *, ping_on_data: bool = False
) -> AsyncIterator[tuple[int, list[int]]]:
    """Serve ``script(connection, stream_id, request_number)`` for each complete request."""
    log: list[int] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeConnection(script, log, ping_on_data), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], log
    finally:
        server.close()
