"""What the adapter needs of the event loop it runs on.

The adapter's calls and connections use a small part of asyncio's loop: ``time``,
``call_soon``, ``call_later``, ``call_at``, ``create_future`` and ``create_task``. On asyncio
(and uvloop) the running loop *is* the :class:`Runtime`, at no cost. On trio,
:class:`~app_kit.aio.trio_runtime.TrioRuntime` provides the same on trio's own primitives
(that module, and trio, are imported only when trio runs).

:func:`current_runtime` picks one; the functions below do what differs between the two.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

__all__ = [
    "Runtime",
    "current_runtime",
    "deadline_scope",
    "expire_scope",
    "getaddrinfo",
    "is_cancellation",
    "running_on_trio",
    "sleep",
    "wait_done",
    "wait_shielded",
]


class Runtime(Protocol):
    """The part of an asyncio event loop app_kit's adapter uses (an asyncio loop is one)."""

    def time(self) -> float:
        """The loop's clock, in seconds."""

    def call_soon(self, callback: Callable[..., object], *args: Any) -> Any:
        """Run ``callback(*args)`` once the current tasks have yielded."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Any:
        """Run ``callback(*args)`` in ``delay`` seconds; the handle's ``cancel()`` stops it."""

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Any:
        """Run ``callback(*args)`` at ``when`` on :meth:`time`'s clock."""

    def create_future(self) -> Any:
        """A future to await and to complete."""

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` as a task; a future of its result, with ``cancel()``."""


def running_on_trio() -> bool:
    """Whether the caller runs under trio (never imports trio itself)."""
    trio_module = sys.modules.get("trio")
    if trio_module is None:
        return False
    try:
        trio_module.lowlevel.current_task()  # (trio.lowlevel.in_trio_run is newer than 0.29)
    except RuntimeError:
        return False
    return True


def current_runtime() -> Runtime:
    """The running asyncio loop, or on trio the run's shared :class:`TrioRuntime`."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        if running_on_trio():
            from .trio_runtime import TrioRuntime

            return TrioRuntime.shared()
        raise RuntimeError("app_kit needs a running asyncio event loop, or trio") from None


def deadline_scope(runtime: Runtime, delay: float | None) -> Any:
    """``async with`` it: the block is cancelled after ``delay`` seconds and TimeoutError
    raised; ``.expired()`` says whether that happened. :func:`asyncio.timeout` on asyncio."""
    if isinstance(runtime, asyncio.AbstractEventLoop):
        return asyncio.timeout(delay)
    return runtime.timeout(delay)  # type: ignore[attr-defined]


def expire_scope(scope: Any) -> None:
    """End a :func:`deadline_scope` now: its block is cancelled and raises TimeoutError, as
    when its time is up."""
    if isinstance(scope, asyncio.Timeout):
        if not scope.expired():  # (expiring already: rescheduling it is an error)
            scope.reschedule(-math.inf)
    else:
        scope.expire()


async def wait_shielded(future: Any) -> Any:
    """Await ``future`` without cancelling it if the waiter is cancelled (on trio a future is
    never cancelled by its waiters; on asyncio :func:`asyncio.shield`)."""
    if isinstance(future, asyncio.Future):
        return await asyncio.shield(future)
    return await future


async def wait_done(future: Any) -> None:
    """Wait until ``future`` is done, whatever its outcome (:func:`asyncio.wait` of one)."""
    if isinstance(future, asyncio.Future):
        await asyncio.wait([future])
    else:
        await future.done_waiter()


async def sleep(delay: float) -> None:
    """Sleep on whichever loop runs."""
    if running_on_trio():
        import trio

        await trio.sleep(delay)
    else:
        await asyncio.sleep(delay)


async def getaddrinfo(host: str, port: int, *, type: int = 0) -> list[Any]:
    """The running loop's (non-blocking) getaddrinfo."""
    if running_on_trio():
        import trio

        return await trio.socket.getaddrinfo(host, port, type=type)
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=type)


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the running loop's cancellation (asyncio's or trio's)."""
    if isinstance(exc, asyncio.CancelledError):
        return True
    trio_module = sys.modules.get("trio")
    return trio_module is not None and isinstance(exc, trio_module.Cancelled)
