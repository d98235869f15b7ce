"""Session 16: defects of my own list ("left alone" in earlier notes), each with the test that
failed before its fix."""

from __future__ import annotations

import asyncio

import h2.events
import pytest

from app_kit import Configuration

from .conftest import running_server
from .h2client import RawClient
from .services import EchoService

pytestmark = pytest.mark.anyio


async def test_keepalive_pings_come_keepalive_time_after_the_last_answer() -> None:
    """gRFC A8: keepalive_time is the wait between a PING's answer and the next PING. With a
    keepalive_time shorter than keepalive_timeout (10 s and the default 20 s, say), the next
    PING waited for the timeout's check instead: one every keepalive_timeout, not every
    keepalive_time (a proxy's idle timer between the two cut the connection)."""
    config = Configuration(keepalive_time=0.2, keepalive_timeout=1.5, keepalive_permit_without_calls=True)
    async with running_server([EchoService()], config=config) as (server, _):
        port = server.sockets[0].getsockname()[1]
        async with RawClient("127.0.0.1", port) as client:  # answers every PING at once
            await asyncio.sleep(1.3)
            pings = sum(isinstance(event, h2.events.PingReceived) for event in client.events)
            assert not client.closed.is_set()
    # PINGs at ~0.2, 0.4, ... 1.2 s: 6 (one while waiting for the timeout's check before).
    assert 4 <= pings <= 7, pings
