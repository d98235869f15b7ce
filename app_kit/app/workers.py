"""``python -m app_kit run module:app --workers N``: N processes of one App serving one port.

A supervisor binds the port first (so that port 0 is one port for all, and a port in use fails
before any worker starts), then runs each worker as ``python -m app_kit run ... --workers 1``:
a worker is exactly the single-process server, with its own resources, settings, signal
handling and exit codes. Subprocesses rather than ``multiprocessing``: nothing is pickled (the
App is found again by its ``module:app`` target), the exit code 3 of a failed start-up arrives
as it is, listening sockets pass by ``pass_fds``, and each worker is a process group of its own,
so a terminal's Ctrl-C reaches the supervisor only and each worker gets one signal. For the same
reason a supervisor that dies without a word (SIGKILL, the OOM killer) would leave its workers
serving: each worker holds the read end of a pipe whose write end only the supervisor has, and
drains as on SIGTERM when it reads EOF there (:func:`watch_supervisor`).

The port is shared in one of two ways (``APP_WORKERS_SOCKET``):

- ``reuse_port`` (the default on Linux): each worker binds its own socket with SO_REUSEPORT and
  the kernel spreads new connections over them; the supervisor keeps a socket bound (never
  listening) so that no other program takes the port while a worker restarts;
- ``inherit``: the supervisor binds one socket and every worker listens on it, one accept queue
  for all (a connection waits for whichever worker accepts first, and one queued at a worker
  that is killed is not lost). A Unix socket (``APP_PATH``) is always shared this way.

The supervisor restarts a worker that dies (after ``APP_WORKER_RESTART_DELAY``, doubled for
each death in a row), stops every worker with SIGTERM on SIGTERM/SIGINT/SIGHUP (as uvicorn does:
a worker still importing the App dies of it without a KeyboardInterrupt traceback) and waits for
all of them to drain; a second signal kills them at once (SIGKILL, each with its process
group). A worker takes a repeated SIGTERM as the same request (systemd's
``KillMode=control-group`` signals every process, so it gets one from outside and one from the
supervisor). A worker whose event loop stops turning
(no heartbeat for ``APP_WORKER_TIMEOUT`` seconds once it serves, see :mod:`.heartbeat`) is
killed and replaced; one still shutting down that long after its drain delay and grace period
is killed. A worker whose start-up fails (exit code 3)
is not restarted: the others are stopped and the supervisor exits 3. Every line a worker writes
to stdout or stderr is relayed to the supervisor's own with ``[worker N pid P]`` in front (JSON
log lines get ``worker`` and ``pid`` fields instead, and with ``APP_LOG_FORMAT=json`` other
lines become JSON lines).

:mod:`app_kit.app.reload` runs one worker the same way and replaces it when a file changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from . import heartbeat
from .envfile import environment_for_children
from .lifecycle import EXIT_STARTUP_FAILED
from .listeners import LISTEN_FDS, REUSE_PORT, bind_tcp, bind_unix
from .settings import AppSettings, listen_address
from .signals import mark_supervised

__all__ = [
    "SharedListeners",
    "Supervisor",
    "bind_shared",
    "child_command",
    "run_workers",
    "sharing_mode",
    "watch_supervisor",
]

log = logging.getLogger("app_kit.workers")

# A line longer than this is relayed in pieces (asyncio's StreamReader needs a bound).
_RELAY_LINE_LIMIT = 1024 * 1024
# Tells a child the file descriptor of its end of the supervisor's pipe (see watch_supervisor).
SUPERVISOR_FD = "_APP_KIT_SUPERVISOR_FD"
# What the supervisor handles: SIGHUP too (a closed terminal), which would otherwise kill it alone.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class SharedListeners:
    """How the workers listen: the supervisor's sockets, and what each worker is told."""

    sockets: list[socket.socket]
    env: dict[str, str]
    arguments: list[str]
    pass_fds: tuple[int, ...] = ()
    unix_file: tuple[str, int] | None = None  # (path, inode) to remove at the end

    def close(self) -> None:
        """Close the supervisor's sockets (the workers' copies stay open)."""
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def remove_unix_file(self) -> None:
        """Remove the Unix socket file made at start, unless something replaced it since."""
        if self.unix_file is not None:
            path, inode = self.unix_file
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:
                    os.remove(path)


