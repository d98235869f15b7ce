"""Full-size flood attacks against app_kit, grpclib and grpcio-aio: ``python bench/floods.py``.

Each implementation serves the same ``/test.Sleeper`` methods in its own process (app_kit:
``python -m app_kit run tests.apps.lifecycle_app:app``; the others: ``bench/flood_servers.py``),
started afresh for each implementation and kept across its attacks (but see below). For each
attack: the server's CPU time (until it is idle again, at most 60 s after the attack), its peak
memory during the attack and the memory it kept, what it answered, and whether a normal
``Sleep(0)`` call on a new connection, made as soon as the attacker stops sending (attacking
connections still open), is served within 5 s ("others served"; if not, asked again once the
server is idle).

Every attack stops sending after ``--seconds`` (20) of wall time and says how much it had sent.
A server that dies is restarted; so is one still busy 60 s after an attack or grown by more than
128 MiB since its start (its aftermath would blur the next attack's numbers); a server over
4 GiB of RSS is killed. ``--quick``: smaller attacks, 5 s bound.
``--impl app_kit,grpclib,grpcio`` picks implementations, ``--only "PING,gzip"`` attacks by the
start of their name. The test suite runs app_kit's part at a smaller size with budgets
(tests/test_hardening.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import pathlib
import re
import resource
import signal
import sys
import time
import urllib.parse
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator

import hpack
from google.protobuf.wrappers_pb2 import BytesValue
from h2.errors import ErrorCodes

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tests.frames import (  # noqa: E402
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HANDSHAKE,
    HEADERS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    flood,
    frame,
    process_cpu_seconds,
    process_peak_rss_bytes,
    process_rss_bytes,
    request_block,
    reset_peak_rss,
)

MiB = 1 << 20
ACK, PADDED, PRIORITY_FLAG = 0x1, 0x8, 0x20
LABELS = {"app_kit": "app_kit", "grpclib": "grpclib", "grpcio": "grpcio-aio"}
MEMORY_CAP = 4 << 30  # a server over this is killed: the bench must not take the machine down
PROBE_TIMEOUT = 5.0
SETTLE_LIMIT = 60.0
RESTART_GROWTH = 128 * MiB  # a server this much larger than at its start is restarted
ERROR_NAMES = {int(code): code.name for code in ErrorCodes}
STATUS_NAMES = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND ALREADY_EXISTS PERMISSION_DENIED "
    "RESOURCE_EXHAUSTED FAILED_PRECONDITION ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE "
    "DATA_LOSS UNAUTHENTICATED"
).split()
FRAME_NAMES = {DATA: "DATA", HEADERS: "HEADERS", RST_STREAM: "RST_STREAM", SETTINGS: "SETTINGS", PING: "PING"}
# app_kit logs "serving ... on 127.0.0.1:PORT"; bench/flood_servers.py prints "READY PORT".
PORT_LINE = re.compile(r"^READY (\d+)$| serving .* on (?:127\.0\.0\.1|\[::1\]|localhost):(\d+)")


class ServerProcess:
    """One implementation's server process; its output is drained, its RSS watched."""

    def __init__(self, implementation: str) -> None:
        self.implementation = implementation
        self.log_lines = 0
        self.tail: deque[str] = deque(maxlen=40)
        self.killed_for_memory = False
        self.max_rss_seen = 0  # sampled: the peak when the process is gone and VmHWM with it
        self.last_cpu = 0.0

    async def start(self) -> None:
        if self.implementation == "app_kit":
            args = ["-m", "app_kit", "run", "tests.apps.lifecycle_app:app", "--port", "0"]
        else:
            args = [str(ROOT / "bench" / "flood_servers.py"), self.implementation, "0"]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 24,
        )
        self.pid = self.process.pid
        self.killed_for_memory = False
        found: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._tasks = [asyncio.create_task(self._drain(s, found)) for s in (self.process.stdout, self.process.stderr)]
        try:
            self.port = await asyncio.wait_for(found, 30)
        except (TimeoutError, RuntimeError):
            await self.stop()
            raise RuntimeError(f"{self.implementation} did not start:\n" + "\n".join(self.tail)) from None
        self._tasks.append(asyncio.create_task(self._watch()))
        self.start_rss = process_rss_bytes(self.pid)

    async def _drain(self, stream: asyncio.StreamReader, found: asyncio.Future[int]) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: count it, go on
                line = b"(long line)\n"
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            self.log_lines += 1
            self.tail.append(text)
            if not found.done() and (match := PORT_LINE.search(text)):
                found.set_result(int(match.group(1) or match.group(2)))
        if not found.done():
            found.set_exception(RuntimeError("exited"))

    async def _watch(self) -> None:
        while self.alive:
            try:
                rss, self.last_cpu = process_rss_bytes(self.pid), process_cpu_seconds(self.pid)
            except (OSError, RuntimeError, IndexError):
                return
            self.max_rss_seen = max(self.max_rss_seen, rss)
            if rss > MEMORY_CAP:
                self.killed_for_memory = True
                self.process.kill()
                return
            await asyncio.sleep(0.05)

    @property
    def alive(self) -> bool:
        """Running: not exited, nor a zombie not yet reaped."""
        if self.process.returncode is not None:
            return False
        try:
            process_rss_bytes(self.pid)  # a zombie has no VmRSS
        except (OSError, RuntimeError):
            return False
        return True

    async def stop(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Peer:
    """A raw HTTP/2 client connection that reads every frame back and keeps a summary of them.

    Unlike tests/frames.py's RawPeer it keeps counts, not frame objects (a server may answer a
    million PINGs), acknowledges the server's SETTINGS and PINGs as clients do, tracks the send
    windows the server grants, and decodes header blocks for each call's grpc-status. Every write
    is of whole frames, so these acknowledgements never split one.
    """

    def __init__(self, port: int, acknowledge: bool = True) -> None:
        self.port = port
        self.acknowledge = acknowledge  # False: inside an endless header block nothing else may be sent
        self.counts: Counter[int] = Counter()
        self.goaways: list[tuple[int, bytes]] = []
        self.resets: Counter[int] = Counter()
        self.statuses: dict[int, int] = {}
        self.status_messages: dict[int, str] = {}
        self.replies: Counter[int] = Counter()  # gRPC messages received, by stream
        self.written = 0  # bytes handed to the socket
        self._held: list[bytes] = []  # acknowledgements due before our preface went out
        self.closed = asyncio.Event()
        self.window_changed = asyncio.Event()
        self.settings_received = asyncio.Event()
        self.connection_window = self.initial_window = 65535
        self.stream_windows: dict[int, int] = {}
        self._decoder = hpack.Decoder()
        self._block: tuple[int, bytearray] | None = None
        self._data: dict[int, bytearray] = {}

    async def __aenter__(self) -> Peer:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.writer.transport.abort()

    async def _read(self) -> None:
        buffer = bytearray()
        try:
            while chunk := await self.reader.read(1 << 18):
                buffer += chunk
                at = 0
                while len(buffer) - at >= 9:
                    length = int.from_bytes(buffer[at : at + 3], "big")
                    if len(buffer) - at < 9 + length:
                        break
                    stream_id = int.from_bytes(buffer[at + 5 : at + 9], "big") & 0x7FFFFFFF
                    self._frame(buffer[at + 3], buffer[at + 4], stream_id, bytes(buffer[at + 9 : at + 9 + length]))
                    at += 9 + length
                del buffer[:at]
        except (ConnectionError, OSError):
            pass
        self.closed.set()
        self.window_changed.set()

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.counts[kind] += 1
        if kind == GOAWAY:
            self.goaways.append((int.from_bytes(payload[4:8], "big"), payload[8:]))
        elif kind == RST_STREAM:
            self.resets[int.from_bytes(payload[:4], "big")] += 1
        elif kind == SETTINGS and not flags & ACK:
            for at in range(0, len(payload) - 5, 6):
                if int.from_bytes(payload[at : at + 2], "big") == 0x4:  # SETTINGS_INITIAL_WINDOW_SIZE
                    value = int.from_bytes(payload[at + 2 : at + 6], "big")
                    for sid in self.stream_windows:
                        self.stream_windows[sid] += value - self.initial_window
                    self.initial_window = value
            self._write(frame(SETTINGS, ACK, 0))
            self.settings_received.set()
            self.window_changed.set()
        elif kind == PING and not flags & ACK:
            self._write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if stream_id == 0:
                self.connection_window += increment
            else:
                self.stream_windows[stream_id] = self.stream_windows.get(stream_id, self.initial_window) + increment
            self.window_changed.set()
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self._block = (stream_id, bytearray())
            if self._block is not None:
                self._block[1].extend(payload)
                if flags & END_HEADERS:
                    self._headers(*self._block)
                    self._block = None
        elif kind == DATA:
            if flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            data = self._data.setdefault(stream_id, bytearray())
            data.extend(payload)
            while len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
                del data[: 5 + int.from_bytes(data[1:5], "big")]
                self.replies[stream_id] += 1

    def _headers(self, stream_id: int, block: bytearray) -> None:
        try:
            for name, value in self._decoder.decode(bytes(block), raw=True):
                if name == b"grpc-status":
                    self.statuses[stream_id] = int(value)
                elif name == b"grpc-message":
                    self.status_messages[stream_id] = urllib.parse.unquote(value.decode(errors="replace"))
        except Exception:  # a block we cannot decode says nothing about the call
            pass

    def _write(self, data: bytes) -> None:
        if not self.acknowledge:
            return
        if not self.written:
            self._held.append(data)  # the server spoke first: nothing may precede our preface
        elif not self.writer.is_closing():
            self.writer.write(data)

    async def send(self, data: bytes, deadline: float) -> bool:
        """Write whole frames; False once the connection is closed or ``deadline`` has passed."""
        if self.closed.is_set() or self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
            self.written += len(data)
            if self._held:
                self.writer.write(b"".join(self._held))
                self._held.clear()
            await asyncio.wait_for(self.writer.drain(), max(deadline - time.monotonic(), 0))
        except (ConnectionError, OSError, TimeoutError):
            return False
        return True

    async def send_data(self, stream_id: int, body: bytes, deadline: float, stall: float = 2.0) -> int:
        """Send ``body`` as DATA on ``stream_id`` as far as the server's windows allow; the bytes sent.

        Gives up at ``deadline``, or when no window opens for ``stall`` seconds.
        """
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.settings_received.wait(), max(deadline - time.monotonic(), 0))
        sent = 0
        while sent < len(body) and not self.closed.is_set():
            window = min(self.connection_window, self.stream_windows.setdefault(stream_id, self.initial_window))
            if window <= 0:
                self.window_changed.clear()
                try:
                    await asyncio.wait_for(self.window_changed.wait(), min(stall, deadline - time.monotonic()))
                except (TimeoutError, ValueError):
                    break
                continue
            size = min(window, 16384, len(body) - sent)
            if not await self.send(frame(DATA, 0, stream_id, body[sent : sent + size]), deadline):
                break
            self.connection_window -= size
            self.stream_windows[stream_id] -= size
            sent += size
        return sent

    def summary(self) -> str:
        """The GOAWAY (or its absence), the frames the server answered with, the connection's state."""
        parts = []
        for code, debug in self.goaways:
            text = f"GOAWAY {ERROR_NAMES.get(code, code)}"
            parts.append(f"{text} {debug.decode(errors='replace')!r}" if 0 < len(debug) <= 40 else text)
        parts = parts or ["no GOAWAY"]
        counts = self.counts.copy()
        counts[SETTINGS] -= 2  # the server's own and its acknowledgement of ours
        answered = [f"{counts[kind]:,} {name}" for kind, name in FRAME_NAMES.items() if counts[kind] > 0]
        if self.resets:
            codes = ", ".join(f"{ERROR_NAMES.get(code, code)} {n:,}" for code, n in self.resets.most_common())
            answered.append(f"(RST_STREAM: {codes})")
        if answered:
            parts.append("got " + " ".join(answered))
        if self.statuses:
            by_status = Counter(self.statuses.values()).most_common()
            parts.append("grpc-status " + ", ".join(f"{status_name(code)} {n:,}" for code, n in by_status))
        parts.append("connection " + ("closed" if self.closed.is_set() else "open"))
        return "; ".join(parts)

    def call_summary(self, calls: int) -> str:
        """How the ``calls`` calls ended: counts by grpc-status, the rest still open."""
        by_status = Counter(self.statuses.values())
        ended = [f"{n} {status_name(code)}" for code, n in by_status.items()]
        if calls - len(self.statuses):
            ended.append(f"{calls - len(self.statuses)} open")
        return f"calls: {', '.join(ended)}"


