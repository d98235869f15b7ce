"""The App: settings, resources, services and the server, entered and left on one AsyncExitStack."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..aio import eventloop
from ..aio.server import Server
from ..rpc.handlers import ServiceLike
from ..services.health import Health, HealthCheck
from .settings import AppSettings, SettingsError, load_settings
from .signals import graceful_exit

if TYPE_CHECKING:
    from ..aio.client import Channel

__all__ = ["App", "RunningApp", "StartupError"]

log = logging.getLogger("app_kit.app")

#: Exit code of a process whose start-up failed (bad settings, a resource, the port, ...).
EXIT_STARTUP_FAILED = 3


def configure_logging(level: str) -> None:
    """One line per record on stderr."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


S = TypeVar("S", bound=AppSettings)
T = TypeVar("T")


class StartupError(Exception):
    """A start-up step failed; everything started before it was shut down again."""


class _StartupAborted(Exception):
    """A shutdown signal arrived during start-up."""


@dataclass
class _Resource:
    name: str
    factory: Callable[..., contextlib.AbstractAsyncContextManager[Any]]
    provides: type
    needs: dict[str, type]
    health_check: Callable[[Any], typing.Awaitable[bool]] | None


@dataclass
class _ServiceFactory:
    name: str
    factory: Callable[..., Any]
    needs: dict[str, type]


@dataclass
class RunningApp(Generic[S]):
    """What a started App is made of: for tests, embedding and the CLI."""

    settings: S
    server: Server
    health: Health
    #: Entered resources, by the type they provide.
    resources: dict[type, Any] = field(default_factory=dict)
    services: list[ServiceLike] = field(default_factory=list)

    def resource(self, kind: type[T]) -> T:
        """The entered resource that provides ``kind``."""
        return typing.cast(T, self.resources[kind])

    @property
    def address(self) -> str:
        """Where the server listens: ``host:port``, or ``unix:path``."""
        if self.settings.path is not None:
            return f"unix:{self.settings.path}"
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def channel(self, **options: Any) -> Channel:
        """A client Channel to this app's server."""
        from ..aio.client import Channel

        if self.settings.path is not None:
            return Channel(path=self.settings.path, **options)
        host, port = self.server.sockets[0].getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return Channel(host, port, **options)