def sharing_mode(settings: AppSettings) -> str:
    """``reuse_port`` or ``inherit``: how TCP workers share the port (``APP_WORKERS_SOCKET``)."""
    if settings.workers_socket != "auto":
        return settings.workers_socket
    return "reuse_port" if sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT") else "inherit"


def bind_shared(settings: AppSettings) -> SharedListeners:
    """Bind what the workers will share (raises OSError, or ValueError for a mode that cannot be)."""
    mode = sharing_mode(settings)
    if settings.path is not None:
        sock = bind_unix(settings.path)
        unix_file = None if settings.path.startswith("\0") else (settings.path, os.stat(settings.path).st_ino)
        return SharedListeners([sock], {LISTEN_FDS: str(sock.fileno())}, [], (sock.fileno(),), unix_file)
    if mode == "reuse_port" and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("APP_WORKERS_SOCKET=reuse_port: this system has no SO_REUSEPORT")
    sockets = bind_tcp(settings.host, settings.port, reuse_port=mode == "reuse_port")
    # Every worker gets the port found here (port 0 is one port for all of them).
    arguments = ["--port", str(sockets[0].getsockname()[1])]
    if mode == "reuse_port":
        return SharedListeners(sockets, {REUSE_PORT: "1"}, arguments)
    if len(sockets) > 1:
        for sock in sockets:
            sock.close()
        raise ValueError(f"APP_WORKERS_SOCKET=inherit shares one socket: host {settings.host!r} has several addresses")
    fds = tuple(sock.fileno() for sock in sockets)
    return SharedListeners(sockets, {LISTEN_FDS: ",".join(map(str, fds))}, arguments, fds)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _exit_code(code: int) -> int:
    """A worker's return code as a shell reports it (128 + N when killed by signal N)."""
    return 128 - code if code < 0 else code


@dataclass
class _Slot:
    """One worker position: its current process, and why it is being stopped."""

    index: int
    process: asyncio.subprocess.Process | None = None
    #: Set while it is stopped to be replaced at once (a reload), not because it died.
    replacing: bool = False
    #: When its process was sent SIGTERM (monotonic): it is draining, and is not signalled again.
    signalled_at: float | None = None
    #: Wakes a slot waiting for the next reload (reload mode, after its process exited).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    relays: list[asyncio.Task[None]] = field(default_factory=list)
    #: Watches its process's heartbeat and shutdown (see Supervisor._watch).
    watch: asyncio.Task[None] | None = None

    def drain(self) -> bool:
        """SIGTERM its process, once: it drains from then on. False if it was signalled already
        (or has no process running)."""
        if self.process is None or self.process.returncode is not None or self.signalled_at is not None:
            return False
        self.signalled_at = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return True


