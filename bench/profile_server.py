"""Profile app_kit's bench server under h2load: ``python bench/profile_server.py [unary|stream|bidi|big] [SECONDS]``.

Prints the top functions by own time (cProfile) — what the hot path spends per call.
"""

from __future__ import annotations

import asyncio
import cProfile
import pathlib
import pstats
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "_gen"), str(HERE / "_gen" / "app_kit")]


async def main(scenario: str, seconds: float) -> None:
    import bench_grpc
    import bench_pb2

    from app_kit import Server

    class Bench(bench_grpc.BenchBase):
        async def Unary(self, stream):  # type: ignore[no-untyped-def]
            await stream.send_message(await stream.recv_message())

        async def ServerStream(self, stream):  # type: ignore[no-untyped-def]
            request = await stream.recv_message()
            reply = bench_pb2.Payload(data=b"x" * request.size)
            for _ in range(request.count):
                await stream.send_message(reply)

        async def BidiStream(self, stream):  # type: ignore[no-untyped-def]
            async for message in stream:
                await stream.send_message(message)

    server = Server([Bench()])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    if scenario == "unary":
        body, path, streams = bench_pb2.Payload(data=b"0123456789").SerializeToString(), "Unary", 100
    elif scenario == "big":
        body, path, streams = bench_pb2.Payload(data=b"m" * (1 << 20)).SerializeToString(), "Unary", 2
    elif scenario == "bidi":
        body, path, streams = bench_pb2.Payload(data=b"0123456789").SerializeToString(), "BidiStream", 10
    else:
        body, path, streams = bench_pb2.StreamRequest(count=100, size=10).SerializeToString(), "ServerStream", 10
    with tempfile.NamedTemporaryFile() as data:
        data.write((b"\x00" + len(body).to_bytes(4, "big") + body) * (100 if scenario == "bidi" else 1))
        data.flush()
        profile = cProfile.Profile()
        profile.enable()
        process = await asyncio.create_subprocess_exec(
            "taskset",
            "-c",
            "1",
            "h2load",
            "-t",
            "1",
            "-c",
            "1",
            "-m",
            str(streams),
            "-D",
            f"{int(seconds * 1000)}ms",
            "-d",
            data.name,
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://127.0.0.1:{port}/bench.Bench/{path}",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        profile.disable()
    print(next(line for line in out.decode().splitlines() if "req/s" in line))
    server.close()
    await server.wait_closed()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(30)
    _by_package(stats, int(out.decode().split(" succeeded")[0].rsplit(" ", 1)[-1]))


def _by_package(stats: pstats.Stats, calls: int) -> None:
    """Own time and Python calls per served call, summed by package (where the time goes)."""
    totals: dict[str, list[float]] = {}
    for (filename, _, function), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename == "~":
            package = function.strip("<>").split(" ")[-1] if "method" in function else "builtins"
        elif "site-packages/" in filename:
            package = filename.split("site-packages/")[1].split("/")[0]
        elif "/app_kit/" in filename:
            package = "app_kit"
        else:
            package = pathlib.Path(filename).parent.name or filename
        entry = totals.setdefault(package, [0.0, 0.0])
        entry[0] += tottime
        entry[1] += ncalls
    whole = sum(seconds for seconds, _ in totals.values())
    print(f"{calls} calls served; per call, by package:")
    for package, (seconds, ncalls) in sorted(totals.items(), key=lambda item: -item[1][0])[:15]:
        print(f"  {package:30} {seconds / whole:6.1%} {ncalls / calls:8.1f} Python calls")


if __name__ == "__main__":
    from generate import generate

    generate()
    import os

    os.sched_setaffinity(0, {0})
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "unary", float(sys.argv[2]) if len(sys.argv) > 2 else 3))
