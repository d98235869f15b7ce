"""Full-size flood attacks against ``python -m app_kit run``: ``python bench/floods.py``.

For each attack: what the server answered, and what it cost the server in CPU time and
memory. The test suite runs the same attacks at a size that keeps it fast.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys
import time
import zlib

import hpack
from google.protobuf.wrappers_pb2 import BytesValue

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tests.frames import (  # noqa: E402
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HANDSHAKE,
    HEADERS,
    RawPeer,
    flood,
    frame,
    process_cpu_seconds,
    process_peak_rss_bytes,
    process_rss_bytes,
    request_block,
    reset_peak_rss,
)
from tests.process import AppProcess  # noqa: E402

MiB = 1 << 20


async def run_flood(port: int, data: bytes) -> tuple[str, float]:
    started = time.perf_counter()
    async with RawPeer(port) as peer:
        for start in range(0, len(data), 1 << 16):
            if not await peer.send(data[start : start + (1 << 16)]):
                break
        await peer.wait_closed(30)
    answer = ", ".join(f"GOAWAY {g.error_code} {g.additional_data!r}" for g in peer.goaways) or "no GOAWAY"
    return answer, time.perf_counter() - started


async def continuation_flood(port: int, limit: int) -> tuple[str, float]:
    started = time.perf_counter()
    sent = 0
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE + frame(HEADERS, 0, 1, request_block()))
        chunk = frame(CONTINUATION, 0, 1, b"\x00" * 16384) * 64
        while sent < limit and not peer.goaways and await peer.send(chunk):
            sent += len(chunk)
            await asyncio.sleep(0)
        await peer.wait_closed(30)
    answer = ", ".join(f"GOAWAY {g.error_code}" for g in peer.goaways) or "no GOAWAY"
    return f"{answer} after {sent / MiB:.0f} MiB sent", time.perf_counter() - started


async def incomplete_messages(port: int, streams: int, each: int) -> tuple[str, float]:
    """Streams that each park ``each`` bytes of a 4 MiB message and never finish it."""
    started = time.perf_counter()
    encoder = hpack.Encoder()
    async with RawPeer(port) as peer:
        await peer.send(HANDSHAKE)
        for stream_id in range(1, 2 * streams, 2):
            block = request_block(encoder, "/test.Sleeper/Hold")
            body = b"\x00" + (4 * MiB).to_bytes(4, "big") + b"x" * each
            step = 1 << 16
            frames = [frame(DATA, 0, stream_id, body[at : at + step]) for at in range(0, len(body), step)]
            if not await peer.send(frame(HEADERS, END_HEADERS, stream_id, block) + b"".join(frames)):
                break
        await asyncio.sleep(1)
        statuses = peer.trailer_statuses()
        closed = peer.closed.is_set() or bool(peer.goaways)
    exhausted = sum(1 for status in statuses.values() if status == b"8")
    answer = f"{exhausted} of {streams} streams RESOURCE_EXHAUSTED, connection {'closed' if closed else 'kept'}"
    return answer, time.perf_counter() - started


async def gzip_bombs(port: int, pid: int, streams: int, per_stream: int) -> tuple[str, float]:
    """Messages of ~4 KiB that inflate to 4 MiB each, ``per_stream`` on each of ``streams`` calls."""
    started = time.perf_counter()
    encoder = hpack.Encoder()
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    payload = bomb.compress(BytesValue(value=bytes(4 * MiB - 16)).SerializeToString()) + bomb.flush()
    reset_peak_rss(pid)
    rss = process_rss_bytes(pid)
    async with RawPeer(port) as peer:
        parts = [HANDSHAKE]
        for stream_id in range(1, 2 * streams, 2):
            block = request_block(encoder, "/test.Sleeper/Hold", extra=[("grpc-encoding", "gzip")])
            body = (b"\x01" + len(payload).to_bytes(4, "big") + payload) * per_stream
            parts += [frame(HEADERS, END_HEADERS, stream_id, block), frame(DATA, END_STREAM, stream_id, body)]
        await peer.send(b"".join(parts))
        await asyncio.sleep(2)
        statuses = peer.trailer_statuses()
    peak = (process_peak_rss_bytes(pid) - rss) / MiB
    exhausted = sum(1 for status in statuses.values() if status == b"8")
    answer = f"peak +{peak:.0f} MiB; {exhausted} of {streams} calls RESOURCE_EXHAUSTED"
    return answer, time.perf_counter() - started


async def unread_answers(port: int, requests: int) -> tuple[str, float]:
    """Requests to an unknown method sent in batches the concurrency limit allows, never reading."""
    started = time.perf_counter()
    encoder = hpack.Encoder()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HANDSHAKE)
    sent = 0
    for first in range(0, requests, 500):
        writer.write(
            b"".join(
                frame(HEADERS, END_HEADERS | END_STREAM, 2 * n + 1, request_block(encoder, "/x.y/z"))
                for n in range(first, first + 500)
            )
        )
        try:
            await asyncio.wait_for(writer.drain(), 1)
        except (TimeoutError, ConnectionError):
            break
        sent = first + 500
    writer.transport.abort()
    return f"{sent:,} requests taken before the server stopped reading", time.perf_counter() - started


async def idle_connections(port: int, count: int) -> tuple[str, float]:
    started = time.perf_counter()
    writers = []
    for _ in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HANDSHAKE)
        writers.append(writer)
    await asyncio.sleep(1)
    for writer in writers:
        writer.close()
    return f"{count} connections held", time.perf_counter() - started


async def main() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    async with AppProcess("tests.apps.lifecycle_app:app", "--port", "0") as app:
        port = await app.ready()
        pid = app.process.pid
        print(f"{'attack':<38}{'server CPU':>12}{'memory growth':>16}  answer")
        cases = [
            ("rapid reset x 100,000", run_flood(port, flood("rapid reset", 100_000))),
            ("malformed requests x 100,000", run_flood(port, flood("malformed requests", 100_000))),
            ("unknown method x 1,000,000, one read", run_flood(port, flood("unknown method", 1_000_000))),
            ("PING x 1,000,000", run_flood(port, flood("PING", 1_000_000))),
            ("SETTINGS x 200,000", run_flood(port, flood("SETTINGS", 200_000))),
            ("empty DATA x 1,000,000", run_flood(port, flood("empty DATA", 1_000_000))),
            ("WINDOW_UPDATE x 1,000,000", run_flood(port, flood("WINDOW_UPDATE", 1_000_000))),
            ("PRIORITY x 1,000,000", run_flood(port, flood("PRIORITY", 1_000_000))),
            ("padded empty DATA x 1,000,000", run_flood(port, flood("padded empty DATA", 1_000_000))),
            ("CONTINUATION, up to 1 GiB", continuation_flood(port, 1 << 30)),
            ("incomplete messages, 200 x 1 MiB", incomplete_messages(port, 200, MiB)),
            ("gzip bombs, 60 calls x 1", gzip_bombs(port, pid, 60, 1)),
            ("gzip bombs, 1 call x 60", gzip_bombs(port, pid, 1, 60)),
            ("unread answers, up to 1,000,000", unread_answers(port, 1_000_000)),
            ("idle connections x 2,000", idle_connections(port, 2000)),
        ]
        for name, run in cases:
            cpu, rss = process_cpu_seconds(pid), process_rss_bytes(pid)
            answer, elapsed = await run
            await asyncio.sleep(0.2)
            print(
                f"{name:<38}{process_cpu_seconds(pid) - cpu:>10.2f} s"
                f"{(process_rss_bytes(pid) - rss) / MiB:>13.1f} MiB  {answer} ({elapsed:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    os.chdir(ROOT)
    asyncio.run(main())
