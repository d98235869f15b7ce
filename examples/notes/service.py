"""The Notes service: every method borrows a pooled connection for just as long as it needs."""

from __future__ import annotations

from app_kit import GRPCError, Status, Stream

from .notes_grpc import NotesBase
from .notes_pb2 import NewNote, Note, NoteId, Search
from .pool import Pool

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL)"


class NotesService(NotesBase):
    """Notes in the pool's database."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def Add(self, stream: Stream[NewNote, NoteId]) -> None:
        """Store a note."""
        note = await stream.recv_message()
        assert note is not None
        if not note.text.strip():
            raise GRPCError(Status.INVALID_ARGUMENT, "a note needs some text")
        async with self.pool.acquire() as db:
            note_id = await db.execute("INSERT INTO notes (text) VALUES (?)", (note.text,))
        await stream.send_message(NoteId(id=note_id))

    async def Get(self, stream: Stream[NoteId, Note]) -> None:
        """One note by id."""
        request = await stream.recv_message()
        assert request is not None
        async with self.pool.acquire() as db:
            rows = await db.fetch("SELECT id, text FROM notes WHERE id = ?", (request.id,))
        if not rows:
            raise GRPCError(Status.NOT_FOUND, f"no note {request.id}")
        await stream.send_message(Note(id=rows[0][0], text=rows[0][1]))

    async def Find(self, stream: Stream[Search, Note]) -> None:
        """The notes containing a text, in pages, so a long answer holds no connection for long."""
        request = await stream.recv_message()
        assert request is not None
        last_id = 0
        while True:
            async with self.pool.acquire() as db:
                page = await db.fetch(
                    "SELECT id, text FROM notes WHERE id > ? AND instr(text, ?) > 0 ORDER BY id LIMIT 100",
                    (last_id, request.contains),
                )
            for note_id, text in page:
                await stream.send_message(Note(id=note_id, text=text))
            if len(page) < 100:
                return
            last_id = page[-1][0]
