"""An app that records its lifecycle to a file, for the process tests.

LIFECYCLE_EVENTS: file to append "enter X" / "exit X" lines to.
LIFECYCLE_FAIL: name of the resource whose start-up raises.
LIFECYCLE_PROBE: when set, its value at import and when the journal starts is journalled
(what the process's environment holds, not the settings: see --env-file).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value
from pydantic import Field

from app_kit import App, AppSettings, Cardinality, Handler, Stream


class LifecycleSettings(AppSettings):
    events_file: str = Field("", validation_alias="LIFECYCLE_EVENTS")
    fail: str = Field("", validation_alias="LIFECYCLE_FAIL")


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, line: str) -> None:
        if self.path:
            with open(self.path, "a") as file:
                file.write(line + "\n")


class Database:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal


class Cache:
    pass


app = App(LifecycleSettings, name="lifecycle")
_PROBE_AT_IMPORT = os.environ.get("LIFECYCLE_PROBE")


@app.resource
async def journal(settings: LifecycleSettings) -> AsyncIterator[Journal]:
    value = Journal(settings.events_file)
    if "LIFECYCLE_PROBE" in os.environ:
        value.write(f"probe at import {_PROBE_AT_IMPORT}, at start {os.environ['LIFECYCLE_PROBE']}")
    value.write("enter journal")
    try:
        yield value
    finally:
        value.write("exit journal")


# Declared before the resource it depends on: the App orders them by dependency.
@app.resource
async def cache(database: Database, settings: LifecycleSettings) -> AsyncIterator[Cache]:
    if settings.fail == "cache":
        raise ConnectionRefusedError("cache server unreachable")
    database.journal.write("enter cache")
    try:
        yield Cache()
    finally:
        database.journal.write("exit cache")
        if settings.fail == "cache-exit":
            raise RuntimeError("cache teardown failed")


@app.resource
async def database(journal: Journal) -> AsyncIterator[Database]:
    journal.write("enter database")
    try:
        yield Database(journal)
    finally:
        await asyncio.sleep(0.01)
        journal.write("exit database")


class Sleeper:
    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/test.Sleeper/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
            "/test.Sleeper/Hold": Handler(self.hold, Cardinality.STREAM_STREAM, BytesValue, Int64Value),
            "/test.Sleeper/Watch": Handler(self.watch, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
        }

    async def watch(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        """Sleep, as Sleep does, and journal the handler's cancellation (with its resources in use)."""
        request = await stream.recv_message()
        assert request is not None
        try:
            await asyncio.sleep(request.value)
        except asyncio.CancelledError:
            self.journal.write("watch cancelled")
            raise
        await stream.send_message(request)

    async def hold(self, stream: Stream[BytesValue, Int64Value]) -> None:
        """Holds each request message for a while, then says how large it was."""
        async for request in stream:
            await asyncio.sleep(0.5)
            await stream.send_message(Int64Value(value=len(request.value)))

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await asyncio.sleep(request.value)
        await stream.send_message(request)


@app.service
def sleeper(journal: Journal, cache: Cache) -> Sleeper:
    return Sleeper(journal)


def create_app() -> App[LifecycleSettings]:
    return app


if os.environ.get("LIFECYCLE_BROKEN_IMPORT"):
    raise ImportError("broken on purpose")
