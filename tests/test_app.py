"""The App in-process: typed injection, ordering, failures, health integration, RunningApp."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import Field

from app_kit import App, AppSettings, StartupError
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
    with pytest.raises(TypeError, match="annotated with what it yields"):

        @app.resource
        async def unannotated(settings: Settings):  # type: ignore[no-untyped-def]
            yield 1

    with pytest.raises(TypeError, match="annotate"):

        @app.service
        def untyped(thing) -> None:  # type: ignore[no-untyped-def]
            pass

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
