"""app_kit: gRPC services on h2 whose whole life is one AsyncExitStack.

The package's folders are its layers, each importing only those below it: ``wire`` (sans-IO
HTTP/2) → ``rpc`` (sans-IO gRPC) → ``aio`` (the asyncio adapter) → ``services`` (health,
reflection) → ``app`` (lifecycle, settings, signals, CLI). This module re-exports the public API.
The app layer (pydantic) and the client load on first use, so a process that only serves with
:class:`Server` never imports them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .aio.server import Server, ServerInterceptor, ServerStats
from .aio.stream import Peer, Stream
from .rpc.codecs import CodecBase, ProtoCodec, ProtoStatusDetailsCodec, StatusDetailsCodecBase
from .rpc.compression import Encoding, register_encoding, registered_encodings, unregister_encoding
from .rpc.deadline import Deadline
from .rpc.handlers import Cardinality, Handler, ServiceLike
from .rpc.metadata import Metadata, MetadataLike
from .rpc.retry import RetryPolicy
from .rpc.status import GRPCError, ProtocolError, Status
from .wire.config import Configuration

if TYPE_CHECKING:  # what __getattr__ below loads on first use, as the type checker sees it
    from .aio.client import Channel, ClientInterceptor, ClientStream
    from .aio.subchannel import ConnectivityState
    from .aio.tls import client_tls, server_tls
    from .app.lifecycle import App, DeclarationError, RunningApp, StartupAborted, StartupError
    from .app.settings import AppSettings, SettingsError
    from .app.signals import graceful_exit
    from .services.health import Health

_LAZY = {
    "Channel": "aio.client",
    "ClientInterceptor": "aio.client",
    "ClientStream": "aio.client",
    "ConnectivityState": "aio.subchannel",
    "client_tls": "aio.tls",
    "server_tls": "aio.tls",
    "App": "app.lifecycle",
    "DeclarationError": "app.lifecycle",
    "RunningApp": "app.lifecycle",
    "StartupAborted": "app.lifecycle",
    "StartupError": "app.lifecycle",
    "AppSettings": "app.settings",
    "SettingsError": "app.settings",
    "graceful_exit": "app.signals",
    "Health": "services.health",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "App",
    "AppSettings",
    "DeclarationError",
    "Health",
    "RunningApp",
    "SettingsError",
    "StartupAborted",
    "StartupError",
    "graceful_exit",
    "Cardinality",
    "Channel",
    "ClientInterceptor",
    "ClientStream",
    "CodecBase",
    "Configuration",
    "ConnectivityState",
    "Deadline",
    "Encoding",
    "GRPCError",
    "Handler",
    "Metadata",
    "MetadataLike",
    "Peer",
    "ProtoCodec",
    "ProtoStatusDetailsCodec",
    "ProtocolError",
    "RetryPolicy",
    "Server",
    "ServerInterceptor",
    "ServerStats",
    "ServiceLike",
    "Status",
    "StatusDetailsCodecBase",
    "Stream",
    "__version__",
    "client_tls",
    "register_encoding",
    "registered_encodings",
    "server_tls",
    "unregister_encoding",
]
