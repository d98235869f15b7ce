"""gRPC's interop TestService as an App, for tests that run (and kill) real server processes."""

from __future__ import annotations

from app_kit import App, AppSettings
from examples.interop.server import TestService

app = App(AppSettings, name="interop")


@app.service
def interop() -> TestService:
    return TestService()