def status_name(code: int) -> str:
    return STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else str(code)


def frame_chunks(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    """``data`` in pieces of about ``size`` bytes, cut between frames (after the preface, if any)."""
    start = at = len(PREFACE) if data.startswith(PREFACE) else 0
    if start:
        yield data[:start]
    while at < len(data):
        at += 9 + int.from_bytes(data[at : at + 3], "big")
        if at - start >= size:
            yield data[start:at]
            start = at
    if start < len(data):
        yield data[start:]


def mib(count: int) -> str:
    if count < MiB:
        return f"{count / 1024:.0f} KiB"
    return f"{count / MiB:.0f} MiB" if count >= 10 * MiB else f"{count / MiB:.1f} MiB"


class Probe:
    """A normal ``Sleep(0)`` call on a new connection: is the server still serving others?"""

    def __init__(self, port: int) -> None:
        self.port = port
        self.result: str | None = None

    async def run(self) -> None:
        if self.result is not None:
            return
        started = time.monotonic()
        message = b"\x00" + (0).to_bytes(4, "big")  # DoubleValue(0.0) serializes to nothing
        request = HANDSHAKE + frame(HEADERS, END_HEADERS, 1, request_block()) + frame(DATA, END_STREAM, 1, message)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT), Peer(self.port) as peer:
                await peer.send(request, started + PROBE_TIMEOUT)
                while 1 not in peer.statuses and not peer.closed.is_set():
                    await asyncio.sleep(0.002)
        except TimeoutError:
            self.result = f"no: no answer in {PROBE_TIMEOUT:.0f} s"
            return
        except OSError as error:
            self.result = f"no: {error.strerror or type(error).__name__}"
            return
        status = peer.statuses.get(1)
        if status == 0 and peer.replies[1] == 1:
            self.result = f"yes, {(time.monotonic() - started) * 1000:.0f} ms"
        elif status is None:
            self.result = "no: connection closed"
        else:
            name = status_name(status)
            message = peer.status_messages.get(1, "")
            self.result = f"no: {name} {message[:60]!r}" if message else f"no: {name}"


