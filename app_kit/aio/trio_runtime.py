"""The adapter's :class:`~app_kit.aio.runtime.Runtime` on trio (imported only under trio).

:class:`TrioRuntime` gives what the adapter uses of asyncio's loop — callbacks, timers, futures,
tasks — on trio's primitives, structured: its tasks run in a nursery, so that a connection's
handler tasks cannot outlive the connection that started them. One scheduler task runs the
callbacks and timers; a :class:`TrioFuture` parks the trio tasks that await it; a
:class:`TrioTask` runs a coroutine in the nursery inside a cancel scope of its own, which
``cancel()`` cancels.

The entry points of the tasks it starts are protected from KeyboardInterrupt (trio's
``enable_ki_protection``): Ctrl-C is raised in the run's main task, not inside a connection's
task, where it would end in trio's TrioInternalError.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, TypeVar

import trio

__all__ = ["FutureCancelled", "TrioFuture", "TrioRuntime", "TrioTask"]

log = logging.getLogger("app_kit.runtime")

T = TypeVar("T")


class _Timeout:
    """A deadline for a block of code on trio, shaped like :func:`asyncio.timeout`'s:
    the block is cancelled when it passes, and TimeoutError raised from it."""

    __slots__ = ("_scope",)

    def __init__(self, delay: float | None) -> None:
        self._scope = trio.CancelScope(deadline=trio.current_time() + delay if delay is not None else float("inf"))

    async def __aenter__(self) -> _Timeout:
        self._scope.__enter__()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        self._scope.__exit__(kind, exc, tb)
        if self._scope.cancelled_caught:
            raise TimeoutError
        return None

    def expired(self) -> bool:
        """Whether the deadline passed and cancelled the block."""
        return self._scope.cancelled_caught

    def expire(self) -> None:
        """End the block now, as if its deadline had passed."""
        self._scope.cancel()


class FutureCancelled(Exception):
    """Raised by awaiting a :class:`TrioFuture` that was cancelled (asyncio's
    CancelledError would mean something else to trio code)."""


class _Handle:
    """A callback scheduled on a :class:`TrioRuntime`."""

    __slots__ = ("args", "callback", "cancelled", "timers")

    def __init__(
        self, callback: Callable[..., object], args: tuple[Any, ...], timers: TrioRuntime | None = None
    ) -> None:
        self.callback = callback
        self.args = args
        self.timers = timers  # the runtime whose timer heap holds it (a timer's)
        self.cancelled = False

    def cancel(self) -> None:
        """Do not run it; let go of what it would have called now (a call's deadline timer
        must not keep the finished call alive until the deadline)."""
        if self.cancelled:
            return
        self.cancelled = True
        self.callback, self.args = _ignore, ()
        if self.timers is not None:
            self.timers._timer_cancelled()


def _ignore(*_: Any) -> None:
    pass


_PENDING, _DONE, _CANCELLED = 0, 1, 2


class TrioFuture(Generic[T]):
    """asyncio's Future, on trio: awaiting it parks the trio task until it is done."""

    __slots__ = ("_callbacks", "_exception", "_result", "_runtime", "_state", "_waiters")

    def __init__(self, runtime: TrioRuntime) -> None:
        self._runtime = runtime
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._callbacks: list[Callable[[Any], object]] = []
        self._waiters: list[Any] = []

    def done(self) -> bool:
        """Whether it has a result, an exception, or was cancelled."""
        return self._state != _PENDING

    def cancelled(self) -> bool:
        """Whether it was cancelled."""
        return self._state == _CANCELLED

    def result(self) -> T:
        """Its result; raises its exception, or FutureCancelled."""
        if self._state == _CANCELLED:
            raise FutureCancelled
        if self._state == _PENDING:
            raise asyncio.InvalidStateError("the future is not done")
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        """Its exception, if it has one."""
        if self._state == _CANCELLED:
            raise FutureCancelled
        return self._exception

    def set_result(self, result: T, /) -> None:
        """Complete it with ``result``; wake who awaits it."""
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the future is done already")
        self._result = result
        self._finish(_DONE)

    def set_exception(self, exception: BaseException, /) -> None:
        """Complete it with ``exception``; wake who awaits it."""
        if self._state != _PENDING:
            raise asyncio.InvalidStateError("the future is done already")
        self._exception = exception
        self._finish(_DONE)

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel it, unless it is done; awaiting it then raises FutureCancelled."""
        if self._state != _PENDING:
            return False
        self._finish(_CANCELLED)
        return True

    def add_done_callback(self, fn: Callable[[Any], object], /) -> None:
        """Call ``fn(self)`` soon after it is done."""
        if self._state != _PENDING:
            self._runtime.call_soon(fn, self)
        else:
            self._callbacks.append(fn)

    def _finish(self, state: int) -> None:
        self._state = state
        waiters, self._waiters = self._waiters, []
        for task in waiters:
            trio.lowlevel.reschedule(task)
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._runtime.call_soon(fn, self)

    def __await__(self) -> Generator[Any, None, T]:
        if self._state == _PENDING:
            yield from self._park()
        return self.result()

    def done_waiter(self) -> _Done:
        """An awaitable that returns once the future is done, without its outcome."""
        return _Done(self)

    def _park(self) -> Generator[Any, None, None]:
        """Suspend the current trio task until the future is done (or the task cancelled)."""
        task = trio.lowlevel.current_task()
        self._waiters.append(task)

        def abort(_: Any) -> Any:
            self._waiters.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        yield from trio.lowlevel.wait_task_rescheduled(abort).__await__()


class _Done:
    """Awaitable: until a :class:`TrioFuture` is done, without its outcome."""

    __slots__ = ("_future",)

    def __init__(self, future: TrioFuture[Any]) -> None:
        self._future = future

    def __await__(self) -> Generator[Any, None, None]:
        if not self._future.done():
            yield from self._future._park()


class TrioTask(TrioFuture[T]):
    """asyncio's Task, on trio: the coroutine runs in the runtime's nursery, inside its own
    cancel scope, which :meth:`cancel` cancels."""

    __slots__ = ("_cancel_requests", "_coro", "_scope")

    def __init__(self, runtime: TrioRuntime, coro: Coroutine[Any, Any, T]) -> None:
        super().__init__(runtime)
        self._coro = coro
        self._scope = trio.CancelScope()
        self._cancel_requests = 0

    def cancel(self, msg: Any | None = None) -> bool:
        """Cancel its scope: the coroutine sees trio.Cancelled at its next checkpoint."""
        if self._state != _PENDING:
            return False
        self._cancel_requests += 1
        self._scope.cancel()
        return True

    def cancelling(self) -> int:
        """How many times :meth:`cancel` was called (asyncio's meaning)."""
        return self._cancel_requests

    def _finish(self, state: int) -> None:
        # Only ever from _run, in the task itself: its done callbacks run now, not a scheduler
        # turn later (what asyncio's call_soon would cost trio: a handle and a wake-up per call).
        callbacks, self._callbacks = self._callbacks, []
        super()._finish(state)
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("exception in done callback %r", fn)

    @trio.lowlevel.enable_ki_protection
    async def _run(self) -> None:
        try:
            if self._cancel_requests:  # cancelled before it started: it never runs, as on asyncio
                self._coro.close()
                self._finish(_CANCELLED)
                return
            try:
                with self._scope:
                    result = await self._coro
            except Exception as exc:
                if not self._callbacks and not self._waiters:  # nobody will hear of it otherwise
                    log.error("unhandled exception in task %r", self._coro, exc_info=exc)
                self.set_exception(exc)
                return
            except BaseException:
                self._finish(_CANCELLED)  # by an enclosing scope: its Cancelled goes on up
                raise
            if self._scope.cancelled_caught:
                self._finish(_CANCELLED)  # by cancel()
            else:
                self.set_result(result)
        finally:
            self._runtime._task_done()


class TrioRuntime:
    """:class:`Runtime` on trio. Callbacks and timers run in one scheduler task (:meth:`run`);
    tasks run in a nursery: the one given to :meth:`run`, or to the constructor.

    ``TrioRuntime(nursery, scheduler=other)`` starts its tasks in ``nursery`` and leaves its
    callbacks and timers to ``other``'s scheduler (a connection's runtime: its handlers in the
    connection's nursery, no scheduler task of its own).
    """

    def __init__(self, nursery: trio.Nursery | None = None, *, scheduler: TrioRuntime | None = None) -> None:
        self._reschedule = trio.lowlevel.reschedule
        self._ready: collections.deque[_Handle] = collections.deque()
        self._timers: list[tuple[float, int, _Handle]] = []
        self._sequence = itertools.count()
        self._nursery: trio.Nursery | None = nursery
        if scheduler is not None:
            # Bound once: they run per call and per flush.
            self.call_soon = scheduler.call_soon  # type: ignore[method-assign]
            self.call_later = scheduler.call_later  # type: ignore[method-assign]
            self.call_at = scheduler.call_at  # type: ignore[method-assign]
        self._pending: list[TrioTask[Any]] = []
        self._parked: Any = None  # the scheduler's trio task while it sleeps
        self._cancelled_timers = 0
        self._tasks = 0
        self._idle: Any = None  # a trio.Event while someone waits for tasks to finish

    @classmethod
    def shared(cls) -> TrioRuntime:
        """One runtime for this trio run, in a system task (for what no nursery owns: a
        :class:`~app_kit.Server`'s listeners, a :class:`~app_kit.Channel`'s connections)."""
        token = trio.lowlevel.current_trio_token()
        runtime: TrioRuntime | None = _shared.get(token)
        if runtime is None:
            runtime = _shared[token] = cls()
            trio.lowlevel.spawn_system_task(runtime._run_shared, token, name="app_kit runtime")
        return runtime

    @trio.lowlevel.enable_ki_protection
    async def _run_shared(self, token: Any) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self.run(nursery)
        finally:
            _shared.pop(token, None)

    # -- Runtime ---------------------------------------------------------------------

    def time(self) -> float:
        """trio's clock."""
        return trio.current_time()

    def call_soon(self, callback: Callable[..., object], *args: Any) -> _Handle:
        """Run ``callback(*args)`` once the tasks running now have yielded."""
        handle = _Handle(callback, args)
        self._ready.append(handle)
        if self._parked is not None:
            self._wake()
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> _Handle:
        """Run ``callback(*args)`` in ``delay`` seconds."""
        handle = _Handle(callback, args, self)
        heapq.heappush(self._timers, (self.time() + delay, next(self._sequence), handle))
        if self._parked is not None and self._timers[0][2] is handle:
            self._wake()  # earlier than what the scheduler sleeps until
        return handle

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> _Handle:
        """Run ``callback(*args)`` at ``when`` on :meth:`time`'s clock."""
        return self.call_later(when - self.time(), callback, *args)

    def _timer_cancelled(self) -> None:
        # Cancelled timers stay in the heap until they come up; when they are most of it
        # (a deadline per call, most calls ending first), the heap is rebuilt without them.
        self._cancelled_timers += 1
        timers = self._timers
        if self._cancelled_timers > 64 and 2 * self._cancelled_timers > len(timers):
            timers[:] = [entry for entry in timers if not entry[2].cancelled]
            heapq.heapify(timers)
            self._cancelled_timers = 0

    def create_future(self) -> TrioFuture[Any]:
        """A future on this runtime."""
        return TrioFuture(self)

    def timeout(self, delay: float | None) -> _Timeout:
        """What :func:`~app_kit.aio.runtime.deadline_scope` gives on trio."""
        return _Timeout(delay)

    def create_task(self, coro: Coroutine[Any, Any, T]) -> TrioTask[T]:
        """Run ``coro`` in this runtime's nursery."""
        task = TrioTask(self, coro)
        self._tasks += 1
        if self._nursery is not None:
            self._nursery.start_soon(task._run)
        else:
            self._pending.append(task)
        return task

    def _task_done(self) -> None:
        self._tasks -= 1
        if not self._tasks and self._idle is not None:
            self._idle.set()

    # -- running ---------------------------------------------------------------------

    @trio.lowlevel.enable_ki_protection
    async def run(self, nursery: trio.Nursery) -> None:
        """Schedule callbacks and timers, and start tasks in ``nursery``, until cancelled."""
        self._nursery = nursery
        for task in self._pending:
            nursery.start_soon(task._run)
        self._pending.clear()
        ready = self._ready
        timers = self._timers
        while True:
            now = trio.current_time()
            while timers and timers[0][0] <= now:
                handle = heapq.heappop(timers)[2]
                if handle.cancelled:
                    self._cancelled_timers -= 1
                else:
                    ready.append(handle)
            for _ in range(len(ready)):
                handle = ready.popleft()
                if handle.cancelled:
                    continue
                try:
                    handle.callback(*handle.args)
                except Exception:
                    log.exception("exception in callback %r", handle.callback)
            while timers and timers[0][2].cancelled:
                heapq.heappop(timers)
                self._cancelled_timers -= 1
            if ready:
                await trio.lowlevel.checkpoint()
                continue
            if timers:
                with trio.move_on_at(timers[0][0]):
                    await self._sleep()
            else:
                await self._sleep()

    def _wake(self) -> None:
        task, self._parked = self._parked, None
        self._reschedule(task)

    async def _sleep(self) -> None:
        """Park the scheduler until :meth:`_wake` (or the enclosing deadline)."""
        self._parked = trio.lowlevel.current_task()

        def abort(_: Any) -> Any:
            self._parked = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def wait_tasks(self) -> None:
        """Wait until every task it started is done."""
        while self._tasks:
            self._idle = trio.Event()
            await self._idle.wait()
        self._idle = None


_shared: dict[Any, TrioRuntime] = {}
