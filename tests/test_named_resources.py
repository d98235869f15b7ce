"""Two resources of one type, told apart by ``Annotated[Pool, "name"]``, served over a real socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

import grpc
import pytest
from google.protobuf.wrappers_pb2 import StringValue
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app_kit import App, AppSettings, Cardinality, DeclarationError, Handler, StartupError, Stream

pytestmark = pytest.mark.anyio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Pool:
    def __init__(self, label: str) -> None:
        self.label = label
        self.healthy = True


class ReadOnlyPool(Pool):
    pass


class Reports:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool


class Label:
    """A service whose one method answers the label it was built with."""

    def __init__(self, service: str, label: str) -> None:
        self.service = service
        self.label = label

    def __mapping__(self) -> dict[str, Handler]:
        return {f"/named.{self.service}/Label": Handler(self.answer, Cardinality.UNARY_UNARY, StringValue, StringValue)}

    async def answer(self, stream: Stream[StringValue, StringValue]) -> None:
        await stream.recv_message()
        await stream.send_message(StringValue(value=self.label))


def settings(**values: object) -> AppSettings:
    return AppSettings(port=0, grace_period=1, **values)  # type: ignore[arg-type]


def two_pools(checked: list[str]) -> App[AppSettings]:
    app = App(AppSettings, name="named")

    async def check(pool: Pool) -> bool:
        checked.append(pool.label)
        return pool.healthy

    # Declared before the replica it needs: the order comes from the names, not from declaration.
    @app.resource
    async def reports(replica: Annotated[Pool, "replica"]) -> AsyncIterator[Reports]:
        yield Reports(replica)

    @app.resource(health_check=check)
    async def primary(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool("primary")

    @app.resource(health_check=check)
    async def replica(primary: Pool) -> AsyncIterator[Annotated[Pool, "replica"]]:
        yield Pool(f"replica of {primary.label}")

    @app.service
    def writer(pool: Pool) -> Label:
        return Label("Writer", pool.label)

    @app.service
    def reader(replica: Annotated[Pool, "replica"], reports: Reports) -> Label:
        assert reports.pool is replica
        return Label("Reader", replica.label)

    return app


async def ask(channel: grpc.aio.Channel, service: str) -> str:
    method = channel.unary_unary(f"/named.{service}/Label", StringValue.SerializeToString, StringValue.FromString)
    reply: StringValue = await method(StringValue())
    return reply.value


async def test_each_service_gets_the_pool_it_names() -> None:
    checked: list[str] = []
    async with two_pools(checked).serve(settings(health_check_ttl=0.1)) as running:
        assert running.resource(Pool).label == "primary"
        assert running.resource(Pool, "replica").label == "replica of primary"
        assert running.resource(Reports).pool is running.resource(Pool, "replica")
        async with grpc.aio.insecure_channel(running.address) as channel:
            assert await ask(channel, "Writer") == "primary"
            assert await ask(channel, "Reader") == "replica of primary"
            health = health_pb2_grpc.HealthStub(channel)
            assert (await health.Check(health_pb2.HealthCheckRequest(service="named.Reader"))).status == SERVING
            assert set(checked) == {"primary", "replica of primary"}  # each check got its own pool
            running.resource(Pool, "replica").healthy = False
            await asyncio.sleep(0.15)  # past the TTL of the last result
            assert (await health.Check(health_pb2.HealthCheckRequest(service="named.Reader"))).status == NOT_SERVING


async def test_a_name_matches_subclasses_under_that_name_only() -> None:
    app = App(AppSettings)
    got: dict[str, Pool] = {}

    @app.resource
    async def primary(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool("primary")

    @app.resource  # a subclass under the name: still a Pool named "replica", and not the unnamed Pool
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[ReadOnlyPool, "replica"]]:
        yield ReadOnlyPool("replica")

    @app.service
    def writer(pool: Pool, replica: Annotated[Pool, "replica"], exact: Annotated[ReadOnlyPool, "replica"]) -> Label:
        got.update(pool=pool, replica=replica, exact=exact)
        return Label("Writer", pool.label)

    async with app.serve(settings()) as running:
        assert got["pool"].label == "primary"
        assert got["replica"] is got["exact"] is running.resource(ReadOnlyPool, "replica")


async def test_a_missing_name_starts_nothing_and_names_what_exists() -> None:
    app = App(AppSettings)
    events: list[str] = []

    @app.resource
    async def primary(settings: AppSettings) -> AsyncIterator[Pool]:
        events.append("primary started")
        yield Pool("primary")

    @app.resource
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
        events.append("replica started")
        yield Pool("replica")

    @app.resource
    async def reports(standby: Annotated[Pool, "standby"]) -> AsyncIterator[Reports]:
        yield Reports(standby)

    message = (
        'resource reports needs standby: Annotated[Pool, "standby"], but no resource is named "standby"; '
        'resources of that type: primary (Pool), replica (Annotated[Pool, "replica"])'
    )
    with pytest.raises(StartupError) as info:
        async with app.serve(settings()):
            pytest.fail("must not start")
    assert str(info.value) == message
    assert events == []  # found before any resource started


async def test_names_are_declared_once_per_type() -> None:
    app = App(AppSettings)

    @app.resource
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
        yield Pool("replica")

    @app.resource  # the same name on another type is another resource
    async def reports(settings: AppSettings) -> AsyncIterator[Annotated[Reports, "replica"]]:
        yield Reports(Pool("replica"))

    with pytest.raises(DeclarationError, match='resources replica and again both provide Pool named "replica"'):

        @app.resource
        async def again(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
            yield Pool("replica")

    with pytest.raises(DeclarationError, match=r"resource empty: Annotated\[Pool, \"\"\] names a resource by one"):

        @app.resource
        async def empty(settings: AppSettings) -> AsyncIterator[Annotated[Pool, ""]]:
            yield Pool("")

    with pytest.raises(DeclarationError, match='service two: Annotated\\[Pool, "a", "b"\\] names a resource by one'):

        @app.service
        def two(pool: Annotated[Pool, "a", "b"]) -> Label:
            return Label("Two", pool.label)

    assert [resource.name for resource in app._resources] == ["replica", "reports"]


async def test_annotated_without_a_name_is_the_unnamed_resource() -> None:
    app = App(AppSettings)
    got: list[Pool] = []

    @app.resource  # metadata that is not a string is someone else's (pydantic's, say): no name
    async def primary(settings: AppSettings) -> AsyncIterator[Annotated[Pool, 42]]:
        yield Pool("primary")

    @app.service
    def writer(pool: Pool) -> Label:
        got.append(pool)
        return Label("Writer", pool.label)

    async with app.serve(settings()) as running:
        assert got == [running.resource(Pool)]
