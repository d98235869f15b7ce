"""Notes over a connection pool, as an App: ``python -m app_kit run examples.notes.app:app``.

Settings: the ``APP_*`` variables, plus ``NOTES_DB_URL`` (an SQLite URI; by default a
database in memory, shared by the pool's connections) and ``NOTES_POOL_SIZE``. The pool is a
resource with a health check: while the database does not answer, the server reports
NOT_SERVING (what Kubernetes' gRPC probes read).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import Field

from app_kit import App, AppSettings

from .pool import Pool
from .service import SCHEMA, NotesService


class NotesSettings(AppSettings):
    """The notes app's own settings on top of the common ones."""

    db_url: str = Field("file:notes?mode=memory&cache=shared", validation_alias="NOTES_DB_URL")
    pool_size: int = Field(4, ge=1, validation_alias="NOTES_POOL_SIZE")


app = App(NotesSettings, name="notes")


@app.resource(health_check=Pool.ping)
async def pool(settings: NotesSettings) -> AsyncIterator[Pool]:
    """The connection pool, open (and the schema in place) while the app runs."""
    pool = Pool(settings.db_url, settings.pool_size)
    await pool.open()
    try:
        async with pool.acquire() as db:
            await db.execute(SCHEMA)
        yield pool
    finally:
        await pool.close()


@app.service
def notes(pool: Pool) -> NotesService:
    """The Notes service over the pool."""
    return NotesService(pool)
