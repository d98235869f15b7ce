"""A worker's heartbeat: how a ``--workers`` supervisor tells a worker whose event loop is stuck.

The supervisor gives each worker the write end of a pipe (``_APP_KIT_HEARTBEAT=FD:SECONDS``).
Once the App serves, a task on the worker's own event loop writes a byte there every quarter of
the timeout: a loop that is blocked (a handler in sync I/O, a CPU loop) or so busy that a timer
due waits the whole timeout stops beating, whatever other threads do. The supervisor then sends
:data:`STACKS_SIGNAL`, on which the worker prints every thread's stack (faulthandler, from the
signal handler: the loop need not turn), and kills it (see :mod:`app_kit.app.workers`).
"""

from __future__ import annotations

import faulthandler
import os
import signal

import anyio

__all__ = ["BEATS_PER_TIMEOUT", "HEARTBEAT", "STACKS_SIGNAL", "beat", "claim"]

#: The variable that gives a worker its end of the heartbeat pipe and the timeout.
HEARTBEAT = "_APP_KIT_HEARTBEAT"
#: Beats per timeout: a beat may wait for the loop most of a timeout without being missed.
BEATS_PER_TIMEOUT = 4
#: What the supervisor sends a worker it is about to kill: print your stacks.
STACKS_SIGNAL = signal.SIGUSR2

_claimed: tuple[int, float] | None = None


def claim() -> None:
    """In a worker: take the heartbeat pipe the supervisor gave (the variable is removed, so the
    App's own subprocesses do not see it), and print the stacks on :data:`STACKS_SIGNAL`.
    Outside a supervisor it does nothing."""
    global _claimed
    text = os.environ.pop(HEARTBEAT, "")
    if not text:
        return
    fd, timeout = text.split(":")
    os.set_inheritable(int(fd), False)  # pass_fds made it inheritable; it is ours alone
    os.set_blocking(int(fd), False)  # a supervisor that does not read never blocks the loop
    # Onto file descriptor 2 (relayed by the supervisor), whatever sys.stderr becomes.
    faulthandler.register(STACKS_SIGNAL, file=2, all_threads=True, chain=False)
    _claimed = (int(fd), float(timeout))


async def beat() -> None:
    """Beat until cancelled (started once the App serves); nothing outside a supervisor."""
    if _claimed is None:
        return
    fd, timeout = _claimed
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass  # a full pipe: the supervisor is behind, not gone
        except OSError:
            return  # the supervisor is gone (its lifeline tells the worker to drain)
        await anyio.sleep(timeout / BEATS_PER_TIMEOUT)
