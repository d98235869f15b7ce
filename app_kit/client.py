"""The client, where generated stubs import it from: see :mod:`app_kit.aio.client`."""

from .aio.client import (
    Channel,
    ClientStream,
    ReplyStream,
    StreamStreamMethod,
    StreamUnaryMethod,
    UnaryStreamMethod,
    UnaryUnaryMethod,
    method_for,
)

__all__ = [
    "Channel",
    "ClientStream",
    "ReplyStream",
    "StreamStreamMethod",
    "StreamUnaryMethod",
    "UnaryStreamMethod",
    "UnaryUnaryMethod",
    "method_for",
]
