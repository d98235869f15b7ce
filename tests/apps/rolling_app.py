"""A backend for the rolling-restart test: one unary method that sleeps as long as it is asked to."""

from __future__ import annotations

import asyncio

from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit import App, AppSettings, Cardinality, Handler, Stream

app = App(AppSettings, name="rolling")


class Sleeper:
    """``/rolling.Sleeper/Sleep``: sleeps ``value`` seconds, then echoes it."""

    def __mapping__(self) -> dict[str, Handler]:
        return {"/rolling.Sleeper/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)}

    async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.value:
            await asyncio.sleep(request.value)
        await stream.send_message(request)


@app.service
def sleeper() -> Sleeper:
    return Sleeper()