class Supervisor:
    """Runs ``count`` worker processes of ``command`` until a signal, then drains them all.

    With ``reload`` (one worker, :mod:`app_kit.app.reload`), a worker that exits is not
    restarted until :meth:`replace_all` (a file changed), and a failed start-up waits for that too.
    """

    def __init__(
        self,
        command: Sequence[str],
        settings: AppSettings,
        shared: SharedListeners,
        *,
        count: int,
        reload: bool = False,
    ) -> None:
        self.command = list(command)
        self.settings = settings
        self.shared = shared
        self.reload = reload
        self.slots = [_Slot(index) for index in range(1, count + 1)]
        # No liveness check under --reload: a breakpoint() in the App stops its loop on purpose.
        self.timeout = 0.0 if reload else settings.worker_timeout
        self.stopping = asyncio.Event()
        self._signals: list[int] = []
        self._failed: int | None = None
        # The children's lifeline (see watch_supervisor): made by run().
        self._lifeline: tuple[int, int] | None = None

    async def run(self, *watchers: Callable[[Supervisor], Coroutine[Any, Any, None]]) -> int:
        """Supervise until every worker is gone; return the exit code for the supervisor."""
        loop = asyncio.get_running_loop()
        for signum in _STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        # Both ends non-inheritable: the read end reaches the children by pass_fds only, and
        # the write end stays here alone, so that it closes when this process ends, however.
        self._lifeline = os.pipe()
        tasks = [asyncio.create_task(watch(self)) for watch in watchers]
        try:
            codes = await asyncio.gather(*(self._keep(slot) for slot in self.slots))
        finally:
            for signum in _STOP_SIGNALS:
                loop.remove_signal_handler(signum)
            for task in tasks + [slot.watch for slot in self.slots if slot.watch is not None]:
                task.cancel()
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
            self.shared.close()
            self.shared.remove_unix_file()
            # The last lines the workers wrote (a worker's own child could keep its stderr open).
            relays = [relay for slot in self.slots for relay in slot.relays]
            if relays:
                await asyncio.wait(relays, timeout=1)
        if self._failed is not None:
            return self._failed
        if len(self._signals) > 1:
            return 128 + self._signals[-1]
        for code in codes:
            if code not in (0, -signal.SIGTERM, -signal.SIGINT):  # killed by ours before it handled it
                return _exit_code(code)
        return 0

    def replace_all(self, reason: str) -> None:
        """Drain every worker and start a new one in its place (``--reload``)."""
        if self.stopping.is_set():
            return
        log.info("%s: restarting", reason)
        for slot in self.slots:
            # Once: the worker is draining from then on.
            if slot.drain():
                slot.replacing = True
            slot.wake.set()

    def _on_signal(self, signum: int) -> None:
        self._signals.append(signum)
        name = signal.Signals(signum).name
        if len(self._signals) == 1:
            log.info("received %s: draining every worker (send it again to kill them at once)", name)
            self._stop(signum)
        else:
            log.warning("received %s again: killing every worker", name)
            for slot in self.slots:
                if slot.process is not None:
                    _kill_group(slot.process)

    def _stop(self, signum: int) -> None:
        self.stopping.set()
        # Only the workers hold the port now: it closes with the last of them.
        self.shared.close()
        # SIGTERM whatever the signal (as uvicorn does): a worker still importing the App has
        # no handler yet, and SIGTERM ends it quietly where SIGINT would print a
        # KeyboardInterrupt traceback. A worker signalled already (draining for a reload) is
        # not signalled again (it would take it as the same request anyway).
        for slot in self.slots:
            slot.drain()
            slot.wake.set()

    async def _keep(self, slot: _Slot) -> int:
        """Run the slot's worker, again and again until stopping; return its last exit code."""
        deaths = 0
        code = 0
        first = True  # this slot's first worker: its failed start is the App's
        while not self.stopping.is_set():
            process = await self._spawn(slot)
            started = time.monotonic()
            if self.stopping.is_set():  # a signal came while it was being spawned
                if len(self._signals) < 2:
                    slot.drain()
                else:
                    _kill_group(process)
            code = await _exited(process)
            ran = time.monotonic() - started
            if self.stopping.is_set():
                log.info("worker %d (pid %d) %s", slot.index, process.pid, _describe_exit(code))
                return code
            if slot.replacing:
                slot.replacing = False
                slot.wake.clear()
                log.info("worker %d (pid %d) drained for the restart", slot.index, process.pid)
                continue
            if self.reload:
                log.warning("worker (pid %d) %s; waiting for a file to change", process.pid, _describe_exit(code))
                slot.wake.clear()
                await slot.wake.wait()
                continue
            if code == EXIT_STARTUP_FAILED and first:
                # A later start that fails (a worker restarted while its TLS files are half
                # written, a resource down for a moment) is retried like a death, with backoff,
                # the other workers serving meanwhile: not a reason to stop them.
                log.error("worker %d (pid %d) failed to start: stopping every worker", slot.index, process.pid)
                if self._failed is None:
                    self._failed = code
                self._stop(signal.SIGTERM)
                return code
            first = False
            # A worker that ran longer than the longest delay died on its own, not in a loop.
            if ran > self.settings.worker_restart_max_delay:
                deaths = 0
            delay = min(self.settings.worker_restart_delay * 2**deaths, self.settings.worker_restart_max_delay)
            deaths += 1
            log.warning(
                "worker %d (pid %d) %s; restarting it in %gs", slot.index, process.pid, _describe_exit(code), delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
        # Stopped while no worker ran here (waiting to restart one, or for a file to change):
        # the last one's death is not how this shutdown went.
        return 0

    async def _spawn(self, slot: _Slot) -> asyncio.subprocess.Process:
        assert self._lifeline is not None, "run() makes it"
        lifeline = self._lifeline[0]
        env = {**environment_for_children(), **self.shared.env, SUPERVISOR_FD: str(lifeline)}
        pass_fds = (*self.shared.pass_fds, lifeline)
        beats = os.pipe() if self.timeout else None  # (read, write): the worker writes
        if beats is not None:
            env[heartbeat.HEARTBEAT] = f"{beats[1]}:{self.timeout!r}"
            pass_fds += (beats[1],)
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                *self.shared.arguments,
                env=env,
                pass_fds=pass_fds,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=_RELAY_LINE_LIMIT,
                # A group of its own: a terminal's Ctrl-C reaches the supervisor, which passes it on once.
                process_group=0,
            )
        except BaseException:
            if beats is not None:
                os.close(beats[0])
            raise
        finally:
            if beats is not None:
                os.close(beats[1])  # the worker's alone: EOF here once it is gone
        slot.process = process
        slot.signalled_at = None
        label = f"pid {process.pid}" if self.reload else f"worker {slot.index} pid {process.pid}"
        if self.reload:
            log.info("started the app (pid %d)", process.pid)
        else:
            log.info("started worker %d (pid %d)", slot.index, process.pid)
        assert process.stdout is not None and process.stderr is not None
        slot.relays = [relay for relay in slot.relays if not relay.done()]
        # With JSON logs, every line is one JSON object: a worker's other output too.
        as_json = self.settings.log_format == "json"
        for stream, out in ((process.stdout, sys.stdout), (process.stderr, sys.stderr)):
            json_name = ("stdout" if out is sys.stdout else "stderr") if as_json else None
            slot.relays.append(asyncio.create_task(_relay(stream, out, label, slot.index, process.pid, json_name)))
        if beats is not None:
            slot.watch = asyncio.create_task(self._watch(slot, process, beats[0]))
        return process

    async def _watch(self, slot: _Slot, process: asyncio.subprocess.Process, beats: int) -> None:
        """Kill a worker whose heartbeat stopped (its event loop is stuck: its connections hang
        while the other workers answer every probe), or that is still shutting down
        ``APP_WORKER_TIMEOUT`` seconds after its drain delay and grace period."""
        loop = asyncio.get_running_loop()
        last: float | None = None  # no beat yet: it is starting (start-up is not bounded here)

        def on_beat() -> None:
            nonlocal last
            try:
                if os.read(beats, 4096):
                    last = time.monotonic()
                    return
            except BlockingIOError:
                return
            except OSError:
                pass
            loop.remove_reader(beats)  # EOF: the worker is gone

        os.set_blocking(beats, False)
        loop.add_reader(beats, on_beat)
        interval = self.timeout / heartbeat.BEATS_PER_TIMEOUT
        # A beat is due every interval: one that waited the timeout for the loop is missed.
        silence_limit = self.timeout + interval
        shutdown_limit = self.settings.drain_delay + self.settings.grace_period + self.timeout
        try:
            while process.returncode is None:
                await asyncio.sleep(interval)
                now = time.monotonic()
                if last is not None and now - last > silence_limit:
                    what = (
                        f"has not answered for {now - last:.1f}s (APP_WORKER_TIMEOUT={self.timeout:g}: its event"
                        " loop is stuck)"
                    )
                elif slot.signalled_at is not None and now - slot.signalled_at > shutdown_limit:
                    what = (
                        f"is still shutting down {now - slot.signalled_at:.1f}s after SIGTERM (APP_DRAIN_DELAY +"
                        f" APP_GRACE_PERIOD + APP_WORKER_TIMEOUT = {shutdown_limit:g}s)"
                    )
                else:
                    continue
                await self._kill(slot, process, what)
                return
        finally:
            loop.remove_reader(beats)
            os.close(beats)

    async def _kill(self, slot: _Slot, process: asyncio.subprocess.Process, what: str) -> None:
        """Have a stuck worker print its stacks, then kill it and what it started (its group)."""
        if process.returncode is not None:
            return
        log.error("worker %d (pid %d) %s: killing it; its stacks follow", slot.index, process.pid, what)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(heartbeat.STACKS_SIGNAL)
            # (Printed from the signal handler at once; a moment for the relay to pass it on.)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_exited(process), 0.5)
        _kill_group(process)


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill a worker with its process group: what it started goes with it, not left running
    as orphans (the group outlives its leader while one of them runs)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


