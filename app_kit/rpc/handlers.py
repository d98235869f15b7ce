"""How services describe their methods to the server: paths, cardinalities, message types."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = ["Cardinality", "Handler", "ServiceLike", "collect_handlers"]


class Cardinality(enum.Enum):
    """Whether each side of a call sends one message or a stream of them."""

    UNARY_UNARY = (False, False)
    UNARY_STREAM = (False, True)
    STREAM_UNARY = (True, False)
    STREAM_STREAM = (True, True)

    #: The client sends a stream of messages.
    client_streaming: bool
    #: The server sends a stream of messages.
    server_streaming: bool

    def __init__(self, client_streaming: bool, server_streaming: bool) -> None:
        # Plain attributes, read per call: a property over ``value`` was two Python calls.
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming


class Handler(NamedTuple):
    """One method of a service: the coroutine function serving it and its types.

    ``func(stream)`` returns None; for a unary-response method it may instead return its
    reply, which is sent as if by ``stream.send_message``.
    """

    func: Callable[[Any], Awaitable[Any]]
    cardinality: Cardinality
    request_type: Any
    reply_type: Any


@runtime_checkable
class ServiceLike(Protocol):
    """Anything the server can serve: generated service bases implement it."""

    def __mapping__(self) -> Mapping[str, Handler]:
        """Map ``/package.Service/Method`` paths to handlers."""
        ...


def collect_handlers(services: Iterable[ServiceLike]) -> dict[str, Handler]:
    """Merge the mappings of several services; a path served twice is an error."""
    mapping: dict[str, Handler] = {}
    for service in services:
        if not isinstance(service, ServiceLike):
            raise TypeError(f"{service!r} is not a service: it has no __mapping__()")
        for path, handler in service.__mapping__().items():
            if path in mapping:
                raise ValueError(f"{path} is served by two services")
            mapping[path] = handler
    return mapping
