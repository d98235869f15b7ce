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
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..aio import eventloop
from ..aio.server import Server
from ..rpc.handlers import Handler, ServiceLike
from ..services.health import Health, HealthCheck
from .settings import AppSettings, SettingsError, load_settings
from .signals import graceful_exit

if TYPE_CHECKING:
    from ..aio.client import Channel

__all__ = ["App", "DeclarationError", "RunningApp", "StartupError"]

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


class DeclarationError(TypeError):
    """A resource or service is declared wrongly; raised where it is declared (on import).

    The message is one line naming the function and where it is defined, so the CLI can
    print it instead of a traceback.
    """


class _StartupAborted(Exception):
    """A shutdown signal arrived during start-up."""


@dataclass
class _Resource:
    name: str
    factory: Callable[..., contextlib.AbstractAsyncContextManager[Any]]
    provides: Any  # a class or a typing.NewType
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
            context_factory = contextlib.asynccontextmanager(func) if inspect.isasyncgenfunction(func) else func
            for other in self._resources:
                if other.provides is provides:
                    raise DeclarationError(
                        f"resources {other.name} and {func.__name__} both provide {_show(provides)}: "
                        f"each type identifies one resource{_at(target)}"
                    )
            self._resources.append(_Resource(func.__name__, context_factory, provides, hints, health_check))
            return func

        return declare(factory) if factory is not None else declare

    def service(self, factory: Callable[..., Any]) -> Callable[..., Any]:
        """Declare a service: ``factory(**needs)`` returns (or awaits to) a service object."""
        hints = _hints(factory, "service")
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
                kwargs = self._inject(declared.name, declared.needs, values)
                try:
                    service = declared.factory(**kwargs)
                    if inspect.isawaitable(service):
                        service = await service
                except Exception as exc:
                    raise StartupError(f"service {declared.name} failed to build: {_describe(exc)}") from exc
                problem = _service_problem(service)
                if problem is not None:
                    raise StartupError(f"service {declared.name} {problem}")
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
                hint = ""
                if getattr(wanted, "_is_protocol", False) and not getattr(wanted, "_is_runtime_protocol", False):
                    hint = (
                        f" ({_show(wanted)} is a Protocol without @runtime_checkable: only a resource "
                        "declared as it, or as a subclass of it, provides it)"
                    )
                raise StartupError(
                    f"{owner} needs {parameter}: {_show(wanted)}, "
                    f"which is neither the settings nor any resource's type{hint}"
                )
            kwargs[parameter] = provider
        return kwargs


def _find(mapping: dict[type, T], wanted: Any) -> T | None:
    # Identity first (the only match for a NewType), then subclasses.
    try:
        if wanted in mapping:
            return mapping[wanted]
    except TypeError:  # an unhashable annotation provides nothing
        return None
    if isinstance(wanted, type):
        for provided, value in mapping.items():
            if isinstance(provided, type) and _provides(provided, wanted):
                return value
    return None


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
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is not None and args:
        return f"{_show(origin)}[{', '.join(_show(arg) for arg in args)}]"
    name = getattr(annotation, "__qualname__", None) or getattr(annotation, "__name__", None)
    return str(name) if name else repr(annotation)


def _hints(func: Callable[..., Any], role: str) -> dict[str, Any]:
    target = inspect.unwrap(func)
    try:
        hints = typing.get_type_hints(target)
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


_ASYNC_ITERATORS = ("AsyncIterator", "AsyncGenerator", "AsyncIterable")
_SYNC_ITERATORS = ("Iterator", "Generator", "Iterable", "AbstractContextManager", "ContextManager")


def _is_key(value: Any) -> bool:
    """Resources are identified by a class or a ``typing.NewType`` (its own key, apart from its class)."""
    return isinstance(value, type | typing.NewType)


def _yielded_type(func: Callable[..., Any], annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    kind = getattr(origin, "__name__", "")
    if (kind in _ASYNC_ITERATORS or origin is contextlib.AbstractAsyncContextManager) and args and _is_key(args[0]):
        return args[0]
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
