"""Where a server call stands: an explicit state machine with one terminal transition.

A call is OPEN until its response headers go out (REPLYING; a server-streaming call past its
first reply is STREAMING, so the per-message path checks one identity), and it ends exactly
once: ENDED when its status is sent, or CANCELLED when it is reset (by the peer, by the
handler's ``cancel()``, by its deadline or by the connection's end) before that. Both are
terminal: nothing moves a call out of them, and whatever tries gets the error the table says.
"""

from __future__ import annotations

import enum

from .status import GRPCError, ProtocolError, Status

__all__ = ["CallInput", "CallState", "transition"]


class CallState(enum.Enum):
    """The states of a server call (see the module's docstring)."""

    # Members are singletons compared by identity: hash them so too, in C (Enum's own
    # __hash__ is Python code, and every call looks states up a few times).
    __hash__ = object.__hash__

    OPEN = "open"
    REPLYING = "replying"
    STREAMING = "streaming"
    ENDED = "ended"
    CANCELLED = "cancelled"


class CallInput(enum.Enum):
    """What can happen to a server call."""

    __hash__ = object.__hash__  # (as CallState's)

    SEND_HEADERS = "send headers"
    SEND_REPLY = "send a reply"
    STREAM = "stream replies"  # a server-streaming call sent its first reply
    SEND_STATUS = "send the status"
    CANCEL = "cancel"


_S, _I = CallState, CallInput
_TRANSITIONS: dict[tuple[CallState, CallInput], CallState] = {
    (_S.OPEN, _I.SEND_HEADERS): _S.REPLYING,
    (_S.OPEN, _I.SEND_REPLY): _S.REPLYING,  # the headers go out with it
    (_S.REPLYING, _I.SEND_REPLY): _S.REPLYING,  # how many a method allows is counted apart
    (_S.REPLYING, _I.STREAM): _S.STREAMING,
    (_S.STREAMING, _I.SEND_REPLY): _S.STREAMING,
    **{(state, _I.SEND_STATUS): _S.ENDED for state in (_S.OPEN, _S.REPLYING, _S.STREAMING)},
    **{(state, _I.CANCEL): _S.CANCELLED for state in (_S.OPEN, _S.REPLYING, _S.STREAMING, _S.CANCELLED)},
    (_S.ENDED, _I.CANCEL): _S.ENDED,  # a reset after the status changes nothing: the call is over
}
TERMINAL = frozenset({CallState.ENDED, CallState.CANCELLED})


def transition(state: CallState, event: CallInput, reason: str | None = None) -> CallState:
    """The state after ``event``; raise what a handler should see if ``event`` is not allowed.

    ``reason`` says why a CANCELLED call ended (for the error raised on its further use).
    """
    new = _TRANSITIONS.get((state, event))
    if new is not None:
        return new
    if state is CallState.CANCELLED:
        raise GRPCError(Status.CANCELLED, f"the call is over: {reason or 'cancelled'}")
    if state is CallState.ENDED:
        raise ProtocolError(f"cannot {event.value}: the call is over (its status was sent)")
    raise ProtocolError(f"cannot {event.value}: the response headers were sent already")
