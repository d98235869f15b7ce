"""``python -m app_kit run module:app --reload``: restart the App when a Python file changes.

For development. The App runs in a child process (as one ``--workers`` worker does, see
:mod:`app_kit.app.workers`); when a ``.py`` file under the watched directories changes, the
child is drained as on SIGTERM and a new one started on the same port. A child that exits or
fails to start waits for the next change. Needs ``watchfiles`` (``pip install app_kit[reload]``).

The reloader never imports the App, so it knows only the listen address the command line or
the environment gives: only that one does it bind (and hold across restarts, port 0 included).
Otherwise the App's settings class decides, defaults included (``port: int = 8080`` in a
subclass), and each child binds its address itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from .lifecycle import EXIT_STARTUP_FAILED
from .settings import AppSettings, listen_address
from .workers import SharedListeners, Supervisor, bind_shared, child_command, sharing_mode

__all__ = ["run_reloading"]

log = logging.getLogger("app_kit.reload")


def run_reloading(argv: Sequence[str], settings: AppSettings, *, directories: Sequence[str]) -> int:
    """Run the ``run`` command line ``argv`` as one child, restarted on changes under ``directories``."""
    try:
        import watchfiles
    except ImportError:
        log.error("--reload needs watchfiles: pip install 'app_kit[reload]'")
        return EXIT_STARTUP_FAILED
    try:
        shared = bind_shared(settings) if _address_given(settings) else SharedListeners([], {}, [])
    except (OSError, ValueError) as exc:
        log.error("start-up failed: cannot listen on %s: %s", listen_address(settings), exc)
        return EXIT_STARTUP_FAILED
    paths = [os.path.abspath(directory) for directory in directories]
    log.info("reloader (pid %d) watching %s", os.getpid(), ", ".join(paths))

    async def watch(supervisor: Supervisor) -> None:
        try:
            async for changes in watchfiles.awatch(
                *paths, watch_filter=watchfiles.PythonFilter(), stop_event=supervisor.stopping
            ):
                changed = sorted({os.path.relpath(path) for _change, path in changes})
                supervisor.replace_all(f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''} changed")
        except Exception:
            # The App keeps running; only reloading stops.
            log.exception("watching files failed: no more reloads")

    async def supervise() -> int:
        return await Supervisor(child_command(argv), settings, shared, count=1, reload=True).run(watch)

    try:
        return asyncio.run(supervise())
    finally:
        shared.close()


def _address_given(settings: AppSettings) -> bool:
    """Whether ``settings`` (plain :class:`AppSettings`, from the command line and environment)
    name where the App listens, so that the reloader can bind it without imposing
    ``AppSettings``' defaults on a subclass that has its own.

    A Unix socket path, or a port: with SO_REUSEPORT each child binds its own host on that port
    beside the reloader's socket; an inherited socket is the reloader's, so its host must be
    given too.
    """
    given = settings.model_fields_set
    if settings.path is not None:
        return True
    return "port" in given and ("host" in given or sharing_mode(settings) == "reuse_port")
