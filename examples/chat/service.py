"""The Chat service: a bidirectional stream per member, over one shared room."""

from __future__ import annotations

import asyncio

from app_kit import GRPCError, Status, Stream

from .chat_grpc import ChatBase
from .chat_pb2 import ChatMessage
from .room import BACKLOG, Member, Room


class ChatService(ChatBase):
    """Relays what each member says to the whole room."""

    def __init__(self, room: Room) -> None:
        self.room = room

    async def Talk(self, stream: Stream[ChatMessage, ChatMessage]) -> None:
        """Read what the caller says while sending it what the room says."""
        member = self.room.join(str(stream.metadata.get("x-name", "anonymous")))
        try:
            async with asyncio.TaskGroup() as group:
                listening = group.create_task(self._listen(stream, member))
                await self._relay(stream, member)
                listening.cancel()  # the caller hung up: stop sending to it
        except* GRPCError as errors:
            raise errors.exceptions[0] from None  # the call ends with that status
        finally:
            self.room.leave(member)

    async def _listen(self, stream: Stream[ChatMessage, ChatMessage], member: Member) -> None:
        """Send the member what the room says, until it is dropped or hangs up."""
        while True:
            inbox = asyncio.ensure_future(member.inbox.get())
            dropped = asyncio.ensure_future(member.dropped.wait())
            try:
                await asyncio.wait([inbox, dropped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                inbox.cancel()
                dropped.cancel()
            if member.dropped.is_set():
                raise GRPCError(Status.RESOURCE_EXHAUSTED, f"more than {BACKLOG} messages behind: dropped")
            await stream.send_message(inbox.result())

    async def _relay(self, stream: Stream[ChatMessage, ChatMessage], member: Member) -> None:
        """Everything the member says goes to the room, with its name on it."""
        async for message in stream:
            self.room.say(ChatMessage(author=member.name, text=message.text))
