"""The parts of interceptors that calls run: which hooks are overridden, and running them.

(The interceptor base classes live beside what they intercept: :mod:`app_kit.aio.server` and
:mod:`app_kit.aio.client`; :mod:`app_kit.aio.interceptors` shows both.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..rpc.connection import StreamState

__all__ = ["CallMeasures", "InterceptorChain", "MessageHook", "Proceed", "default_hook", "run_hooks"]

#: What a server interceptor awaits to run the rest of the chain (and at its end the handler).
Proceed = Callable[[], Awaitable[None]]
#: A message hook: ``(call, message) -> message``.
MessageHook = Callable[[Any, Any], Any]
F = TypeVar("F", bound=Callable[..., Any])


def default_hook(func: F) -> F:
    """Mark a base class's do-nothing hook: a call skips it unless a subclass overrides it."""
    func.__app_kit_default_hook__ = True  # type: ignore[attr-defined]
    return func


def _overrides(interceptor: object, name: str) -> bool:
    return not getattr(getattr(type(interceptor), name), "__app_kit_default_hook__", False)


class InterceptorChain:
    """A server's or channel's interceptors, and the message hooks they really override."""

    __slots__ = ("interceptors", "received", "sent")

    def __init__(self, interceptors: Sequence[Any], *, inward: str) -> None:
        #: Outermost first.
        self.interceptors: tuple[Any, ...] = tuple(interceptors)
        received = [i.on_message_received for i in self.interceptors if _overrides(i, "on_message_received")]
        sent = [i.on_message_sent for i in self.interceptors if _overrides(i, "on_message_sent")]
        # A message passes the interceptors from the outermost in, or from the innermost out:
        # on the server received messages travel inward, on the client sent ones do.
        if inward == "received":
            sent.reverse()
        else:
            received.reverse()
        self.received: tuple[MessageHook, ...] = tuple(received)
        self.sent: tuple[MessageHook, ...] = tuple(sent)

    def __bool__(self) -> bool:
        return bool(self.interceptors)


def run_hooks(hooks: tuple[MessageHook, ...], call: Any, message: Any) -> Any:
    """Pass ``message`` through each hook in turn."""
    for hook in hooks:
        message = hook(call, message)
    return message


class CallMeasures:
    """What a call measured, for interceptors and logs: the same on the server's
    :class:`~app_kit.Stream` and the client's :class:`~app_kit.ClientStream`."""

    __slots__ = ()
    _started_at: float
    _ended_at: float | None
    _messages_received: int
    _messages_sent: int
    _bytes_received: int
    _bytes_sent: int
    _counted_by: StreamState | None  # what counts the messages sent instead, if not None

    @property
    def elapsed(self) -> float:
        """Seconds since the call began (arrived; on the client, its interceptors started it),
        until it ended once it has."""
        end = self._ended_at if self._ended_at is not None else time.perf_counter()
        return end - self._started_at

    @property
    def messages_received(self) -> int:
        """Messages received and handed over so far (requests to the handler, replies to the caller)."""
        return self._messages_received

    @property
    def messages_sent(self) -> int:
        """Messages sent so far."""
        counted = self._counted_by
        return self._messages_sent if counted is None else counted.sent_messages

    @property
    def bytes_received(self) -> int:
        """Encoded (uncompressed) bytes of the messages handed over so far."""
        return self._bytes_received

    @property
    def bytes_sent(self) -> int:
        """Encoded (uncompressed) bytes of the messages sent so far."""
        counted = self._counted_by
        return self._bytes_sent if counted is None else counted.sent_bytes
