"""A scripted HTTP/2 server (plain h2) for client behaviour grpcio servers never show on demand."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events

from app_kit.rpc.framing import frame_message


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if self.ping_on_data:
                    self.conn.ping(self.pings_sent.to_bytes(8, "big"))
                    self.pings_sent += 1
            if isinstance(event, h2.events.StreamEnded):
                self.log.append(event.stream_id)
                self.script(self, event.stream_id, len(self.log))
        self.transport.write(self.conn.data_to_send())  # type: ignore[attr-defined]

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
