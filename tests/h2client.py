"""A raw HTTP/2 client for sending what grpcio never sends, and reading every frame back."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events

from app_kit.rpc.framing import frame_message
from app_kit.wire.h2_internals import GoAwayTolerantStateMachine


@dataclass
class Response:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytes = b""
    reset_code: int | None = None
    ended: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers + self.trailers:
            if key == name:
                return value
        return None

    @property
    def http_status(self) -> int | None:
        value = self.header(b":status")
        return int(value) if value is not None else None

    @property
    def grpc_status(self) -> int | None:
        value = self.header(b"grpc-status")
        return int(value) if value is not None else None

    @property
    def grpc_message(self) -> str | None:
        from app_kit.rpc.metadata import decode_grpc_message

        value = self.header(b"grpc-message")
        return decode_grpc_message(value) if value is not None else None

    def messages(self) -> list[bytes]:
        return [payload for _, payload in self.framed()]

    def framed(self) -> list[tuple[int, bytes]]:
        """Each message as sent: its compressed flag and its payload (still compressed)."""
        out, data = [], self.data
        while data:
            length = int.from_bytes(data[1:5], "big")
            out.append((data[0], data[5 : 5 + length]))
            data = data[5 + length :]
        return out


class RawClient:
    """An h2 client connection over a real socket, with validation switched off on our side."""

    def __init__(self, host: str, port: int, **h2_settings: Any) -> None:
        self.host, self.port = host, port
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        # As real gRPC clients do: keep serving the streams a graceful GOAWAY lets finish.
        self.conn.state_machine = GoAwayTolerantStateMachine()
        self.responses: dict[int, Response] = {}
        self.events: list[h2.events.Event] = []
        self.closed = asyncio.Event()
        self._changed = asyncio.Event()
        self.auto_ack = True

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.writer.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                self.closed.set()
                self._changed.set()
                return
            try:
                events = self.conn.receive_data(data)
            except Exception as exc:  # the test inspects raw frames; keep going
                self.events.append(exc)  # type: ignore[arg-type]
                events = []
            for event in events:
                self.events.append(event)
                self._apply(event)
            self.flush()
            self._changed.set()

    def _apply(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        if stream_id is None:
            return
        response = self.responses.setdefault(stream_id, Response())
        if isinstance(event, h2.events.ResponseReceived):
            response.headers = list(event.headers)
        elif isinstance(event, h2.events.TrailersReceived):
            response.trailers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            response.data += event.data
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            response.ended = True
        elif isinstance(event, h2.events.StreamReset):
            response.reset_code = event.error_code
            response.ended = True

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def new_stream_id(self) -> int:
        return self.conn.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()

    async def request(
        self,
        path: str,
        payload: bytes | None = None,
        *,
        timeout: bytes | None = None,
        extra: list[tuple[bytes, bytes]] | None = None,
        end_stream: bool = True,
        method: bytes = b"POST",
    ) -> int:
        stream_id = self.new_stream_id()
        headers = [
            (b":method", method),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", b"localhost"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        if timeout is not None:
            headers.append((b"grpc-timeout", timeout))
        headers += extra or []
        self.conn.send_headers(stream_id, headers, end_stream=payload is None and end_stream)
        if payload is not None:
            self.conn.send_data(stream_id, frame_message(payload), end_stream=end_stream)
        self.flush()
        return stream_id

    async def read_response(self, stream_id: int, timeout: float = 5.0) -> Response:
        await self.wait_for(lambda: self.responses.get(stream_id, Response()).ended, timeout)
        return self.responses[stream_id]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")
