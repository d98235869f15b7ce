"""Call deadlines and the ``grpc-timeout`` header that carries them."""

from __future__ import annotations

import math
import time

__all__ = ["Deadline", "encode_grpc_timeout", "parse_grpc_timeout"]

# Seconds per unit of the grpc-timeout header: Hours, Minutes, Seconds, milli, micro, nano.
_UNIT_SECONDS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 1e-3,
    ord("u"): 1e-6,
    ord("n"): 1e-9,
}
_MAX_DIGITS = 8
_MAX_VALUE = 10**_MAX_DIGITS - 1


def parse_grpc_timeout(value: bytes) -> float:
    """Return the seconds a ``grpc-timeout`` value stands for.

    The protocol allows one to eight ASCII digits followed by exactly one unit of
    ``H M S m u n``; anything else raises :class:`ValueError`.
    """
    if not 2 <= len(value) <= _MAX_DIGITS + 1:
        raise ValueError(f"invalid grpc-timeout {value[:12]!r}: 1 to 8 digits and a unit expected")
    unit = _UNIT_SECONDS.get(value[-1])
    digits = value[:-1]
    if unit is None or not digits.isdigit():
        raise ValueError(f"invalid grpc-timeout {value!r}: digits then one of H M S m u n expected")
    # PROTOCOL-HTTP2 says "positive", but grpc-go sends 0n for a deadline already due: it is
    # served as one (DEADLINE_EXCEEDED), not rejected as malformed.
    return int(digits) * unit


def encode_grpc_timeout(seconds: float) -> str:
    """Encode a positive number of seconds as a ``grpc-timeout`` value.

    Picks the finest unit whose value still fits in eight digits, rounding up so that
    the peer never sees a shorter timeout than the caller asked for.
    """
    if seconds <= 0:
        return "1n"
    for unit, per in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0), ("H", 3600.0)):
        value = math.ceil(seconds / per)
        if value <= _MAX_VALUE:
            return f"{value}{unit}"
    return f"{_MAX_VALUE}H"


class Deadline:
    """A point in time (on the monotonic clock) by which a call must be done."""

    __slots__ = ("when",)

    def __init__(self, when: float) -> None:
        #: The deadline on :func:`time.monotonic`'s clock (asyncio's loop clock).
        self.when = when

    @classmethod
    def from_timeout(cls, timeout: float) -> Deadline:
        """A deadline ``timeout`` seconds from now."""
        return cls(time.monotonic() + timeout)

    def time_remaining(self) -> float:
        """Seconds left until the deadline, never negative."""
        return max(0.0, self.when - time.monotonic())

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.monotonic() >= self.when

    def __lt__(self, other: Deadline) -> bool:
        return self.when < other.when

    def __le__(self, other: Deadline) -> bool:
        return self.when <= other.when

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Deadline) and self.when == other.when

    def __hash__(self) -> int:
        return hash(self.when)

    def __repr__(self) -> str:
        return f"<Deadline in {self.when - time.monotonic():.3f}s>"
