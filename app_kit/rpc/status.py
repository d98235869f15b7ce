"""gRPC status codes and the exception that carries one to the peer."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metadata import MetadataLike

__all__ = ["GRPCError", "ProtocolError", "Status"]


class Status(enum.IntEnum):
    """The gRPC status codes, with their wire values."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GRPCError(Exception):
    """A call outcome other than OK.

    Raise it from a handler to end the call with ``status``. ``message`` travels as
    ``grpc-message``; ``details`` (a sequence of protobuf messages, such as those of
    ``google.rpc.error_details_pb2``) travel as ``grpc-status-details-bin`` when the server
    has a status-details codec; ``trailing_metadata`` goes out with the status. A client
    raises it with the same four: the trailers' metadata included, the details decoded.
    """

    def __init__(
        self,
        status: Status,
        message: str | None = None,
        details: Sequence[Any] | None = None,
        *,
        trailing_metadata: MetadataLike | None = None,
    ) -> None:
        super().__init__(status, message, details)
        self.status = Status(status)
        self.message = message
        self.details = details
        #: Metadata of the trailers (on a client: what the server sent, lower-case keys).
        self.trailing_metadata = trailing_metadata

    def __str__(self) -> str:
        if self.message:
            return f"{self.status.name}: {self.message}"
        return self.status.name

    def __repr__(self) -> str:
        return f"GRPCError(Status.{self.status.name}, {self.message!r}, {self.details!r})"


class ProtocolError(Exception):
    """A call was used against its contract (sending after the trailers, a second
    message on a unary method, OK without a response, ...): a bug in the caller."""
