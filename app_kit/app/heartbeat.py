"""A worker's heartbeat: how a ``--workers`` supervisor tells a worker whose event loop is blocked.

The supervisor gives each worker the write end of a pipe (``_APP_KIT_HEARTBEAT=FD:SECONDS``).
Once the App serves, a task on the worker's own event loop writes a byte there every interval:
a loop that is blocked (a handler in sync I/O or a CPU loop) stops beating, whatever other
threads do, and the supervisor kills and replaces the worker (see :mod:`app_kit.app.workers`).
Each beat also re-arms :func:`faulthandler.dump_traceback_later`, so that a worker whose beats
stop prints its threads' stacks (where it is stuck) before the supervisor kills it.
"""

from __future__ import annotations

import faulthandler
import os

import anyio

__all__ = ["HEARTBEAT", "beat", "claim"]

#: The variable that gives a worker its end of the heartbeat pipe and the timeout.
HEARTBEAT = "_APP_KIT_HEARTBEAT"
# How many beats a timeout holds: a late beat or two is not a blocked loop.
BEATS_PER_TIMEOUT = 4

_claimed: tuple[int, float] | None = None


def claim() -> None:
    """In a worker: take the heartbeat pipe the supervisor gave (the variable is removed, so the
    App's own subprocesses do not see it). Outside a supervisor it does nothing."""
    global _claimed
    text = os.environ.pop(HEARTBEAT, "")
    if not text:
        return
    fd, timeout = text.split(":")
    os.set_inheritable(int(fd), False)  # pass_fds made it inheritable; it is ours alone
    os.set_blocking(int(fd), False)  # a supervisor that does not read never blocks the loop
    _claimed = (int(fd), float(timeout))


async def beat() -> None:
    """Beat until cancelled (started once the App serves); nothing outside a supervisor."""
    if _claimed is None:
        return
    fd, timeout = _claimed
    try:
        while True:
            try:
                os.write(fd, b".")
            except BlockingIOError:
                pass  # a full pipe: the supervisor is behind, not gone
            except OSError:
                return  # the supervisor is gone (its lifeline tells the worker to drain)
            # Onto file descriptor 2 (relayed by the supervisor), whatever sys.stderr became.
            faulthandler.dump_traceback_later(timeout, exit=False, file=2)
            await anyio.sleep(timeout / BEATS_PER_TIMEOUT)
    finally:
        faulthandler.cancel_dump_traceback_later()
