"""One client implementation as the load: ``python bench/clients.py IMPL SCENARIO PORT SECONDS``.

IMPL is app_kit, app_kit-trio (app_kit's Channel under ``trio.run``), grpclib or grpcio;
SCENARIO ``unary_100`` (unary calls, 100 in flight on one channel) or ``server_stream`` (calls
of 100 ten-byte replies, 10 in flight). Prints one JSON result: calls or messages, their rate,
and this process's CPU time per call or message. Every reply is checked; a wrong one is an
error and fails the orchestrator's gate.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
IMPLEMENTATION, SCENARIO, PORT, SECONDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ON_TRIO = IMPLEMENTATION == "app_kit-trio"
sys.path[:0] = [str(HERE / "_gen"), str(HERE / "_gen" / ("app_kit" if ON_TRIO else IMPLEMENTATION))]
sys.path.append(str(HERE.parent))  # app_kit from the checkout, unless PYTHONPATH says otherwise

import bench_pb2  # noqa: E402

SMALL = bench_pb2.Payload(data=b"0123456789")
STREAM = bench_pb2.StreamRequest(count=100, size=10)


async def load(unary: Callable[[], Awaitable[Any]], stream: Callable[[], Awaitable[list[Any]]]) -> dict[str, Any]:
    in_flight = 100 if SCENARIO == "unary_100" else 10
    done = errors = 0
    deadline = time.perf_counter() + SECONDS

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            try:
                if SCENARIO == "unary_100":
                    ok = (await unary()).data == SMALL.data
                    done += 1
                else:
                    replies = await stream()
                    ok = len(replies) == 100 and all(reply.data == b"x" * 10 for reply in replies)
                    done += len(replies)
            except Exception:
                ok = False
            errors += not ok

    for _ in range(200):  # warm up: connection, first calls
        await unary()
    cpu, began = time.process_time(), time.perf_counter()
    if ON_TRIO:
        import trio

        async with trio.open_nursery() as nursery:
            for _ in range(in_flight):
                nursery.start_soon(worker)
    else:
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - began
    return {"count": done, "errors": errors, "rate": done / elapsed, "cpu_us": cpu / max(done, 1) * 1e6}


async def main() -> dict[str, Any]:
    target = f"127.0.0.1:{PORT}"
    if IMPLEMENTATION in ("app_kit", "app_kit-trio"):
        from bench_grpc import BenchStub

        from app_kit import Channel

        async with Channel("127.0.0.1", PORT) as channel:
            stub = BenchStub(channel)
            return await load(lambda: stub.Unary(SMALL), lambda: stub.ServerStream(STREAM))  # type: ignore[arg-type,return-value]
    if IMPLEMENTATION == "grpclib":
        from bench_grpc import BenchStub  # type: ignore[no-redef]
        from grpclib.client import Channel as GrpclibChannel

        channel = GrpclibChannel("127.0.0.1", PORT)
        try:
            stub = BenchStub(channel)
            return await load(lambda: stub.Unary(SMALL), lambda: stub.ServerStream(STREAM))  # type: ignore[arg-type,return-value]
        finally:
            channel.close()
    import grpc
    from bench_pb2_grpc import BenchStub as GrpcioStub

    async with grpc.aio.insecure_channel(target) as grpcio_channel:
        grpcio_stub = GrpcioStub(grpcio_channel)

        async def collect() -> list[Any]:
            return [reply async for reply in grpcio_stub.ServerStream(STREAM)]

        return await load(lambda: grpcio_stub.Unary(SMALL), collect)


if __name__ == "__main__":
    if ON_TRIO:
        import trio

        print(json.dumps(trio.run(main)))
    else:
        print(json.dumps(asyncio.run(main())))