async def _exited(process: asyncio.subprocess.Process) -> int:
    """The worker's exit code once it has exited. Not ``process.wait()``: on Python 3.11 that
    also waits for its stdout and stderr to close, which a child the worker started (and left
    running) holds open: its exit would go unseen, neither restarted nor waited for."""
    while process.returncode is None:
        await asyncio.sleep(0.05)
    return process.returncode


async def _relay(
    stream: asyncio.StreamReader,
    out: IO[str] | None,
    label: str,
    index: int,
    pid: int,
    json_name: str | None = None,
) -> None:
    """Copy a worker's stdout or stderr to ``out`` (ours), each line saying which worker wrote it.

    ``json_name`` (``stdout`` or ``stderr``, with JSON logs): a line that is not a JSON object (a ``print()``,
    a traceback, the stacks of a stuck worker) becomes one, as the logs are (a piece of one
    too long to hold, one each).
    Read to the end even when ``out`` cannot be written (closed, a broken pipe): a worker
    must never block on a full pipe.
    """
    target = getattr(out, "buffer", None)
    prefix = f"[{label}] ".encode()
    at_line_start = True
    while True:
        try:
            chunk = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            chunk = exc.partial
            if not chunk:
                break
            chunk += b"\n"  # its last line, unended: what we write next starts a line of its own
        except asyncio.LimitOverrunError as exc:
            # A piece of a very long line. One that begins as JSON goes on as it is (a prefix
            # would break it; it is too long to hold and label): still one JSON line.
            chunk = await stream.read(max(exc.consumed, 1))
            if at_line_start and chunk.startswith(b"{"):
                at_line_start = False
        if at_line_start:
            labelled = _label_json(chunk, index, pid)
            if labelled is not None:
                chunk = labelled
            elif json_name is not None:
                chunk = _as_json_line(chunk, index, pid, json_name)
            else:
                chunk = prefix + chunk
        at_line_start = chunk.endswith(b"\n")
        if target is not None:
            try:
                target.write(chunk)
                target.flush()
            except (OSError, ValueError):  # ValueError: closed
                target = None


