"""An app for tests/test_app_review.py: resources that record their life to a file.

REVIEW_EVENTS: file to append "enter X" / "exit X" lines to.
REVIEW_TEARDOWN: "cancelled-task": the ``poller`` resource's teardown cancels its background
task and awaits it (the usual asyncio idiom, which re-raises CancelledError).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pydantic import Field

from app_kit import App, AppSettings
from examples.interop.server import TestService
from tests.apps.lifecycle_app import Journal


class ReviewSettings(AppSettings):
    events_file: str = Field("", validation_alias="REVIEW_EVENTS")
    teardown: str = Field("", validation_alias="REVIEW_TEARDOWN")


class Poller:
    def __init__(self, task: asyncio.Task[None]) -> None:
        self.task = task


app = App(ReviewSettings, name="review")


@app.resource
async def journal(settings: ReviewSettings) -> AsyncIterator[Journal]:
    value = Journal(settings.events_file)
    value.write("enter journal")
    try:
        yield value
    finally:
        value.write("exit journal")


@app.resource
async def poller(journal: Journal, settings: ReviewSettings) -> AsyncIterator[Poller]:
    async def poll() -> None:
        while True:
            await asyncio.sleep(3600)

    task = asyncio.create_task(poll())
    journal.write("enter poller")
    try:
        yield Poller(task)
    finally:
        journal.write("exit poller")
        task.cancel()
        if settings.teardown == "cancelled-task":
            await task  # raises CancelledError: the task was cancelled
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await task


@app.service
def interop(poller: Poller) -> TestService:
    return TestService()
