"""The chat room: who is in it, and what each has yet to hear."""

from __future__ import annotations

import asyncio

from .chat_pb2 import ChatMessage

#: Messages a member may fall behind by; a member further behind is dropped from the room
#: (its call ends RESOURCE_EXHAUSTED) rather than making the room buffer without bound.
BACKLOG = 100


class Member:
    """One caller in the room: the messages it has yet to hear."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.inbox: asyncio.Queue[ChatMessage] = asyncio.Queue(BACKLOG)
        self.dropped = asyncio.Event()


class Room:
    """Everyone who is talking; what one says, all hear."""

    def __init__(self) -> None:
        self.members: set[Member] = set()

    def join(self, name: str) -> Member:
        """Enter the room."""
        member = Member(name)
        self.members.add(member)
        return member

    def leave(self, member: Member) -> None:
        """Leave it (hanging up, or dropped)."""
        self.members.discard(member)

    def say(self, message: ChatMessage) -> None:
        """Hand ``message`` to every member; drop those too far behind to take it."""
        for member in list(self.members):
            try:
                member.inbox.put_nowait(message)
            except asyncio.QueueFull:
                self.leave(member)
                member.dropped.set()
