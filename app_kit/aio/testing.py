"""Testing helpers: call services in-process, without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from ..rpc.codecs import CodecBase, StatusDetailsCodecBase
from ..rpc.handlers import ServiceLike
from ..wire.config import Configuration
from .client import Channel, ClientProtocol
from .runtime import Runtime, current_runtime
from .server import Server, ServerProtocol
from .subchannel import Address

__all__ = ["ChannelFor"]


class _MemoryTransport(asyncio.Transport):
    """One end of an in-memory byte pipe; delivery happens on the next loop turn, like a socket."""

    def __init__(self, loop: Runtime, protocol: asyncio.Protocol, name: str) -> None:
        super().__init__()
        self._loop = loop
        self._protocol = protocol
        self._name = name
        self.peer: _MemoryTransport | None = None
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and self.peer is not None:
            self._loop.call_soon(self.peer._deliver, bytes(data))

    def _deliver(self, data: bytes) -> None:
        if not self._closing:
            self._protocol.data_received(data)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._protocol.connection_lost, None)
        if self.peer is not None:
            # After the bytes already in flight, like a FIN behind the data.
            self._loop.call_soon(self.peer.close)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self._name, 0), "sockname": (self._name, 0)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Nothing is buffered: every write is delivered at once."""

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


class _InMemoryChannel(Channel):
    def __init__(self, server: Server, **kwargs: Any) -> None:
        super().__init__("in-memory", 0, **kwargs)
        self._server = server

    async def _open_transport(self, factory: Callable[[Runtime], ClientProtocol], address: Address) -> ClientProtocol:
        loop = current_runtime()
        client = factory(loop)
        server = ServerProtocol(self._server, loop)
        client_end = _MemoryTransport(loop, client, "in-memory-server")
        server_end = _MemoryTransport(loop, server, "in-memory-client")
        client_end.peer, server_end.peer = server_end, client_end
        server.connection_made(server_end)
        client.connection_made(client_end)
        return client


class ChannelFor:
    """``async with ChannelFor([service, ...]) as channel``: a Channel wired to a Server in memory.

    The whole protocol runs (framing, h2, flow control, deadlines), only the socket is
    replaced, so unit tests of a service need no port and see what a real client would.
    """

    def __init__(
        self,
        services: Iterable[ServiceLike],
        *,
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
        config: Configuration | None = None,
    ) -> None:
        self.server = Server(services, codec=codec, status_details_codec=status_details_codec, config=config)
        self.channel: Channel = _InMemoryChannel(
            self.server, codec=codec, status_details_codec=status_details_codec, config=config
        )

    async def __aenter__(self) -> Channel:
        return self.channel

    async def __aexit__(self, *exc_info: object) -> None:
        self.channel.close()
        self.server.close()
        await self.server.wait_closed()
