"""The server call state machine: its table, and that a call ends exactly once."""

from __future__ import annotations

import itertools

import pytest

from app_kit import GRPCError, ProtocolError, Status
from app_kit.rpc.call_state import TERMINAL, CallInput, CallState, transition


def _after(state: CallState, event: CallInput) -> CallState | BaseException:
    try:
        return transition(state, event, "reset by peer")
    except (GRPCError, ProtocolError) as exc:
        return exc


def test_terminal_states_are_never_left() -> None:
    for state, event in itertools.product(TERMINAL, CallInput):
        after = _after(state, event)
        assert isinstance(after, BaseException) or after is state, (state, event, after)


def test_every_path_ends_once() -> None:
    # Any sequence of inputs from OPEN: once terminal, always that same terminal state, and
    # a status or a cancel from any live state is always accepted.
    for length in range(1, 6):
        for events in itertools.product(CallInput, repeat=length):
            state, ended = CallState.OPEN, None
            for event in events:
                after = _after(state, event)
                if state not in TERMINAL and event in (CallInput.SEND_STATUS, CallInput.CANCEL):
                    assert after in TERMINAL
                if isinstance(after, CallState):
                    state = after
                if ended is not None:
                    assert state is ended
                elif state in TERMINAL:
                    ended = state


@pytest.mark.parametrize(
    ("state", "event", "error"),
    [
        (CallState.CANCELLED, CallInput.SEND_REPLY, "CANCELLED: the call is over: reset by peer"),
        (CallState.ENDED, CallInput.SEND_REPLY, "cannot send a reply: the call is over"),
        (CallState.ENDED, CallInput.SEND_STATUS, "cannot send the status: the call is over"),
        (CallState.REPLYING, CallInput.SEND_HEADERS, "the response headers were sent already"),
        (CallState.STREAMING, CallInput.SEND_HEADERS, "the response headers were sent already"),
    ],
)
def test_what_a_handler_is_told(state: CallState, event: CallInput, error: str) -> None:
    after = _after(state, event)
    assert isinstance(after, BaseException) and error in str(after)
    if state is CallState.CANCELLED:
        assert isinstance(after, GRPCError) and after.status is Status.CANCELLED
