"""Two-stage shutdown on signals: the first closes the servers, a second forces the exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Collection, Iterator
from typing import Protocol

__all__ = ["Closable", "graceful_exit"]

log = logging.getLogger("app_kit.signals")


class Closable(Protocol):
    """Anything :func:`graceful_exit` can stop: a :class:`~app_kit.Server`, for one."""

    def close(self) -> None:
        """Begin stopping; must be safe to call more than once and before any start."""


@contextlib.contextmanager
def graceful_exit(
    servers: Collection[Closable],
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    signals: Collection[int] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[None]:
    """Handle ``signals`` while the block runs.

    The first signal calls ``close()`` on every server, so that their ``wait_closed()``
    completes once they are drained; a server closed before it started never starts.
    Any later signal raises ``SystemExit(128 + signum)`` in the event loop, the exit code
    a shell reports for a process killed by that signal. The handlers that were installed
    before are restored on exit.

    Must run in the main thread, with a loop that supports ``add_signal_handler``.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("graceful_exit() installs signal handlers: use it in the main thread")
    loop = loop if loop is not None else asyncio.get_running_loop()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            log.info("received %s: shutting down gracefully (send it again to exit at once)", _name(signum))
            for server in servers:
                server.close()
        else:
            log.warning("received %s again: exiting now", _name(signum))
            raise SystemExit(128 + signum)

    previous = {signum: signal.getsignal(signum) for signum in signals}
    installed: list[int] = []
    try:
        for signum in signals:
            try:
                loop.add_signal_handler(signum, on_signal, signum)
            except NotImplementedError:
                raise RuntimeError(
                    "this event loop cannot handle signals (no add_signal_handler): use graceful_exit() "
                    "with a loop that supports it, or stop the servers another way"
                ) from None
            installed.append(signum)
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
            handler = previous[signum]
            if handler is not None:
                signal.signal(signum, handler)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
