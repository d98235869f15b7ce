"""Two-stage shutdown on signals: the first closes the servers, a second forces the exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Collection, Iterator
from typing import Protocol

import anyio
from anyio.abc import TaskStatus

__all__ = ["Closable", "SignalShutdown", "graceful_exit", "mark_supervised"]

log = logging.getLogger("app_kit.signals")

# Set by mark_supervised(): a repeated signal is the same request, not "exit at once".
_supervised = False


def mark_supervised() -> None:
    """This process runs under a supervisor (a ``--workers`` worker, the ``--reload`` child).

    Its stop signals can come twice for one stop: from outside (systemd's
    ``KillMode=control-group``, a ``kill`` of every pid of a service) and from the supervisor,
    which passes its own on. From now on :class:`SignalShutdown` treats a repeated SIGINT or
    SIGTERM as the same request; the supervisor sends SIGKILL when it wants the exit forced.
    """
    global _supervised
    _supervised = True


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

    Must run in the main thread, with an asyncio loop that supports ``add_signal_handler``
    (on trio there is none: :meth:`App.run <app_kit.App.run>` handles signals on any loop).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("graceful_exit() installs signal handlers: use it in the main thread")
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "graceful_exit() installs its handlers on the running asyncio event loop, and none is "
                "running (on trio: App.run() handles signals itself, or use anyio.open_signal_receiver)"
            ) from None
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


class SignalShutdown:
    """Two-stage shutdown on any anyio loop (asyncio, uvloop, trio), as :func:`graceful_exit` does it.

    :meth:`listen` runs as a task: the first of ``signals`` calls ``stop()`` (a graceful
    shutdown); a second cancels ``cancel`` (what is still running, the drain included, is cut
    short) and is kept in :attr:`forced`: exit then with ``128 + forced``, the exit code a
    shell reports for a process killed by that signal; from then on it holds the signals
    (later ones are logged, and change nothing) until :meth:`release` is called, once the
    exit's teardown is over. Under a supervisor (:func:`mark_supervised`), a second signal
    changes nothing. The handlers that were installed before are restored when it ends.
    """

    def __init__(
        self,
        stop: Callable[[], object],
        cancel: anyio.CancelScope,
        signals: Collection[int] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self._stop = stop
        self._cancel = cancel
        self._signals = tuple(signal.Signals(signum) for signum in signals)
        #: The signal that forced the exit (the second one), if any.
        self.forced: int | None = None
        self._holding: anyio.CancelScope | None = None

    def release(self) -> None:
        """The exit's teardown is over: after a forced exit, stop holding the signals (the
        listener then ends, and the handlers that were there before are put back)."""
        if self._holding is not None:
            self._holding.cancel()

    async def listen(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Handle the signals until cancelled (start it with ``task_group.start``: handlers installed)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("App.run() installs signal handlers: run it in the main thread")
        previous = {signum: signal.getsignal(signum) for signum in self._signals}
        try:
            with anyio.open_signal_receiver(*self._signals) as received:
                task_status.started()
                first = True
                async for signum in received:
                    if first:
                        first = False
                        hint = "" if _supervised else " (send it again to exit at once)"
                        log.info("received %s: shutting down gracefully%s", signum.name, hint)
                        self._stop()
                    elif _supervised:
                        log.info("received %s again: already shutting down", signum.name)
                    else:
                        log.warning("received %s again: exiting now", signum.name)
                        self.forced = signum
                        self._cancel.cancel()
                        # The handlers stay ours while the exit unwinds (see release()): the
                        # default action of a third signal would kill it before its teardown.
                        with anyio.CancelScope(shield=True) as self._holding:
                            async for later in received:
                                log.warning("received %s again: already exiting", later.name)
                        return
        except NotImplementedError:
            raise RuntimeError(
                "this event loop cannot handle signals (no add_signal_handler): run the App with "
                "App.serve() and stop it another way"
            ) from None
        finally:
            # asyncio's loop leaves the default handlers behind; put back what was there.
            for signum, handler in previous.items():
                if handler is not None:
                    signal.signal(signum, handler)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
