"""Instructions per unary call of app_kit's bench server, or of app_kit's client.

``python bench/instructions.py [CALLS] [CONNECTIONS] [STREAMS]`` counts the server;
``python bench/instructions.py client [CALLS]`` counts the client (100 calls in flight on one
``Channel``, against app_kit's bench server); ``python bench/instructions.py bidi [MESSAGES]``
the server per message of the bench's bidi echo (calls of 100 messages, 10 at once), and
``python bench/instructions.py stream [MESSAGES] [PER_CALL]`` per message of its
server-streaming calls (PER_CALL replies of 10 bytes per call, default 100, 10 calls at once:
two runs with different PER_CALL separate the cost per call from the cost per message).

Seconds of CPU move with whatever else the machine does; instructions do not. The process
measured runs under valgrind's callgrind: it is warmed up with 500 calls, its counters are
zeroed, CALLS unary calls are made (default 3,000; for the server CONNECTIONS x STREAMS from
h2load, default 1 x 100) and the instructions counted per call are printed: the same to about
0.05 % from run to run, so one change to the hot path can be judged on its own, even with tests
running beside it. It counts user-space work only (no system calls, no cache misses): compare
changes with it, and the implementations with ``bench/run.py``. Needs valgrind and h2load.
``INSTRUCTIONS_DUMP=path`` keeps callgrind's dump there (function names uncompressed: self
costs per function can be summed from it).
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "_gen"), str(HERE / "_gen" / "app_kit")]
sys.path.append(str(HERE.parent))  # app_kit from the checkout, unless PYTHONPATH says otherwise


def h2load(port: int, calls: int, connections: int, streams: int, body: str, method: str = "Unary") -> None:
    command = ["h2load", "-n", str(calls), "-c", str(connections), "-m", str(streams), "-d", body]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    out = subprocess.run([*command, f"http://127.0.0.1:{port}/bench.Bench/{method}"], capture_output=True, text=True)
    if f"{calls} succeeded" not in out.stdout:
        raise SystemExit(f"h2load: not every call succeeded\n{out.stdout}{out.stderr}")


def under_callgrind(out: pathlib.Path, *arguments: str) -> subprocess.Popen[bytes]:
    # sys.executable: valgrind must start Python itself, not a launcher script that execs it.
    command = [
        "valgrind",
        "--tool=callgrind",
        "--compress-strings=no",
        f"--callgrind-out-file={out}",
        "-q",
        sys.executable,
        *arguments,
    ]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def count(process: subprocess.Popen[bytes], scratch: str, warm_up: Callable[[], None], load: Callable[[], None]) -> int:
    """Instructions ``process`` spends on ``load`` (after ``warm_up``), from callgrind's dump."""
    assert process.stdout is not None
    if process.stdout.readline().strip() != b"READY":
        raise SystemExit("the measured process did not start")
    warm_up()
    subprocess.run(["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True)
    load()
    subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True)
    time.sleep(1)
    dumps = sorted(pathlib.Path(scratch).glob("callgrind.out*"), key=lambda path: path.stat().st_mtime)
    keep = os.environ.get("INSTRUCTIONS_DUMP")  # a path: keep the dump, for callgrind_annotate
    if keep:
        shutil.copy(dumps[-1], keep)
    match = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit("no totals in callgrind's dump")
    return int(match.group(1))


def client_process(port: int, calls: int) -> None:
    """The measured client: prints READY after its warm-up, then runs one batch per stdin line."""
    import asyncio

    import bench_pb2
    from bench_grpc import BenchStub

    from app_kit import Channel

    request = bench_pb2.Payload(data=b"0123456789")

    async def main() -> None:
        async with Channel("127.0.0.1", port) as channel:
            stub = BenchStub(channel)

            async def batch(total: int) -> None:
                left = total

                async def worker() -> None:
                    nonlocal left
                    while left > 0:
                        left -= 1
                        if (await stub.Unary(request)).data != request.data:
                            raise SystemExit("a wrong reply")

                await asyncio.gather(*(worker() for _ in range(100)))

            await batch(500)
            print("READY", flush=True)
            loop = asyncio.get_running_loop()
            while await loop.run_in_executor(None, sys.stdin.readline):
                await batch(calls)
                print("DONE", flush=True)

    asyncio.run(main())


def main() -> int:
    from generate import generate
    from run import free_port

    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install valgrind nghttp2-client", file=sys.stderr)
            return 2
    measure_client = sys.argv[1:2] == ["client"]
    bidi = sys.argv[1:2] == ["bidi"]
    stream = sys.argv[1:2] == ["stream"]
    arguments = sys.argv[2:] if measure_client or bidi or stream else sys.argv[1:]
    defaults = ["3000", "1", "100"]
    calls, connections, streams = (int(arg) for arg in [*arguments, *defaults[len(arguments) :]][:3])
    per_call = int(arguments[1]) if stream and len(arguments) > 1 else 100
    if bidi or stream:  # the bench's shapes: calls of 100 messages, 10 at once on one connection
        calls, connections, streams = max(calls // per_call, 1), 1, 10
    generate()
    import bench_pb2

    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        out = pathlib.Path(scratch, "callgrind.out")
        if measure_client:
            server = subprocess.Popen(
                [sys.executable, str(HERE / "servers.py"), "app_kit", str(port)], stdout=subprocess.PIPE
            )
            client = None
            try:
                assert server.stdout is not None
                if server.stdout.readline().strip() != b"READY":
                    raise SystemExit("the bench server did not start")
                client = under_callgrind(out, str(HERE / "instructions.py"), "--client-process", str(port), str(calls))
                assert client.stdin is not None and client.stdout is not None

                def run_batch() -> None:
                    client.stdin.write(b"go\n")  # type: ignore[union-attr]
                    client.stdin.flush()  # type: ignore[union-attr]
                    if client.stdout.readline().strip() != b"DONE":  # type: ignore[union-attr]
                        raise SystemExit("the client failed")

                total = count(client, scratch, lambda: None, run_batch)
            finally:
                if client is not None:
                    client.kill()
                    client.wait()
                server.terminate()
                server.wait()
            print(f"{total / calls:,.0f} client instructions per unary call (100 in flight, {calls} calls)")
            return 0
        body = pathlib.Path(scratch, "body")
        if stream:
            payload = bench_pb2.StreamRequest(count=per_call, size=10).SerializeToString()
        else:
            payload = bench_pb2.Payload(data=b"0123456789").SerializeToString()
        body.write_bytes((b"\x00" + len(payload).to_bytes(4, "big") + payload) * (100 if bidi else 1))
        method = "BidiStream" if bidi else "ServerStream" if stream else "Unary"
        server = under_callgrind(out, str(HERE / "servers.py"), "app_kit", str(port))
        try:
            total = count(
                server,
                scratch,
                lambda: h2load(port, 50 if bidi or stream else 500, connections, streams, str(body), method),
                lambda: h2load(port, calls, connections, streams, str(body), method),
            )
        finally:
            server.terminate()
            server.wait()
    if bidi:
        print(f"{total / calls / 100:,.0f} instructions per bidi echo message ({calls} calls of 100 messages)")
        return 0
    if stream:
        print(f"{total / calls / per_call:,.0f} instructions per streamed reply ({calls} calls of {per_call} messages)")
        return 0
    print(f"{total / calls:,.0f} instructions per unary call ({connections} x {streams}, {calls} calls)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--client-process"]:
        client_process(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
