"""A connection pool in the shape of asyncpg's or psycopg's, over SQLite from the standard
library (so the example runs anywhere): ``async with pool.acquire() as db: await db.fetch(...)``.

Each connection lives on a worker thread of its own: SQLite blocks, the event loop must not.
SQLite takes one writer at a time: writes wait for the pool's write lock (a server database
would take them concurrently); reads do not wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class Connection:
    """One database connection, used by one caller at a time (the pool sees to that)."""

    def __init__(self, url: str, write_lock: asyncio.Lock) -> None:
        self._write_lock = write_lock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="notes-db")
        self._url = url
        self._sqlite: sqlite3.Connection | None = None

    async def _call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def open(self) -> None:
        def connect() -> None:
            self._sqlite = sqlite3.connect(self._url, uri=True, check_same_thread=True)
            # Readers of a shared in-memory database take no table locks (writes are serialized).
            self._sqlite.execute("PRAGMA read_uncommitted = true")

        await self._call(connect)

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """Run a statement and commit; the id of the row it inserted, if any."""

        def run() -> int:
            assert self._sqlite is not None
            with self._sqlite:
                return self._sqlite.execute(sql, parameters).lastrowid or 0

        async with self._write_lock:
            return await self._call(run)  # type: ignore[no-any-return]

    async def fetch(self, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows a query returns."""

        def run() -> list[tuple[Any, ...]]:
            assert self._sqlite is not None
            return self._sqlite.execute(sql, parameters).fetchall()

        return await self._call(run)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._sqlite is not None:
            await self._call(self._sqlite.close)
        self._executor.shutdown(wait=False)


class Pool:
    """``size`` connections to ``url``, lent out one caller at a time."""

    def __init__(self, url: str, size: int = 4) -> None:
        self.url = url
        self.size = size
        self._idle: asyncio.Queue[Connection] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._all: list[Connection] = []

    async def open(self) -> None:
        """Open every connection (failing here fails the app's start-up, as it should)."""
        for _ in range(self.size):
            connection = Connection(self.url, self._write_lock)
            await connection.open()
            self._all.append(connection)
            self._idle.put_nowait(connection)

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Connection]:
        """A connection for the block; waits while all are lent out."""
        connection = await self._idle.get()
        try:
            yield connection
        finally:
            self._idle.put_nowait(connection)

    async def ping(self) -> bool:
        """The health check: can a connection be had, and does the database answer?"""
        async with asyncio.timeout(1.0), self.acquire() as db:
            return await db.fetch("SELECT 1") == [(1,)]

    async def close(self) -> None:
        """Close every connection."""
        for connection in self._all:
            await connection.close()
        self._all.clear()
