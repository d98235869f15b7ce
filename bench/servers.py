"""The bench service on one implementation: ``python bench/servers.py IMPLEMENTATION PORT``.

IMPLEMENTATION is ``app_kit``, ``grpclib``, ``grpcio`` or ``app_kit-trio`` (app_kit's server, the
same code, under ``trio.run``: its anyio byte-stream transport instead of asyncio's protocols).

``BENCH_INTERCEPTORS`` (app_kit only) installs interceptors, to measure what they cost:
``empty`` (one that overrides nothing), ``access`` (the access log, written to nowhere),
``metrics`` (Prometheus metrics). Prints ``READY`` when serving. On SIGTERM prints
``SERVED {json counts}`` and exits: the orchestrator checks those counts against what the load
generators saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import resource
import signal
import sys
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
IMPLEMENTATION = sys.argv[1]
ON_TRIO = IMPLEMENTATION == "app_kit-trio"
sys.path[:0] = [str(HERE / "_gen"), str(HERE / "_gen" / ("app_kit" if ON_TRIO else IMPLEMENTATION))]

import bench_pb2  # noqa: E402

COUNTS = {"unary": 0, "stream_messages": 0, "bidi_messages": 0}


class BenchMethods:
    """The service for app_kit and grpclib alike: their Stream APIs are the same."""

    async def Unary(self, stream):  # type: ignore[no-untyped-def]
        request = await stream.recv_message()
        COUNTS["unary"] += 1
        await stream.send_message(request)

    async def ServerStream(self, stream):  # type: ignore[no-untyped-def]
        request = await stream.recv_message()
        reply = bench_pb2.Payload(data=b"x" * request.size)
        for _ in range(request.count):
            await stream.send_message(reply)
        COUNTS["stream_messages"] += request.count

    async def BidiStream(self, stream):  # type: ignore[no-untyped-def]
        async for message in stream:
            COUNTS["bidi_messages"] += 1
            await stream.send_message(message)


def bench_interceptors() -> list[object]:
    import logging

    from app_kit import ServerInterceptor

    kind = os.environ.get("BENCH_INTERCEPTORS", "none")
    if kind == "none":
        return []
    if kind == "empty":
        return [ServerInterceptor()]
    if kind == "access":
        from app_kit.observe.access_log import AccessLog

        logger = logging.getLogger("bench.access")
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
        return [AccessLog(logger)]
    if kind == "metrics":
        from app_kit.observe.prometheus import ServerMetrics

        return [ServerMetrics()]
    raise SystemExit(f"BENCH_INTERCEPTORS={kind}: not one of none, empty, access, metrics")


async def serve_app_kit(port: int, stop: asyncio.Event | Any) -> None:
    """app_kit's server until ``stop`` is set (an asyncio.Event, or on trio a trio.Event)."""
    import bench_grpc

    from app_kit import Configuration, Server

    class Bench(BenchMethods, bench_grpc.BenchBase):
        pass

    config = Configuration(max_receive_message_length=8 << 20, max_send_message_length=8 << 20)
    server = Server([Bench()], config=config, interceptors=bench_interceptors())
    await server.start("127.0.0.1", port)
    print("READY", flush=True)
    await stop.wait()
    server.close(grace=1)
    await server.wait_closed()


async def serve_grpclib(port: int, stop: asyncio.Event) -> None:
    import bench_grpc
    from grpclib.server import Server

    class Bench(BenchMethods, bench_grpc.BenchBase):
        pass

    server = Server([Bench()])
    await server.start("127.0.0.1", port)
    print("READY", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def serve_grpcio(port: int, stop: asyncio.Event) -> None:
    import bench_pb2_grpc
    import grpc

    class Bench(bench_pb2_grpc.BenchServicer):
        async def Unary(self, request, context):  # type: ignore[no-untyped-def]
            COUNTS["unary"] += 1
            return request

        async def ServerStream(self, request, context):  # type: ignore[no-untyped-def]
            reply = bench_pb2.Payload(data=b"x" * request.size)
            for _ in range(request.count):
                yield reply
            COUNTS["stream_messages"] += request.count

        async def BidiStream(self, requests, context):  # type: ignore[no-untyped-def]
            async for message in requests:
                COUNTS["bidi_messages"] += 1
                yield message

    options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
    server = grpc.aio.server(options=options)
    bench_pb2_grpc.add_BenchServicer_to_server(Bench(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    await stop.wait()
    await server.stop(1)


async def main(port: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    serve = {"app_kit": serve_app_kit, "grpclib": serve_grpclib, "grpcio": serve_grpcio}[IMPLEMENTATION]
    await serve(port, stop)
    print("SERVED", json.dumps(COUNTS), flush=True)


async def main_trio(port: int) -> None:
    """app_kit's server under trio; SIGTERM through trio's signal receiver."""
    import trio

    stop = trio.Event()

    async def on_sigterm(signals: Any) -> None:
        async for _ in signals:
            stop.set()
            return

    # The receiver is in place before READY is printed, as asyncio's handler is in main().
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_sigterm, signals)
            await serve_app_kit(port, stop)
            nursery.cancel_scope.cancel()
    print("SERVED", json.dumps(COUNTS), flush=True)


if __name__ == "__main__":
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for the idle-connections test
    if ON_TRIO:
        import trio

        trio.run(main_trio, int(sys.argv[2]))
    elif IMPLEMENTATION == "grpcio" or os.environ.get("BENCH_LOOP") == "asyncio":
        asyncio.run(main(int(sys.argv[2])))  # grpc.aio drives its own core; asyncio's loop
    else:
        # app_kit runs on uvloop when installed (app_kit.aio.eventloop); grpclib gets the same.
        from app_kit.aio import eventloop

        eventloop.run(main(int(sys.argv[2])))
