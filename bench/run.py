"""app_kit vs grpclib vs grpcio-aio, measured in one run: ``python bench/run.py [--quick]``.

``app_kit-trio`` is app_kit's server (and client) under trio, through its anyio byte-stream
transport; ``app_kit`` is the asyncio adapter (on uvloop when installed). The table's
``trio/asyncio`` column compares the two.

Each server is pinned to CPU 0 and every load generator to CPU 1. Scenarios alternate the
implementations, repeat (median of 3; 1 with --quick), and are correctness-gated: replies are
verified by the grpcio load generator, and the server's own count of what it served must match
what the load generator saw. Needs h2load (Debian package nghttp2-client), grpclib, and
matplotlib for the chart: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
IMPLEMENTATIONS = ("app_kit", "app_kit-trio", "grpclib", "grpcio")
SERVER_CPU, LOAD_CPU = "0", "1"


class GateFailed(Exception):
    """A run whose results cannot be trusted."""


@dataclass
class Scenario:
    name: str
    unit: str
    higher_is_better: bool = True
    runs: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def median(self, implementation: str) -> float | None:
        values = self.runs.get(implementation)
        return statistics.median(values) if values else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class BenchServer:
    """One bench server process, pinned to the server CPU."""

    def __init__(self, implementation: str, env: dict[str, str] | None = None) -> None:
        self.implementation = implementation
        self.port = free_port()
        self.env = {**os.environ, **(env or {})}

    def __enter__(self) -> BenchServer:
        self.process = subprocess.Popen(
            [
                "taskset",
                "-c",
                SERVER_CPU,
                sys.executable,
                str(HERE / "servers.py"),
                self.implementation,
                str(self.port),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("READY"):
            raise GateFailed(f"{self.implementation} server did not start: {line!r}")
        return self

    def stop(self) -> dict[str, int]:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        match = re.search(r"SERVED (\{.*\})", out)
        if match is None:
            raise GateFailed(f"{self.implementation} server reported no counts")
        return json.loads(match.group(1))  # type: ignore[no-any-return]

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_h2load(port: int, seconds: float, clients: int, streams: int, path: str, body: bytes) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".bin") as data:
        data.write(body)
        data.flush()
        completed = subprocess.run(
            [
                "taskset",
                "-c",
                LOAD_CPU,
                "h2load",
                "-t",
                "1",
                "-c",
                str(clients),
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
                f"http://127.0.0.1:{port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    out = completed.stdout + completed.stderr
    requests = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out
    )
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if requests is None or rate is None:
        raise GateFailed(f"unexpected h2load output:\n{out}")
    succeeded, failed, errored = int(requests.group(4)), int(requests.group(5)), int(requests.group(6))
    if failed or errored or not succeeded:
        raise GateFailed(f"h2load: {succeeded} succeeded, {failed} failed, {errored} errored")
    return {"rate": float(rate.group(1)), "succeeded": succeeded}


def _run_json(script: str, arguments: list[str], what: str, seconds: float) -> dict[str, Any]:
    """Run a bench script on the load CPU; its last line of output is its JSON result."""
    out = subprocess.run(
        ["taskset", "-c", LOAD_CPU, sys.executable, str(HERE / script), *arguments],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    if out.returncode != 0:
        raise GateFailed(f"{what} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise GateFailed(f"{what}: {result['errors']} wrong or failed replies")
    return result


def run_client(implementation: str, port: int, scenario: str, seconds: float) -> dict[str, Any]:
    """One client implementation as the load (bench/clients.py): its own CPU per call."""
    arguments = [implementation, scenario, str(port), str(seconds)]
    return _run_json("clients.py", arguments, f"{implementation} client {scenario}", seconds)


def run_loadgen(port: int, scenario: str, seconds: float) -> dict[str, Any]:
    """grpcio's load generator (bench/loadgen.py) against the server on ``port``."""
    return _run_json("loadgen.py", [scenario, str(port), str(seconds)], f"loadgen {scenario}", seconds)


