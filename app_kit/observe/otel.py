"""OpenTelemetry: a span per call on each side, and RPC metrics, through the OpenTelemetry API.

Needs the ``otel`` extra (``opentelemetry-api``); what is exported, and where, is the SDK's
configuration (a ``TracerProvider`` / ``MeterProvider``, global or passed in). Spans follow
the OpenTelemetry RPC semantic conventions for gRPC: named ``package.Service/Method``, kind
SERVER or CLIENT, with ``rpc.system="grpc"``, ``rpc.service``, ``rpc.method``,
``rpc.grpc.status_code`` (int) and the peer's ``network.peer.address``/``network.peer.port``.
The trace context travels in the call's metadata with the global propagator (W3C
``traceparent``/``tracestate`` unless configured otherwise), so our client, our server, and
grpcio or other OpenTelemetry-instrumented peers share traces.
"""

from __future__ import annotations

import weakref
from typing import Any

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.status import Status as SpanStatus
from opentelemetry.trace.status import StatusCode

from ..aio.client import ClientInterceptor, ClientStream
from ..aio.server import ServerInterceptor
from ..aio.stream import Peer, Stream
from ..rpc.metadata import Metadata
from ..rpc.status import GRPCError, Status

__all__ = ["SERVER_ERRORS", "ClientTracing", "ServerTracing"]

#: The statuses that mark a server span as an error, as the conventions list them: the others
#: (NOT_FOUND, INVALID_ARGUMENT, CANCELLED...) are the client's problem, not the server's.
#: On the client every status but OK is an error.
SERVER_ERRORS = frozenset(
    {
        Status.UNKNOWN,
        Status.DEADLINE_EXCEEDED,
        Status.UNIMPLEMENTED,
        Status.INTERNAL,
        Status.UNAVAILABLE,
        Status.DATA_LOSS,
    }
)
_SCOPE = "app_kit"


