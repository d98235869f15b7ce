"""Talk in the chat room: every line you type is said, everything said is printed.

``python -m examples.chat.client --name Ann [--port 50051]`` (Ctrl-D hangs up).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

from app_kit import Channel

from .chat_grpc import ChatStub
from .chat_pb2 import ChatMessage


async def typed_lines() -> AsyncIterator[ChatMessage]:
    """Lines from standard input, read off the event loop, until end of input."""
    while line := await asyncio.to_thread(sys.stdin.readline):
        yield ChatMessage(text=line.rstrip("\n"))


async def talk(name: str, host: str, port: int) -> None:
    """Join, say what is typed, print what is said."""
    async with Channel(host, port) as channel:
        async for message in ChatStub(channel).Talk(typed_lines(), metadata={"x-name": name}):
            print(f"{message.author}: {message.text}", flush=True)


def main() -> None:
    """Parse arguments and talk."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    arguments = parser.parse_args()
    asyncio.run(talk(arguments.name, arguments.host, arguments.port))


if __name__ == "__main__":
    main()
