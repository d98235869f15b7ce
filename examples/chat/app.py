"""A chat room as an App: ``python -m app_kit run examples.chat.app:app``, then talk with
``python -m examples.chat.client --name Ann`` from as many terminals as you like."""

from __future__ import annotations

from collections.abc import AsyncIterator

from app_kit import App, AppSettings

from .room import Room
from .service import ChatService

app = App(AppSettings, name="chat")


@app.resource
async def room() -> AsyncIterator[Room]:
    """The one room, for as long as the app runs."""
    yield Room()


@app.service
def chat(room: Room) -> ChatService:
    """The Chat service over that room."""
    return ChatService(room)