# -- the attacks: each returns the server's answer, and runs the probe when it stops sending -------


async def run_flood(port: int, probe: Probe, data: bytes, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    async with Peer(port) as peer:
        for chunk in frame_chunks(data):
            if not await peer.send(chunk, deadline):
                break
        sent = peer.written
        out_of_time = sent < len(data) and time.monotonic() >= deadline
        await probe.run()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(peer.closed.wait(), 3)
    answer = peer.summary()
    if out_of_time:
        answer += f"; stopped at the {seconds:.0f} s bound, {mib(sent)} of {mib(len(data))} sent"
    elif sent < len(data):
        answer += f"; {mib(sent)} of {mib(len(data))} sent"
    return answer


async def continuation_flood(port: int, probe: Probe, limit: int, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    async with Peer(port, acknowledge=False) as peer:
        await peer.send(HANDSHAKE + frame(HEADERS, 0, 1, request_block()), deadline)
        chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 64
        while peer.written < limit and not peer.goaways and await peer.send(chunk, deadline):
            await asyncio.sleep(0)  # let the reader see a GOAWAY as soon as it comes
        sent = peer.written
        out_of_time = sent < limit and time.monotonic() >= deadline
        await probe.run()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(peer.closed.wait(), 3)
    bound = f", stopped at the {seconds:.0f} s bound" if out_of_time and not peer.goaways else ""
    return f"{peer.summary()}; {mib(sent)} sent{bound}"


async def incomplete_messages(port: int, probe: Probe, streams: int, each: int, seconds: float) -> str:
    """Streams that each park ``each`` bytes of a 4 MiB message and never finish it.

    Sent within the windows the server grants: a server that enforces flow control is not
    measured by how it treats a peer that does not.
    """
    deadline = time.monotonic() + seconds
    encoder = hpack.Encoder()
    sent = opened = 0
    async with Peer(port) as peer:
        await peer.send(HANDSHAKE, deadline)
        for stream_id in range(1, 2 * streams, 2):
            block = request_block(encoder, "/test.Sleeper/Hold")
            if time.monotonic() >= deadline or not await peer.send(
                frame(HEADERS, END_HEADERS, stream_id, block), deadline
            ):
                break
            opened += 1
            body = b"\x00" + (4 * MiB).to_bytes(4, "big") + b"x" * each
            sent += await peer.send_data(stream_id, body, deadline)
        await probe.run()
        await asyncio.sleep(1)
    parked = f"{opened} streams opened, {mib(sent)} of {mib(streams * (each + 5))} sent within the windows"
    return f"{parked}; {peer.call_summary(opened)}; {peer.summary()}"


async def gzip_bombs(port: int, probe: Probe, streams: int, per_stream: int, seconds: float) -> str:
    """Messages of ~4 KiB that inflate to 4 MiB each, ``per_stream`` on each of ``streams`` calls."""
    deadline = time.monotonic() + seconds
    encoder = hpack.Encoder()
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = bomb.compress(BytesValue(value=bytes(4 * MiB - 16)).SerializeToString()) + bomb.flush()
    body = (b"\x01" + len(payload).to_bytes(4, "big") + payload) * per_stream
    sent = 0
    async with Peer(port) as peer:
        await peer.send(HANDSHAKE, deadline)
        for stream_id in range(1, 2 * streams, 2):
            block = request_block(encoder, "/test.Sleeper/Hold", extra=[("grpc-encoding", "gzip")])
            if not await peer.send(frame(HEADERS, END_HEADERS, stream_id, block), deadline):
                break
            sent += await peer.send_data(stream_id, body, deadline)
        await probe.run()
        await asyncio.sleep(2)
    replies = sum(peer.replies.values())
    return (
        f"{sent // (len(payload) + 5)} of {streams * per_stream} bombs taken; {replies} replies in 2 s; "
        f"{peer.call_summary(streams)}; {peer.summary()}"
    )


async def unread_answers(port: int, probe: Probe, requests: int, seconds: float) -> str:
    """Requests to an unknown method sent in batches the concurrency limit allows, never reading."""
    deadline = time.monotonic() + seconds
    encoder = hpack.Encoder()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HANDSHAKE)
    sent, reason = 0, ""
    for first in range(0, requests, 500):
        writer.write(
            b"".join(
                frame(HEADERS, END_HEADERS | END_STREAM, 2 * n + 1, request_block(encoder, "/x.y/z"))
                for n in range(first, first + 500)
            )
        )
        sent = first + 500
        try:
            await asyncio.wait_for(writer.drain(), min(1, max(deadline - time.monotonic(), 0)))
        except TimeoutError:
            reason = "the bound" if time.monotonic() >= deadline else "the server stopped reading"
            break
        except ConnectionError:
            reason = "the server closed the connection"
            break
    await probe.run()
    writer.transport.abort()
    if sent == requests:
        return f"all {sent:,} requests written"
    return f"{sent:,} requests written, then {reason}"


async def idle_connections(port: int, probe: Probe, count: int, seconds: float) -> str:
    """``count`` connections that complete the handshake, then say nothing for a second."""
    deadline = time.monotonic() + seconds
    failure = ""
    async with contextlib.AsyncExitStack() as stack:
        peers: list[Peer] = []
        try:
            while len(peers) < count:
                if time.monotonic() >= deadline:
                    failure = ", then the bound"
                    break
                peer = await asyncio.wait_for(
                    stack.enter_async_context(Peer(port)), max(deadline - time.monotonic(), 0.1)
                )
                await peer.send(HANDSHAKE, deadline)
                peers.append(peer)
        except (OSError, TimeoutError) as error:
            failure = f", then {type(error).__name__}"
        await asyncio.sleep(1)
        await probe.run()
        closed = sum(1 for peer in peers if peer.closed.is_set())
    return f"{len(peers):,} opened{failure}; after 1 s {closed:,} closed by the server"


@dataclasses.dataclass
class Attack:
    name: str
    run: Callable[[int, Probe, float], Awaitable[str]]


def attacks(quick: bool) -> list[Attack]:
    """The attacks in the order they run; ``quick``: about 1/20 of their full size."""

    def n(full: int) -> int:
        return full // 20 if quick else full

    def flooding(kind: str, count: int) -> Callable[[int, Probe, float], Awaitable[str]]:
        return lambda port, probe, seconds: run_flood(port, probe, flood(kind, count), seconds)

    return [
        Attack(f"rapid reset x {n(100_000):,}", flooding("rapid reset", n(100_000))),
        Attack(f"malformed requests x {n(100_000):,}", flooding("malformed requests", n(100_000))),
        Attack(f"unknown method x {n(1_000_000):,} in one burst", flooding("unknown method", n(1_000_000))),
        Attack(f"PING x {n(1_000_000):,}", flooding("PING", n(1_000_000))),
        Attack(f"SETTINGS x {n(200_000):,}", flooding("SETTINGS", n(200_000))),
        Attack(f"empty DATA x {n(1_000_000):,}", flooding("empty DATA", n(1_000_000))),
        Attack(f"WINDOW_UPDATE x {n(1_000_000):,}", flooding("WINDOW_UPDATE", n(1_000_000))),
        Attack(f"PRIORITY x {n(1_000_000):,}", flooding("PRIORITY", n(1_000_000))),
        Attack(f"padded empty DATA x {n(1_000_000):,}", flooding("padded empty DATA", n(1_000_000))),
        Attack(
            f"CONTINUATION, up to {mib(n(1 << 30))}",
            lambda port, probe, seconds: continuation_flood(port, probe, n(1 << 30), seconds),
        ),
        Attack(
            f"incomplete messages, {n(200)} x 1 MiB",
            lambda port, probe, seconds: incomplete_messages(port, probe, n(200), MiB, seconds),
        ),
        Attack(
            f"gzip bombs, {n(60)} calls x 1",
            lambda port, probe, seconds: gzip_bombs(port, probe, n(60), 1, seconds),
        ),
        Attack(
            f"gzip bombs, 1 call x {n(60)}",
            lambda port, probe, seconds: gzip_bombs(port, probe, 1, n(60), seconds),
        ),
        Attack(
            f"unread answers, up to {n(1_000_000):,}",
            lambda port, probe, seconds: unread_answers(port, probe, n(1_000_000), seconds),
        ),
        Attack(
            f"idle connections x {n(2000):,}",
            lambda port, probe, seconds: idle_connections(port, probe, n(2000), seconds),
        ),
    ]


# -- measuring --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    cpu: float
    peak: float  # MiB over the RSS before the attack
    kept: float  # MiB of RSS growth once the server is idle again
    answer: str
    others: str
    seconds: float
    log_lines: int
    busy: bool  # still using CPU SETTLE_LIMIT seconds after the attack
    restarted: str = ""  # why the server was restarted after this attack, if it was

    def cell(self) -> str:
        busy = ", still busy" if self.busy else ""
        kept = "nothing (died)" if math.isnan(self.kept) else f"{self.kept:+.0f} MiB"
        return f"{self.cpu:.2f} s{busy}, peak {self.peak:+.0f} MiB, kept {kept}"


async def settle(server: ServerProcess) -> bool:
    """Wait until the server uses under 20 ms of CPU in 0.5 s; False if not within SETTLE_LIMIT."""
    limit = time.monotonic() + SETTLE_LIMIT
    try:
        last = process_cpu_seconds(server.pid)
    except (OSError, IndexError):
        return True  # gone
    while time.monotonic() < limit and server.alive:
        await asyncio.sleep(0.5)
        try:
            now = process_cpu_seconds(server.pid)
        except (OSError, IndexError):
            return True
        if now - last < 0.02:
            return True
        last = now
    return not server.alive


async def measure(server: ServerProcess, attack: Attack, seconds: float) -> Result:
    probe = Probe(server.port)
    running = attack.run(server.port, probe, seconds)  # floods build their bytes here, before the clock starts
    pid = server.pid
    cpu, rss, lines = process_cpu_seconds(pid), process_rss_bytes(pid), server.log_lines
    reset_peak_rss(pid)
    server.max_rss_seen = rss
    started = time.monotonic()
    try:
        answer = await asyncio.wait_for(running, seconds + 30)
    except TimeoutError:
        answer = "the bench's own time bound hit"
    except OSError as error:
        answer = f"could not connect: {error.strerror or type(error).__name__}"
    elapsed = time.monotonic() - started
    await probe.run()
    busy = not await settle(server)
    await asyncio.sleep(0.1)
    if server.alive and not (probe.result or "").startswith("yes"):
        again = Probe(server.port)  # starved for a while, or for good?
        await again.run()
        probe.result = f"{probe.result}; once idle: {again.result}"
    if not server.alive:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.process.wait(), 5)
        why = f"exit {server.process.returncode}"
        if server.killed_for_memory:
            why = f"killed by the bench over {mib(MEMORY_CAP)}"
        return Result(
            server.last_cpu - cpu,
            (server.max_rss_seen - rss) / MiB,
            float("nan"),
            f"server died ({why}); {answer}",
            probe.result or "",
            elapsed,
            server.log_lines - lines,
            False,
        )
    return Result(
        process_cpu_seconds(pid) - cpu,
        (process_peak_rss_bytes(pid) - rss) / MiB,
        (process_rss_bytes(pid) - rss) / MiB,
        answer,
        probe.result or "",
        elapsed,
        server.log_lines - lines,
        busy,
    )


