"""What a Channel is made of: target names, one connection per backend address, and the
connectivity states and reconnect backoff of gRPC's connectivity and connection-backoff specs.

A :class:`Subchannel` owns the connection to one address. It connects when a call needs it
(IDLE → CONNECTING → READY). A failed attempt puts it in TRANSIENT_FAILURE, where it stays until
a connection is READY (gRFC A62's sticky TRANSIENT_FAILURE: calls that do not wait for ready
fail at once meanwhile), trying again in the background each time its backoff expires, backing
off further after each failure. A READY connection that is lost or draining (told to go away
with GOAWAY, or out of stream ids) makes it IDLE at once, its calls in flight finishing on the
old connection; the next call that needs it connects anew.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from ..wire.config import Configuration
from .runtime import current_runtime, deadline_scope

__all__ = ["Address", "Backoff", "CallConnection", "ConnectivityState", "Subchannel", "Target", "parse_target"]

DEFAULT_PORT = 50051


class CallConnection(Protocol):
    """What a subchannel needs of a connection (the client's protocol)."""

    #: Called once when the connection stops taking new calls.
    on_unusable: Callable[[], None] | None

    @property
    def takes_calls(self) -> bool:
        """Open, and not draining."""

    @property
    def carried_calls(self) -> bool:
        """Whether a call was ever started on it."""

    @property
    def unusable_reason(self) -> str:
        """Why it takes no new calls: lost, or draining (and why)."""

    def close_when_idle(self) -> None:
        """Take no more calls; close once the calls on it are done."""


ConnectionT = TypeVar("ConnectionT", bound=CallConnection)


class ConnectivityState(enum.Enum):
    """gRPC's connectivity states, of a channel or of one of its connections."""

    IDLE = "idle"
    CONNECTING = "connecting"
    READY = "ready"
    TRANSIENT_FAILURE = "transient_failure"
    SHUTDOWN = "shutdown"


@dataclasses.dataclass(frozen=True, slots=True)
class Address:
    """One backend: a TCP host and port, or a Unix socket path."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in str(self.host) else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """What a channel connects to: fixed addresses, or a DNS name resolved into addresses."""

    addresses: tuple[Address, ...] = ()
    dns_name: str | None = None
    dns_port: int = DEFAULT_PORT

    @property
    def authority(self) -> str:
        """The ``:authority`` of requests: the name the caller gave (the first address of a list)."""
        if self.dns_name is not None:
            return str(Address(self.dns_name, self.dns_port))
        first = self.addresses[0]
        return "localhost" if first.path is not None else str(first)


def _host_port(text: str, original: str) -> Address:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (port 50051 if none)."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"invalid target {original!r}")
        port_text = rest[1:]
    elif text.count(":") > 1:
        host, port_text = text, ""  # a bare IPv6 address
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"invalid target {original!r}: no host")
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"invalid target {original!r}: bad port")
    return Address(host, int(port_text) if port_text else DEFAULT_PORT)


def parse_target(target: str) -> Target:
    """A gRPC target string: ``host:port``, ``dns:///name:port`` (every address the name
    resolves to is a backend), ``unix:path`` or ``unix:///absolute/path``."""
    if target.startswith("unix:"):
        path = target[len("unix://") :] if target.startswith("unix://") else target[len("unix:") :]
        if not path:
            raise ValueError(f"invalid target {target!r}: no path")
        return Target(addresses=(Address(path=path),))
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        if rest.startswith("//"):
            rest = rest[2:].partition("/")[2]  # dns://authority/name: the authority is the DNS server's
        address = _host_port(rest, target)
        assert address.host is not None and address.port is not None
        return Target(dns_name=address.host, dns_port=address.port)
    return Target(addresses=(_host_port(target, target),))


class Backoff:
    """gRPC's connection backoff: 1 s, then 1.6 times longer per failure up to 120 s, with
    20 % jitter either way (all set by :class:`Configuration`)."""

    def __init__(self, config: Configuration) -> None:
        self._config = config
        self._current = config.connect_initial_backoff

    def reset(self) -> None:
        """After a success: the next failure waits the initial backoff again."""
        self._current = self._config.connect_initial_backoff

    def next_delay(self) -> float:
        """How long to wait after the failure that just happened."""
        config = self._config
        delay = self._current
        jitter = config.connect_backoff_jitter * delay
        self._current = min(self._current * config.connect_backoff_multiplier, config.connect_max_backoff)
        return max(0.0, delay + random.uniform(-jitter, jitter))


