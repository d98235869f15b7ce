"""Instructions per unary call of app_kit's bench server.

``python bench/instructions.py [CALLS] [CONNECTIONS] [STREAMS]``

Seconds of CPU move with whatever else the machine does; instructions do not. This runs
``bench/servers.py app_kit`` under valgrind's callgrind, warms it up with 500 calls from h2load,
zeroes the counters, sends CALLS unary calls (default 3,000; CONNECTIONS x STREAMS, default
1 x 100) and prints the instructions counted per call: the same to about 0.05 % from run to run,
so one change to the hot path can be judged on its own, even with tests running beside it. It
counts the server process's user-space work only (no system calls, no cache misses): compare
changes with it, and the implementations with ``bench/run.py``. Needs valgrind and h2load.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "_gen"), str(HERE / "_gen" / "app_kit")]


def h2load(port: int, calls: int, connections: int, streams: int, body: str) -> None:
    command = ["h2load", "-n", str(calls), "-c", str(connections), "-m", str(streams), "-d", body]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    out = subprocess.run([*command, f"http://127.0.0.1:{port}/bench.Bench/Unary"], capture_output=True, text=True)
    if f"{calls} succeeded" not in out.stdout:
        raise SystemExit(f"h2load: not every call succeeded\n{out.stdout}{out.stderr}")


def main() -> int:
    from generate import generate
    from run import free_port

    for tool in ("valgrind", "callgrind_control", "h2load"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install valgrind nghttp2-client", file=sys.stderr)
            return 2
    calls, connections, streams = (int(arg) for arg in [*sys.argv[1:], "3000", "1", "100"][:3])
    generate()
    import bench_pb2

    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        body = pathlib.Path(scratch, "body")
        payload = bench_pb2.Payload(data=b"0123456789").SerializeToString()
        body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        out = pathlib.Path(scratch, "callgrind.out")
        server = subprocess.Popen(
            # sys.executable: valgrind must start Python itself, not a launcher script that execs it.
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "-q", sys.executable),
                *(str(HERE / "servers.py"), "app_kit", str(port)),
            ],
            stdout=subprocess.PIPE,
        )
        try:
            assert server.stdout is not None
            if server.stdout.readline().strip() != b"READY":
                raise SystemExit("the bench server did not start")
            h2load(port, 500, connections, streams, str(body))
            subprocess.run(["callgrind_control", "-z", str(server.pid)], check=True, capture_output=True)
            h2load(port, calls, connections, streams, str(body))
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
            time.sleep(1)
            dumps = sorted(pathlib.Path(scratch).glob("callgrind.out*"), key=lambda path: path.stat().st_mtime)
            match = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.MULTILINE)
            if match is None:
                raise SystemExit("no totals in callgrind's dump")
        finally:
            server.terminate()
            server.wait()
    print(f"{int(match.group(1)) / calls:,.0f} instructions per unary call ({connections} x {streams}, {calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
