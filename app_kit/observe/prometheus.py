"""Prometheus metrics: the standard gRPC names, a server's connection gauges, and ``/metrics``.

Needs the ``prometheus`` extra (``prometheus-client``). The per-call metrics have the names
and labels of go-grpc-prometheus, so existing dashboards and alerts work unchanged:

* ``grpc_server_started_total``, ``grpc_server_msg_received_total``,
  ``grpc_server_msg_sent_total`` and the ``grpc_server_handling_seconds`` histogram, labelled
  ``grpc_type`` (``unary``, ``client_stream``, ``server_stream``, ``bidi_stream``),
  ``grpc_service`` (``package.Service``) and ``grpc_method``;
* ``grpc_server_handled_total``, labelled as well with ``grpc_code``: the code's name as
  go-grpc-prometheus writes it (Go's ``codes.Code``: ``OK``, ``Canceled``, ``NotFound``,
  ``DeadlineExceeded``...), which the usual alerts match;
* the same with ``grpc_client_`` from :class:`ClientMetrics`.

Only methods a server serves get labels (an unknown method is refused before any interceptor
runs, as is a request whose headers the server cannot take), so a client cannot grow the label
sets.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from typing import Any, cast

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketListener, SocketStream, TaskGroup
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ..aio.client import ClientInterceptor, ClientStream
from ..aio.server import Server, ServerInterceptor
from ..aio.stream import Stream
from ..rpc.handlers import Cardinality
from ..rpc.status import Status

log = logging.getLogger("app_kit.metrics")

__all__ = [
    "DEFAULT_BUCKETS",
    "GO_CODE_NAMES",
    "ClientMetrics",
    "RegistryCollector",
    "ServerMetrics",
    "ServerStatsCollector",
    "serve_metrics",
]

#: Upper bounds (seconds) of the handling-time histograms: Prometheus's default buckets as
#: go-grpc-prometheus uses them (Go's ``prometheus.DefBuckets``; Python's client adds three).
DEFAULT_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: ``grpc_code`` label values: Go's names of the codes, as go-grpc-prometheus writes them
#: (``codes.Code.String()``), so that alerts such as ``grpc_code=~"Unavailable|DeadlineExceeded"``
#: match app_kit's services as they match Go's.
GO_CODE_NAMES: dict[Status, str] = {
    Status.OK: "OK",
    Status.CANCELLED: "Canceled",
    Status.UNKNOWN: "Unknown",
    Status.INVALID_ARGUMENT: "InvalidArgument",
    Status.DEADLINE_EXCEEDED: "DeadlineExceeded",
    Status.NOT_FOUND: "NotFound",
    Status.ALREADY_EXISTS: "AlreadyExists",
    Status.PERMISSION_DENIED: "PermissionDenied",
    Status.RESOURCE_EXHAUSTED: "ResourceExhausted",
    Status.FAILED_PRECONDITION: "FailedPrecondition",
    Status.ABORTED: "Aborted",
    Status.OUT_OF_RANGE: "OutOfRange",
    Status.UNIMPLEMENTED: "Unimplemented",
    Status.INTERNAL: "Internal",
    Status.UNAVAILABLE: "Unavailable",
    Status.DATA_LOSS: "DataLoss",
    Status.UNAUTHENTICATED: "Unauthenticated",
}

# registry -> side -> its metrics (weakly: a registry dropped takes its metrics with it)
_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _CallMetrics]] = weakref.WeakKeyDictionary()

GRPC_TYPES = {
    Cardinality.UNARY_UNARY: "unary",
    Cardinality.STREAM_UNARY: "client_stream",
    Cardinality.UNARY_STREAM: "server_stream",
    Cardinality.STREAM_STREAM: "bidi_stream",
}
_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class _CallMetrics:
    """The five metrics of one side (``grpc_server_`` or ``grpc_client_``), with each method's
    labelled children cached: ``labels()`` takes a lock and builds a key on every use."""

    @classmethod
    def of(cls, side: str, registry: CollectorRegistry | None, buckets: Sequence[float], what: str) -> _CallMetrics:
        """The side's metrics in ``registry``: one set, shared by every interceptor that counts
        there (a ``ClientMetrics()`` per channel, as go-grpc-prometheus's one set for all)."""
        if registry is None:
            return cls(side, None, buckets, what)
        shared = _SHARED.setdefault(registry, {})
        metrics = shared.get(side)
        if metrics is None:
            metrics = shared[side] = cls(side, registry, buckets, what)
        elif metrics.buckets != tuple(buckets):
            raise ValueError(
                f"grpc_{side}_handling_seconds is in this registry with buckets {metrics.buckets}, not {tuple(buckets)}"
            )
        return metrics

    def __init__(self, side: str, registry: CollectorRegistry | None, buckets: Sequence[float], what: str) -> None:
        self.buckets = tuple(buckets)
        prefix = f"grpc_{side}"
        self.started = Counter(f"{prefix}_started", f"RPCs {what} started.", _LABELS, registry=registry)
        self.handled = Counter(
            f"{prefix}_handled", f"RPCs {what} completed, by status code.", (*_LABELS, "grpc_code"), registry=registry
        )
        self.received = Counter(
            f"{prefix}_msg_received", f"Stream messages received by RPCs {what}.", _LABELS, registry=registry
        )
        self.sent = Counter(f"{prefix}_msg_sent", f"Stream messages sent by RPCs {what}.", _LABELS, registry=registry)
        self.seconds = Histogram(
            f"{prefix}_handling_seconds",
            f"Seconds RPCs {what} took, until their status.",
            _LABELS,
            buckets=buckets,
            registry=registry,
        )
        # path -> (started, received, sent, seconds) children; (path, status) -> handled child
        self._children: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._handled: dict[tuple[str, Status], Any] = {}

    def children(self, path: str, cardinality: Cardinality) -> tuple[Any, Any, Any, Any]:
        found = self._children.get(path)
        if found is None:
            labels = self._labels(path, cardinality)
            found = (
                self.started.labels(*labels),
                self.received.labels(*labels),
                self.sent.labels(*labels),
                self.seconds.labels(*labels),
            )
            self._children[path] = found
        return found

    def ended(
        self,
        path: str,
        cardinality: Cardinality,
        status: Status | None,
        elapsed: float,
        received: int,
        sent: int,
    ) -> None:
        status = status if status is not None else Status.UNKNOWN
        handled = self._handled.get((path, status))
        if handled is None:
            handled = self.handled.labels(*self._labels(path, cardinality), GO_CODE_NAMES[status])
            self._handled[(path, status)] = handled
        _, received_counter, sent_counter, seconds = self.children(path, cardinality)
        handled.inc()
        if received:
            received_counter.inc(received)
        if sent:
            sent_counter.inc(sent)
        seconds.observe(elapsed)

    @staticmethod
    def _labels(path: str, cardinality: Cardinality) -> tuple[str, str, str]:
        service, _, method = path.lstrip("/").rpartition("/")
        return GRPC_TYPES[cardinality], service, method


class ServerMetrics(ServerInterceptor):
    """The standard ``grpc_server_*`` metrics of every call the server serves.

    List it first (outermost) in ``interceptors``: a call an outer interceptor refuses never
    reaches it, and is not counted. ``registry`` is where the metrics are registered
    (prometheus_client's global ``REGISTRY`` by default; every ``ServerMetrics`` of one
    registry counts in the same metrics, so their ``buckets`` must agree); ``buckets`` are the
    upper bounds of ``grpc_server_handling_seconds``.

    Messages are counted when a call ends, from the call's own counters, rather than in the
    per-message hooks: one increment per call instead of one per message, and the server's
    message path stays as fast as without interceptors. The cost is that a long stream's
    messages appear in ``grpc_server_msg_*_total`` when it ends.
    """

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self._metrics = _CallMetrics.of("server", registry, buckets, "on the server")

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        """Count the call as started, and run it."""
        self._metrics.children(call.method, call.cardinality)[0].inc()
        await proceed()

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        """Count the call as handled with its status; its messages; its duration."""
        self._metrics.ended(
            call.method, call.cardinality, call.status, call.elapsed, call.messages_received, call.messages_sent
        )


class ClientMetrics(ClientInterceptor):
    """The standard ``grpc_client_*`` metrics of every call (each attempt) of a channel.

    Arguments as for :class:`ServerMetrics`. A call counts as started when its interceptors
    start (before it connects), so calls that fail to connect are counted, with their status
    (``UNAVAILABLE``, ``DEADLINE_EXCEEDED``).
    """

    def __init__(
        self, registry: CollectorRegistry | None = REGISTRY, *, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self._metrics = _CallMetrics.of("client", registry, buckets, "from the client")

    async def start(self, call: ClientStream[Any, Any]) -> None:
        """Count the call as started."""
        self._metrics.children(call.path, call.cardinality)[0].inc()

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        """Count the call as handled with its status; its messages; its duration."""
        self._metrics.ended(
            call.path, call.cardinality, call.status, call.elapsed, call.messages_received, call.messages_sent
        )


class RegistryCollector(Collector):
    """Everything another registry holds, collected afresh at each scrape: how an App's
    ``/metrics`` also serves prometheus_client's global ``REGISTRY`` (the app's own metrics,
    ``ClientMetrics`` of its channels, the ``process_*`` and ``python_*`` ones)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        """The other registry's metrics, as it collects them now."""
        yield from self._registry.collect()


class ServerStatsCollector(Collector):
    """A server's connection and call counts, read from :meth:`Server.stats` at each scrape.

    * ``app_kit_server_open_connections`` (gauge): connections open now;
    * ``app_kit_server_running_calls`` (gauge): calls whose handler runs now;
    * ``app_kit_server_connections_total`` (counter): connections accepted;
    * ``app_kit_server_connection_errors_total{error}`` (counter): connections the server
      ended with an HTTP/2 error, by its name: ``ENHANCE_YOUR_CALM`` counts the floods and
      ping abuse it cut off, ``PROTOCOL_ERROR`` and ``FRAME_SIZE_ERROR`` broken peers.

    Register it with ``registry.register(ServerStatsCollector(server))``. Scrape it in the
    server's event loop (:func:`serve_metrics` does): the server's counters are not meant to
    be read from other threads.
    """

    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        """The four metrics, as the server's counters are now."""
        stats = self.server.stats()
        yield GaugeMetricFamily("app_kit_server_open_connections", "Connections open now.", value=stats.connections)
        yield GaugeMetricFamily("app_kit_server_running_calls", "Calls whose handler runs now.", value=stats.calls)
        yield CounterMetricFamily("app_kit_server_connections", "Connections accepted.", value=stats.connections_total)
        errors = CounterMetricFamily(
            "app_kit_server_connection_errors",
            "Connections the server ended with an HTTP/2 error, by its name.",
            labels=("error",),
        )
        for name, count in sorted(stats.connection_errors.items()):
            errors.add_metric((name,), count)
        yield errors


#: Longest request head (request line and headers) the metrics endpoint reads.
DEFAULT_MAX_REQUEST_BYTES = 8192
#: Seconds the metrics endpoint waits for a request head before it drops the connection.
DEFAULT_READ_TIMEOUT = 10.0
#: Seconds the metrics endpoint gives a scraper to take the page before it drops the connection.
DEFAULT_WRITE_TIMEOUT = 10.0
#: Connections the metrics endpoint keeps open at once; more are closed as they are accepted.
DEFAULT_MAX_CONNECTIONS = 64
#: Seconds the endpoint waits after it failed to accept a connection (out of file descriptors,
#: say) before it tries again: asyncio's servers wait as long.
_ACCEPT_RETRY_DELAY = 1.0


@contextlib.asynccontextmanager
async def serve_metrics(
    host: str | None = None,
    port: int = 0,
    registry: CollectorRegistry = REGISTRY,
    *,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    write_timeout: float = DEFAULT_WRITE_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> AsyncIterator[int]:
    """Serve ``registry`` in the Prometheus text format at ``/metrics`` over HTTP/1.1, in this
    event loop (asyncio or trio), while the block runs; yield the bound port (``port=0`` picks
    a free one). ``host`` None listens on every interface (on one port for every address
    family, ``port=0`` included).

    The format is what the scraper's ``Accept`` header asks for: Prometheus's text format, or
    OpenMetrics. Anything but ``GET`` or ``HEAD`` of ``/metrics`` (a query string is ignored)
    is answered 404 or 405. One request per connection. The page is generated in the event loop, so that
    collectors read a server's state in the thread that changes it; a scrape of a registry of
    usual size takes well under a millisecond. Leaving the block stops listening and drops the
    connections still open. Enter and leave it in the same task (the connections are tasks of
    a task group it holds).

    What one client can hold is bounded: the request head by ``max_request_bytes`` and
    ``read_timeout``, the answer by ``write_timeout`` (a scraper that does not read is dropped),
    and at most ``max_connections`` are open at once (more are closed as they come).
    """
    open_connections = 0

    async def handle(stream: SocketStream) -> None:
        nonlocal open_connections
        async with stream:
            if open_connections >= max_connections:
                return  # closed at once: idle connections must not pile up
            open_connections += 1
            try:
                await _answer(stream, registry, max_request_bytes, read_timeout, write_timeout)
            except (OSError, anyio.BrokenResourceError, anyio.EndOfStream, TimeoutError, ValueError):
                pass  # a client that went away, sent garbage or did not read: nothing to answer
            except Exception:
                # A collector that failed, say: this scrape fails, not the block around it.
                log.exception("the metrics endpoint failed to answer")
            finally:
                open_connections -= 1

    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=100)
    failure: Exception | None = None
    async with listener, anyio.create_task_group() as tasks:
        for one in listener.listeners:
            tasks.start_soon(_accept, cast(SocketListener, one), tasks, handle)
        try:
            yield listener.extra(SocketAttribute.local_port)
        except Exception as exc:
            failure = exc  # the block's own error: raised as it is below, not in an ExceptionGroup
        finally:
            # Stops the accepting and the answering; each connection is closed as its task ends.
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure


async def _accept(
    listener: SocketListener, tasks: TaskGroup, handle: Callable[[SocketStream], Coroutine[Any, Any, None]]
) -> None:
    while True:
        try:
            stream = await listener.accept()
        except (OSError, anyio.BrokenResourceError) as exc:
            error = exc if isinstance(exc, OSError) else exc.__cause__
            if isinstance(error, ConnectionAbortedError):
                continue  # the client left before it was accepted
            # Out of file descriptors, say: keep serving, as asyncio's servers do, a second later.
            log.warning("the metrics endpoint cannot accept connections: %s", error or exc)
            await anyio.sleep(_ACCEPT_RETRY_DELAY)
            continue
        tasks.start_soon(handle, stream)


async def _answer(
    stream: ByteStream,
    registry: CollectorRegistry,
    max_request_bytes: int,
    read_timeout: float,
    write_timeout: float,
) -> None:
    with anyio.fail_after(read_timeout):
        head = await _read_head(stream, max_request_bytes)
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    path = target.split("?", 1)[0]
    accept = ""
    for line in header_lines:
        name, _, header_value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = header_value.strip()
    if path != "/metrics":
        status, content_type, body = "404 Not Found", "text/plain; charset=utf-8", b"Not Found\n"
    elif method not in ("GET", "HEAD"):
        status, content_type, body = "405 Method Not Allowed", "text/plain; charset=utf-8", b"Method Not Allowed\n"
    else:
        # The format the scraper asks for: the text format (0.0.4 unless it asks for a later
        # version), or OpenMetrics.
        encoder, content_type = choose_encoder(accept)
        status, body = "200 OK", encoder(registry)
    headers = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with anyio.fail_after(write_timeout):
        await stream.send(headers.encode("latin-1") + (b"" if method == "HEAD" else body))


async def _read_head(stream: ByteStream, limit: int) -> bytes:
    """The request line and headers, blank line included: at most ``limit`` bytes, or ValueError."""
    head = b""
    while (end := head.find(b"\r\n\r\n")) < 0:
        if len(head) >= limit:
            raise ValueError("request head too long")
        head += await stream.receive(limit - len(head))  # never more than the limit
    return head[: end + 4]