def _as_json_line(text: bytes, index: int, pid: int, stream: str) -> bytes:
    """A line of a worker's plain output as a JSON log line of the supervisor's format."""
    entry = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
        "level": "INFO" if stream == "stdout" else "WARNING",
        "logger": f"app_kit.workers.{stream}",
        "message": text.rstrip(b"\r\n").decode(errors="replace"),
        "worker": index,
        "pid": pid,
    }
    return json.dumps(entry, ensure_ascii=False).encode(errors="surrogateescape") + b"\n"


def _label_json(line: bytes, index: int, pid: int) -> bytes | None:
    """A JSON log line with ``worker`` and ``pid`` added (it stays one JSON object), or None."""
    if not line.startswith(b"{"):
        return None
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # (nested too deep for the parser: relayed as text)
        return None
    if not isinstance(entry, dict):
        return None
    entry.setdefault("worker", index)
    entry.setdefault("pid", pid)
    try:
        return json.dumps(entry, ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate the worker escaped: escaped it stays
        return json.dumps(entry).encode() + b"\n"


def watch_supervisor() -> None:
    """In a worker or ``--reload`` child: once the supervisor is gone, drain as on SIGTERM.

    Workers are process groups of their own, so a supervisor killed without passing a signal
    on (SIGKILL, the OOM killer, a crash) would leave them serving the port. A thread waits for
    EOF on the supervisor's pipe (every write end closes when it dies) and then sends this
    process SIGTERM: the usual graceful shutdown, whatever the event loop. Outside a
    supervisor it does nothing. The variable is removed, so the App's own subprocesses do not
    see it.

    The child also takes a repeated SIGTERM/SIGINT as the same request
    (:func:`~app_kit.app.signals.mark_supervised`), and writes stdout line by line: it is
    relayed a line at a time, and a pipe would otherwise hold ``print()`` output back.
    """
    heartbeat.claim()
    text = os.environ.pop(SUPERVISOR_FD, "")
    if not text:
        return
    mark_supervised()
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)
    fd = int(text)
    os.set_inheritable(fd, False)  # pass_fds made it inheritable; it is ours alone
    threading.Thread(target=_await_supervisor_exit, args=(fd,), name="app_kit supervisor watch", daemon=True).start()


