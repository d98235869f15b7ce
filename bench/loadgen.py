"""grpcio load generator: ``python bench/loadgen.py SCENARIO PORT SECONDS`` prints one JSON result.

Every reply is checked; a wrong one counts as an error and fails the run's gate.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import time

import grpc

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_gen"), str(HERE / "_gen" / "grpcio")]

import bench_pb2  # noqa: E402
import bench_pb2_grpc  # noqa: E402

SMALL = bench_pb2.Payload(data=b"0123456789")
OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


async def unary(stub: bench_pb2_grpc.BenchStub, seconds: float, in_flight: int, payload: bench_pb2.Payload) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                reply = await stub.Unary(payload)
                ok = reply.data == payload.data
            except grpc.aio.AioRpcError:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - began
    return {
        "calls": len(latencies),
        "errors": errors,
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "bytes_per_s": len(latencies) * len(payload.data) / elapsed,
    }


async def server_stream(stub: bench_pb2_grpc.BenchStub, seconds: float) -> dict:
    request = bench_pb2.StreamRequest(count=1000, size=10)
    messages = errors = calls = 0
    deadline = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < deadline:
        calls += 1
        received = 0
        async for reply in stub.ServerStream(request):
            received += 1
            errors += len(reply.data) != 10
        errors += received != request.count
        messages += received
    elapsed = time.perf_counter() - began
    return {"calls": calls, "messages": messages, "errors": errors, "rate": messages / elapsed}


async def bidi(stub: bench_pb2_grpc.BenchStub, seconds: float) -> dict:
    call = stub.BidiStream()
    window = asyncio.Semaphore(100)  # at most 100 messages in flight
    sent = received = errors = 0
    stop = time.perf_counter() + seconds

    async def writer() -> None:
        nonlocal sent
        while time.perf_counter() < stop:
            await window.acquire()
            await call.write(bench_pb2.Payload(data=sent.to_bytes(8, "big")))
            sent += 1
        await call.done_writing()

    began = time.perf_counter()
    writing = asyncio.ensure_future(writer())
    async for reply in call:
        errors += int.from_bytes(reply.data, "big") != received
        received += 1
        window.release()
    await writing
    elapsed = time.perf_counter() - began
    errors += sent != received
    return {"calls": 1, "messages": received, "errors": errors, "rate": received / elapsed}


async def main(scenario: str, port: int, seconds: float) -> dict:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS) as channel:
        stub = bench_pb2_grpc.BenchStub(channel)
        await stub.Unary(SMALL)  # connect and warm up
        if scenario == "unary_1":
            return await unary(stub, seconds, 1, SMALL)
        if scenario == "unary_100":
            return await unary(stub, seconds, 100, SMALL)
        if scenario == "unary_1mib":
            return await unary(stub, seconds, 2, bench_pb2.Payload(data=b"m" * (1 << 20)))
        if scenario == "server_stream":
            return await server_stream(stub, seconds)
        if scenario == "bidi":
            return await bidi(stub, seconds)
    raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))))
