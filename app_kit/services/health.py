"""The standard health service, ``grpc.health.v1.Health``: Check, List and streaming Watch."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from ..aio.stream import Stream
from ..protos.grpc.health.v1.health_grpc import HealthBase
from ..protos.grpc.health.v1.health_pb2 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
    HealthListResponse,
)
from ..rpc.status import GRPCError, Status

__all__ = ["MIN_RECHECK_INTERVAL", "Health", "HealthCheck", "ServingStatus"]

log = logging.getLogger("app_kit.health")

#: ``UNKNOWN``, ``SERVING``, ``NOT_SERVING`` and ``SERVICE_UNKNOWN``.
ServingStatus = HealthCheckResponse.ServingStatus
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN

#: An async check: True while the thing it checks (a database, a downstream service) works.
HealthCheck = Callable[[], Awaitable[bool]]

#: Seconds between two background runs of a watched check, however short its ``ttl`` (0 included).
MIN_RECHECK_INTERVAL = 0.1

#: What a Watch stream has sent before its first message (no status is negative).
_NOTHING_SENT = -1


class _Run:
    """A run of a check in progress, which every caller that needs a fresh result awaits."""

    __slots__ = ("done", "scope")

    def __init__(self) -> None:
        self.done = anyio.Event()
        #: Shielded: a caller going away does not cancel the run; shutdown does.
        self.scope = anyio.CancelScope(shield=True)


@dataclass(eq=False)
class _Check:
    """One check function, shared by every service whose status it decides."""

    func: HealthCheck
    ttl: float
    timeout: float
    services: set[str] = field(default_factory=set)
    result: int = NOT_SERVING
    checked_at: float = float("-inf")
    #: The run in progress, which every caller that needs a fresh result awaits.
    running: _Run | None = None
    #: Re-runs the check every ``ttl`` while one of its services is watched: a task in one of
    #: the Watch streams (:meth:`Health._start_refresher`), stopped by cancelling this scope.
    refresher: anyio.CancelScope | None = None

    def ran(self) -> bool:
        return self.checked_at != float("-inf")

    def stale(self) -> bool:
        return anyio.current_time() - self.checked_at >= self.ttl

    def describe(self) -> str:
        names = sorted(self.services)
        shown = ", ".join(repr(name) for name in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


class _Watchers:
    """The Watch streams of one service: woken together, only when its status changes."""

    __slots__ = ("changed", "count")

    def __init__(self) -> None:
        self.count = 0
        self.changed = anyio.Event()


class Health(HealthBase):
    """Tells clients (Kubernetes probes, load balancers, ``grpc_health_probe``) who can serve.

    The status under ``""`` is the server's as a whole. A service's status is what
    :meth:`set_status` said, or, for a service with a check (:meth:`add_check`), the check's
    result (a check that raises or overruns its ``timeout`` means NOT_SERVING).
    :meth:`enter_graceful_shutdown` makes every status NOT_SERVING for good.

    A check runs at most once per ``ttl`` for the whole server, however many services it
    decides and however many clients ask: Check and List calls reuse a result younger than
    ``ttl`` and share a run in progress; while a service it decides is watched, one task
    re-runs it every ``ttl`` (at least :data:`MIN_RECHECK_INTERVAL` apart).
    Watch streams send the status at once and then only when it changes; an unchanging
    status costs them nothing. A slow watcher may skip intermediate states, never the
    latest one.

    It starts no task of its own, so it runs on asyncio and trio alike and needs no entering:
    a run is a task of the call that started it, shielded so that this caller going away (a
    probe's deadline) does not cancel what the others wait for (that call ends when the run
    does, within the check's ``timeout``); the re-runs are a task of one of the Watch streams,
    and when that stream ends another watcher's takes over.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._checks: dict[str, _Check] = {}
        self._watchers: dict[str, _Watchers] = {}
        self._shutting_down = False
        self._closed = False

    # -- the application's side --------------------------------------------------------

    def set_status(self, service: str, status: int | bool) -> None:
        """Set ``service``'s status (``""``: the whole server); ignored after shutdown began.

        For a service with a check, the check's result is what clients see.
        """
        if self._shutting_down:
            return
        value = (SERVING if status else NOT_SERVING) if isinstance(status, bool) else int(status)
        before = self._effective(service)
        self._statuses[service] = value
        if self._effective(service) != before:
            self._notify(service)

    def add_check(
        self, service: str | Iterable[str], check: HealthCheck, *, ttl: float = 5.0, timeout: float = 2.0
    ) -> None:
        """Derive the status of ``service`` (a name, or several) from ``check``, run at most once per ``ttl``.

        The services share one result: the check runs once per ``ttl`` for all of them. Adding
        the same ``check`` (with the same ``ttl`` and ``timeout``) for another service shares it too.
        """
        names = [service] if isinstance(service, str) else list(service)
        shared = next(
            (c for c in self._checks.values() if c.func is check and c.ttl == ttl and c.timeout == timeout), None
        )
        if shared is None:
            shared = _Check(check, ttl, timeout)
        for name in names:
            before = self._effective(name)
            replaced = self._checks.get(name)
            if replaced is not None and replaced is not shared:
                replaced.services.discard(name)
                self._stop_refresher_if_unwatched(replaced)
            self._checks[name] = shared
            shared.services.add(name)
            self._statuses.setdefault(name, NOT_SERVING)
            # Watchers hear of a check that never ran once it has (the refresher runs it at once).
            if shared.ran() and self._effective(name) != before:
                self._notify(name)
        if self._needs_refresher(shared) and self._is_watched(shared):
            # A refresher is a task of a Watch stream: wake the watchers, one of them starts it.
            self._wake_watchers(shared)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams are told at once."""
        if self._shutting_down:
            return
        before = {service: self._effective(service) for service in self._watchers}
        self._shutting_down = True
        for service in self._statuses:
            self._statuses[service] = NOT_SERVING
        for check in {id(c): c for c in self._checks.values()}.values():
            self._stop_refresher(check)
            if check.running is not None:
                # Its result no longer matters, and its waiters (handlers the server is about
                # to drain) are answered NOT_SERVING at once.
                check.running.scope.cancel()
        for service, status in before.items():
            if self._effective(service) != status:
                self._notify(service)

    def close(self) -> None:
        """End every Watch stream (with status OK), so that the server can drain."""
        self.enter_graceful_shutdown()
        self._closed = True
        for service in list(self._watchers):
            self._notify(service)

    async def status(self, service: str) -> int | None:
        """The current status of ``service``, or None if it is unknown.

        For a service with a check whose result is older than its ``ttl``, the check is run
        first (or the run in progress awaited).
        """
        if service not in self._statuses:
            return None
        check = self._checks.get(service)
        if check is not None and not self._shutting_down and check.stale():
            await self._fresh_result(check)
        return self._effective(service)

    # -- inside ----------------------------------------------------------------------------

    def _effective(self, service: str) -> int | None:
        """What clients are told now, without running anything."""
        if service not in self._statuses:
            return None
        if self._shutting_down:
            return NOT_SERVING
        check = self._checks.get(service)
        return check.result if check is not None else self._statuses[service]

    async def _fresh_result(self, check: _Check) -> int:
        run = check.running
        if run is None:
            run = check.running = _Run()
            # A task of its own, shielded: one caller going away (cancelled by the server, when
            # its client's deadline passes) must not cancel the run others wait for. On asyncio
            # a task's cancel() goes through shields, so the run cannot be this caller's task;
            # this caller leaves when the run ends, within the check's timeout.
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._run_check, check, run)
        else:
            await run.done.wait()
        return check.result

    async def _run_check(self, check: _Check, run: _Run) -> None:
        try:
            with run.scope:  # the scope is entered before the task first yields: no cancel slips in
                result, cause, error = await self._verdict(check)
                self._record(check, result, cause, error)
        finally:
            if check.running is run:
                check.running = None
            run.done.set()

    async def _verdict(self, check: _Check) -> tuple[int, str, BaseException | None]:
        """Run the check once: its result, what to log if it is NOT_SERVING, and the error it
        raised, if any."""
        try:
            with anyio.fail_after(check.timeout):
                healthy = await check.func()
        except TimeoutError:
            return NOT_SERVING, f"its check took longer than {check.timeout}s", None
        except Exception as exc:
            return NOT_SERVING, f"its check raised {type(exc).__name__}: {exc}", exc
        return (SERVING if healthy else NOT_SERVING), "its check returned false", None

    def _record(self, check: _Check, result: int, cause: str, error: BaseException | None) -> None:
        first = not check.ran()
        check.checked_at = anyio.current_time()
        if (result != check.result and not first) or (first and result == NOT_SERVING):
            # What an operator looks for when a probe starts (or stops) failing: which, and why
            # (with the traceback of a check that raised), once per change, not per probe.
            if result == NOT_SERVING:
                log.warning("%s now NOT_SERVING: %s", check.describe(), cause, exc_info=error)
            else:
                log.info("%s SERVING again: its check passed", check.describe())
        elif result == NOT_SERVING:
            log.debug("%s still NOT_SERVING: %s", check.describe(), cause, exc_info=error)
        if result != check.result or first:
            before = {service: self._effective(service) for service in check.services}
            check.result = result
            for service, status in before.items():
                if first or self._effective(service) != status:
                    self._notify(service)

    async def _refresh(self, check: _Check, scope: anyio.CancelScope) -> None:
        """Keep a watched check's result fresh: one run per ``ttl``, whoever watches."""
        interval = max(check.ttl, MIN_RECHECK_INTERVAL)
        try:
            with scope:
                while True:
                    delay = check.checked_at + interval - anyio.current_time()
                    if delay > 0:
                        await anyio.sleep(delay)
                    else:
                        await self._fresh_result(check)
        finally:
            if check.refresher is scope:
                # Not stopped: the Watch stream it ran in ended. Another watcher takes over.
                check.refresher = None
                self._wake_watchers(check)

    def _needs_refresher(self, check: _Check) -> bool:
        return check.refresher is None and not self._shutting_down

    def _start_refresher(self, check: _Check, tasks: TaskGroup) -> None:
        """Start the check's refresher as a task of this Watch stream."""
        check.refresher = anyio.CancelScope()
        tasks.start_soon(self._refresh, check, check.refresher)

    def _stop_refresher(self, check: _Check) -> None:
        if check.refresher is not None:
            check.refresher.cancel()
            check.refresher = None

    def _stop_refresher_if_unwatched(self, check: _Check) -> None:
        if not self._is_watched(check):
            self._stop_refresher(check)

    def _is_watched(self, check: _Check) -> bool:
        return any(service in self._watchers for service in check.services)

    def _notify(self, service: str) -> None:
        # Wake the watchers of this service only; each compares with what it last sent.
        watchers = self._watchers.get(service)
        if watchers is not None:
            watchers.changed.set()
            watchers.changed = anyio.Event()

    def _wake_watchers(self, check: _Check) -> None:
        """Wake the watchers of the check's services, so that one of them starts its refresher."""
        for service in check.services:
            self._notify(service)

    # -- the service ---------------------------------------------------------------------

    async def Check(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        """The status of one service; NOT_FOUND if it is unknown."""
        request = await stream.recv_message()
        assert request is not None
        status = await self.status(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {_shown(request.service)}")
        await stream.send_message(HealthCheckResponse(status=status))  # type: ignore[arg-type]

    async def List(self, stream: Stream[HealthListRequest, HealthListResponse]) -> None:
        """The status of every known service."""
        await stream.recv_message()
        response = HealthListResponse()
        for service in list(self._statuses):
            status = await self.status(service)
            if status is not None:
                response.statuses[service].status = status
        await stream.send_message(response)

    async def Watch(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        """The status now (SERVICE_UNKNOWN if unknown) and after every change, until shutdown."""
        request = await stream.recv_message()
        assert request is not None
        service = request.service
        watchers = self._watchers.get(service)
        if watchers is None:
            watchers = self._watchers[service] = _Watchers()
        watchers.count += 1
        try:
            sent = await self._watch(stream, service, watchers, None, _NOTHING_SENT)
            if sent is not None:
                # This stream is to run its check's refresher: it goes on in a task group that
                # holds it (only such streams pay for one).
                failure: Exception | None = None
                async with anyio.create_task_group() as tasks:
                    try:
                        await self._watch(stream, service, watchers, tasks, sent)
                    except Exception as exc:
                        failure = exc  # raised as it is below, not inside the group's ExceptionGroup
                    tasks.cancel_scope.cancel()
                if failure is not None:
                    raise failure
        finally:
            watchers.count -= 1
            if watchers.count == 0 and self._watchers.get(service) is watchers:
                del self._watchers[service]
                check = self._checks.get(service)
                if check is not None:
                    self._stop_refresher_if_unwatched(check)

    async def _watch(
        self,
        stream: Stream[HealthCheckRequest, HealthCheckResponse],
        service: str,
        watchers: _Watchers,
        tasks: TaskGroup | None,
        sent: int,
    ) -> int | None:
        """Send the service's status, then each change, until the Watch ends (None); without
        ``tasks``, only until this stream is to run its check's refresher (the status sent last)."""
        if sent == _NOTHING_SENT:
            check = self._checks.get(service)
            if check is not None and self._needs_refresher(check):
                if tasks is None:
                    return sent
                self._start_refresher(check, tasks)
            status = await self.status(service)
            sent = SERVICE_UNKNOWN if status is None else status
            await stream.send_message(HealthCheckResponse(status=sent))  # type: ignore[arg-type]
        while True:
            changed = watchers.changed
            check = self._checks.get(service)
            if check is not None and self._needs_refresher(check):
                # A check added since, or whose refresher's stream ended: this stream runs it.
                if tasks is None:
                    return sent
                self._start_refresher(check, tasks)
            status = self._effective(service)
            current = SERVICE_UNKNOWN if status is None else status
            # A check that never ran has no verdict yet: its first run wakes this stream.
            undecided = check is not None and not check.ran() and not self._shutting_down
            if current != sent and not undecided:
                await stream.send_message(HealthCheckResponse(status=current))  # type: ignore[arg-type]
                sent = current
                continue
            if self._closed:
                return None
            await changed.wait()


def _shown(name: str, limit: int = 100) -> str:
    """``name`` quoted and escaped, cut to ``limit`` characters: safe to put in a status message."""
    if len(name) <= limit:
        return ascii(name)
    return f"{name[:limit]!a}... ({len(name)} characters)"