async def run_implementation(implementation: str, chosen: list[Attack], seconds: float) -> dict[str, Result]:
    """Every chosen attack against one fresh server process, restarted if an attack kills it."""
    results: dict[str, Result] = {}
    server = ServerProcess(implementation)
    await server.start()
    try:
        for attack in chosen:
            if not server.alive:
                await server.stop()
                await server.start()
            results[attack.name] = result = await measure(server, attack, seconds)
            # A server still busy, or holding much more than at its start, would lend its
            # aftermath to the next attack's numbers (or hide them in memory it already has).
            if server.alive and (result.busy or process_rss_bytes(server.pid) > server.start_rss + RESTART_GROWTH):
                grown = (process_rss_bytes(server.pid) - server.start_rss) / MiB
                result.restarted = "still busy" if result.busy else f"+{grown:.0f} MiB since its start"
                await server.stop()
                await server.start()
            restarted = f" | restarted: {result.restarted}" if result.restarted else ""
            print(
                f"{LABELS[implementation]:<11} {attack.name:<40} {result.cell()}, {result.seconds:.1f} s,"
                f" {result.log_lines} log lines | {result.answer} | others served: {result.others}{restarted}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await server.stop()
    return results


def table(chosen: list[Attack], implementations: list[str], results: dict[str, dict[str, Result]]) -> str:
    """One row per attack and implementation, in Markdown."""
    rows = [
        "| attack | server | server CPU, memory | answer | others served |",
        "|---|---|---|---|---|",
    ]
    for attack in chosen:
        for implementation in implementations:
            result = results[implementation][attack.name]
            answer = result.answer.replace("|", "/")
            if result.restarted:
                answer += f" (server restarted after this: {result.restarted})"
            rows.append(f"| {attack.name} | {LABELS[implementation]} | {result.cell()} | {answer} | {result.others} |")
    return "\n".join(rows)


def quiet_resets(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """Resets of attacking connections are expected; a drain cut short by one is not news."""
    if not isinstance(context.get("exception"), ConnectionError):
        loop.default_exception_handler(context)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="app_kit,grpclib,grpcio", help="comma-separated: app_kit,grpclib,grpcio")
    parser.add_argument("--quick", action="store_true", help="attacks at about 1/20 of their size, 5 s bound")
    parser.add_argument("--only", default="", help="comma-separated starts of attack names, e.g. 'PING,gzip'")
    parser.add_argument("--seconds", type=float, default=None, help="how long an attack may send (20; --quick 5)")
    options = parser.parse_args()
    implementations = [name.strip() for name in options.impl.split(",") if name.strip()]
    unknown = [name for name in implementations if name not in LABELS]
    if unknown:
        parser.error(f"unknown --impl {unknown}: choose from {', '.join(LABELS)}")
    seconds = options.seconds or (5.0 if options.quick else 20.0)
    chosen = attacks(options.quick)
    if options.only:
        starts = [start.strip().lower() for start in options.only.split(",") if start.strip()]
        chosen = [attack for attack in chosen if attack.name.lower().startswith(tuple(starts))]
        if not chosen:
            parser.error(f"--only {options.only!r} matches no attack")

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the servers
    asyncio.get_running_loop().set_exception_handler(quiet_resets)
    results = {impl: await run_implementation(impl, chosen, seconds) for impl in implementations}
    print(table(chosen, implementations, results), flush=True)


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