class App(Generic[S]):
    """A gRPC service's whole life: settings → resources → services → server, and back.

    Resources are ``asynccontextmanager`` factories (or async generator functions); services
    are functions returning a service object. Both receive what they need by parameter
    type: the settings (``AppSettings`` or your subclass) or any resource, identified by the
    type its factory yields (``-> AsyncIterator[OrderStore]``). Resources are entered in
    dependency order and exited in reverse; a failed start-up exits exactly what was entered.
    """

    def __init__(self, settings: type[S] = AppSettings, *, name: str = "app") -> None:  # type: ignore[assignment]
        self.settings_type = settings
        self.name = name
        self._resources: list[_Resource] = []
        self._services: list[_ServiceFactory] = []

    # -- declaration -----------------------------------------------------------------

    def resource(
        self,
        factory: Callable[..., Any] | None = None,
        *,
        health_check: Callable[[Any], typing.Awaitable[bool]] | None = None,
    ) -> Any:
        """Declare a resource (usable as ``@app.resource`` or ``@app.resource(health_check=...)``).

        ``health_check(resource)`` feeds the health status: while it fails (False, raises or
        times out), the server and every service report NOT_SERVING.
        """

        def declare(func: Callable[..., Any]) -> Callable[..., Any]:
            hints = _hints(func)
            provides = _yielded_type(func, hints.pop("return", None))
            context_factory = contextlib.asynccontextmanager(func) if inspect.isasyncgenfunction(func) else func
            if any(r.provides is provides for r in self._resources):
                raise TypeError(f"two resources provide {provides.__name__}")
            self._resources.append(_Resource(func.__name__, context_factory, provides, hints, health_check))
            return func

        return declare(factory) if factory is not None else declare

    def service(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        """Declare a service: ``factory(**needs)`` returns (or awaits to) a service object."""
        hints = _hints(factory)
        hints.pop("return", None)
        self._services.append(_ServiceFactory(factory.__name__, factory, hints))
        return factory

    # -- running ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(
        self, settings: S | None = None, *, stop: asyncio.Event | None = None
    ) -> AsyncIterator[RunningApp[S]]:
        """Start everything, yield the running app, then drain and unwind (no signal handling).

        If ``stop`` is set during start-up, start-up stops where it is and unwinds.
        Start-up failures raise :class:`StartupError` after unwinding.
        """
        settings = settings if settings is not None else load_settings(self.settings_type)
        stop = stop if stop is not None else asyncio.Event()

        def check_stop() -> None:
            if stop.is_set():
                raise _StartupAborted

        async with contextlib.AsyncExitStack() as stack:
            values: dict[type, Any] = {type(settings): settings}
            health = Health()
            checks: list[HealthCheck] = []
            for resource in self._ordered_resources():
                check_stop()
                kwargs = self._inject(resource.name, resource.needs, values)
                log.debug("entering resource %s", resource.name)
                try:
                    value = await stack.enter_async_context(_GuardedTeardown(resource.factory(**kwargs), resource.name))
                except Exception as exc:
                    raise StartupError(f"resource {resource.name} failed to start: {_describe(exc)}") from exc
                values[resource.provides] = value
                if resource.health_check is not None:
                    checks.append(_bind_check(resource.health_check, value))
            services: list[ServiceLike] = []
            for declared in self._services:
                check_stop()
                try:
                    service = declared.factory(**self._inject(declared.name, declared.needs, values))
                    if inspect.isawaitable(service):
                        service = await service
                except Exception as exc:
                    raise StartupError(f"service {declared.name} failed to build: {_describe(exc)}") from exc
                services.append(service)
            extra: list[ServiceLike] = [health]
            if settings.reflection:
                from ..services.reflection import Reflection

                extra.extend(
                    Reflection.for_services(
                        [*services, health],
                        max_requests_per_second=settings.reflection_max_requests_per_second or None,
                        max_response_bytes_per_second=settings.reflection_max_response_bytes_per_second or None,
                    )
                )
            try:
                server = Server([*services, *extra], config=settings.server_config(), compression=settings.compression)
            except (TypeError, ValueError) as exc:
                raise StartupError(f"cannot serve the services: {exc}") from exc
            names = sorted({path.split("/")[1] for path in server.mapping})
            for name in ["", *names]:
                health.set_status(name, False)
            if checks:
                # One check for the server and every service: it runs once per TTL for all of them.
                health.add_check(
                    ["", *names], _all_of(checks), ttl=settings.health_check_ttl, timeout=settings.health_check_timeout
                )
            check_stop()
            try:
                if settings.path is not None:
                    await server.start(path=settings.path, ssl=settings.ssl_context())
                else:
                    await server.start(settings.host, settings.port, ssl=settings.ssl_context())
            except Exception as exc:
                raise StartupError(f"cannot listen: {_describe(exc)}") from exc
            stack.push_async_callback(self._drain, server, health, settings)
            for name in ["", *names]:
                health.set_status(name, True)
            running = RunningApp(settings, server, health, values, services)
            log.info("%s serving %s on %s", self.name, ", ".join(names) or "no services", running.address)
            yield running
            log.info("%s shutting down", self.name)

    async def _drain(self, server: Server, health: Health, settings: AppSettings) -> None:
        health.enter_graceful_shutdown()
        if settings.drain_delay:
            log.info("NOT_SERVING; still serving for the drain delay of %ss", settings.drain_delay)
            await asyncio.sleep(settings.drain_delay)
        health.close()
        server.close(grace=settings.grace_period)
        await server.wait_closed()
        log.info("server drained")

    async def run(self, settings: S | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully.

        A second signal exits at once with ``128 + signum``; start-up failures raise
        :class:`StartupError`.
        """
        settings = settings if settings is not None else load_settings(self.settings_type)
        stop = asyncio.Event()
        with graceful_exit([_StopTrigger(stop)]):
            try:
                async with self.serve(settings, stop=stop):
                    await stop.wait()
            except _StartupAborted:
                log.info("shutdown requested during start-up; everything started was stopped")

    def run_sync(
        self,
        settings: S | None = None,
        *,
        env_file: str | None = None,
        overrides: dict[str, Any] | None = None,
        log_level: str | None = None,
    ) -> int:
        """:meth:`run` in a new event loop; return the process exit code (0, or 3 on failure).

        Without ``settings``, they are read from the environment (and ``env_file``), with
        ``overrides`` winning; logging is set up at ``log_level`` (default: the settings').
        """
        try:
            if settings is None:
                settings = load_settings(self.settings_type, env_file=env_file, **(overrides or {}))
        except SettingsError as exc:
            print(f"app_kit: {exc}", file=sys.stderr)
            return EXIT_STARTUP_FAILED
        level = log_level or settings.log_level
        configure_logging(level)
        try:
            eventloop.run(self.run(settings))
        except StartupError as exc:
            # One clear line; the traceback of the cause only when debugging.
            logging.getLogger("app_kit").error("start-up failed: %s", exc, exc_info=exc if level == "DEBUG" else None)
            return EXIT_STARTUP_FAILED
        return 0

    # -- helpers ---------------------------------------------------------------------

    def _ordered_resources(self) -> list[_Resource]:
        by_type = {resource.provides: resource for resource in self._resources}
        ordered: list[_Resource] = []
        state: dict[str, int] = {}  # 1: visiting, 2: done

        def visit(resource: _Resource, path: tuple[str, ...]) -> None:
            if state.get(resource.name) == 2:
                return
            if state.get(resource.name) == 1:
                raise StartupError(f"resources depend on each other in a cycle: {' -> '.join((*path, resource.name))}")
            state[resource.name] = 1
            for needed in resource.needs.values():
                dependency = _find(by_type, needed)
                if dependency is not None:
                    visit(dependency, (*path, resource.name))
            state[resource.name] = 2
            ordered.append(resource)

        for resource in self._resources:
            visit(resource, ())
        return ordered

    def _inject(self, owner: str, needs: dict[str, type], values: dict[type, Any]) -> dict[str, Any]:
        kwargs = {}
        for parameter, wanted in needs.items():
            provider = _find(values, wanted)
            if provider is None:
                raise StartupError(
                    f"{owner} needs {parameter}: {getattr(wanted, '__name__', wanted)}, "
                    "which is neither the settings nor any resource's type"
                )
            kwargs[parameter] = provider
        return kwargs


def _find(mapping: dict[type, T], wanted: type) -> T | None:
    if wanted in mapping:
        return mapping[wanted]
    if isinstance(wanted, type):
        for provided, value in mapping.items():
            if isinstance(provided, type) and issubclass(provided, wanted):
                return value
    return None


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    target = inspect.unwrap(func)
    try:
        hints = typing.get_type_hints(target)
    except Exception as exc:
        raise TypeError(f"cannot resolve the annotations of {func.__name__}: {exc}") from exc
    parameters = inspect.signature(target).parameters
    missing = [name for name in parameters if name not in hints]
    if missing:
        raise TypeError(f"{func.__name__}: annotate {', '.join(missing)} so the App can inject them by type")
    return hints


def _yielded_type(func: Callable[..., Any], annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (AsyncIterator, typing.AsyncIterator, typing.AsyncGenerator) or (
        origin is not None and getattr(origin, "__name__", "") in ("AsyncIterator", "AsyncGenerator")
    ):
        if args and isinstance(args[0], type):
            return args[0]
    if origin is contextlib.AbstractAsyncContextManager and args and isinstance(args[0], type):
        return args[0]
    raise TypeError(f"resource {func.__name__} must be annotated with what it yields, e.g. '-> AsyncIterator[Pool]'")


class _GuardedTeardown(contextlib.AbstractAsyncContextManager[Any]):
    """Enters a resource; if leaving it raises, logs that and lets the other teardowns run."""

    def __init__(self, context: contextlib.AbstractAsyncContextManager[Any], name: str) -> None:
        self._context = context
        self._name = name

    async def __aenter__(self) -> Any:
        return await self._context.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        try:
            return await self._context.__aexit__(exc_type, exc, tb)
        except Exception:
            log.exception("resource %s failed to shut down", self._name)
            return False
        finally:
            log.debug("left resource %s", self._name)


class _StopTrigger:
    def __init__(self, event: asyncio.Event) -> None:
        self._event = event

    def close(self) -> None:
        self._event.set()


def _bind_check(check: Callable[[Any], typing.Awaitable[bool]], value: Any) -> HealthCheck:
    async def bound() -> bool:
        return await check(value)

    return bound


def _all_of(checks: Sequence[HealthCheck]) -> HealthCheck:
    async def combined() -> bool:
        results = await asyncio.gather(*(check() for check in checks))
        return all(results)

    return combined


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
