"""``python -m app_kit run module:app``: run an App with settings from the environment."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from .._version import __version__
from ..aio.eventloop import LOOPS, LoopUnavailable, resolve_loop
from .envfile import load_env_file
from .lifecycle import EXIT_STARTUP_FAILED, App, DeclarationError, _describe
from .logs import configure_logging, report_early
from .settings import AppSettings, SettingsError, load_settings
from .workers import watch_supervisor

__all__ = ["load_app", "main"]
_TARGET = re.compile(r"(?P<module>[\w.]+):(?P<attr>[\w.]+)(?P<call>\(\))?\Z")


class LoadError(Exception):
    """The ``module:app`` target cannot be loaded."""


class AppCodeError(LoadError):
    """The app's own code raised while it was imported (or its factory called): its
    ``__cause__`` is the error, whose traceback the CLI prints."""


def load_app(target: str) -> App[Any]:
    """Import ``module:attr`` (an App) or ``module:factory()`` (a function returning one).

    The target is parsed, never evaluated; the current directory is importable, as it is
    for ``python -m``. Raises :class:`LoadError` (:class:`AppCodeError` when the module or the
    factory raises: a KeyError, a SyntaxError...), or the module's
    :class:`~app_kit.app.lifecycle.DeclarationError` if it declares a resource or service wrongly.
    """
    match = _TARGET.match(target)
    if match is None:
        raise LoadError(f"invalid target {target!r}: expected 'module:app' or 'module:create_app()'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(match["module"])
    except ImportError as exc:
        missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
        if missing is not None and (match["module"] == missing or match["module"].startswith(missing + ".")):
            raise LoadError(f"cannot import {match['module']}: {exc}") from exc  # the target is not there
        # Something the module imports: where, is the user's to see.
        raise AppCodeError(f"importing {match['module']} failed: {_describe(exc)}") from exc
    except DeclarationError:
        raise
    except Exception as exc:
        raise AppCodeError(f"importing {match['module']} failed: {_describe(exc)}") from exc
    value: Any = module
    for name in match["attr"].split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise LoadError(f"{match['module']} has no attribute {match['attr']}") from None
    if match["call"]:
        if not callable(value):
            raise LoadError(f"{match['module']}:{match['attr']} is not callable")
        try:
            value = value()
        except DeclarationError:
            raise
        except Exception as exc:
            raise AppCodeError(f"{match['module']}:{match['attr']}() failed: {_describe(exc)}") from exc
    if not isinstance(value, App):
        if not match["call"] and (inspect.isfunction(value) or inspect.ismethod(value)):
            raise LoadError(f"{target} is a function, not an app_kit.App: did you mean {target}()?")
        raise LoadError(f"{target} is {type(value).__name__}, not an app_kit.App")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: ``python -m app_kit run module:app [options]``."""
    parser = argparse.ArgumentParser(
        prog="app_kit" if os.path.basename(sys.argv[0]) == "app_kit" else "python -m app_kit",
        description="Run gRPC services built with app_kit.",
    )
    parser.add_argument("--version", action="version", version=f"app_kit {__version__}")
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
    run.add_argument(
        "--env-file", help="load this .env file into the environment (variables already set win), settings included"
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="serve the port from N processes, each running the whole App (overrides APP_WORKERS)",
    )
    run.add_argument(
        "--loop",
        type=str.lower,
        choices=LOOPS,
        help="the event loop: auto (uvloop if installed, else asyncio), asyncio, uvloop or trio (overrides APP_LOOP)",
    )
    run.add_argument(
        "--reload",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="development: restart the App when a .py file changes (needs app_kit[reload])",
    )
    run.add_argument(
        "--reload-dir",
        action="append",
        metavar="DIR",
        help="with --reload: watch this directory (repeatable; default: the current one)",
    )
    run.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="level of app_kit's loggers, any case (overrides APP_LOG_LEVEL)",
    )
    run.add_argument("--debug", action="store_true", help="app_kit's loggers at DEBUG, with full tracebacks")
    run.add_argument(
        "--log-config",
        metavar="FILE",
        help="configure logging with this logging.config.dictConfig file (JSON, or YAML with app_kit[yaml])",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    # A --workers or --reload child: drain if the supervisor dies (from now on: the import too).
    watch_supervisor()
    if args.reload and args.workers is not None and args.workers > 1:
        parser.error("--reload runs one process: it cannot be used with --workers")
    # A missing env file the user named is a mistake (dotenv would read it as empty).
    if args.env_file is not None:
        if not os.path.isfile(args.env_file):
            report_early(f"--env-file {args.env_file}: no such file")
            return EXIT_STARTUP_FAILED
        load_env_file(args.env_file)
    # --reload and --workers children get the same command line (--loop included) and environment.
    overrides = {
        name: getattr(args, name) for name in ("host", "port", "path", "loop") if getattr(args, name) is not None
    }
    if args.log_level is not None:
        overrides["log_level"] = args.log_level
    if args.reload:
        # The reloader never imports the App: the code it watches may be broken for a while.
        return _supervise(parser, args, argv, None, overrides)
    try:
        app = load_app(args.target)
    except (LoadError, DeclarationError) as exc:
        if isinstance(exc, AppCodeError) and exc.__cause__ is not None:
            _print_user_traceback(exc.__cause__)  # the user's code: where it failed matters
        elif args.debug and isinstance(exc, DeclarationError):
            traceback.print_exception(exc)
        report_early(f"{exc}")
        return EXIT_STARTUP_FAILED
    if args.workers != 1:  # more, or APP_WORKERS decides (a worker is run with --workers 1)
        return _supervise(parser, args, argv, app, overrides)
    return app.run_sync(
        overrides=overrides,  # (--env-file is in the environment already: not read twice)
        log_level="DEBUG" if args.debug else args.log_level,
        log_config=args.log_config,
    )


def _print_user_traceback(exc: BaseException) -> None:
    """``exc``'s traceback from the first frame of the user's code (load_app and importlib's
    frames left out; a SyntaxError says where it is by itself)."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename in (__file__, importlib.__file__)
        or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _supervise(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    argv: list[str],
    app: App[Any] | None,
    overrides: dict[str, Any],
) -> int:
    """``--reload`` (``app`` None: not imported), or more than one worker: a supervisor process
    runs the App in children. With one worker after all (APP_WORKERS unset), ``app`` runs here.
    """
    settings_type = app.settings_type if app is not None else AppSettings
    if args.workers is not None:
        overrides = {**overrides, "workers": args.workers}
    try:
        settings = load_settings(settings_type, **overrides)  # (--env-file: in the environment)
    except SettingsError as exc:
        report_early(f"{exc}")
        return EXIT_STARTUP_FAILED
    if args.reload and settings.workers > 1:
        parser.error(f"--reload runs one process: it cannot be used with APP_WORKERS={settings.workers}")
    level = "DEBUG" if args.debug else args.log_level
    if app is not None and settings.workers == 1:
        return app.run_sync(settings, log_level=level, log_config=args.log_config)
    try:
        resolve_loop(settings.loop)  # once here, rather than in every worker
    except LoopUnavailable as exc:
        report_early(f"APP_LOOP / --loop: {exc}")
        return EXIT_STARTUP_FAILED
    if level is None and "log_level" in settings.model_fields_set:
        level = settings.log_level
    try:
        configure_logging(level, log_format=settings.log_format, config_file=args.log_config)
    except ValueError as exc:
        report_early(f"{exc}")
        return EXIT_STARTUP_FAILED
    if args.reload:
        from .reload import run_reloading

        return run_reloading(argv, settings, directories=args.reload_dir or ["."])
    from .workers import run_workers

    return run_workers(argv, settings, count=settings.workers)
