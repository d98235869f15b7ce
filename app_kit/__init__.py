"""app_kit: gRPC services on h2 whose whole life is one AsyncExitStack."""

__version__ = "0.1.0"

from .client import Channel, ClientStream
from .codecs import CodecBase, ProtoCodec, ProtoStatusDetailsCodec, StatusDetailsCodecBase
from .config import Configuration
from .deadline import Deadline
from .handlers import Cardinality, Handler, ServiceLike
from .metadata import Metadata, MetadataLike
from .server import Server
from .status import GRPCError, ProtocolError, Status
from .stream import Peer, Stream

__all__ = [
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
