"""The App: settings, resources, services and the server, entered and left on one AsyncExitStack."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import socket
import ssl
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, Generic, Protocol, TypeVar, overload

import anyio
from anyio.abc import TaskGroup

from ..aio import eventloop
from ..aio.server import Server, ServerInterceptor
from ..rpc.handlers import Handler, ServiceLike
from ..services.health import Health, HealthCheck
from . import heartbeat
from .logs import configure_logging, report_early
from .settings import AppSettings, SettingsError, listen_address, load_settings, unknown_variables
from .signals import SignalShutdown

if TYPE_CHECKING:
    from ..aio.client import Channel

__all__ = ["App", "DeclarationError", "RunningApp", "StartupAborted", "StartupError", "StopEvent"]

log = logging.getLogger("app_kit.app")

#: Exit code of a process whose start-up failed (bad settings, a resource, the port, ...).
EXIT_STARTUP_FAILED = 3

S = TypeVar("S", bound=AppSettings)
T = TypeVar("T")
#: What ``@app.resource`` accepts and gives back unchanged: a factory of an async iterator
#: (an async generator function) or of an async context manager.
ResourceFactory = TypeVar(
    "ResourceFactory",
    bound=Callable[..., AsyncIterator[Any] | contextlib.AbstractAsyncContextManager[Any]],
)
#: What ``@app.service`` accepts and gives back unchanged: a function returning a service or awaiting to one.
ServiceFactory = TypeVar("ServiceFactory", bound=Callable[..., ServiceLike | Awaitable[ServiceLike]])
InterceptorFactory = TypeVar(
    "InterceptorFactory", bound=Callable[..., ServerInterceptor | Awaitable[ServerInterceptor]]
)
#: A resource's health check: called with the resource, True while it is healthy.
ResourceCheck = Callable[[Any], Awaitable[bool]]
#: How a resource is identified: the class (or NewType) it provides, and its name (None: unnamed).
_Key = tuple[Any, str | None]


class StartupError(Exception):
    """A start-up step failed; everything started before it was shut down again."""


class DeclarationError(TypeError):
    """A resource or service is declared wrongly; raised where it is declared (on import).

    The message is one line naming the function and where it is defined, so the CLI can
    print it instead of a traceback.
    """


class StartupAborted(StartupError):
    """``stop`` was set (a shutdown signal) during start-up; everything started was shut down again.

    A :class:`StartupError`, so that ``except StartupError`` covers every way :meth:`App.serve`
    can end without serving; catch this one first to tell a requested stop from a failure
    (:meth:`App.run` does, and returns normally).
    """


_StartupAborted = StartupAborted  # the former private name, for code that imported it


class StopEvent(Protocol):
    """What :meth:`App.serve` takes as ``stop``: an :class:`anyio.Event`, or an :class:`asyncio.Event`
    on asyncio (anything with these three methods)."""

    def set(self) -> None:
        """Request the stop."""

    def is_set(self) -> bool:
        """Whether the stop was requested."""

    def wait(self) -> Awaitable[object]:
        """Wait until the stop is requested."""


@dataclass
class _Resource:
    name: str
    factory: Callable[..., contextlib.AbstractAsyncContextManager[Any]]
    provides: _Key  # a class or a typing.NewType, and the resource's name
    needs: dict[str, _Key]
    health_check: ResourceCheck | None


@dataclass
class _ServiceFactory:
    name: str
    factory: Callable[..., Any]
    needs: dict[str, _Key]


@dataclass
class RunningApp(Generic[S]):
    """What a started App is made of: for tests, embedding and the CLI."""

    settings: S
    server: Server
    health: Health
    #: Entered resources (and the settings), by the type they provide; a named one by
    #: ``Annotated[type, name]``.
    resources: dict[Any, Any] = field(default_factory=dict)
    services: list[ServiceLike] = field(default_factory=list)
    #: The port of ``/metrics`` (``APP_METRICS_PORT``; 0 there picks one), if served.
    metrics_port: int | None = None

    def resource(self, kind: type[T], name: str | None = None) -> T:
        """The entered resource that provides ``kind`` (under ``name``, for a named one)."""
        return typing.cast(T, self.resources[_public_key((kind, name))])

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
    type its factory yields (``-> AsyncIterator[OrderStore]``). Several resources of one type
    are told apart by name: a factory yielding ``Annotated[Pool, "replica"]`` is injected into
    parameters annotated ``Annotated[Pool, "replica"]``, while plain ``Pool`` is the unnamed one.
    Resources are entered in dependency order and exited in reverse; a failed start-up exits
    exactly what was entered.
    """

    def __init__(self, settings: type[S] = AppSettings, *, name: str = "app") -> None:  # type: ignore[assignment]
        self.settings_type = settings
        self.name = name
        self._resources: list[_Resource] = []
        self._services: list[_ServiceFactory] = []
        self._interceptors: list[_ServiceFactory] = []

    # -- declaration -----------------------------------------------------------------

    @overload
    def resource(self, factory: ResourceFactory, /) -> ResourceFactory: ...

    @overload
    def resource(
        self, factory: None = None, /, *, health_check: ResourceCheck | None = None
    ) -> Callable[[ResourceFactory], ResourceFactory]: ...

    def resource(
        self, factory: ResourceFactory | None = None, /, *, health_check: ResourceCheck | None = None
    ) -> ResourceFactory | Callable[[ResourceFactory], ResourceFactory]:
        """Declare a resource (usable as ``@app.resource`` or ``@app.resource(health_check=...)``).

        The factory is returned unchanged. ``health_check(resource)`` feeds the health status:
        while it fails (False, raises or times out), the server and every service report
        NOT_SERVING.
        """

        def declare(func: ResourceFactory) -> ResourceFactory:
            target = inspect.unwrap(func)
            hints = _hints(func, "resource")
            if inspect.isgeneratorfunction(target):
                yielded = typing.get_args(hints.get("return"))
                raise DeclarationError(
                    f"resource {func.__name__} is a plain generator, but resources are async: write "
                    f"'async def {func.__name__}(...) -> AsyncIterator[{_show(yielded[0]) if yielded else '...'}]'"
                    f"{_at(target)}"
                )
            provides = _yielded_type(func, hints.pop("return", None))
            needs = _needs(func, hints, "resource")
            context_factory: Callable[..., contextlib.AbstractAsyncContextManager[Any]] = (
                contextlib.asynccontextmanager(func) if inspect.isasyncgenfunction(func) else func  # type: ignore[assignment]
            )
            kind, name = provides
            for other in self._resources:
                if other.provides[0] is not kind or other.provides[1] != name:
                    continue
                if name is None:
                    raise DeclarationError(
                        f"resources {other.name} and {func.__name__} both provide {_show(kind)}: each type "
                        f"identifies one resource; to have several, name them: "
                        f"'-> AsyncIterator[Annotated[{_show(kind)}, \"replica\"]]'{_at(target)}"
                    )
                raise DeclarationError(
                    f"resources {other.name} and {func.__name__} both provide {_show(kind)} named "
                    f'"{name}": a name identifies one resource of a type{_at(target)}'
                )
            self._resources.append(_Resource(func.__name__, context_factory, provides, needs, health_check))
            return func

        return declare(factory) if factory is not None else declare

    def service(self, factory: ServiceFactory) -> ServiceFactory:
        """Declare a service: ``factory(**needs)`` returns (or awaits to) a service object.

        The factory is returned unchanged.
        """
        hints = _hints(factory, "service")
        hints.pop("return", None)
        self._services.append(_ServiceFactory(factory.__name__, factory, _needs(factory, hints, "service")))
        return factory

    def interceptor(self, factory: InterceptorFactory) -> InterceptorFactory:
        """Declare a server interceptor: ``factory(**needs)`` returns (or awaits to) a
        :class:`~app_kit.ServerInterceptor`, its parameters injected as a service's are.

        Interceptors run in the order declared, the first outermost, inside the access log
        and metrics the settings turn on. The factory is returned unchanged.
        """
        hints = _hints(factory, "interceptor")
        hints.pop("return", None)
        self._interceptors.append(_ServiceFactory(factory.__name__, factory, _needs(factory, hints, "interceptor")))
        return factory

    # -- running ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, settings: S | None = None, *, stop: StopEvent | None = None) -> AsyncIterator[RunningApp[S]]:
        """Start everything, yield the running app, then drain and unwind (no signal handling).

        If ``stop`` (an :class:`anyio.Event`, or an :class:`asyncio.Event` on asyncio) is set
        during start-up, start-up stops where it is (a resource or service still starting is
        cancelled), unwinds and raises :class:`StartupAborted`. Start-up failures raise
        :class:`StartupError` after unwinding.
        """
        settings = settings if settings is not None else load_settings(self.settings_type)
        startup = _Startup(stop if stop is not None else anyio.Event())
        async with _task_group() as group:
            group.start_soon(startup.watch)
            async with self._started(settings, startup) as running:
                yield running

    @contextlib.asynccontextmanager
    async def _started(self, settings: S, startup: _Startup) -> AsyncIterator[RunningApp[S]]:
        """:meth:`serve` inside the task group in which ``startup`` watches for the stop."""
        aborted = True  # until start-up is over: see the end
        tls = _tls_context(settings)  # before any resource too: a wrong file path starts none
        async with contextlib.AsyncExitStack() as stack:
            bound, reuse_port = _bind_early(stack, settings)  # before any resource: a port in use starts none
            values: dict[_Key, Any] = {(type(settings), None): settings}
            health = Health()
            checks: list[HealthCheck] = []
            for resource in self._start_order(type(settings)):
                startup.check()
                kwargs = self._inject(f"resource {resource.name}", resource.needs, values)
                log.debug("entering resource %s", resource.name)
                # The resource is entered, and left, inside a scope the stop cancels while it starts:
                # on the exit stack, so that the scopes a resource itself enters (a task group it
                # keeps) stay nested inside it.
                scope = stack.enter_context(startup.step())
                guard = stack.enter_context(anyio.CancelScope())
                try:
                    value = await stack.enter_async_context(_GuardedTeardown(resource.factory(**kwargs), resource.name))
                except Exception as exc:
                    if scope.cancel_called:  # it turned the stop's cancellation into an error of its own
                        raise StartupAborted("shutdown requested during start-up") from exc
                    raise StartupError(f"resource {resource.name} failed to start: {_describe(exc)}") from exc
                finally:
                    startup.step_done()
                if scope.cancel_called:  # it swallowed the stop's cancellation and started
                    guard.shield = True  # its teardown is not cut short by that cancellation
                    raise StartupAborted("shutdown requested during start-up")
                values[resource.provides] = value
                if resource.health_check is not None:
                    checks.append(_bind_check(resource.health_check, value))
            services: list[ServiceLike] = []
            for declared in self._services:
                startup.check()
                service = await self._build("service", declared, values, startup)
                problem = _service_problem(service)
                if problem is not None:
                    raise StartupError(f"service {declared.name} {problem}")
                services.append(service)
            registry = _metrics_registry(settings)
            interceptors = await self._build_interceptors(settings, values, startup, registry)
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
                server = Server(
                    [*services, *extra],
                    config=settings.server_config(),
                    compression=settings.compression,
                    interceptors=interceptors,
                )
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
            startup.check()
            # Closes the server if start-up fails from here on (the metrics endpoint, or start
            # itself half done); once it serves, _drain closes it first and this does nothing.
            stack.push_async_callback(_close_unless_drained, server)
            try:
                if len(bound) == 1:
                    await server.start(sock=bound[0], ssl=tls)
                elif bound:
                    # A host name with several addresses: Server.start takes one ready socket, so
                    # they are bound again, on the port found free before the resources started.
                    port = bound[0].getsockname()[1]
                    for sock in bound:
                        sock.close()
                    await server.start(settings.host, port, ssl=tls, reuse_port=reuse_port or None)
                else:
                    await server.start(path=settings.path, ssl=tls)
            except Exception as exc:
                raise StartupError(f"cannot listen on {listen_address(settings)}: {_describe(exc)}") from exc
            metrics_port = None
            if registry is not None:
                metrics_port = await self._serve_metrics(stack, settings, server, registry)
            # Pushed after the metrics endpoint: it is scraped until the drain is over.
            stack.push_async_callback(self._drain, server, health, settings)
            for name in ["", *names]:
                health.set_status(name, True)
            running = RunningApp(
                settings, server, health, {_public_key(k): v for k, v in values.items()}, services, metrics_port
            )
            startup.done()
            aborted = False
            log.info(
                "%s serving %s on %s (%s)",
                self.name,
                ", ".join(names) or "no services",
                running.address,
                eventloop.current_loop(),
            )
            yield running
            log.info("%s shutting down", self.name)
        if aborted:
            # The stop cancelled a resource while it started, and that resource's scope (on the
            # stack) caught the cancellation: the stack has unwound without an error to raise.
            raise StartupAborted("shutdown requested during start-up")

    async def _build(self, role: str, declared: _ServiceFactory, values: dict[_Key, Any], startup: _Startup) -> Any:
        """Call a service's or interceptor's factory with what it needs (awaiting it if async)."""
        kwargs = self._inject(f"{role} {declared.name}", declared.needs, values)
        with startup.step() as scope:
            try:
                built = declared.factory(**kwargs)
                if inspect.isawaitable(built):
                    built = await built
            except Exception as exc:
                if scope.cancel_called:  # the factory turned the stop's cancellation into its own error
                    raise StartupAborted("shutdown requested during start-up") from exc
                raise StartupError(f"{role} {declared.name} failed to build: {_describe(exc)}") from exc
            finally:
                startup.step_done()
        if scope.cancel_called:  # cancelled (the scope caught it), or it swallowed the cancellation
            raise StartupAborted("shutdown requested during start-up")
        return built

    async def _build_interceptors(
        self, settings: AppSettings, values: dict[_Key, Any], startup: _Startup, registry: Any
    ) -> list[ServerInterceptor]:
        """The settings' interceptors (outermost: they see every call's end), then the App's."""
        interceptors: list[ServerInterceptor] = []
        if registry is not None:
            from ..observe.prometheus import ServerMetrics

            interceptors.append(ServerMetrics(registry=registry))
        if settings.access_log:
            from ..observe.access_log import AccessLog

            interceptors.append(AccessLog())
        for declared in self._interceptors:
            startup.check()
            interceptor = await self._build("interceptor", declared, values, startup)
            if not isinstance(interceptor, ServerInterceptor):
                raise StartupError(
                    f"interceptor {declared.name} returned {type(interceptor).__name__}, not a ServerInterceptor"
                )
            interceptors.append(interceptor)
        return interceptors

    async def _serve_metrics(
        self, stack: contextlib.AsyncExitStack, settings: AppSettings, server: Server, registry: Any
    ) -> int:
        """``/metrics`` on ``APP_METRICS_PORT`` (same host as the server), until the stack unwinds:
        the App's own metrics, and whatever the process registered in prometheus_client's
        global ``REGISTRY`` (the app's metrics, its channels', ``process_*``), as a process's
        ``start_http_server`` would serve them."""
        from prometheus_client import REGISTRY

        from ..observe.prometheus import RegistryCollector, ServerStatsCollector, serve_metrics

        registry.register(ServerStatsCollector(server))
        registry.register(RegistryCollector(REGISTRY))
        host = settings.host if settings.path is None else "127.0.0.1"
        try:
            port: int = await stack.enter_async_context(serve_metrics(host, settings.metrics_port or 0, registry))
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on port {settings.metrics_port}: {_describe(exc)}") from exc
        log.info("metrics at http://%s:%d/metrics", host, port)
        return port

    async def _drain(self, server: Server, health: Health, settings: AppSettings) -> None:
        health.enter_graceful_shutdown()
        try:
            if settings.drain_delay:
                log.info("NOT_SERVING; still serving for the drain delay of %ss", settings.drain_delay)
                await anyio.sleep(settings.drain_delay)
            health.close()
            server.close(grace=settings.grace_period)
            await server.wait_closed()
        except anyio.get_cancelled_exc_class():
            # A forced exit (a second signal), in the drain delay or the grace period: what is
            # left of them is cut short, and the handlers still running unwind from their
            # cancellation before the resources they use close (APP_FORCED_EXIT_UNWIND at most).
            health.close()
            server.close(grace=0)
            with anyio.CancelScope(shield=True), anyio.move_on_after(settings.forced_exit_unwind):
                await server.wait_calls_done()
            raise
        log.info("server drained")

    async def run(self, settings: S | None = None) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully.

        A second signal exits at once with ``128 + signum``; start-up failures raise
        :class:`StartupError`.
        """
        settings = settings if settings is not None else load_settings(self.settings_type)
        stop = anyio.Event()
        async with _task_group() as group:
            signals = SignalShutdown(stop.set, group.cancel_scope)
            await group.start(signals.listen)  # before start-up: a signal during it aborts it
            try:
                async with self.serve(settings, stop=stop):
                    group.start_soon(heartbeat.beat)  # (a --workers worker's: serving from now on)
                    await stop.wait()
            except StartupAborted:
                log.info("shutdown requested during start-up; everything started was stopped")
            finally:
                signals.release()  # (a forced exit holds the signals until its teardown is over)
            group.cancel_scope.cancel()  # stop listening
        if signals.forced is not None:
            raise SystemExit(128 + signals.forced)

    def run_sync(
        self,
        settings: S | None = None,
        *,
        env_file: str | None = None,
        overrides: dict[str, Any] | None = None,
        log_level: str | None = None,
        log_config: str | None = None,
    ) -> int:
        """:meth:`run` in a new event loop (the settings' ``loop``); return the process exit code
        (0, or 3 on failure; a second signal N raises ``SystemExit(128 + N)``).

        Without ``settings``, they are read from the environment (and ``env_file``), with
        ``overrides`` winning. Logging is set up as :mod:`app_kit.app.logs` says: a
        configuration already made (or ``log_config``, a dictConfig file) is kept; app_kit's
        loggers get ``log_level`` (default: the settings', when they set one).
        """
        try:
            if settings is None:
                settings = load_settings(self.settings_type, env_file=env_file, **(overrides or {}))
        except SettingsError as exc:
            report_early(f"{exc}")
            return EXIT_STARTUP_FAILED
        level = log_level or (settings.log_level if "log_level" in settings.model_fields_set else None)
        try:
            configure_logging(level, log_format=settings.log_format, config_file=log_config)
        except ValueError as exc:
            report_early(f"{exc}")
            return EXIT_STARTUP_FAILED
        unknown = unknown_variables(type(settings))
        if unknown:  # (said once logging is set up: in the format the user chose)
            log.warning("ignored: no setting is named %s", ", ".join(unknown))
        try:
            eventloop.resolve_loop(settings.loop)
        except (ValueError, eventloop.LoopUnavailable) as exc:
            report_early(f"APP_LOOP / --loop: {exc}")
            return EXIT_STARTUP_FAILED
        try:
            eventloop.run(self.run, settings, loop=settings.loop)
        except StartupError as exc:
            # One clear line; the traceback of the cause only when debugging.
            logging.getLogger("app_kit").error("start-up failed: %s", exc, exc_info=exc if level == "DEBUG" else None)
            return EXIT_STARTUP_FAILED
        return 0

    # -- helpers ---------------------------------------------------------------------

    def _start_order(self, settings_type: type[AppSettings]) -> list[_Resource]:
        """The resources in dependency order, once every need is known to be provided.

        Checked before anything starts, so a missing or misnamed dependency starts nothing.
        """
        by_key = {resource.provides: resource for resource in self._resources}
        provided = {*by_key, (settings_type, None)}
        for owner, needs in [
            *((f"resource {resource.name}", resource.needs) for resource in self._resources),
            *((f"service {service.name}", service.needs) for service in self._services),
        ]:
            for parameter, wanted in needs.items():
                if _match(provided, wanted) is None:
                    raise StartupError(self._unprovided(owner, parameter, wanted))
        ordered: list[_Resource] = []
        state: dict[str, int] = {}  # 1: visiting, 2: done

        def visit(resource: _Resource, path: tuple[str, ...]) -> None:
            if state.get(resource.name) == 2:
                return
            if state.get(resource.name) == 1:
                raise StartupError(f"resources depend on each other in a cycle: {' -> '.join((*path, resource.name))}")
            state[resource.name] = 1
            for needed in resource.needs.values():
                dependency = _match(by_key, needed)
                if dependency is not None:  # else the settings
                    visit(by_key[dependency], (*path, resource.name))
            state[resource.name] = 2
            ordered.append(resource)

        for resource in self._resources:
            visit(resource, ())
        return ordered

    def _inject(self, owner: str, needs: dict[str, _Key], values: dict[_Key, Any]) -> dict[str, Any]:
        kwargs = {}
        for parameter, wanted in needs.items():
            key = _match(values, wanted)
            assert key is not None, "_start_order checked every need and entered its provider first"
            kwargs[parameter] = values[key]
        return kwargs

    def _unprovided(self, owner: str, parameter: str, wanted: _Key) -> str:
        """Why nothing provides ``wanted``, naming what there is of its type."""
        kind, name = wanted
        offered = [  # the resources of that type, whatever their name
            f"{resource.name} ({_show_key(resource.provides)})"
            for resource in self._resources
            if _match({(resource.provides[0], name)}, wanted) is not None
        ]
        if name is None:
            hint = ""
            if getattr(kind, "_is_protocol", False) and not getattr(kind, "_is_runtime_protocol", False):
                hint = (
                    f" ({_show(kind)} is a Protocol without @runtime_checkable: only a resource "
                    "declared as it, or as a subclass of it, provides it)"
                )
            elif offered:
                hint = f"; only named resources provide it: {', '.join(offered)}"
            return (
                f"{owner} needs {parameter}: {_show(kind)}, which is neither the settings nor any resource's type"
                + hint
            )
        there = f"resources of that type: {', '.join(offered)}" if offered else f"no resource provides {_show(kind)}"
        return f'{owner} needs {parameter}: {_show_key(wanted)}, but no resource is named "{name}"; {there}'


def _match(provided: Collection[_Key], wanted: _Key) -> _Key | None:
    """The key among ``provided`` that satisfies ``wanted``: itself, else a subclass under the same name."""
    # Identity first (the only match for a NewType), then subclasses.
    try:
        if wanted in provided:
            return wanted
    except TypeError:  # an unhashable annotation provides nothing
        return None
    kind, name = wanted
    if isinstance(kind, type):
        for key in provided:
            if key[1] == name and isinstance(key[0], type) and _provides(key[0], kind):
                return key
    return None


def _public_key(key: _Key) -> Any:
    """How :attr:`RunningApp.resources` keys a resource: its type, or ``Annotated[type, name]``."""
    kind, name = key
    annotated: Any = Annotated  # subscripted with values, which type checkers reject on the form itself
    return kind if name is None else annotated[kind, name]


def _provides(provided: type, wanted: type) -> bool:
    """``provided`` can stand in for ``wanted``; never raises."""
    if getattr(wanted, "_is_protocol", False) and not getattr(wanted, "_is_runtime_protocol", False):
        # issubclass() raises for such a protocol; only declared (nominal) subclasses match.
        return wanted in provided.__mro__
    try:
        return issubclass(provided, wanted)
    except TypeError:  # e.g. a runtime_checkable protocol with data members
        return False


def _at(func: Any) -> str:
    """`` (file:line)`` where ``func`` is defined, to point at the declaration without a traceback."""
    try:
        code = inspect.unwrap(func).__code__
    except (AttributeError, ValueError):
        return ""
    path = Path(code.co_filename)
    with contextlib.suppress(ValueError):
        path = path.relative_to(Path.cwd())
    return f" ({path}:{code.co_firstlineno})"


def _show(annotation: Any) -> str:
    """An annotation as written in source: ``AsyncIterator[Pool]``, not its module-qualified repr."""
    if annotation is None or annotation is type(None):
        return "None"
    if isinstance(annotation, str):  # Annotated's metadata: a resource's name
        return f'"{annotation}"'
    if typing.get_origin(annotation) is Annotated:  # get_args() would flatten it
        return f"Annotated[{', '.join(_show(arg) for arg in (annotation.__origin__, *annotation.__metadata__))}]"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is not None and args:
        return f"{_show(origin)}[{', '.join(_show(arg) for arg in args)}]"
    name = getattr(annotation, "__qualname__", None) or getattr(annotation, "__name__", None)
    return str(name) if name else repr(annotation)


def _show_key(key: _Key) -> str:
    """A resource's key as its annotation reads: ``Pool``, or ``Annotated[Pool, "replica"]``."""
    kind, name = key
    return _show(kind) if name is None else f'Annotated[{_show(kind)}, "{name}"]'


def _hints(func: Callable[..., Any], role: str) -> dict[str, Any]:
    target = inspect.unwrap(func)
    try:
        hints = typing.get_type_hints(target, include_extras=True)  # keeps Annotated[..., name]
    except Exception as exc:
        raise DeclarationError(
            f"cannot resolve the annotations of {role} {func.__name__}: {_describe(exc)}{_at(target)}"
        ) from exc
    parameters = inspect.signature(target).parameters
    missing = [name for name in parameters if name not in hints]
    if missing:
        raise DeclarationError(
            f"{role} {func.__name__}: annotate {', '.join(missing)} with the type to inject "
            f"(the settings class or a resource's type){_at(target)}"
        )
    return hints


def _needs(func: Callable[..., Any], hints: dict[str, Any], role: str) -> dict[str, _Key]:
    """The parameters' annotations (``return`` popped) as the keys of what they need injected."""
    return {parameter: _key(annotation, func, role) for parameter, annotation in hints.items()}


def _key(annotation: Any, func: Callable[..., Any], role: str) -> _Key:
    """``Annotated[Pool, "replica"]`` → ``(Pool, "replica")``; another annotation → ``(it, None)``.

    The name is the one string among ``Annotated``'s metadata; other metadata is left to others.
    """
    if typing.get_origin(annotation) is not Annotated:
        return annotation, None
    names = [item for item in annotation.__metadata__ if isinstance(item, str)]
    if len(names) > 1 or names == [""]:
        raise DeclarationError(
            f"{role} {func.__name__}: {_show(annotation)} names a resource by one non-empty string, "
            f'e.g. Annotated[{_show(annotation.__origin__)}, "replica"]{_at(func)}'
        )
    return annotation.__origin__, names[0] if names else None


_ASYNC_ITERATORS = ("AsyncIterator", "AsyncGenerator", "AsyncIterable")
_SYNC_ITERATORS = ("Iterator", "Generator", "Iterable", "AbstractContextManager", "ContextManager")


def _is_key(value: Any) -> bool:
    """Resources are identified by a class or a ``typing.NewType`` (its own key, apart from its class)."""
    return isinstance(value, type | typing.NewType)


def _yielded_type(func: Callable[..., Any], annotation: Any) -> _Key:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    kind = getattr(origin, "__name__", "")
    if (kind in _ASYNC_ITERATORS or origin is contextlib.AbstractAsyncContextManager) and args:
        provides = _key(args[0], func, "resource")
        if _is_key(provides[0]):
            return provides
    name, where = func.__name__, _at(func)
    if kind in _ASYNC_ITERATORS and args:
        raise DeclarationError(
            f"resource {name} yields {_show(args[0])}, which cannot identify it: "
            f"resources are identified by a class or a typing.NewType{where}"
        )
    # Suggest what the annotation probably meant: the class it names, or the iterator's item.
    yielded = _show(args[0]) if args else _show(annotation) if _is_key(annotation) else "Pool"
    if kind in _SYNC_ITERATORS:
        raise DeclarationError(
            f"resource {name} is annotated '-> {_show(annotation)}', but resources are async: "
            f"write 'async def {name}(...) -> AsyncIterator[{yielded}]'{where}"
        )
    shown = "has no return annotation" if annotation is None else f"is annotated '-> {_show(annotation)}'"
    raise DeclarationError(
        f"resource {name} {shown}; annotate it with what it yields, e.g. '-> AsyncIterator[{yielded}]'{where}"
    )


def _service_problem(service: Any) -> str | None:
    """Why ``service`` cannot be served, found at start-up rather than on the first call."""
    if isinstance(service, type):
        return f"returned the class {service.__name__}, not an instance: return {service.__name__}(...)"
    if not isinstance(service, ServiceLike):
        return (
            f"returned {type(service).__name__}, which is not a service: it has no __mapping__() "
            "(return an instance of a class derived from a generated ...Base)"
        )
    try:
        mapping = service.__mapping__()
    except Exception as exc:
        return f"has a __mapping__() that fails: {_describe(exc)}"
    for path, handler in mapping.items():
        func = handler.func if isinstance(handler, Handler) else None
        if not _is_async(func):
            name = getattr(func, "__qualname__", repr(func))
            return f"handles {path} with {name}, which is not async: declare it 'async def'{_at(func)}"
    return None


def _is_async(func: Any) -> bool:
    # A decorated coroutine function (functools.wraps) or an object with an async __call__ counts.
    with contextlib.suppress(ValueError):
        if inspect.iscoroutinefunction(inspect.unwrap(func)):
            return True
    return inspect.iscoroutinefunction(func) or (callable(func) and inspect.iscoroutinefunction(type(func).__call__))


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
        except anyio.get_cancelled_exc_class():
            # ``task.cancel(); await task`` re-raises the task's CancelledError here: a teardown
            # failure like any other, unless this scope is itself being cancelled (then it is ours).
            if _being_cancelled():
                raise
            log.exception("resource %s failed to shut down (it raised a cancellation of its own)", self._name)
            return False
        finally:
            log.debug("left resource %s", self._name)


def _being_cancelled() -> bool:
    """Whether the current task is being cancelled: by an enclosing cancel scope (asyncio or
    trio), or on asyncio by a plain ``task.cancel()`` (``asyncio.run`` on Ctrl-C, a timeout)."""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # trio: no asyncio task, and its cancel scopes say it all
        return False
    return task is not None and task.cancelling() > 0


async def _close_unless_drained(server: Server) -> None:
    """Close ``server`` at once (a start-up failure); a no-op once :meth:`App._drain` closed it."""
    server.close(grace=0)
    await server.wait_closed()


class _Startup:
    """Watches ``stop`` while the App starts: setting it cancels the step under way.

    Each step (a resource entering, a service being built) runs in a cancel scope from
    :meth:`step`; :meth:`watch`, a task in the App's task group, cancels the current one once
    ``stop`` is set. Cancel scopes tell the stop's cancellation from any other: an outer one
    goes on as it came.
    """

    def __init__(self, stop: StopEvent) -> None:
        self.stop = stop
        self._step: anyio.CancelScope | None = None
        self._watching = anyio.CancelScope()

    async def watch(self) -> None:
        with self._watching:
            await self.stop.wait()
            if self._step is not None:
                self._step.cancel()

    def check(self) -> None:
        """Raise :class:`StartupAborted` if the stop was requested (between steps)."""
        if self.stop.is_set():
            raise StartupAborted("shutdown requested during start-up")

    def step(self) -> anyio.CancelScope:
        """The scope of the next step: cancelled if the stop comes while it runs."""
        self._step = anyio.CancelScope()
        return self._step

    def step_done(self) -> None:
        self._step = None

    def done(self) -> None:
        """Start-up is over: the stop is the body's business from now on."""
        self._step = None
        self._watching.cancel()


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[TaskGroup]:
    """An anyio task group that lets one error out as itself, not in an ExceptionGroup.

    A task group groups even the one exception of its body; :meth:`App.serve` and
    :meth:`App.run` raise :class:`StartupError` (and the body's own errors) as they are.
    """
    try:
        async with anyio.create_task_group() as group:
            yield group
    except BaseExceptionGroup as errors:
        if len(errors.exceptions) != 1:
            raise
        sole = errors.exceptions[0]
    else:
        return
    # Raised outside the except clause: the group is not chained to it as its context.
    raise sole


def _metrics_registry(settings: AppSettings) -> Any:
    """A registry of this App's own (several Apps in one process must not collide), or None."""
    if settings.metrics_port is None:
        return None
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise StartupError("APP_METRICS_PORT needs prometheus-client: pip install 'app_kit[prometheus]'") from None
    return CollectorRegistry()


def _bind_check(check: Callable[[Any], typing.Awaitable[bool]], value: Any) -> HealthCheck:
    async def bound() -> bool:
        return await check(value)

    return bound


def _all_of(checks: Sequence[HealthCheck]) -> HealthCheck:
    async def combined() -> bool:
        results: list[bool] = []

        async def run_one(check: HealthCheck) -> None:
            results.append(await check())

        # The first check to raise cancels the others; its error is the health log's cause.
        async with _task_group() as group:
            for check in checks:
                group.start_soon(run_one, check)
        return all(results)

    return combined


def _bind_early(stack: contextlib.AsyncExitStack, settings: AppSettings) -> tuple[list[socket.socket], bool]:
    """The TCP sockets the server will listen on, and whether they use SO_REUSEPORT.

    Bound before any resource starts, so that a port in use fails start-up at once; not
    listening until the server starts, so that a client is refused, not queued, until then. A
    ``--workers`` worker gets the supervisor's sockets, or binds with SO_REUSEPORT beside the
    other workers. A Unix socket (``path``) is made when the server starts: none here.
    """
    from .listeners import bind_tcp, worker_listen_options

    inherited, reuse_port = worker_listen_options()
    try:
        if inherited:
            bound = inherited
        elif settings.path is not None:
            return [], False
        else:
            bound = bind_tcp(settings.host, settings.port, reuse_port=reuse_port)
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen_address(settings)}: {_describe(exc)}") from exc
    for sock in bound:
        # Closed by the server once it listens on them, or here if start-up fails before.
        stack.callback(sock.close)
    return bound, reuse_port


def _tls_context(settings: AppSettings) -> ssl.SSLContext | None:
    """The server's TLS context (None without TLS); a file that cannot be used fails start-up,
    naming the setting and the file."""
    try:
        return settings.ssl_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        for name in _TLS_FILES:
            path = getattr(settings, name)
            if path is None:
                continue
            try:
                content = path.read_bytes()
            except OSError as unreadable:
                reason = unreadable.strerror or _describe(unreadable)
                raise StartupError(f"cannot use TLS: {name} {str(path)!r}: {reason}") from exc
            if name != "tls_key_file" and b"-----BEGIN CERTIFICATE-----" not in content:
                raise StartupError(f"cannot use TLS: {name} {str(path)!r} holds no PEM certificate") from exc
            if name == "tls_key_file" and b"ENCRYPTED" in content and settings.tls_key_password is None:
                raise StartupError(
                    f"cannot use TLS: tls_key_file {str(path)!r} is encrypted: set tls_key_password"
                    " (APP_TLS_KEY_PASSWORD)"
                ) from exc
        files = [f"{name} {str(getattr(settings, name))!r}" for name in _TLS_FILES if getattr(settings, name)]
        raise StartupError(f"cannot use TLS: {' and '.join(files)}: {_describe(exc)}") from exc


_TLS_FILES = ("tls_cert_file", "tls_key_file", "tls_client_ca_file")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
