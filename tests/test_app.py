"""The App in-process: typed injection, ordering, failures, health integration, RunningApp."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any, NewType, Protocol, runtime_checkable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field

from app_kit import App, AppSettings, DeclarationError, Handler, SettingsError, StartupError
from app_kit.app.settings import load_settings
from examples.cafe.app import CafeSettings
from examples.cafe.app import app as cafe_app
from examples.cafe.cafe_grpc import CoffeeMachineStub
from examples.cafe.cafe_pb2 import LatteOrder
from examples.cafe.store import OrderStore

from .services import EchoService

pytestmark = pytest.mark.anyio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Settings(AppSettings):
    label: str = Field("x", validation_alias="TEST_LABEL")


class Pool:
    def __init__(self, label: str) -> None:
        self.label = label
        self.healthy = True


class Repository:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool


def settings(**values: object) -> Settings:
    return Settings(port=0, grace_period=1, **values)  # type: ignore[arg-type]


def make_app(events: list[str]) -> App[Settings]:
    app = App(Settings)

    @app.resource
    @contextlib.asynccontextmanager
    async def repository(pool: Pool) -> AsyncIterator[Repository]:
        events.append("enter repository")
        try:
            yield Repository(pool)
        finally:
            events.append("exit repository")

    @app.resource(health_check=lambda pool: _healthy(pool))
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:  # the base class matches Settings
        events.append("enter pool")
        try:
            yield Pool(settings.label)  # type: ignore[attr-defined]
        finally:
            events.append("exit pool")

    @app.service
    async def echo(repository: Repository, settings: Settings) -> EchoService:
        events.append(f"service {repository.pool.label}")
        return EchoService()

    return app


async def _healthy(pool: Pool) -> bool:
    return pool.healthy


async def test_resources_are_injected_by_type_in_dependency_order() -> None:
    events: list[str] = []
    app = make_app(events)
    async with app.serve(settings(label="blue")) as running:
        assert events == ["enter pool", "enter repository", "service blue"]
        assert running.resource(Repository).pool is running.resource(Pool)
        async with running.channel() as channel:
            from google.protobuf.wrappers_pb2 import BytesValue

            from app_kit.aio.client import method_for
            from app_kit.rpc.handlers import Cardinality

            unary = method_for(channel, "/test.Echo/Unary", Cardinality.UNARY_UNARY, BytesValue, BytesValue)
            assert (await unary(BytesValue(value=b"in-process"))).value == b"in-process"
    assert events[-2:] == ["exit repository", "exit pool"]


async def test_health_follows_lifecycle_and_resource_checks() -> None:
    events: list[str] = []
    async with make_app(events).serve(settings(health_check_ttl=0.1)) as running:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "test.Echo"):
                assert (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status == SERVING
            running.resource(Pool).healthy = False
            await asyncio.sleep(0.15)  # the check's result is reused for its TTL
            assert (await stub.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            running.resource(Pool).healthy = True
            running.health.enter_graceful_shutdown()
            assert (await stub.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING


async def test_startup_failure_unwinds_what_was_entered() -> None:
    events: list[str] = []
    app = make_app(events)

    @app.resource
    async def broken(repository: Repository) -> AsyncIterator[int]:
        raise OSError("disk on fire")
        yield 0

    with pytest.raises(StartupError, match="resource broken failed to start: OSError: disk on fire"):
        async with app.serve(settings()):
            pass
    assert events == ["enter pool", "enter repository", "exit repository", "exit pool"]


async def test_stop_during_startup_aborts_and_unwinds() -> None:
    events: list[str] = []
    app = make_app(events)
    stop = asyncio.Event()

    @app.resource
    async def slow(pool: Pool) -> AsyncIterator[float]:
        stop.set()  # a signal arrives while this resource starts
        try:
            yield 1.0
        finally:
            events.append("exit slow")

    from app_kit.app.lifecycle import _StartupAborted

    with pytest.raises(_StartupAborted):
        async with app.serve(settings(), stop=stop):
            pytest.fail("must not start")
    assert events == ["enter pool", "enter repository", "exit slow", "exit repository", "exit pool"]
    assert not any(e.startswith("service") for e in events)


async def test_declaration_and_wiring_errors() -> None:
    app = App(Settings)
    with pytest.raises(DeclarationError, match="unannotated has no return annotation; annotate it with what it yields"):

        @app.resource
        async def unannotated(settings: Settings):  # type: ignore[no-untyped-def]
            yield 1

    with pytest.raises(DeclarationError, match=r"service untyped: annotate thing with the type to inject .*test_app"):

        @app.service
        def untyped(thing) -> None:  # type: ignore[no-untyped-def]
            pass

    assert issubclass(DeclarationError, TypeError)  # what these raised before they had their own type

    missing = App(Settings)

    @missing.service
    def needs_pool(pool: Pool) -> EchoService:
        return EchoService()

    with pytest.raises(StartupError, match="needs pool: Pool"):
        async with missing.serve(settings()):
            pass

    cyclic = App(Settings)

    @cyclic.resource
    async def first(second: Repository) -> AsyncIterator[Pool]:
        yield Pool("a")

    @cyclic.resource
    async def second(first: Pool) -> AsyncIterator[Repository]:
        yield Repository(first)

    with pytest.raises(StartupError, match="cycle"):
        async with cyclic.serve(settings()):
            pass


async def test_reflection_can_be_turned_off() -> None:
    async with make_app([]).serve(settings(reflection=False)) as running:
        assert not any("reflection" in path for path in running.server.mapping)
    async with make_app([]).serve(settings()) as running:
        assert "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" in running.server.mapping
        assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in running.server.mapping


async def test_cafe_app_in_process_with_its_database(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = str(tmp_path / "orders.sqlite3")
    async with cafe_app.serve(CafeSettings(port=0, db_path=db, brew_step=0)) as running:
        async with running.channel() as channel:
            stub = CoffeeMachineStub(channel)
            first = await stub.MakeLatte(LatteOrder(milk_ml=200, shots=2))
            second = await stub.MakeLatte(LatteOrder(milk_ml=200, shots=3))
            assert (first.order_id, second.order_id) == (1, 2)
        assert await running.resource(OrderStore).count() == 2
    store = OrderStore(db)  # the orders outlive the process
    await store.open()
    assert await store.count() == 2
    await store.close()


async def test_more_declaration_mistakes() -> None:
    app = App(Settings)

    @app.resource
    async def pool(settings: Settings) -> AsyncIterator[Pool]:
        yield Pool("a")

    with pytest.raises(DeclarationError, match="resources pool and other both provide Pool"):

        @app.resource
        async def other(settings: Settings) -> AsyncIterator[Pool]:
            yield Pool("b")

    with pytest.raises(DeclarationError, match=r"-> AsyncIterator\[Repository\]"):

        @app.resource
        async def wrong(pool: Pool) -> Repository:  # type: ignore[misc]
            yield Repository(pool)

    with pytest.raises(DeclarationError, match=r"plain generator, but .*AsyncIterator\[Repository\]"):

        @app.resource
        def sync(pool: Pool) -> Iterator[Repository]:
            yield Repository(pool)

    with pytest.raises(DeclarationError, match=r"plain generator"):

        @app.resource
        @contextlib.contextmanager
        def sync_context(pool: Pool) -> Iterator[Repository]:
            yield Repository(pool)

    with pytest.raises(DeclarationError, match=r"'-> Iterator\[Repository\]', but resources are async"):

        @app.resource
        async def iterator(pool: Pool) -> Iterator[Repository]:  # type: ignore[misc]
            yield Repository(pool)

    with pytest.raises(DeclarationError, match=r"yields dict\[str, int\], which cannot identify it"):

        @app.resource
        async def generic(pool: Pool) -> AsyncIterator[dict[str, int]]:
            yield {}

    assert [r.name for r in app._resources] == ["pool"]  # the mistakes declared nothing


ReplicaPool = NewType("ReplicaPool", Pool)


async def test_a_newtype_is_its_own_key() -> None:
    app = App(Settings)
    got: dict[str, str] = {}

    @app.resource
    async def pool(settings: Settings) -> AsyncIterator[Pool]:
        yield Pool("primary")

    @app.resource  # not a duplicate of Pool: the NewType is a key of its own
    async def replica(settings: Settings) -> AsyncIterator[ReplicaPool]:
        yield ReplicaPool(Pool("replica"))

    @app.service
    def echo(pool: Pool, replica: ReplicaPool) -> EchoService:
        got.update(pool=pool.label, replica=replica.label)
        return EchoService()

    async with app.serve(settings()) as running:
        assert got == {"pool": "primary", "replica": "replica"}
        assert running.resource(ReplicaPool).label == "replica"  # type: ignore[arg-type]


class Labelled(Protocol):
    label: str


class Closeable(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class RuntimeCloseable(Protocol):
    def close(self) -> None: ...


@runtime_checkable
class RuntimeLabelled(Protocol):  # has a data member: issubclass() raises for it
    label: str


class ClosingPool(Pool, Closeable):  # declares Closeable as a base
    def close(self) -> None:
        pass


class StructuralPool(Pool):
    def close(self) -> None:
        pass


async def test_protocols_match_by_identity_declaration_or_runtime_check() -> None:
    def app_for(kind: Any, provided: type, wanted: Any) -> App[Settings]:
        app = App(Settings)

        async def resource(settings: Settings) -> AsyncIterator[Any]:
            yield provided("x")

        resource.__annotations__["return"] = AsyncIterator[kind]
        app.resource(resource)

        def service(thing: Any) -> EchoService:
            return EchoService()

        service.__annotations__["thing"] = wanted
        app.service(service)
        return app

    for kind, provided, wanted in [
        (Labelled, Pool, Labelled),  # the resource is declared as the protocol
        (ClosingPool, ClosingPool, Closeable),  # a declared subclass
        (StructuralPool, StructuralPool, RuntimeCloseable),  # structurally, as the protocol is runtime_checkable
    ]:
        async with app_for(kind, provided, wanted).serve(settings()) as running:
            assert running.services
    for kind, provided, wanted in [
        (StructuralPool, StructuralPool, Closeable),  # structural only, and not runtime_checkable
        (Pool, Pool, RuntimeLabelled),  # issubclass() would raise
    ]:
        with pytest.raises(StartupError, match=f"needs thing: {wanted.__name__}, which is neither"):
            async with app_for(kind, provided, wanted).serve(settings()):
                pass


class SyncHandlers(EchoService):
    def __mapping__(self) -> dict[str, Handler]:
        mapping = super().__mapping__()
        mapping["/test.Echo/Unary"] = mapping["/test.Echo/Unary"]._replace(func=self.sync)
        return mapping

    def sync(self, stream: Any) -> None:
        pass


class AsyncCallable:
    async def __call__(self, stream: Any) -> None:
        pass


def logged(func: Any) -> Any:
    @functools.wraps(func)
    def wrapper(stream: Any) -> Any:
        return func(stream)  # a coroutine, from a plain function

    return wrapper


class WrappedHandlers(EchoService):
    def __mapping__(self) -> dict[str, Handler]:
        mapping = super().__mapping__()
        unary, sleep = mapping["/test.Echo/Unary"], mapping["/test.Echo/Sleep"]
        mapping["/test.Echo/Unary"] = unary._replace(func=AsyncCallable())
        mapping["/test.Echo/Sleep"] = sleep._replace(func=logged(sleep.func))
        return mapping


async def test_services_are_checked_at_startup() -> None:
    def app_returning(service: Any) -> App[Settings]:
        app = App(Settings)

        @app.service
        def echo(settings: Settings) -> Any:
            return service

        return app

    for service, message in [
        (EchoService, "service echo returned the class EchoService, not an instance"),
        (None, "service echo returned NoneType, which is not a service: it has no __mapping__()"),
        (SyncHandlers(), r"service echo handles /test.Echo/Unary with SyncHandlers.sync, which is not async"),
    ]:
        for reflection in (True, False):
            with pytest.raises(StartupError, match=message):
                async with app_returning(service).serve(settings(reflection=reflection)):
                    pass
    async with app_returning(WrappedHandlers()).serve(settings()) as running:
        assert running.services


def test_every_bad_setting_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APP_PORT", "abc")
    monkeypatch.setenv("APP_GRACE_PERIOD", "-1")
    monkeypatch.setenv("APP_TLS_KEY_FILE", "key.pem")
    monkeypatch.setenv("APP_REFLECTION_MAX_REQUESTS_PER_SECOND", "-1")
    with pytest.raises(SettingsError) as info:
        load_settings(AppSettings, compression="brotli", health_check_timeout=0)
    *problems, compression = str(info.value).split("; ")
    # Each named as it was set: a variable by its name, an override (an argument) by its field's.
    assert problems == [
        "invalid settings: APP_PORT: Input should be a valid integer, unable to parse string as an integer",
        "APP_TLS_KEY_FILE: tls_cert_file and tls_key_file go together",
        "APP_GRACE_PERIOD: cannot be negative",
        "APP_REFLECTION_MAX_REQUESTS_PER_SECOND: cannot be negative (0: no limit)",
        "health_check_timeout: must be positive",
    ]
    assert compression.startswith("compression: compression 'brotli' is not a registered encoding (gzip")
    monkeypatch.setenv("APP_PORT", "70000")
    monkeypatch.setenv("APP_TLS_CERT_FILE", "cert.pem")
    monkeypatch.delenv("APP_GRACE_PERIOD")
    monkeypatch.delenv("APP_REFLECTION_MAX_REQUESTS_PER_SECOND")
    with pytest.raises(SettingsError, match=r"^invalid settings: APP_PORT: must be from 0 to 65535$"):
        load_settings(AppSettings)
    monkeypatch.delenv("APP_PORT")
    monkeypatch.delenv("APP_TLS_CERT_FILE")
    monkeypatch.delenv("APP_TLS_KEY_FILE")
    assert load_settings(AppSettings, compression="GZIP").compression == "gzip"  # any case
