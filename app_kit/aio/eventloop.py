"""The event loop app_kit runs on: uvloop when it is installed, asyncio's own otherwise, or trio.

``APP_LOOP`` / ``--loop`` choose: ``auto`` (uvloop if installed, else asyncio), ``asyncio``,
``uvloop`` or ``trio``. :func:`run` runs a coroutine function on the chosen one; the App's
lifecycle is written on anyio, so that it is the same on all of them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar, cast

__all__ = ["LOOPS", "LoopName", "LoopUnavailable", "current_loop", "loop_factory", "resolve_loop", "run"]

T = TypeVar("T")

#: What ``loop`` may be: ``auto`` is uvloop when it is installed, else asyncio.
LoopName = Literal["auto", "asyncio", "uvloop", "trio"]
LOOPS: tuple[LoopName, ...] = ("auto", "asyncio", "uvloop", "trio")


class LoopUnavailable(RuntimeError):
    """The loop asked for is not installed (``uvloop`` or ``trio``)."""


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's ``new_event_loop`` if uvloop is installed (``pip install app_kit[uvloop]``)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def resolve_loop(loop: str = "auto") -> Literal["asyncio", "uvloop", "trio"]:
    """The loop ``loop`` stands for (``auto``: uvloop if installed, else asyncio).

    Raises ValueError for an unknown name and :class:`LoopUnavailable` when uvloop or trio is
    asked for by name and is not installed.
    """
    if loop not in LOOPS:
        raise ValueError(f"unknown loop {loop!r}: expected one of {', '.join(LOOPS)}")
    if loop == "auto":
        return "uvloop" if _installed("uvloop") else "asyncio"
    if loop == "uvloop" and not _installed("uvloop"):
        raise LoopUnavailable("the uvloop loop is not installed: pip install 'app_kit[uvloop]'")
    if loop == "trio" and not _installed("trio"):
        raise LoopUnavailable("the trio loop is not installed: pip install 'app_kit[trio]'")
    return cast(Literal["asyncio", "uvloop", "trio"], loop)


def run(main: Callable[..., Awaitable[T]] | Coroutine[Any, Any, T], *args: Any, loop: str = "auto") -> T:
    """Run ``main(*args)`` on ``loop`` (see :func:`resolve_loop`) until it returns; its result.

    ``main`` may also be a coroutine already made (``run(main())``, as :func:`asyncio.run`
    takes it), for code written before ``loop`` existed.
    """
    chosen = resolve_loop(loop)
    if asyncio.iscoroutine(main):
        if args:
            raise TypeError("run(coroutine) takes no further arguments")
        coroutine = main
        main, args = _await, (coroutine,)
    function = cast(Callable[..., Awaitable[T]], main)
    if chosen == "trio":
        # trio.run, not anyio.run: anyio's primitives find trio running all the same, and anyio.run
        # refuses to start in a thread where an asyncio runner merely exists (as under pytest).
        import trio

        return trio.run(function, *args)
    factory = loop_factory() if chosen == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(_await(function(*args)))


def current_loop() -> str:
    """The loop the caller runs on: ``asyncio``, ``uvloop`` or ``trio``."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        return "uvloop" if type(running).__module__.startswith("uvloop") else "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None and trio.lowlevel.in_trio_run():
        return "trio"
    raise RuntimeError("no event loop is running")


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported, or blocked (None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
