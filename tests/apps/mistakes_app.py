"""Newcomers' declaration mistakes, one per value of MISTAKE, for tests/test_startup_mistakes.py.

Unset (or ``good``), the app is correct and injects by a ``NewType`` and by a ``Protocol``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, NewType, Protocol

from google.protobuf.wrappers_pb2 import BytesValue

from app_kit import App, AppSettings, Cardinality, Handler, Stream


class Pool:
    def __init__(self, label: str = "main") -> None:
        self.label = label


class Labelled(Protocol):  # not runtime_checkable: matched only by identity
    label: str


#: A second pool, injected apart from Pool by its own type.
ReplicaPool = NewType("ReplicaPool", Pool)


class Echo:
    def __init__(self, *labels: str) -> None:
        self.labels = labels

    def __mapping__(self) -> dict[str, Handler]:
        return {"/mistakes.Echo/Echo": Handler(self.echo, Cardinality.UNARY_UNARY, BytesValue, BytesValue)}

    async def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(request)


class SyncEcho(Echo):
    def echo(self, stream: Stream[BytesValue, BytesValue]) -> None:  # type: ignore[override]  # the mistake
        pass


class NotAService:
    pass


MISTAKE = os.environ.get("MISTAKE", "good")
app = App(AppSettings, name="mistakes")


def create_app() -> App[AppSettings]:
    return app


if MISTAKE == "good":

    @app.resource
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool()

    @app.resource
    async def replica(pool: Pool) -> AsyncIterator[ReplicaPool]:
        yield ReplicaPool(Pool("replica"))

    @app.resource
    async def labelled(replica: ReplicaPool) -> AsyncIterator[Labelled]:
        yield replica

    @app.service
    def echo(pool: Pool, replica: ReplicaPool, labelled: Labelled) -> Echo:
        return Echo(pool.label, replica.label, labelled.label)

elif MISTAKE == "duplicate":

    @app.resource
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool()

    @app.resource
    async def other_pool(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool()

elif MISTAKE == "duplicate-name":

    @app.resource
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
        yield Pool("replica")

    @app.resource
    async def other_replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
        yield Pool("replica")

elif MISTAKE == "two-names":

    @app.resource
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica", "standby"]]:
        yield Pool("replica")

elif MISTAKE in ("unknown-name", "named-only"):

    @app.resource
    async def replica(settings: AppSettings) -> AsyncIterator[Annotated[Pool, "replica"]]:
        yield Pool("replica")

    if MISTAKE == "unknown-name":

        @app.resource
        async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
            yield Pool()

        @app.service
        def echo(replica: Annotated[Pool, "replcia"]) -> Echo:  # the typo
            return Echo(replica.label)

    else:

        @app.service
        def echo(pool: Pool) -> Echo:  # only a named Pool exists
            return Echo(pool.label)

elif MISTAKE == "unannotated-resource-parameter":

    @app.resource
    async def pool(settings) -> AsyncIterator[Pool]:  # type: ignore[no-untyped-def]
        yield Pool()

elif MISTAKE == "unannotated-service-parameter":

    @app.service
    def echo(pool) -> Echo:  # type: ignore[no-untyped-def]
        return Echo()

elif MISTAKE == "no-return-annotation":

    @app.resource
    async def pool(settings: AppSettings):  # type: ignore[no-untyped-def]
        yield Pool()

elif MISTAKE == "wrong-return-annotation":

    @app.resource  # type: ignore[type-var]
    async def pool(settings: AppSettings) -> Pool:  # type: ignore[misc]
        yield Pool()

elif MISTAKE == "sync-generator":

    @app.resource  # type: ignore[type-var]  # mypy --strict sees this mistake too
    def pool(settings: AppSettings) -> Iterator[Pool]:
        yield Pool()

elif MISTAKE == "iterator-annotation":

    @app.resource  # type: ignore[type-var]
    async def pool(settings: AppSettings) -> Iterator[Pool]:  # type: ignore[misc]
        yield Pool()

elif MISTAKE == "not-a-service":

    @app.service  # type: ignore[type-var]  # mypy --strict sees this mistake too
    def echo(settings: AppSettings) -> NotAService:
        return NotAService()

elif MISTAKE == "sync-handler":

    @app.service
    def echo(settings: AppSettings) -> SyncEcho:
        return SyncEcho()

elif MISTAKE == "protocol-without-provider":

    @app.resource
    async def pool(settings: AppSettings) -> AsyncIterator[Pool]:
        yield Pool()  # structurally Labelled, but Labelled is not runtime_checkable

    @app.service
    def echo(labelled: Labelled) -> Echo:
        return Echo(labelled.label)

else:
    raise RuntimeError(f"unknown MISTAKE {MISTAKE!r}")
