"""An app for the worker liveness tests (``--workers`` and ``APP_WORKER_TIMEOUT``).

``/liveness.Pids/Pid`` answers the serving process's pid after ``value`` seconds: awaited when
positive, with the event loop blocked (``time.sleep``) when negative.
LIVENESS_START_DELAY: seconds its resource takes to start.
LIVENESS_STOP: ``hang`` (its resource's close awaits for ever) or ``block`` (it blocks the loop).
LIVENESS_CHILD: a command its resource starts and leaves running (it inherits stdout and stderr).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator

import anyio
from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value
from pydantic import Field

from app_kit import App, AppSettings, Cardinality, Handler, Stream


class LivenessSettings(AppSettings):
    start_delay: float = Field(0.0, validation_alias="LIVENESS_START_DELAY")
    child: str = Field("", validation_alias="LIVENESS_CHILD")
    stop: str = Field("", validation_alias="LIVENESS_STOP")


class Resource:
    pass


app = App(LivenessSettings, name="liveness")


@app.resource
async def resource(settings: LivenessSettings) -> AsyncIterator[Resource]:
    await anyio.sleep(settings.start_delay)
    if settings.child:
        subprocess.Popen(settings.child.split())  # (left running: an orphan once the worker is gone)
    yield Resource()
    if settings.stop == "hang":
        await anyio.sleep_forever()
    elif settings.stop == "block":
        time.sleep(3600)


class Pids:
    def __mapping__(self) -> dict[str, Handler]:
        return {"/liveness.Pids/Pid": Handler(self.pid, Cardinality.UNARY_UNARY, DoubleValue, Int64Value)}

    async def pid(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value > 0:
            await anyio.sleep(request.value)
        elif request.value < 0:
            time.sleep(-request.value)  # the event loop blocked: what the supervisor must notice
        await stream.send_message(Int64Value(value=os.getpid()))


@app.service
def pids(resource: Resource) -> Pids:
    return Pids()
