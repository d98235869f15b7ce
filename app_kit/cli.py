"""``python -m app_kit run module:app``: run an App with settings from the environment."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from . import eventloop
from .lifecycle import App, StartupError
from .settings import AppSettings, SettingsError, load_settings

__all__ = ["load_app", "main", "run_app"]

log = logging.getLogger("app_kit")

#: Exit code of a process whose start-up failed (bad settings, a resource, the port, ...).
EXIT_STARTUP_FAILED = 3
_TARGET = re.compile(r"(?P<module>[\w.]+):(?P<attr>[\w.]+)(?P<call>\(\))?\Z")


class LoadError(Exception):
    """The ``module:app`` target cannot be loaded."""


def load_app(target: str) -> App[Any]:
    """Import ``module:attr`` (an App) or ``module:factory()`` (a function returning one).

    The target is parsed, never evaluated; the current directory is importable, as it is
    for ``python -m``.
    """
    match = _TARGET.match(target)
    if match is None:
        raise LoadError(f"invalid target {target!r}: expected 'module:app' or 'module:create_app()'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(match["module"])
    except ImportError as exc:
        raise LoadError(f"cannot import {match['module']}: {exc}") from exc
    value: Any = module
    for name in match["attr"].split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise LoadError(f"{match['module']} has no attribute {match['attr']}") from None
    if match["call"]:
        if not callable(value):
            raise LoadError(f"{match['module']}:{match['attr']} is not callable")
        value = value()
    if not isinstance(value, App):
        raise LoadError(f"{target} is {type(value).__name__}, not an app_kit.App")
    return value


def configure_logging(level: str) -> None:
    """One line per record on stderr."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def run_app(
    app: App[Any],
    settings: AppSettings | None = None,
    *,
    env_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    log_level: str | None = None,
) -> int:
    """Load settings, configure logging, run ``app`` until a signal; return the exit code."""
    try:
        if settings is None:
            settings = load_settings(app.settings_type, env_file=env_file, **(overrides or {}))
    except SettingsError as exc:
        print(f"app_kit: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    level = log_level or settings.log_level
    configure_logging(level)
    try:
        eventloop.run(app.run(settings))
    except StartupError as exc:
        # One clear line; the traceback of the cause only when debugging.
        log.error("start-up failed: %s", exc, exc_info=exc if level == "DEBUG" else None)
        return EXIT_STARTUP_FAILED
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m app_kit run module:app [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m app_kit",
        description="Run gRPC services built with app_kit.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run an App until SIGINT/SIGTERM",
        description=(
            "Run an App: settings from APP_* environment variables (and --env-file), resources, "
            "services, server. The first SIGINT/SIGTERM drains gracefully, a second exits at once. "
            f"Exit codes: 0 clean shutdown, {EXIT_STARTUP_FAILED} start-up failed, 128+N killed by signal N."
        ),
    )
    run.add_argument("target", help="the app: 'module:app', or 'module:create_app()' for a factory")
    run.add_argument("--host", help="interface to listen on (overrides APP_HOST)")
    run.add_argument("--port", type=int, help="TCP port (overrides APP_PORT)")
    run.add_argument("--path", help="listen on this Unix socket instead (overrides APP_PATH)")
    run.add_argument("--env-file", help="read settings from this .env file too")
    run.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="overrides APP_LOG_LEVEL"
    )
    run.add_argument("--debug", action="store_true", help="log at DEBUG level, with full tracebacks")
    args = parser.parse_args(argv)
    try:
        app = load_app(args.target)
    except LoadError as exc:
        print(f"app_kit: {exc}", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    overrides = {name: getattr(args, name) for name in ("host", "port", "path") if getattr(args, name) is not None}
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    return run_app(
        app, env_file=args.env_file, overrides=overrides, log_level="DEBUG" if args.debug else args.log_level
    )
