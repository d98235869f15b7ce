"""Logging of what peers do wrong: one line each, never a flood of them."""

from __future__ import annotations

import logging
import time

__all__ = ["RateLimitedLogger"]


class RateLimitedLogger:
    """Logs at most ``burst`` lines per ``interval`` seconds, then says how many it dropped.

    A misbehaving peer must not be able to fill the disk or drown real messages.
    """

    __slots__ = ("_burst", "_dropped", "_interval", "_logger", "_sent", "_window_start")

    def __init__(self, logger: logging.Logger, *, burst: int = 20, interval: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._interval = interval
        self._window_start = float("-inf")
        self._sent = 0
        self._dropped = 0

    def log(self, level: int, message: str, *args: object) -> None:
        """Log like :meth:`logging.Logger.log`, unless over the rate."""
        if not self._logger.isEnabledFor(level):
            return
        now = time.monotonic()
        if now - self._window_start >= self._interval:
            if self._dropped:
                self._logger.warning("%d similar messages were suppressed", self._dropped)
            self._window_start, self._sent, self._dropped = now, 0, 0
        if self._sent >= self._burst:
            self._dropped += 1
            return
        self._sent += 1
        self._logger.log(level, message, *args)
