"""The flood attacks' target service on grpclib or grpcio-aio: ``python bench/flood_servers.py grpclib|grpcio PORT``.

Serves what ``tests/apps/lifecycle_app.py``'s ``Sleeper`` serves, with each library's default
limits: ``/test.Sleeper/Hold`` (stream-stream ``BytesValue`` -> ``Int64Value``: for each request,
wait 0.5 s, then answer its length) and ``/test.Sleeper/Sleep`` (unary ``DoubleValue``: wait that
many seconds, echo). PORT 0 binds an ephemeral port; prints ``READY <port>`` once serving, exits
on SIGTERM or SIGINT. grpclib runs on uvloop when installed, as ``python -m app_kit run`` does;
grpc.aio on asyncio's loop (it drives its own core).
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.wrappers_pb2 import BytesValue, DoubleValue, Int64Value


async def serve_grpclib(port: int, stop: asyncio.Event) -> None:
    """grpclib's ``Server`` with its defaults (it has no message size limit and no compression)."""
    from grpclib.const import Cardinality, Handler
    from grpclib.server import Server, Stream

    class Sleeper:
        def __mapping__(self) -> dict[str, Handler]:
            return {
                "/test.Sleeper/Sleep": Handler(self.sleep, Cardinality.UNARY_UNARY, DoubleValue, DoubleValue),
                "/test.Sleeper/Hold": Handler(self.hold, Cardinality.STREAM_STREAM, BytesValue, Int64Value),
            }

        async def hold(self, stream: Stream[BytesValue, Int64Value]) -> None:
            async for request in stream:
                await asyncio.sleep(0.5)
                await stream.send_message(Int64Value(value=len(request.value)))

        async def sleep(self, stream: Stream[DoubleValue, DoubleValue]) -> None:
            request = await stream.recv_message()
            assert request is not None
            await asyncio.sleep(request.value)
            await stream.send_message(request)

    server = Server([Sleeper()])
    await server.start("127.0.0.1", port)
    assert server._server is not None  # grpclib keeps its asyncio server here; no public accessor
    bound = server._server.sockets[0].getsockname()[1]
    print("READY", bound, flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


async def serve_grpcio(port: int, stop: asyncio.Event) -> None:
    """``grpc.aio.server()`` with its defaults: 4 MiB receive limit, gzip requests decompressed."""
    import grpc

    async def hold(requests: AsyncIterator[BytesValue], context: Any) -> AsyncIterator[Int64Value]:
        async for request in requests:
            await asyncio.sleep(0.5)
            yield Int64Value(value=len(request.value))

    async def sleep(request: DoubleValue, context: Any) -> DoubleValue:
        await asyncio.sleep(request.value)
        return request

    handler = grpc.method_handlers_generic_handler(
        "test.Sleeper",
        {
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep, DoubleValue.FromString, DoubleValue.SerializeToString),
            "Hold": grpc.stream_stream_rpc_method_handler(hold, BytesValue.FromString, Int64Value.SerializeToString),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", bound, flush=True)
    await stop.wait()
    await server.stop(0)


async def main(implementation: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serve = {"grpclib": serve_grpclib, "grpcio": serve_grpcio}[implementation]
    await serve(port, stop)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("grpclib", "grpcio"):
        raise SystemExit("usage: python bench/flood_servers.py grpclib|grpcio PORT")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # for the idle-connections attack
    implementation, port = sys.argv[1], int(sys.argv[2])
    if implementation == "grpcio":
        asyncio.run(main(implementation, port))
    else:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main(implementation, port))
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main(implementation, port))