def _await_supervisor_exit(fd: int) -> None:
    try:
        while os.read(fd, 1024):  # nothing is ever written: only EOF comes
            pass
    except OSError:
        return
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    log.warning("the supervisor is gone: shutting down")
    # Nobody reads our stdout and stderr any more (pipes to the dead supervisor): what the
    # drain writes (a handler's print(), the logs) goes nowhere, rather than failing with
    # BrokenPipeError in the handlers still finishing their calls.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    os.kill(os.getpid(), signal.SIGTERM)


def child_command(argv: Sequence[str]) -> list[str]:
    """The command of one worker: this command line, as one process (later options win)."""
    return [sys.executable, "-m", "app_kit", *argv, "--workers", "1", "--no-reload"]


def run_workers(argv: Sequence[str], settings: AppSettings, *, count: int) -> int:
    """Supervise ``count`` workers of the ``run`` command line ``argv``; return the exit code.

    Logging is expected to be set up already (the CLI does it).
    """
    if settings.metrics_port and count > 1:
        # Each worker is a process with metrics of its own and would bind that one port: the
        # second would fail to start, stopping them all. Refused before any worker starts.
        log.error(
            "start-up failed: APP_METRICS_PORT=%d cannot be served by %d workers (each would bind it): "
            "run one worker per process (e.g. a replica each), or use APP_METRICS_PORT=0 for a port "
            "per worker (each logs its own)",
            settings.metrics_port,
            count,
        )
        return EXIT_STARTUP_FAILED
    try:
        shared = bind_shared(settings)
    except (OSError, ValueError) as exc:
        log.error("start-up failed: cannot listen on %s: %s", listen_address(settings), exc)
        return EXIT_STARTUP_FAILED
    where = settings.path if settings.path is not None else f"{settings.host}:{shared.arguments[1]}"
    log.info("supervisor (pid %d): %d workers on %s", os.getpid(), count, where)

    async def supervise() -> int:
        return await Supervisor(child_command(argv), settings, shared, count=count).run()

    try:
        return asyncio.run(supervise())
    finally:
        shared.close()
