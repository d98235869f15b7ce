"""The floor under a Python client on h2: ``python bench/h2_floor.py PORT SECONDS``.

A client with nothing of gRPC but the bytes: h2's own ``send_headers``/``send_data``/
``receive_data`` on an asyncio protocol, a pre-encoded request message, replies only checked
for their DATA and trailers, 100 unary calls in flight on one connection, as
``bench/clients.py unary_100`` runs them. Prints this process's CPU time per call: what any
client built on h2 and asyncio pays before doing any gRPC work (metadata, deadlines, codecs,
call states, retries). It is the reference for the client-CPU row of ``bench/run.py``.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import time
from typing import Any

import h2.config
import h2.connection
import h2.events

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "_gen"), str(HERE / "_gen" / "app_kit")]

import bench_pb2  # noqa: E402

_BODY = bench_pb2.Payload(data=b"0123456789").SerializeToString()
_MESSAGE = b"\x00" + len(_BODY).to_bytes(4, "big") + _BODY


class FloorClient(asyncio.Protocol):
    def __init__(self, authority: str) -> None:
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/bench.Bench/Unary"),
            (b":authority", authority.encode()),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
        ]
        self.calls: dict[int, tuple[asyncio.Future[bytes], bytearray]] = {}
        self.transport: asyncio.Transport | None = None
        self.flush_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        self.flush_scheduled = False
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.calls[event.stream_id][1].extend(event.data)
            elif isinstance(event, h2.events.TrailersReceived):
                future, reply = self.calls.pop(event.stream_id)
                future.set_result(bytes(reply))
        self.flush()

    async def call(self) -> bytes:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, self.headers)
        self.h2.send_data(stream_id, _MESSAGE, end_stream=True)
        future = asyncio.get_running_loop().create_future()
        self.calls[stream_id] = (future, bytearray())
        if not self.flush_scheduled:  # one write per loop turn, as app_kit's client does
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return await future


async def main(port: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: FloorClient(f"127.0.0.1:{port}"), "127.0.0.1", port)
    done = errors = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while time.perf_counter() < deadline:
            reply = await client.call()
            done += 1
            errors += reply != _MESSAGE

    for _ in range(200):
        await client.call()
    cpu, began = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(100)))
    cpu, elapsed = time.process_time() - cpu, time.perf_counter() - began
    return {"calls": done, "errors": errors, "rate": done / elapsed, "cpu_us_per_call": cpu / done * 1e6}


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop

        sys.argv.remove("--uvloop")
        result = uvloop.run(main(int(sys.argv[1]), float(sys.argv[2])))
    else:
        result = asyncio.run(main(int(sys.argv[1]), float(sys.argv[2])))
    print(json.dumps(result))
