"""One log line per finished call, on the ``app_kit.access`` logger."""

from __future__ import annotations

import logging
from typing import Any

from ..aio.server import ServerInterceptor
from ..aio.stream import Stream

__all__ = ["AccessLog"]


def describe_peer(address: Any) -> str:
    """``host:port`` of a TCP peer (``[v6]:port``), ``unix`` for a Unix socket."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unix"


class AccessLog(ServerInterceptor):
    """Logs each call when it ends: peer, method, status, duration, messages and bytes each way.

    At INFO on ``app_kit.access`` (or ``logger``), for example::

        127.0.0.1:51532 "/cafe.CoffeeMachine/Order" OK 1.84ms in=1/12B out=1/40B

    ``in``/``out`` are messages/encoded bytes received and sent. The same values are on each
    record as attributes (``grpc_method``, ``grpc_status``, ``peer``, ``duration_ms``,
    ``messages_in``, ``bytes_in``, ``messages_out``, ``bytes_out``, ``user_agent``) for
    structured formatters, with the call's :attr:`~app_kit.Stream.log_fields` (what
    interceptors set: ``trace_id`` and ``span_id`` under ``ServerTracing``). No metadata is
    logged.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger if logger is not None else logging.getLogger("app_kit.access")

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        """Write the call's line (nothing is built when the logger is off for INFO)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        status = call.status.name if call.status is not None else "UNKNOWN"
        fields = {
            "peer": describe_peer(call.peer.addr()),
            "grpc_method": call.method,
            "grpc_status": status,
            "duration_ms": round(call.elapsed * 1000, 3),
            "messages_in": call.messages_received,
            "bytes_in": call.bytes_received,
            "messages_out": call.messages_sent,
            "bytes_out": call.bytes_sent,
            "user_agent": call.user_agent,
        }
        extra = call._log_fields  # (Stream.log_fields, without making one)
        if extra:
            fields = {**extra, **fields}  # (ours win: a formatter relies on them)
        logger.info(
            '%s "%s" %s %.2fms in=%d/%dB out=%d/%dB',
            fields["peer"],
            call.method,
            status,
            call.elapsed * 1000,
            call.messages_received,
            call.bytes_received,
            call.messages_sent,
            call.bytes_sent,
            extra=fields,
        )