def grpc_frame(message: Any) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


async def open_idle_connections(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` HTTP/2 connections that finish the handshake and then stay silent."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    ack = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"

    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(preface + ack)
        await writer.drain()
        await reader.read(4096)  # the server's SETTINGS
        return writer

    writers = []
    for start in range(0, count, 100):
        writers += await asyncio.gather(*(one() for _ in range(min(100, count - start))))
    return writers


def idle_memory(implementation: str, count: int) -> float:
    """KiB of server memory per idle HTTP/2 connection."""
    with BenchServer(implementation) as server:
        time.sleep(0.3)
        before = rss_bytes(server.process.pid)

        async def hold() -> int:
            writers = await open_idle_connections(server.port, count)
            await asyncio.sleep(1.0)
            after = rss_bytes(server.process.pid)
            for writer in writers:
                writer.close()
            return after

        after = asyncio.run(hold())
        server.stop()
    return (after - before) / count / 1024


def launch_time(command: list[str], port: int, call: Any) -> float:
    """Seconds from spawning a server process to the first call it serves.

    Polls with plain TCP connects (a gRPC channel would back off for a second after the first
    refused attempt), then makes the call.
    """
    import grpc

    # As deployed: bytecode compiled at install time, not recompiled at every start (some
    # environments set PYTHONDONTWRITEBYTECODE, which would charge compiling to the launch).
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "app_kit"), str(ROOT / "examples"), str(HERE)],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    started = time.perf_counter()
    process = subprocess.Popen(
        ["taskset", "-c", SERVER_CPU, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.perf_counter() - started > 20:
                    raise GateFailed(f"{command} did not listen within 20 s") from None
                time.sleep(0.001)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call(channel)
        return time.perf_counter() - started
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repetition of 2-second runs (about 4 minutes)")
    parser.add_argument("--smoke", action="store_true", help="app_kit only, tiny runs: checks the pipeline works")
    parser.add_argument("--out", default=str(HERE / "results"), help="directory for results.json and results.png")
    parser.add_argument("--only", help="run only the scenarios whose name contains this")
    args = parser.parse_args()
    seconds = 0.5 if args.smoke else 2.0 if args.quick else 5.0
    repeats = 1 if args.quick or args.smoke else 3
    implementations = ("app_kit",) if args.smoke else IMPLEMENTATIONS
    if not args.smoke and shutil.which("h2load") is None:
        print("h2load not found: apt-get install nghttp2-client", file=sys.stderr)
        return 2
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    os.sched_setaffinity(0, {int(LOAD_CPU)})

    sys.path.insert(0, str(HERE))
    from generate import generate

    generate(with_grpclib=not args.smoke)
    sys.path[:0] = [str(HERE / "_gen"), str(HERE / "_gen" / "grpcio")]
    import bench_pb2

    small = grpc_frame(bench_pb2.Payload(data=b"0123456789"))
    stream_request = grpc_frame(bench_pb2.StreamRequest(count=100, size=10))
    # A bidi call whose client sends 100 messages at once and reads the 100 echoes.
    bidi_request = small * 100
    # name, connections, streams per connection, path, body, messages per call, server's counter
    h2load_scenarios = [
        ("h2load unary 1x1", 1, 1, "/bench.Bench/Unary", small, 1, "unary"),
        ("h2load unary 1x100", 1, 100, "/bench.Bench/Unary", small, 1, "unary"),
        ("h2load unary 10x10", 10, 10, "/bench.Bench/Unary", small, 1, "unary"),
        (
            "h2load server-stream 1x10 (msgs)",
            1,
            10,
            "/bench.Bench/ServerStream",
            stream_request,
            100,
            "stream_messages",
        ),
        ("h2load bidi echo 1x10 (msgs)", 1, 10, "/bench.Bench/BidiStream", bidi_request, 100, "bidi_messages"),
    ]
    loadgen_scenarios = [
        ("grpcio unary 1 in flight", "unary_1", "calls/s"),
        ("grpcio unary 100 in flight", "unary_100", "calls/s"),
        ("grpcio server-stream", "server_stream", "msgs/s"),
        ("grpcio bidi echo", "bidi", "msgs/s"),
        ("1 MiB unary echo", "unary_1mib", "MiB/s"),
    ]
    results: dict[str, Scenario] = {}

    def record(name: str, unit: str, implementation: str, value: float, higher: bool = True, **extra: Any) -> None:
        scenario = results.setdefault(name, Scenario(name, unit, higher))
        scenario.runs.setdefault(implementation, []).append(value)
        scenario.extra.setdefault(implementation, []).append(extra)

    selected_h2load = [] if args.smoke else h2load_scenarios
    selected_loadgen = loadgen_scenarios[:1] if args.smoke else loadgen_scenarios
    if args.only:
        selected_h2load = [item for item in selected_h2load if args.only in item[0]]
        selected_loadgen = [item for item in selected_loadgen if args.only in item[0]]
    for repeat in range(repeats):
        order = implementations[repeat % len(implementations) :] + implementations[: repeat % len(implementations)]
        for name, clients, streams, path, body, per_request, counter in selected_h2load:
            for implementation in order:
                with BenchServer(implementation) as server:
                    cpu_before = cpu_seconds(server.process.pid)
                    result = run_h2load(server.port, seconds, clients, streams, path, body)
                    cpu = cpu_seconds(server.process.pid) - cpu_before
                    counts = server.stop()
                served = counts[counter] // per_request
                # The server served every call h2load saw succeed, and at most those still in
                # flight when h2load stopped besides.
                if not result["succeeded"] <= served <= result["succeeded"] + clients * streams + 1000:
                    raise GateFailed(f"{name} {implementation}: h2load saw {result['succeeded']}, server {served}")
                cpu_per_call_us = cpu / served * 1e6 if served else 0.0
                record(
                    name,
                    "calls/s" if per_request == 1 else "msgs/s",
                    implementation,
                    result["rate"] * per_request,
                    cpu_us_per_call=cpu_per_call_us,
                )
                # CPU per call is steadier than the rate on a shared machine, and is where the
                # trio transport's cost shows (a call of a stream is its 100 messages).
                cpu_row = f"{name.removesuffix(' (msgs)')}: server CPU"
                record(cpu_row, "µs/call", implementation, cpu_per_call_us, False)
                print(
                    f"  {name:<36} {implementation:<12} {result['rate'] * per_request:>12,.0f}  "
                    f"server CPU {cpu_per_call_us:6.1f} µs/call",
                    flush=True,
                )
        for name, scenario, unit in selected_loadgen:
            for implementation in order:
                with BenchServer(implementation) as server:
                    result = run_loadgen(server.port, scenario, seconds)
                    counts = server.stop()
                if scenario.startswith("unary"):
                    if counts["unary"] < result["calls"]:
                        raise GateFailed(f"{name} {implementation}: served {counts['unary']} < {result['calls']}")
                    value = result["bytes_per_s"] / (1 << 20) if scenario == "unary_1mib" else result["rate"]
                elif scenario == "server_stream":
                    if counts["stream_messages"] < result["messages"]:
                        raise GateFailed(f"{name} {implementation}: server count too low")
                    value = result["rate"]
                else:
                    if counts["bidi_messages"] != result["messages"]:
                        raise GateFailed(f"{name} {implementation}: server echoed {counts['bidi_messages']}")
                    value = result["rate"]
                record(name, unit, implementation, value)
                if scenario == "unary_1":
                    record("unary p50 latency (1 in flight)", "ms", implementation, result["p50_ms"], False)
                    record("unary p99 latency (1 in flight)", "ms", implementation, result["p99_ms"], False)
                print(f"  {name:<36} {implementation:<12} {value:>12,.1f} {unit}", flush=True)
        # The clients, each as the load against the same server on the server CPU: what each
        # spends per call on the client CPU. The server is app_kit's, the fastest here, so that
        # the client is the bottleneck: against grpcio's, a client faster than that server sees
        # its replies in small batches and pays more per call for the server's pace.
        client_scenarios = [
            ("client CPU per unary call (100 in flight)", "unary_100", "µs/call"),
            ("client CPU per streamed reply", "server_stream", "µs/msg"),
        ]
        for name, scenario, unit in client_scenarios:
            if args.smoke or (args.only and args.only not in name):
                continue
            for implementation in order:
                with BenchServer("app_kit") as server:
                    result = run_client(implementation, server.port, scenario, seconds)
                    counts = server.stop()
                served = counts["unary"] if scenario == "unary_100" else counts["stream_messages"]
                if served < result["count"]:
                    raise GateFailed(f"{name} {implementation}: server served {served} < {result['count']}")
                record(name, unit, implementation, result["cpu_us"], False, rate=result["rate"])
                print(f"  {name:<36} {implementation:<12} {result['cpu_us']:>12.1f} {unit}", flush=True)
        # What interceptors cost the server: h2load unary 1x100 on app_kit with none, one that
        # overrides nothing, the access log (to a NullHandler) and Prometheus metrics.
        if not args.smoke and (not args.only or args.only in "interceptor cost"):
            for kind in ("none", "empty", "access", "metrics"):
                name = f"interceptor cost: {kind} (server CPU)"
                with BenchServer("app_kit", env={"BENCH_INTERCEPTORS": kind}) as server:
                    cpu_before = cpu_seconds(server.process.pid)
                    result = run_h2load(server.port, seconds, 1, 100, "/bench.Bench/Unary", small)
                    cpu = cpu_seconds(server.process.pid) - cpu_before
                    served = server.stop()["unary"]
                if served < result["succeeded"]:
                    raise GateFailed(f"{name}: h2load saw {result['succeeded']}, server {served}")
                cpu_us = cpu / served * 1e6 if served else 0.0
                record(name, "µs/call", "app_kit", cpu_us, False, rate=result["rate"])
                print(f"  {name:<36} app_kit  {cpu_us:>12.1f} µs/call  {result['rate']:,.0f} calls/s", flush=True)
        if not args.smoke and (not args.only or args.only in "memory per idle connection"):
            for implementation in order:
                kib = idle_memory(implementation, 1000)
                record("memory per idle connection", "KiB", implementation, kib, False)
                print(f"  {'memory per idle connection':<36} {implementation:<12} {kib:>12.1f} KiB", flush=True)
        if not args.smoke and (not args.only or args.only in "launch to first call"):
            # Three starts each, alternating: one start moves by ±30 % here (the row's median).
            for implementation in order * 3:
                port = free_port()
                seconds_to_call = launch_time(
                    [sys.executable, str(HERE / "servers.py"), implementation, str(port)],
                    port,
                    lambda channel: channel.unary_unary(
                        "/bench.Bench/Unary", bench_pb2.Payload.SerializeToString, bench_pb2.Payload.FromString
                    )(bench_pb2.Payload(), timeout=1),
                )
                record("launch to first call (bench server)", "ms", implementation, seconds_to_call * 1e3, False)
    if not args.smoke and (not args.only or args.only in "launch to first call"):
        sys.path.insert(0, str(ROOT))
        from examples.cafe import cafe_pb2

        for _ in range(3 * repeats):
            port = free_port()
            seconds_to_call = launch_time(
                [sys.executable, "-m", "app_kit", "run", "examples.cafe.app:app", "--port", str(port)],
                port,
                lambda channel: channel.unary_unary(
                    "/cafe.CoffeeMachine/MakeLatte", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.Latte.FromString
                )(cafe_pb2.LatteOrder(milk_ml=200, shots=1), timeout=1),
            )
            record("launch to first call (cafe App, CLI)", "ms", "app_kit", seconds_to_call * 1e3, False)
            # The floor under both launch rows: this interpreter starting with nothing to do
            # (site hooks of the environment included).
            started = time.perf_counter()
            subprocess.run(["taskset", "-c", SERVER_CPU, sys.executable, "-c", "pass"], check=True)
            record("python -c pass (launch floor)", "ms", "app_kit", (time.perf_counter() - started) * 1e3, False)

    report(results, implementations, pathlib.Path(args.out), quick=args.quick or args.smoke)
    return 0


def report(results: dict[str, Scenario], implementations: tuple[str, ...], out: pathlib.Path, quick: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    header = f"{'scenario':<42} {'unit':<8}" + "".join(f"{name:>13}" for name in implementations)
    if "grpclib" in implementations:
        header += f"{'/grpclib':>10}{'/grpcio':>10}"
    if "app_kit-trio" in implementations:
        header += f"{'trio/asyncio':>14}"
    print("\n" + header + "\n" + "-" * len(header))
    payload: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "mode": "quick" if quick else "full",
        "scenarios": {},
    }
    for scenario in results.values():
        medians = {name: scenario.median(name) for name in implementations}
        row = f"{scenario.name:<42} {scenario.unit:<8}" + "".join(
            f"{value:>13,.1f}" if value is not None else f"{'-':>13}" for value in medians.values()
        )
        ratios = {}
        for other in ("grpclib", "grpcio"):
            mine, theirs = medians.get("app_kit"), medians.get(other)
            if mine and theirs:
                ratios[other] = mine / theirs
                row += f"{mine / theirs:>9.2f}x"
            elif other in implementations:
                row += f"{'-':>10}"
        # app_kit's server on trio (anyio byte streams) against the same on asyncio.
        on_trio, on_asyncio = medians.get("app_kit-trio"), medians.get("app_kit")
        trio_ratio = on_trio / on_asyncio if on_trio and on_asyncio else None
        if trio_ratio is not None:
            row += f"{trio_ratio:>13.2f}x"
        elif "app_kit-trio" in implementations:
            row += f"{'-':>14}"
        print(row)
        payload["scenarios"][scenario.name] = {
            "unit": scenario.unit,
            "higher_is_better": scenario.higher_is_better,
            "median": medians,
            "runs": scenario.runs,
            "extra": scenario.extra,
            "app_kit_ratio": ratios,
            "trio_asyncio_ratio": trio_ratio,
        }
    if "app_kit-trio" in implementations:
        print("(ratios: app_kit / other; trio/asyncio: app_kit-trio / app_kit; for ms, µs, KiB lower is better)")
    else:
        print("(ratios are app_kit / other; for ms and KiB lower is better)")
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    try:
        chart(payload, implementations, out / "results.png")
    except ImportError:
        print("matplotlib not installed: no chart (pip install -e '.[bench]')")
    print(f"\nwrote {out / 'results.json'}" + (f" and {out / 'results.png'}" if (out / "results.png").exists() else ""))


def chart(payload: dict[str, Any], implementations: tuple[str, ...], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = "grpclib" if "grpclib" in implementations else implementations[0]
    # Only what can be compared: app_kit-only rows (the cafe App, the launch floor) are left out.
    names = [name for name, scenario in payload["scenarios"].items() if scenario["median"].get(baseline)]
    figure, axis = plt.subplots(figsize=(12, 0.45 * len(names) * len(implementations) + 1.5))
    height = 0.8 / len(implementations)
    for index, implementation in enumerate(implementations):
        values = []
        for name in names:
            medians = payload["scenarios"][name]["median"]
            mine, base = medians.get(implementation), medians.get(baseline)
            if mine and base:
                ratio = mine / base
                values.append(ratio if payload["scenarios"][name]["higher_is_better"] else 1 / ratio)
            else:
                values.append(0)
        axis.barh([i + index * height for i in range(len(names))], values, height, label=implementation)
    axis.set_yticks([i + height for i in range(len(names))], names)
    axis.invert_yaxis()
    axis.axvline(1, color="grey", linewidth=0.8)
    axis.set_xlabel(f"relative to {baseline} (higher is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
