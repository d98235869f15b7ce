"""Codecs: how messages and rich error details become bytes and back."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

from .status import Status

__all__ = [
    "CodecBase",
    "ProtoCodec",
    "ProtoStatusDetailsCodec",
    "StatusDetailsCodecBase",
]


class CodecBase(abc.ABC):
    """Turns messages into payload bytes and back.

    Subclass it for a custom serialization; ``content_subtype`` names it in the
    ``content-type`` header (``application/grpc+<subtype>``). Requests with plain
    ``application/grpc`` are accepted by every codec.
    """

    #: The ``+subtype`` of ``application/grpc`` this codec speaks.
    content_subtype: str = ""

    @abc.abstractmethod
    def encode(self, message: Any, message_type: Any) -> bytes:
        """Serialize ``message``, which should be an instance of ``message_type``."""

    @abc.abstractmethod
    def decode(self, data: bytes, message_type: Any) -> Any:
        """Parse ``data`` into an instance of ``message_type``; raise on malformed data."""

    def decoder(self, message_type: Any) -> Callable[[bytes], Any]:
        """:meth:`decode` for ``message_type``, as a one-argument function (a call looks it
        up once, and runs it per message)."""
        decode = self.decode
        return lambda data: decode(data, message_type)

    def encoder(self, message_type: Any) -> Callable[[Any], bytes] | None:
        """A one-argument function serializing messages whose type is exactly
        ``message_type`` (the caller checks that; others go to :meth:`encode`), if the codec
        has one faster than :meth:`encode`; None if not (the default)."""
        return None


class ProtoCodec(CodecBase):
    """The default codec: protocol buffers messages."""

    content_subtype = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        """Serialize a protobuf message, refusing one of the wrong type."""
        if not isinstance(message, message_type):
            raise TypeError(f"{message_type.__name__} expected, got {type(message).__name__}")
        return message.SerializeToString()

    def decode(self, data: bytes, message_type: Any) -> Any:
        """Parse a protobuf message of ``message_type``."""
        return message_type.FromString(data)

    def decoder(self, message_type: Any) -> Callable[[bytes], Any]:
        """``message_type.FromString`` itself: no Python call per message around it."""
        from_string: Callable[[bytes], Any] | None = getattr(message_type, "FromString", None)
        return from_string if from_string is not None else super().decoder(message_type)

    def encoder(self, message_type: Any) -> Callable[[Any], bytes] | None:
        """``message_type.SerializeToString``, unbound: for a message of exactly that type,
        what :meth:`encode` does without its Python call and type check."""
        serialize: Callable[[Any], bytes] | None = getattr(message_type, "SerializeToString", None)
        return serialize


class StatusDetailsCodecBase(abc.ABC):
    """Turns a status with rich details into ``grpc-status-details-bin`` and back."""

    @abc.abstractmethod
    def encode(self, status: Status, message: str | None, details: Sequence[Any]) -> bytes:
        """Serialize the status, its message and its details."""

    @abc.abstractmethod
    def decode(self, status: Status, message: str | None, data: bytes) -> Sequence[Any]:
        """Return the details carried by ``data``."""


class ProtoStatusDetailsCodec(StatusDetailsCodecBase):
    """Details as a ``google.rpc.Status`` whose ``details`` are ``Any``-packed messages.

    Code and message of the ``google.rpc.Status`` always agree with ``grpc-status`` and
    ``grpc-message``, as the gRPC error model requires.
    """

    def encode(self, status: Status, message: str | None, details: Sequence[Any]) -> bytes:
        """Pack ``details`` into a serialized ``google.rpc.Status``."""
        from google.protobuf.any_pb2 import Any as AnyProto
        from google.rpc.status_pb2 import Status as StatusProto

        packed = []
        for detail in details:
            item = AnyProto()
            item.Pack(detail)
            packed.append(item)
        return StatusProto(code=status.value, message=message or "", details=packed).SerializeToString()

    def decode(self, status: Status, message: str | None, data: bytes) -> Sequence[Any]:
        """Unpack details whose types are known to the default protobuf symbol database.

        The standard ``google.rpc`` detail types (``BadRequest``, ``RetryInfo``, ...) are
        always known, without the caller importing their module. Details of other unknown
        types are returned as ``google.protobuf.Any``.
        """
        from google.protobuf import symbol_database
        from google.rpc import error_details_pb2  # noqa: F401 - registers the standard detail types
        from google.rpc.status_pb2 import Status as StatusProto

        database = symbol_database.Default()
        result = []
        for item in StatusProto.FromString(data).details:
            type_name = item.type_url.rpartition("/")[2]
            try:
                message_type = database.GetSymbol(type_name)
            except KeyError:
                result.append(item)
                continue
            detail = message_type()
            item.Unpack(detail)
            result.append(detail)
        return result
