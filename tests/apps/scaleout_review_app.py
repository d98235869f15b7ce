"""An app for tests/test_scaleout_review.py: a handler that sleeps, one that fails, one that logs.

SCALEOUT_EVENTS: file each process appends "start PID" / "stop PID" lines to (its resource).
SCALEOUT_USER_LOG: a dictConfig the module applies at import, as a user's module does:
``stdout`` (a handler on sys.stdout, uvicorn's default for its access log).
SCALEOUT_IMPORT_DELAY: seconds the module takes to import (a large app's imports).
SCALEOUT_DEFAULT_PORT: the settings subclass's default ``port`` (a user's own default).
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import time
from collections.abc import AsyncIterator

from google.protobuf.wrappers_pb2 import DoubleValue, Int64Value, StringValue
from pydantic import Field

from app_kit import App, AppSettings, Cardinality, Handler, Stream
from tests.apps.lifecycle_app import Journal

if os.environ.get("SCALEOUT_USER_LOG") == "stdout":
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
            "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stdout"}},
            "root": {"handlers": ["out"], "level": "INFO"},
        }
    )

log = logging.getLogger("scaleout")
time.sleep(float(os.environ.get("SCALEOUT_IMPORT_DELAY", "0")))


class ScaleoutSettings(AppSettings):
    port: int = int(os.environ.get("SCALEOUT_DEFAULT_PORT", "50051"))
    events_file: str = Field("", validation_alias="SCALEOUT_EVENTS")


app = App(ScaleoutSettings, name="scaleout")


@app.resource
async def journal(settings: ScaleoutSettings) -> AsyncIterator[Journal]:
    value = Journal(settings.events_file)
    value.write(f"start {os.getpid()}")
    try:
        yield value
    finally:
        value.write(f"stop {os.getpid()}")


class Probe:
    """``/scaleout.Probe/Sleep`` answers its pid after ``value`` seconds; ``Fail`` raises;
    ``Log`` logs its request at WARNING on the ``scaleout`` logger."""

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/scaleout.Probe/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, Int64Value),
            "/scaleout.Probe/Fail": Handler(self.fail, Cardinality.UNARY_UNARY, StringValue, StringValue),
            "/scaleout.Probe/Log": Handler(self.log, Cardinality.UNARY_UNARY, StringValue, StringValue),
        }

    async def sleep(self, stream: Stream[DoubleValue, Int64Value]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value:
            await asyncio.sleep(request.value)
        await stream.send_message(Int64Value(value=os.getpid()))

    async def fail(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        raise RuntimeError(f"secret internals: {request.value}")

    async def log(self, stream: Stream[StringValue, StringValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        log.warning("user says %s", request.value)
        await stream.send_message(StringValue(value=request.value))


@app.service
def probe(journal: Journal) -> Probe:
    return Probe()
