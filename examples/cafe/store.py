"""Where the cafe keeps its orders: SQLite from the standard library, off the event loop."""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

import anyio
import anyio.to_thread


class MemoryOrders:
    """Order numbers without persistence, for a CoffeeMachine used on its own."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def add(self, description: str) -> int:
        """Record an order; return its number."""
        return next(self._ids)


class OrderStore:
    """Orders in an SQLite database, used by one worker thread at a time (anyio's threads:
    the same code on asyncio and on trio)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._one_at_a_time: anyio.CapacityLimiter | None = None

    async def _run(self, function: Any, *args: Any) -> Any:
        if self._one_at_a_time is None:
            self._one_at_a_time = anyio.CapacityLimiter(1)
        return await anyio.to_thread.run_sync(function, *args, limiter=self._one_at_a_time)

    async def open(self) -> None:
        """Connect and create the table."""

        def connect() -> None:
            # Serialized by the limiter, from whichever worker thread runs it.
            self._connection = sqlite3.connect(self.path, check_same_thread=False)
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY AUTOINCREMENT, description TEXT NOT NULL)"
            )
            self._connection.commit()

        await self._run(connect)

    async def close(self) -> None:
        """Close the connection."""
        if self._connection is not None:
            await self._run(self._connection.close)
            self._connection = None

    async def add(self, description: str) -> int:
        """Record an order; return its number."""

        def insert() -> int:
            assert self._connection is not None
            cursor = self._connection.execute("INSERT INTO orders (description) VALUES (?)", (description,))
            self._connection.commit()
            return int(cursor.lastrowid or 0)

        return int(await self._run(insert))

    async def count(self) -> int:
        """How many orders there are."""

        def count() -> int:
            assert self._connection is not None
            return int(self._connection.execute("SELECT count(*) FROM orders").fetchone()[0])

        return int(await self._run(count))

    async def ping(self) -> bool:
        """Health check: the database answers."""
        if self._connection is None:
            return False
        return bool(await self._run(lambda: self._connection.execute("SELECT 1").fetchone()[0] == 1))  # type: ignore[union-attr]
