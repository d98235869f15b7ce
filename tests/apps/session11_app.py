"""An app for tests/test_session11_review.py: runs on asyncio and trio (its handlers use anyio).

S11_EVENTS: file to append lines to: "enter X" / "exit X" for the resources, "unwound" once a
cancelled handler has finished its (shielded, 0.3 s) clean-up, "end STATUS" for each call's
on_call_end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
from google.protobuf.wrappers_pb2 import DoubleValue
from pydantic import Field

from app_kit import App, AppSettings, Cardinality, Handler, ServerInterceptor, Stream


class S11Settings(AppSettings):
    events_file: str = Field("", validation_alias="S11_EVENTS")


class Journal:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, line: str) -> None:
        if self.path:
            with open(self.path, "a") as file:
                file.write(line + "\n")


class Cache:
    """What a handler uses: it must outlive the handlers that use it."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal


app = App(S11Settings, name="session11")


@app.resource
async def journal(settings: S11Settings) -> AsyncIterator[Journal]:
    value = Journal(settings.events_file)
    value.write("enter journal")
    try:
        yield value
    finally:
        value.write("exit journal")


@app.resource
async def cache(journal: Journal) -> AsyncIterator[Cache]:
    journal.write("enter cache")
    try:
        yield Cache(journal)
    finally:
        journal.write("exit cache")


class Slow:
    def __init__(self, cache: Cache) -> None:
        self.cache = cache

    def __mapping__(self) -> dict[str, Handler]:
        return {"/s11.Slow/Wait": Handler(self.wait, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)}

    async def wait(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
        """Sleep for the request's seconds; cancelled, clean up with the cache (0.3 s) first."""
        request = await stream.recv_message()
        assert request is not None
        self.cache.journal.write("waiting")
        try:
            await anyio.sleep(request.value)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.3)  # a rollback, say, with the cache still open
            self.cache.journal.write("unwound")
            raise
        await stream.send_message(request)


class Ends(ServerInterceptor):
    """Journals each call's status as on_call_end sees it (what access logs and metrics record)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    def on_call_end(self, call: Stream[object, object]) -> None:
        self.journal.write(f"end {call.status.name if call.status is not None else None}")


@app.service
def slow(cache: Cache) -> Slow:
    return Slow(cache)


@app.interceptor
def ends(journal: Journal) -> Ends:
    return Ends(journal)
