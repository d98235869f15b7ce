"""The cafe as an App: ``python -m app_kit run examples.cafe.app:app``.

Settings: the ``APP_*`` variables of every app, plus ``CAFE_DB_PATH`` (the SQLite file,
default in memory) and ``CAFE_BREW_STEP`` (seconds per brewing stage).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import Field

from app_kit import App, AppSettings

from .service import CoffeeMachine
from .store import OrderStore

log = logging.getLogger("cafe")


class CafeSettings(AppSettings):
    """The cafe's own settings on top of the common ones."""

    db_path: str = Field(":memory:", validation_alias="CAFE_DB_PATH")
    brew_step: float = Field(0.2, validation_alias="CAFE_BREW_STEP")


app = App(CafeSettings, name="cafe")


@app.resource(health_check=OrderStore.ping)
async def order_store(settings: CafeSettings) -> AsyncIterator[OrderStore]:
    """The order database, open while the app runs."""
    store = OrderStore(settings.db_path)
    await store.open()
    log.info("order store open: %s", settings.db_path)
    try:
        yield store
    finally:
        await store.close()
        log.info("order store closed")


@app.service
def coffee_machine(store: OrderStore, settings: CafeSettings) -> CoffeeMachine:
    """The CoffeeMachine service, recording orders in the store."""
    return CoffeeMachine(store, brew_step=settings.brew_step)
