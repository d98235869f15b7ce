"""An app for the workers and reload tests: it says which process answered.

WORKERS_EVENTS: file each process appends "start PID" / "stop PID" lines to (its resource).
WORKERS_FAIL: when set, the resource fails to start (a start-up failure, exit 3).
WORKERS_START_DELAY: seconds the resource takes to start.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value
from pydantic import Field

from app_kit import App, AppSettings, Cardinality, Handler, Stream
from tests.apps.lifecycle_app import Journal


class WorkersSettings(AppSettings):
    events_file: str = Field("", validation_alias="WORKERS_EVENTS")
    fail: bool = Field(False, validation_alias="WORKERS_FAIL")
    start_delay: float = Field(0.0, validation_alias="WORKERS_START_DELAY")


class Events(Journal):
    """Lines appended to the events file (one write each: whole lines from concurrent processes)."""


app = App(WorkersSettings, name="workers")


@app.resource
async def events(settings: WorkersSettings) -> AsyncIterator[Events]:
    await asyncio.sleep(settings.start_delay)
    if settings.fail:
        raise ConnectionRefusedError("database unreachable")
    value = Events(settings.events_file)
    value.write(f"start {os.getpid()}")
    try:
        yield value
    finally:
        value.write(f"stop {os.getpid()}")


class Pids:
    """``/workers.Pids/Pid``: the serving process's pid, after sleeping ``value`` seconds."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/workers.Pids/Pid": Handler(self.pid, Cardinality.UNARY_UNARY, DoubleValue, Int64Value)}

    async def pid(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value:
            await asyncio.sleep(request.value)
        await stream.send_message(Int64Value(value=os.getpid()))


@app.service
def pids(events: Events) -> Pids:
    return Pids()
