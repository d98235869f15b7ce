"""Real-peer tests with Node's official gRPC library, @grpc/grpc-js: many of our users' callers.

Both ways round, every connection through :func:`~tests.relay.segmenting_relay` (TCP re-cut at
random offsets both ways), on the interop service (``examples/interop``, grpc.testing's
TestService, which grpc-js loads from the same .proto files with @grpc/proto-loader):

- a grpc-js client against our server (``tests/js/client.js``): gRPC's interop cases, the bug
  report's upload (64 messages of 1 MiB, client streaming: failed 8 runs in 20 once), 100
  concurrent calls, gzip from the client, grpc-js keepalive, a graceful close with a call in
  flight. One Node run does every case (a Node start costs ~100 ms+) and prints one JSON line
  per case; a :class:`Recorder` on the server sees each call's side (cancelled, its deadline,
  compressed messages...), told apart by the ``x-case`` metadata each call carries.
- our :class:`~app_kit.Channel` against grpc-js's server (``tests/js/server.js``, one process
  for the module): the interop cases our client runs against grpcio, and deadlines,
  cancellations and 1 MiB messages, checked on the server side from the events it prints.

``tests/js/package-lock.json`` pins grpc-js; ``npm ci`` installs it into ``tests/js/node_modules``
the first time (Node and npm are on every machine that runs the suite: without them these tests
fail, they do not skip).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from app_kit import Channel, ClientInterceptor, ClientStream, GRPCError, ServerInterceptor, Status, Stream
from examples.interop.client import CASES, ECHO_TRAILING
from examples.interop.messages_pb2 import (
    Payload,
    ResponseParameters,
    SimpleRequest,
    StreamingInputCallRequest,
    StreamingOutputCallRequest,
)
from examples.interop.server import TestService as InteropService
from examples.interop.testing_grpc import TestServiceStub as Stub

from .conftest import running_server
from .relay import MSS, SegmentingRelay, segmenting_relay
from .test_interop import AGAINST_GRPCIO

pytestmark = pytest.mark.anyio

JS = Path(__file__).resolve().parent / "js"
MiB = 1024 * 1024
#: How long the Node client's run may take in all (it takes ~4 s).
CLIENT_RUN_LIMIT = 60.0
#: The graceful close's grace: the call in flight needs ~0.6 s of it.
GRACE = 5.0
#: How many times the grpc-js client runs the 64 x 1 MiB upload.
UPLOADS = 4


# -- Node and grpc-js ------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not on PATH: tests/test_grpc_js.py runs grpc-js peers with Node (v18 or later) and "
            "installs them with npm; install Node.js and npm (Debian: apt-get install nodejs npm)"
        )
    return path


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` binary, with grpc-js installed in tests/js/node_modules (``npm ci`` if missing)."""
    node = _tool("node")
    if not (JS / "node_modules" / "@grpc" / "grpc-js" / "package.json").is_file():
        done = subprocess.run(
            [_tool("npm"), "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode:
            pytest.fail(f"`npm ci` in {JS} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return node


# -- the server side of the grpc-js client's calls ------------------------------------------------


@dataclasses.dataclass
class Ended:
    """One call our server served, as the :class:`Recorder` saw it end."""

    method: str
    status: Status | None
    received: int
    sent: int
    #: Seconds left of its deadline when its handler started (None: it had none).
    deadline: float | None
    #: Whether each request message arrived compressed.
    compressed: list[bool]
    request_encoding: str
    echo_trailing: list[str | bytes]


def _case_of(call: Stream[Any, Any]) -> str:
    return str(call.metadata.get("x-case", ""))


class Recorder(ServerInterceptor):
    """Each call's case (its ``x-case`` metadata), what its handler saw, how it ended."""

    def __init__(self) -> None:
        self.started: collections.Counter[str] = collections.Counter()
        self.ended: dict[str, list[Ended]] = collections.defaultdict(list)
        self.running: collections.Counter[str] = collections.Counter()
        self.peak: collections.Counter[str] = collections.Counter()
        #: Handlers whose task was cancelled (a reset, a deadline...), by case.
        self.cancelled: collections.Counter[str] = collections.Counter()
        self._deadlines: dict[int, float | None] = {}
        self._compressed: dict[int, list[bool]] = collections.defaultdict(list)

    async def intercept(self, call: Stream[Any, Any], proceed: Callable[[], Any]) -> None:
        case = _case_of(call)
        self.started[case] += 1
        self._deadlines[id(call)] = None if call.deadline is None else call.deadline.time_remaining()
        self.running[case] += 1
        self.peak[case] = max(self.peak[case], self.running[case])
        try:
            await proceed()
        except asyncio.CancelledError:
            self.cancelled[case] += 1
            raise
        finally:
            self.running[case] -= 1

    def on_message_received(self, call: Stream[Any, Any], message: Any) -> Any:
        self._compressed[id(call)].append(call.last_message_compressed)
        return message

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.ended[_case_of(call)].append(
            Ended(
                method=call.method_name,
                status=call.status,
                received=call.messages_received,
                sent=call.messages_sent,
                deadline=self._deadlines.pop(id(call), None),
                compressed=self._compressed.pop(id(call), []),
                request_encoding=call.request_encoding,
                echo_trailing=call.metadata.getall(ECHO_TRAILING[0], []),
            )
        )

    async def wait_started(self, case: str, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.started[case]:
                await asyncio.sleep(0.002)


# -- one run of the grpc-js client against our servers --------------------------------------------


@dataclasses.dataclass
class ClientRun:
    results: dict[str, dict[str, Any]]
    recorder: Recorder
    close_recorder: Recorder
    main_relay: SegmentingRelay
    upload_relay: SegmentingRelay
    keepalive_relay: SegmentingRelay
    idle_relay: SegmentingRelay
    close_relay: SegmentingRelay
    #: How long the closed server took from close(grace) to wait_closed() returning.
    close_seconds: float | None
    failure: str | None
    stderr: str
    seconds: float

    def result(self, name: str) -> dict[str, Any]:
        """The case's result; fails the test unless grpc-js's side of it passed."""
        result = self.results.get(name)
        if result is None:
            why = self.failure or "it never reported one"
            pytest.fail(f"no result from the Node client for {name!r}: {why}\n{self.context()}")
        if not result["ok"]:
            pytest.fail(f"grpc-js client, case {name!r}: {result['error']}\n{self.context()}")
        return result

    def context(self) -> str:
        return (
            f"main {self.main_relay.describe()}\nupload {self.upload_relay.describe()}\n"
            f"keepalive {self.keepalive_relay.describe()}\nidle {self.idle_relay.describe()}\n"
            f"close {self.close_relay.describe()}\nNode's stderr:\n{self.stderr[-4000:]}"
        )


async def _send(process: asyncio.subprocess.Process, line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line.encode() + b"\n")
    await process.stdin.drain()


async def _run_client(node: str, config: dict[str, Any], recorder: Recorder, closing: Any) -> dict[str, Any]:
    """Run client.js to its end, answering its requests; what it reported."""
    process = await asyncio.create_subprocess_exec(
        node,
        str(JS / "client.js"),
        json.dumps(config),
        cwd=JS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    results: dict[str, dict[str, Any]] = {}
    helpers: list[asyncio.Future[None]] = []
    closed: dict[str, float] = {}
    failure = None

    async def when_started(case: str) -> None:
        await recorder.wait_started(case)
        await _send(process, f"go {case}")

    async def close_server() -> None:
        start = time.monotonic()
        closing.close(grace=GRACE)
        await _send(process, "closed")
        async with asyncio.timeout(GRACE + 5):  # a hang fails the graceful close's test, not the run
            await closing.wait_closed()
        closed["seconds"] = time.monotonic() - start

    try:
        async with asyncio.timeout(CLIENT_RUN_LIMIT):
            async for raw in process.stdout:
                line = json.loads(raw)
                event = line.get("event")
                if event is None:
                    results[line["case"]] = line
                elif event == "await_server":
                    helpers.append(asyncio.ensure_future(when_started(line["case"])))
                elif event == "in_flight":
                    helpers.append(asyncio.ensure_future(close_server()))
                elif event == "done":
                    break
            await process.wait()
            errors = [repr(e) for e in await asyncio.gather(*helpers, return_exceptions=True) if e is not None]
            if errors:
                failure = f"answering the Node client failed: {errors}"
    except TimeoutError:
        failure = f"the Node client's run took longer than {CLIENT_RUN_LIMIT} s"
    finally:
        for helper in helpers:
            helper.cancel()
        if process.returncode is None:
            process.kill()
            await process.wait()
    return {
        "results": results,
        "failure": failure,
        "close_seconds": closed.get("seconds"),
        "stderr": (await stderr).decode(errors="replace"),
    }


@pytest.fixture(scope="module")
async def client_run(node: str) -> AsyncIterator[ClientRun]:
    recorder, close_recorder = Recorder(), Recorder()
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        _, target = await stack.enter_async_context(running_server([InteropService()], interceptors=[recorder]))
        closing, close_target = await stack.enter_async_context(
            running_server([InteropService()], interceptors=[close_recorder])
        )
        port, close_port = int(target.rsplit(":", 1)[1]), int(close_target.rsplit(":", 1)[1])
        # The uploads' relay cuts into pieces of up to 64 KiB, not 1448 bytes (a quarter of them
        # still 1 to 9 bytes): 64 MiB in MSS-sized pieces takes our relay ~7 s, this ~0.6 s.
        relays = [
            await stack.enter_async_context(SegmentingRelay("127.0.0.1", upstream, max_piece=max_piece))
            for upstream, max_piece in ((port, MSS), (port, 64 * 1024), (port, MSS), (port, MSS), (close_port, MSS))
        ]
        config = {
            "target": f"127.0.0.1:{relays[0].port}",
            "uploadTarget": f"127.0.0.1:{relays[1].port}",
            "keepaliveTarget": f"127.0.0.1:{relays[2].port}",
            "keepaliveIdleTarget": f"127.0.0.1:{relays[3].port}",
            "closeTarget": f"127.0.0.1:{relays[4].port}",
            "uploadRepeats": UPLOADS,
            "keepaliveMs": 3500,
        }
        outcome = await _run_client(node, config, recorder, closing)
    run = ClientRun(
        recorder=recorder,
        close_recorder=close_recorder,
        main_relay=relays[0],
        upload_relay=relays[1],
        keepalive_relay=relays[2],
        idle_relay=relays[3],
        close_relay=relays[4],
        seconds=time.monotonic() - started,
        **outcome,
    )
    print(f"the grpc-js client's run took {run.seconds:.1f} s")
    yield run


# What our server must have seen of each case: (method, status, messages received, messages
# sent) per call, in any order; a case with two lists may end either way (None: any count).
_OK, _CANCELLED = Status.OK, Status.CANCELLED
Seen = list[tuple[str, Status | None, int | None, int | None]]
SERVER_SIDE: dict[str, list[Seen]] = {
    "empty_unary": [[("EmptyCall", _OK, 1, 1)]],
    "large_unary": [[("UnaryCall", _OK, 1, 1)]],
    "client_streaming": [[("StreamingInputCall", _OK, 4, 1)]],
    "server_streaming": [[("StreamingOutputCall", _OK, 1, 4)]],
    "ping_pong": [[("FullDuplexCall", _OK, 4, 4)]],
    "empty_stream": [[("FullDuplexCall", _OK, 0, 0)]],
    "custom_metadata": [[("FullDuplexCall", _OK, 1, 1), ("UnaryCall", _OK, 1, 1)]],
    "status_code_and_message": [[("FullDuplexCall", Status.UNKNOWN, 1, 0), ("UnaryCall", Status.UNKNOWN, 1, 0)]],
    "special_status_message": [[("UnaryCall", Status.UNKNOWN, 1, 0)]],
    "unimplemented_method": [[("UnimplementedCall", Status.UNIMPLEMENTED, None, 0)]],
    # grpc-js's cancel() is Node's Http2Stream.close(NGHTTP2_CANCEL), which ends the request side
    # (DATA END_STREAM) before it sends RST_STREAM CANCEL (lib/internal/http2/core.js closeStream):
    # when the END_STREAM comes first, these handlers see a client that half-closed and answer
    # (OK) before the reset arrives. cancel_server_stream below is the cancel they must see.
    "cancel_after_begin": [[("StreamingInputCall", _CANCELLED, 0, 0)], [("StreamingInputCall", _OK, 0, 1)]],
    "cancel_after_first_response": [[("FullDuplexCall", _CANCELLED, 1, 1)], [("FullDuplexCall", _OK, 1, 1)]],
    "client_compressed_unary": [
        [("UnaryCall", Status.INVALID_ARGUMENT, 1, 0), ("UnaryCall", _OK, 1, 1), ("UnaryCall", _OK, 1, 1)]
    ],
    "client_compressed_streaming": [[("StreamingInputCall", _OK, 4, 1)]],
}

GRPC_JS_CLIENT_CASES = [
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "custom_metadata",
    "status_code_and_message",
    "special_status_message",
    "unimplemented_method",
    "cancel_after_begin",
    "cancel_after_first_response",
    "timeout_on_sleeping_server",
    "client_compressed_unary",
    "client_compressed_streaming",
]


def _key(call: tuple[str, Status | None, int | None, int | None]) -> tuple[str, int]:
    return call[0], -1 if call[1] is None else call[1].value


def _matches(seen: Seen, expected: Seen) -> bool:
    return len(seen) == len(expected) and all(
        got[:2] == want[:2] and all(w is None or g == w for g, w in zip(got[2:], want[2:], strict=True))
        for got, want in zip(sorted(seen, key=_key), sorted(expected, key=_key), strict=True)
    )


@pytest.mark.parametrize("name", GRPC_JS_CLIENT_CASES)
async def test_grpc_js_client_interop_case(client_run: ClientRun, name: str) -> None:
    client_run.result(name)
    ended = client_run.recorder.ended[name]
    seen: Seen = [(e.method, e.status, e.received, e.sent) for e in ended]
    if name == "timeout_on_sleeping_server":
        # A 1 ms deadline: grpc-js may give up before the call leaves. If it arrived, it ended
        # by the deadline, or by the half-close grpc-js sends before its reset (see above).
        assert all(e.status in (Status.DEADLINE_EXCEEDED, _CANCELLED, _OK) and e.sent == 0 for e in ended), seen
        return
    assert any(_matches(seen, expected) for expected in SERVER_SIDE[name]), (
        f"server side: {seen}, expected one of {SERVER_SIDE[name]}"
    )
    if name == "custom_metadata":
        # The -bin header arrived as its bytes (and was echoed back: client.js checked that).
        assert [e.echo_trailing for e in ended] == [[ECHO_TRAILING[1]]] * 2
    if name == "client_compressed_unary":
        # The probe went uncompressed; both gzip channel calls arrived gzip-compressed.
        assert sorted((e.request_encoding, e.compressed) for e in ended) == [
            ("gzip", [True]),
            ("gzip", [True]),
            ("identity", [False]),
        ]
    if name == "client_compressed_streaming":
        assert [(e.request_encoding, e.compressed) for e in ended] == [("gzip", [True] * 4)]


async def test_grpc_js_cancel_reaches_our_handler(client_run: ClientRun) -> None:
    # A server stream cancelled by grpc-js after 2 of its 20 replies (one every 50 ms): its
    # RST_STREAM CANCEL cancels our handler's task, which stops sending.
    client_run.result("cancel_server_stream")
    (ended,) = client_run.recorder.ended["cancel_server_stream"]
    assert ended.status is _CANCELLED and 2 <= ended.sent < 20, ended
    assert client_run.recorder.cancelled["cancel_server_stream"] == 1


async def test_grpc_js_client_deadline_reaches_our_server(client_run: ClientRun) -> None:
    result = client_run.result("deadline_reaches_server")
    assert 250 <= result["details"]["elapsed_ms"] < 3000, result
    (ended,) = client_run.recorder.ended["deadline_reaches_server"]
    # grpc-timeout arrived (300 ms, less the trip), and the handler, due to reply in 2 s, was
    # cancelled at the deadline (ours, DEADLINE_EXCEEDED, or grpc-js's RST_STREAM CANCEL,
    # whichever came first), with nothing sent.
    assert ended.deadline is not None and 0 < ended.deadline <= 0.3, ended
    assert ended.status in (Status.DEADLINE_EXCEEDED, _CANCELLED) and ended.sent == 0, ended
    assert client_run.recorder.cancelled["deadline_reaches_server"] == 1


async def test_grpc_js_client_100_concurrent_unary_calls(client_run: ClientRun) -> None:
    client_run.result("concurrent_unary_100")
    ended = client_run.recorder.ended["concurrent_unary_100"]
    assert [e.status for e in ended] == [_OK] * 100
    peak = client_run.recorder.peak["concurrent_unary_100"]
    print(f"peak concurrent handlers: {peak}")
    assert peak > 1, "the 100 calls never overlapped"  # (they all do, as a rule)


@pytest.mark.parametrize("attempt", range(UPLOADS))
async def test_grpc_js_client_uploads_64_messages_of_1_mib(client_run: ClientRun, attempt: int) -> None:
    # The bug report's case: a grpc-js client streaming 64 x 1 MiB failed 8 runs in 20.
    name = f"upload_64x1MiB/{attempt}"
    result = client_run.result(name)
    print(f"{name}: {result['details']['elapsed_ms']} ms")
    assert [(e.status, e.received) for e in client_run.recorder.ended[name]] == [(_OK, 64)]


async def test_grpc_js_keepalive_is_not_told_too_many_pings(client_run: ClientRun) -> None:
    # grpc-js's production keepalive (keepalive_time_ms 10000, keepalive_permit_without_calls)
    # twenty times faster (500 ms), over 3.5 s of calls: at least 4 PINGs, more than
    # max_ping_strikes + 1, each sent while our replies flow, which licenses it (gRPC resets the
    # strikes whenever the server sends HEADERS or DATA): no GOAWAY ENHANCE_YOUR_CALM.
    result = client_run.result("keepalive")
    relay = client_run.keepalive_relay
    print(f"keepalive: {result['details']}")
    assert relay.error_goaways == [], relay.describe()
    assert relay.connections == 1, f"grpc-js reconnected: {relay.describe()}"


async def test_grpc_js_keepalive_without_calls_is_told_too_many_pings(client_run: ClientRun) -> None:
    # The control, which shows the case above could fail: the same settings on a connection
    # that has no calls. Nothing licenses those PINGs (A8: 2 h apart without calls), so the
    # strike past max_ping_strikes ends the connection, as a gRPC core or Go server would.
    result = client_run.result("keepalive_idle")
    print(f"keepalive without calls: {result['details']}")
    ours = [(g.error_code, g.debug) for g in client_run.idle_relay.goaways if g.direction == "upstream->client"]
    assert ours == [(11, b"too_many_pings")], client_run.idle_relay.describe()  # 11: ENHANCE_YOUR_CALM
    assert result["details"]["pings"] == 4, result


async def test_grpc_js_graceful_close_with_a_call_in_flight(client_run: ClientRun) -> None:
    # close(grace) while a server stream is half done: it completes (client.js checked its
    # three replies and OK), a call made once grpc-js had the GOAWAY fails UNAVAILABLE at once,
    # and the server closes as soon as the call is done, long before the grace ends.
    result = client_run.result("graceful_close")
    print(f"graceful close: {result['details']}, closed in {client_run.close_seconds} s")
    assert result["details"]["after_ms"] < 3000, result
    assert client_run.close_seconds is not None and client_run.close_seconds < GRACE - 1, client_run.close_seconds
    ended = client_run.close_recorder.ended
    assert [(e.method, e.status, e.sent) for e in ended["graceful_close"]] == [("StreamingOutputCall", _OK, 3)]
    assert ended["graceful_close/after"] == [], "the call after the close reached the closed server"
    assert client_run.close_relay.error_goaways == [], client_run.close_relay.describe()


async def test_no_error_goaway_from_our_server(client_run: ClientRun) -> None:
    for relay in (client_run.main_relay, client_run.upload_relay, client_run.keepalive_relay, client_run.close_relay):
        assert relay.error_goaways == [], relay.describe()


# -- our Channel against grpc-js's server -----------------------------------------------------------


@dataclasses.dataclass
class JsServer:
    port: int
    events: list[dict[str, Any]]

    def of(self, case: str, event: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("case") == case and (event is None or e["event"] == event)]

    async def wait_for(self, case: str, event: str, timeout: float = 5.0) -> dict[str, Any]:
        try:
            async with asyncio.timeout(timeout):
                while not self.of(case, event):
                    await asyncio.sleep(0.005)
        except TimeoutError:
            pytest.fail(f"grpc-js's server reported no {event!r} for {case!r}: {self.of(case)}")
        return self.of(case, event)[0]


@pytest.fixture(scope="module")
async def js_server(node: str) -> AsyncIterator[JsServer]:
    process = await asyncio.create_subprocess_exec(
        node,
        str(JS / "server.js"),
        cwd=JS,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None and process.stdin is not None
    stderr = asyncio.ensure_future(process.stderr.read())
    reader: asyncio.Future[None] | None = None
    try:
        async with asyncio.timeout(20):
            first = await process.stdout.readline()
        if not first:
            pytest.fail(f"grpc-js's server did not start: {(await stderr).decode(errors='replace')}")
        server = JsServer(port=json.loads(first)["port"], events=[])

        async def read() -> None:
            assert process.stdout is not None
            async for line in process.stdout:
                server.events.append(json.loads(line))

        reader = asyncio.ensure_future(read())
        yield server
    finally:
        process.stdin.close()  # it exits when its stdin closes
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader
        await stderr


class Tag(ClientInterceptor):
    """Every call carries ``x-case: <case>`` (grpc-js's server reports events under it)."""

    def __init__(self, case: str) -> None:
        self.case = case

    async def start(self, call: ClientStream[Any, Any]) -> None:
        call.add_metadata("x-case", self.case)


@contextlib.asynccontextmanager
async def channel_to(server: JsServer, case: str) -> AsyncIterator[Channel]:
    async with segmenting_relay("127.0.0.1", server.port) as port:
        async with Channel("127.0.0.1", port, interceptors=[Tag(case)]) as channel:
            yield channel


# grpc-js's server never compresses a reply (server-interceptors.ts serializeMessage: "response
# compression is currently not supported, so this compressed bit is always 0"): it has no
# CompressedResponse, which server_compressed_unary and server_compressed_streaming test.
AGAINST_GRPC_JS = [name for name in AGAINST_GRPCIO if not name.startswith("server_compressed_")]


@pytest.mark.parametrize("name", AGAINST_GRPC_JS)
async def test_our_channel_against_grpc_js_server(js_server: JsServer, name: str) -> None:
    async with channel_to(js_server, name) as channel:
        await CASES[name](channel)


def _sleeping_request() -> StreamingOutputCallRequest:
    return StreamingOutputCallRequest(payload=Payload(body=bytes(100)))  # asks for no reply


async def test_our_deadline_reaches_grpc_js_server(js_server: JsServer) -> None:
    case = "our_deadline"
    async with channel_to(js_server, case) as channel:
        start = time.monotonic()
        with pytest.raises(GRPCError) as raised:
            async with Stub(channel).FullDuplexCall.open(timeout=0.3) as call:
                await call.send_message(_sleeping_request())
                await call.recv_message()
        elapsed = time.monotonic() - start
        assert raised.value.status is Status.DEADLINE_EXCEEDED, raised.value
        assert 0.25 <= elapsed < 2.0, elapsed
        # A server stream too: its one reply due in 2 s, a deadline of 0.3 s.
        slow = StreamingOutputCallRequest(response_parameters=[ResponseParameters(size=1, interval_us=2_000_000)])
        with pytest.raises(GRPCError) as raised:
            await Stub(channel).StreamingOutputCall(slow, timeout=0.3)
        assert raised.value.status is Status.DEADLINE_EXCEEDED, raised.value
    calls = js_server.of(case, "call")
    assert [c["method"] for c in calls] == ["FullDuplexCall", "StreamingOutputCall"], js_server.of(case)
    # grpc-timeout reached it (300 ms less the trip), and the calls ended there too.
    assert all(c["deadline_ms"] is not None and 0 < c["deadline_ms"] <= 300 for c in calls), calls
    async with asyncio.timeout(5):
        while len(js_server.of(case, "cancelled")) < 2:
            await asyncio.sleep(0.005)


async def test_our_cancellation_reaches_grpc_js_server(js_server: JsServer) -> None:
    case = "our_cancellation"
    async with channel_to(js_server, case) as channel:
        # A server stream cancelled after 2 of its 20 replies (one every 50 ms).
        request = StreamingOutputCallRequest(
            response_parameters=[ResponseParameters(size=1000, interval_us=50_000)] * 20
        )
        async with Stub(channel).StreamingOutputCall.open() as call:
            await call.send_message(request, end=True)
            for _ in range(2):
                assert await call.recv_message() is not None
            await call.cancel()
            with pytest.raises(GRPCError) as raised:
                await call.recv_message()
            assert raised.value.status is Status.CANCELLED
        await js_server.wait_for(case, "cancelled")
        # The channel goes on working after it.
        reply = await Stub(channel).UnaryCall(SimpleRequest(response_size=10))
        assert len(reply.payload.body) == 10


async def test_our_channel_exchanges_1_mib_messages_with_grpc_js(js_server: JsServer) -> None:
    case = "one_mib"
    async with channel_to(js_server, case) as channel:
        stub = Stub(channel)
        reply = await stub.UnaryCall(SimpleRequest(response_size=MiB, payload=Payload(body=bytes(MiB))))
        assert reply.payload.body == bytes(MiB)
        total = await stub.StreamingInputCall([StreamingInputCallRequest(payload=Payload(body=bytes(MiB)))] * 4)
        assert total.aggregated_payload_size == 4 * MiB
        replies = await stub.StreamingOutputCall(
            StreamingOutputCallRequest(response_parameters=[ResponseParameters(size=MiB)] * 4)
        )
        assert [len(r.payload.body) for r in replies] == [MiB] * 4
        async with stub.FullDuplexCall.open() as call:
            for _ in range(2):
                await call.send_message(
                    StreamingOutputCallRequest(
                        response_parameters=[ResponseParameters(size=MiB)], payload=Payload(body=bytes(MiB))
                    )
                )
                echoed = await call.recv_message()
                assert echoed is not None and echoed.payload.body == bytes(MiB)
            await call.end()
            assert await call.recv_message() is None
            await call.recv_trailing_metadata()
    (received,) = js_server.of(case, "received")
    assert received["sizes"] == [MiB] * 4
