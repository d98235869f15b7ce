"""app_kit: gRPC services on h2 whose whole life is one AsyncExitStack."""

__version__ = "0.1.0"

from .codecs import CodecBase, ProtoCodec, ProtoStatusDetailsCodec, StatusDetailsCodecBase
from .config import Configuration
from .deadline import Deadline
from .handlers import Cardinality, Handler, ServiceLike
from .health import Health
from .lifecycle import App, RunningApp, StartupError
from .metadata import Metadata, MetadataLike
from .server import Server
from .settings import AppSettings, SettingsError
from .signals import graceful_exit
from .status import GRPCError, ProtocolError, Status
from .stream import Peer, Stream

# The client is loaded on first use: a server process never pays for importing it.
_LAZY = {"Channel": "client", "ClientStream": "client"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "App",
    "AppSettings",
    "Health",
    "RunningApp",
    "SettingsError",
    "StartupError",
    "graceful_exit",
    "Cardinality",
    "Channel",
    "ClientStream",
    "CodecBase",
    "Configuration",
    "Deadline",
    "GRPCError",
    "Handler",
    "Metadata",
    "MetadataLike",
    "Peer",
    "ProtoCodec",
    "ProtoStatusDetailsCodec",
    "ProtocolError",
    "Server",
    "ServiceLike",
    "Status",
    "StatusDetailsCodecBase",
    "Stream",
]
