"""An app whose module sets up logging of its own when LOGGING_APP_USER_CONFIG is set, as a user's
module does at import (a JSON handler, say): ``python -m app_kit run`` must leave it alone."""

from __future__ import annotations

import logging.config
import os

from app_kit import App, AppSettings
from examples.interop.server import TestService

if os.environ.get("LOGGING_APP_USER_CONFIG"):
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,  # app_kit's loggers exist already: keep them on
            "formatters": {"mine": {"format": "USER %(levelname)s %(name)s %(message)s"}},
            "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "mine", "stream": "ext://sys.stderr"}},
            "root": {"handlers": ["err"], "level": "INFO"},
        }
    )

app = App(AppSettings, name="logging")


@app.service
def interop() -> TestService:
    return TestService()