class _MetadataGetter(Getter[Metadata]):
    """Reads propagation headers from a call's metadata (text values only)."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        # gRPC metadata keys are lower-case; a propagator may spell its header otherwise
        # (AWS X-Ray's ``X-Amzn-Trace-Id``).
        values = [value for value in carrier.getall(key.lower(), ()) if isinstance(value, str)]
        return values or None

    def keys(self, carrier: Metadata) -> list[str]:
        return list(carrier.keys())


_GETTER = _MetadataGetter()


def _peer_attributes(peer: Peer | None) -> dict[str, Any]:
    address = peer.addr() if peer is not None else None
    if isinstance(address, tuple) and len(address) >= 2:
        return {"network.transport": "tcp", "network.peer.address": address[0], "network.peer.port": address[1]}
    if peer is not None:
        return {"network.transport": "unix"}
    return {}


def _end_span(span: Span, status: Status | None, message: str | None, error: bool) -> None:
    status = status if status is not None else Status.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", int(status))
    if error:
        span.set_status(SpanStatus(StatusCode.ERROR, f"{status.name}: {message}" if message else status.name))
    span.end()


class _RpcMetrics:
    """``rpc.{side}.duration`` (ms), ``rpc.{side}.requests_per_rpc`` and
    ``rpc.{side}.responses_per_rpc`` histograms, as the RPC conventions name them."""

    def __init__(self, side: str, meter_provider: metrics.MeterProvider | None) -> None:
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self.duration = meter.create_histogram(
            f"rpc.{side}.duration", unit="ms", description="Duration of RPCs, until their status."
        )
        self.requests = meter.create_histogram(
            f"rpc.{side}.requests_per_rpc", unit="{count}", description="Request messages per RPC."
        )
        self.responses = meter.create_histogram(
            f"rpc.{side}.responses_per_rpc", unit="{count}", description="Response messages per RPC."
        )

    def record(
        self, service: str, method: str, status: Status | None, elapsed: float, requests: int, responses: int
    ) -> None:
        attributes: dict[str, str | int] = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            "rpc.grpc.status_code": int(status if status is not None else Status.UNKNOWN),
        }
        self.duration.record(elapsed * 1000, attributes)
        self.requests.record(requests, attributes)
        self.responses.record(responses, attributes)


class ServerTracing(ServerInterceptor):
    """A SERVER span for each call, the current span while its handler runs.

    The span continues the trace whose context came in the request metadata (read with
    ``propagator``, the global one by default), so a client's span is its parent; spans the
    handler starts, and calls it makes with a traced channel, are its children. It ends when
    the call ended, with ``rpc.grpc.status_code``; its status is ERROR only for the statuses
    in :data:`SERVER_ERRORS`. An exception the handler raised (other than a
    :class:`GRPCError` or ``NotImplementedError``, which choose a status) is recorded on it.

    The ``rpc.server.duration`` (ms), ``rpc.server.requests_per_rpc`` and
    ``rpc.server.responses_per_rpc`` histograms go to ``meter_provider`` (the global one by
    default: without an SDK configured, a no-op call each).

    List it outermost, so that the span covers what the other interceptors do (and their log
    lines carry its trace id). Message events are not recorded: they would need the
    per-message hooks (a cost on every message) and a long stream would overflow the span's
    event limit; ``messages_received``/``messages_sent`` are in the metrics.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._propagator = propagator
        self._metrics = _RpcMetrics("server", meter_provider)
        # on_call_end runs for every call whose intercept started: nothing stays behind.
        self._spans: dict[Stream[Any, Any], Span] = {}

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        """Start the call's span from the propagated context, and run the call inside it."""
        if self._propagator is not None:
            parent = self._propagator.extract(call.metadata, getter=_GETTER)
        else:
            parent = propagate.extract(call.metadata, getter=_GETTER)
        attributes: dict[str, Any] = {
            "rpc.system": "grpc",
            "rpc.service": call.service,
            "rpc.method": call.method_name,
            **_peer_attributes(call.peer),
        }
        span = self._tracer.start_span(
            call.method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes=attributes
        )
        self._spans[call] = span
        span_context = span.get_span_context()
        if span_context.is_valid:  # (not under the API's no-op tracer)
            # For the access log's line (Stream.log_fields), as OpenTelemetry's log correlation
            # spells them: the line and the trace can be joined.
            fields = call.log_fields
            fields["trace_id"] = format(span_context.trace_id, "032x")
            fields["span_id"] = format(span_context.span_id, "016x")
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            await proceed()
        except (GRPCError, NotImplementedError):
            raise  # statuses a handler chose, not crashes
        except Exception as exc:
            span.record_exception(exc)
            raise
        finally:
            context.detach(token)

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        """End the call's span with its final status; record the metrics."""
        span = self._spans.pop(call, None)
        status = call.status
        if span is not None:
            _end_span(span, status, call.status_message, status in SERVER_ERRORS or status is None)
        self._metrics.record(
            call.service, call.method_name, status, call.elapsed, call.messages_received, call.messages_sent
        )


class ClientTracing(ClientInterceptor):
    """A CLIENT span for each call (each attempt), child of the span current when it starts.

    Its context goes out in the request metadata (with ``propagator``, the global one by
    default), so the server's span is its child. It ends when the call ended, with
    ``rpc.grpc.status_code``; every status but OK makes it ERROR. The ``rpc.client.*``
    metrics go to ``meter_provider``, as with :class:`ServerTracing`.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        meter_provider: metrics.MeterProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self._propagator = propagator
        self._metrics = _RpcMetrics("client", meter_provider)
        # Weak: a call its caller abandoned without leaving its ``async with`` never ends.
        self._spans: weakref.WeakKeyDictionary[ClientStream[Any, Any], Span] = weakref.WeakKeyDictionary()

    async def start(self, call: ClientStream[Any, Any]) -> None:
        """Start the call's span and put its context into the request metadata."""
        attributes = {"rpc.system": "grpc", "rpc.service": call.service, "rpc.method": call.method_name}
        span = self._tracer.start_span(call.path.lstrip("/"), kind=SpanKind.CLIENT, attributes=attributes)
        self._spans[call] = span
        carrier: dict[str, str] = {}
        if self._propagator is not None:
            self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        else:
            propagate.inject(carrier, context=trace.set_span_in_context(span))
        for key, value in carrier.items():
            call.add_metadata(key.lower(), value)  # (gRPC metadata keys are lower-case)

    def on_call_end(self, call: ClientStream[Any, Any]) -> None:
        """End the call's span with its status; record the metrics."""
        span = self._spans.pop(call, None)
        status = call.status
        if span is not None:
            span.set_attributes(_peer_attributes(call.peer))
            _end_span(span, status, call.status_message, status is not Status.OK)
        self._metrics.record(
            call.service, call.method_name, status, call.elapsed, call.messages_sent, call.messages_received
        )
