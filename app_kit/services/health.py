"""The standard health service, ``grpc.health.v1.Health``: Check, List and streaming Watch."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..aio.stream import Stream
from ..protos.grpc.health.v1.health_grpc import HealthBase
from ..protos.grpc.health.v1.health_pb2 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
    HealthListResponse,
)
from ..rpc.status import GRPCError, Status

__all__ = ["Health", "HealthCheck", "ServingStatus"]

log = logging.getLogger("app_kit.health")

#: ``UNKNOWN``, ``SERVING``, ``NOT_SERVING`` and ``SERVICE_UNKNOWN``.
ServingStatus = HealthCheckResponse.ServingStatus
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN

#: An async check: True while the thing it checks (a database, a downstream service) works.
HealthCheck = Callable[[], Awaitable[bool]]


@dataclass
class _Check:
    func: HealthCheck
    ttl: float
    timeout: float
    result: int = NOT_SERVING
    checked_at: float = float("-inf")
    running: asyncio.Task[int] | None = None


class Health(HealthBase):
    """Tells clients (Kubernetes probes, load balancers, ``grpc_health_probe``) who can serve.

    The status under ``""`` is the server's as a whole. A service's status is what
    :meth:`set_status` said, or, for a service with a check (:meth:`add_check`), the check's
    result, computed at most once per ``ttl`` (a check that raises or overruns its
    ``timeout`` means NOT_SERVING). :meth:`enter_graceful_shutdown` makes every status
    NOT_SERVING for good. Watch streams send the status at once and after every change:
    a slow watcher may skip intermediate states, never the latest one.
    """

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {}
        self._checks: dict[str, _Check] = {}
        self._changed = asyncio.Event()
        self._shutting_down = False
        self._closed = asyncio.Event()

    # -- the application's side --------------------------------------------------------

    def set_status(self, service: str, status: int | bool) -> None:
        """Set ``service``'s status (``""``: the whole server); ignored after shutdown began."""
        if self._shutting_down:
            return
        value = (SERVING if status else NOT_SERVING) if isinstance(status, bool) else int(status)
        if self._statuses.get(service) != value:
            self._statuses[service] = value
            self._notify()

    def add_check(self, service: str, check: HealthCheck, *, ttl: float = 5.0, timeout: float = 2.0) -> None:
        """Derive ``service``'s status from ``check``, run at most once per ``ttl`` seconds."""
        self._checks[service] = _Check(check, ttl, timeout)
        self._statuses.setdefault(service, NOT_SERVING)
        self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING from now on; Watch streams are told at once."""
        if self._shutting_down:
            return
        self._shutting_down = True
        for service in self._statuses:
            self._statuses[service] = NOT_SERVING
        self._notify()

    def close(self) -> None:
        """End every Watch stream (with status OK), so that the server can drain."""
        self.enter_graceful_shutdown()
        self._closed.set()
        self._notify()

    async def status(self, service: str) -> int | None:
        """The current status of ``service``, or None if it is unknown."""
        if service not in self._statuses:
            return None
        if self._shutting_down:
            return NOT_SERVING
        check = self._checks.get(service)
        if check is None:
            return self._statuses[service]
        if time.monotonic() - check.checked_at >= check.ttl:
            if check.running is None:
                check.running = asyncio.ensure_future(self._run_check(service, check))
            # Shielded: one caller going away must not cancel the check others wait for.
            await asyncio.shield(check.running)
        return check.result

    async def _run_check(self, service: str, check: _Check) -> int:
        try:
            async with asyncio.timeout(check.timeout):
                healthy = await check.func()
            result = SERVING if healthy else NOT_SERVING
        except TimeoutError:
            log.warning("health check of %r took longer than %ss", service, check.timeout)
            result = NOT_SERVING
        except Exception:
            log.warning("health check of %r failed", service, exc_info=True)
            result = NOT_SERVING
        finally:
            check.running = None
        check.checked_at = time.monotonic()
        if result != check.result:
            check.result = result
            self._statuses[service] = result
            self._notify()
        return result

    def _notify(self) -> None:
        # Wake every watcher; each compares with what it last sent.
        self._changed.set()
        self._changed = asyncio.Event()

    # -- the service ---------------------------------------------------------------------

    async def Check(self, stream: Stream[HealthCheckRequest, HealthCheckResponse]) -> None:
        """The status of one service; NOT_FOUND if it is unknown."""
        request = await stream.recv_message()
        assert request is not None
        status = await self.status(request.service)
        if status is None:
            raise GRPCError(Status.NOT_FOUND, f"unknown service {request.service!r}")
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
        sent: int | None = None
        while True:
            changed = self._changed
            status = await self.status(service)
            current = SERVICE_UNKNOWN if status is None else status
            if current != sent:
                await stream.send_message(HealthCheckResponse(status=current))  # type: ignore[arg-type]
                sent = current
            if self._closed.is_set():
                return
            check = self._checks.get(service)
            try:
                # A service with a check is re-checked when its result goes stale.
                async with asyncio.timeout(check.ttl if check is not None and not self._shutting_down else None):
                    await changed.wait()
            except TimeoutError:
                pass