class Subchannel(Generic[ConnectionT]):
    """The connection to one address (see the module's docstring)."""

    def __init__(
        self,
        address: Address,
        connect: Callable[[Address], Awaitable[ConnectionT]],
        config: Configuration,
        on_change: Callable[[Subchannel[ConnectionT]], None],
    ) -> None:
        self.address = address
        self._connect = connect
        self._config = config
        self._on_change = on_change
        self._backoff = Backoff(config)
        self.state = ConnectivityState.IDLE
        self.protocol: ConnectionT | None = None
        #: Why the last attempt (or connection) failed.
        self.last_error: str | None = None
        self._task: Any = None  # the connection attempt's task
        self._retry_handle: Any = None
        # When the connection became READY, and when the attempt that made it could have
        # been retried had it failed (see ready_protocol).
        self._ready_at = 0.0
        self._retry_at = 0.0
        # Connections in a row that went before carrying a call, young (see ready_protocol).
        self._young_losses = 0

    def __repr__(self) -> str:
        return f"<Subchannel {self.address} {self.state.name}>"

    def ready_protocol(self) -> ConnectionT | None:
        """The connection if it takes new calls; a lost or draining one makes us IDLE.

        A connection lost (or told to go away) before it carried a call and within the
        initial backoff of becoming READY proved nothing: the backoff was not reset by it,
        and the second such loss in a row is a failed attempt (TRANSIENT_FAILURE until the
        backoff expires). A backend that drops every connection right after its SETTINGS, or
        a draining server that greets each one with GOAWAY, was otherwise redialled as fast
        as it answered (1,500 connections a second), and a call that does not wait for ready
        waited on it. The first such loss reconnects at once: behind a virtual IP the next
        connection may reach another backend.
        """
        protocol = self.protocol
        if protocol is None:
            return None
        if not protocol.takes_calls:
            self.protocol = None
            self.last_error = protocol.unusable_reason
            protocol.close_when_idle()
            loop = current_runtime()
            if protocol.carried_calls or loop.time() - self._ready_at >= self._config.connect_initial_backoff:
                self._backoff.reset()
                self._young_losses = 0
            else:
                self._young_losses += 1
                if self._young_losses > 1:
                    self.last_error = f"{self.address} ended each connection before any call ({self.last_error})"
                    self._retry_handle = loop.call_at(max(self._retry_at, loop.time()), self._backoff_over)
                    self.state = ConnectivityState.TRANSIENT_FAILURE
                    self._on_change(self)
                    return None
            self._set(ConnectivityState.IDLE)
            return None
        return protocol

    def request_connection(self) -> None:
        """Start connecting if IDLE (a call needs a connection). In TRANSIENT_FAILURE the next
        attempt starts by itself when the backoff expires."""
        self.ready_protocol()
        if self.state is ConnectivityState.IDLE:
            self._set(ConnectivityState.CONNECTING)
            self._task = current_runtime().create_task(self._attempt())

    async def _attempt(self) -> None:
        loop = current_runtime()
        delay = self._backoff.next_delay()
        retry_at = loop.time() + delay
        try:
            # gRPC's rule: each attempt may take the larger of the backoff and the minimum.
            # (_connect returns once the server's SETTINGS came: a connection closed before
            # it spoke HTTP/2 is a failed attempt, backed off, never READY. Cancelled by
            # shutdown(), it closes what it opened.)
            async with deadline_scope(loop, max(delay, self._config.connect_min_timeout)):
                protocol = await self._connect(self.address)
        except Exception as exc:  # OSError, TimeoutError, a TLS or ALPN failure: all transient
            self._task = None
            if self.state is ConnectivityState.SHUTDOWN:
                return
            self.last_error = f"cannot connect to {self.address}: {_describe(exc)}"
            self._retry_handle = loop.call_at(retry_at, self._backoff_over)
            # Told each time (not only on entering TRANSIENT_FAILURE): the channel resolves
            # its name again, and the calls waiting for a backend look again.
            self.state = ConnectivityState.TRANSIENT_FAILURE
            self._on_change(self)
            return
        self._task = None
        if self.state is ConnectivityState.SHUTDOWN:  # shut down as it connected: nobody's
            protocol.close_when_idle()
            return
        # The backoff is reset once the connection proves itself (see ready_protocol).
        self._ready_at = loop.time()
        self._retry_at = retry_at
        self.protocol = protocol
        protocol.on_unusable = self._connection_changed
        self._set(ConnectivityState.READY)

    def _backoff_over(self) -> None:
        """Try again, in the background, staying in TRANSIENT_FAILURE until READY."""
        self._retry_handle = None
        if self.state is ConnectivityState.TRANSIENT_FAILURE and self._task is None:
            self._task = current_runtime().create_task(self._attempt())

    def _connection_changed(self) -> None:
        if self.protocol is not None:
            self.ready_protocol()

    def _set(self, state: ConnectivityState) -> None:
        if state is not self.state:
            self.state = state
            self._on_change(self)

    def shutdown(self) -> None:
        """Stop: an attempt under way is cancelled (closing the connection it was opening),
        no further one is made; the connection closes once its calls are done (now, if none)."""
        self.state = ConnectivityState.SHUTDOWN
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.close_when_idle()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
