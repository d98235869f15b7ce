"""Settings from the environment (``APP_*``) and an optional ``.env`` file, via pydantic-settings."""

from __future__ import annotations

import math
import os
import re
import ssl
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..aio.tls import server_tls
from ..rpc.compression import IDENTITY, is_supported, registered_encodings
from ..wire.config import Configuration

__all__ = ["AppSettings", "SettingsError", "load_settings", "unknown_variables"]

_MiB = 1024 * 1024


class AppSettings(BaseSettings):
    """What every app can be told from outside. Subclass it for your own fields.

    Each field reads the environment variable ``APP_<FIELD>`` (``APP_PORT=8080``); fields of
    a subclass can use their own names with ``Field(validation_alias="CAFE_DB_URL")``.
    """

    # defer_build: the validator is built when settings are first read, not at import, so an
    # App with a subclass builds only the subclass's (AppSettings' own took ~5 ms of its launch).
    model_config = SettingsConfigDict(
        env_prefix="APP_", extra="ignore", validate_default=True, populate_by_name=True, defer_build=True
    )

    #: Interface to listen on; ``0.0.0.0`` (or ``::``) in a container.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one.
    port: int = 50051
    #: Listen on this Unix socket instead of TCP.
    path: str | None = None
    #: PEM certificate chain and key: serve TLS (ALPN h2) when both are set.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: The password of an encrypted ``tls_key_file`` (uvicorn's ``--ssl-keyfile-password``).
    tls_key_password: SecretStr | None = None
    #: PEM CA certificates: require every client to present a certificate they signed (mutual
    #: TLS: grpcio's ``require_client_auth``, uvicorn's ``--ssl-ca-certs`` + ``--ssl-cert-reqs``).
    #: A handler reads the client's with ``stream.peer.cert()``.
    tls_client_ca_file: Path | None = None
    #: Seconds between looks at the TLS files for a renewed certificate (cert-manager's, say):
    #: at the first handshake after that, changed files are read again and new connections get
    #: the new certificate; 0: read once, at start (see :func:`~app_kit.server_tls`).
    tls_reload_interval: float = 60.0
    #: Seconds a new connection has for its TLS handshake, then as long for its HTTP/2 one.
    handshake_timeout: float = 10.0
    #: Seconds a connection without calls stays open before it is closed gracefully (GOAWAY);
    #: 0: for ever.
    idle_timeout: float = 30 * 60.0
    #: Seconds without a frame from a client, during a call, before the server PINGs it (then
    #: ``keepalive_timeout`` for the answer, or the connection is closed); 0: never.
    keepalive_time: float = 2 * 60 * 60.0
    keepalive_timeout: float = 20.0
    #: PING clients without calls too: a client gone without a word (its node lost) is found
    #: after keepalive_time + keepalive_timeout instead of idle_timeout. As grpc-core's server
    #: option does, it also lets clients PING without calls as often as ``min_ping_interval``
    #: (else once per 2 hours: more is GOAWAY too_many_pings).
    keepalive_permit_without_calls: bool = False
    #: Seconds a client must leave between its PINGs during calls (gRPC's
    #: min_recv_ping_interval_without_data): a client that PINGs more often gets strikes, then
    #: GOAWAY ENHANCE_YOUR_CALM too_many_pings.
    min_ping_interval: float = 5 * 60.0
    #: Seconds in-flight calls get to finish on shutdown before they are cancelled (UNAVAILABLE).
    grace_period: float = 20.0
    #: Seconds between NOT_SERVING and closing the listeners, so load balancers stop routing here.
    drain_delay: float = 0.0
    #: On a forced exit (a second signal), seconds the handlers still running get to unwind
    #: from their cancellation before the resources close (the exit is meant to be at once).
    forced_exit_unwind: float = 1.0
    #: The level of app_kit's own loggers (any case); other libraries' stay at INFO at most.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    #: ``text`` lines, or ``json``: one JSON object per line (when the CLI sets up logging).
    log_format: Literal["text", "json"] = "text"
    #: One line per finished call on the ``app_kit.access`` logger.
    access_log: bool = False
    #: Serve Prometheus metrics at ``http://<host>:<metrics_port>/metrics`` (unset: off; needs
    #: ``app_kit[prometheus]``).
    metrics_port: int | None = None
    #: Serve gRPC server reflection (grpcurl, grpcui).
    reflection: bool = True
    #: Per reflection stream: requests answered, and response bytes sent, per second (0: no limit).
    #: The defaults are ``ReflectionV1``'s.
    reflection_max_requests_per_second: float = 100.0
    reflection_max_response_bytes_per_second: int = 1 * _MiB
    #: Resource health checks: how long a result is reused, and how long one may take.
    health_check_ttl: float = 5.0
    health_check_timeout: float = 2.0
    max_receive_message_length: int = 4 * _MiB
    max_send_message_length: int = 4 * _MiB
    #: Bytes of incomplete messages one connection may hold (see :class:`Configuration`).
    max_connection_receive_buffer: int = 64 * _MiB
    #: Bytes of inflated messages the calls of one connection may hold (see :class:`Configuration`).
    max_connection_inflated_bytes: int = 32 * _MiB
    #: Bytes of incomplete and inflated messages all connections may hold (see :class:`Configuration`).
    max_server_receive_buffer: int = 128 * _MiB
    #: Calls running at once across all connections; a call over it gets RESOURCE_EXHAUSTED at
    #: once (see :class:`Configuration`); unset: no limit.
    max_concurrent_calls: int | None = None
    #: Seconds after which a connection is closed gracefully (GOAWAY; varied by 10 %), so that
    #: clients connect again and spread over new replicas; unset: never (see :class:`Configuration`).
    max_connection_age: float | None = None
    #: Seconds the calls of a connection past its age may still run (then UNAVAILABLE); unset: no limit.
    max_connection_age_grace: float | None = None
    #: How replies are compressed unless a handler says otherwise: unset answers in the request's
    #: encoding, ``identity`` never compresses, ``gzip`` (or any registered encoding)
    #: compresses for every client that accepts it.
    compression: str | None = None
    #: Processes serving the port (``--workers``), each running the whole App with its own
    #: resources, under a supervisor that restarts them (see :mod:`app_kit.app.workers`).
    workers: int = 1
    #: How workers share the port: ``reuse_port`` (a socket each with SO_REUSEPORT, the kernel
    #: spreads connections), ``inherit`` (one socket the supervisor bound: one accept queue,
    #: taken by whichever worker is free), or ``auto``: ``reuse_port`` on Linux, else ``inherit``.
    workers_socket: Literal["auto", "reuse_port", "inherit"] = "auto"
    #: Seconds before a worker that died is restarted, doubled for each death in a row (a worker
    #: that ran longer than the maximum starts the count again), up to the maximum.
    worker_restart_delay: float = 0.5
    worker_restart_max_delay: float = 30.0
    #: Seconds a serving worker's event loop may keep its heartbeat waiting (blocked by sync
    #: code), or a worker may overrun its shutdown (past drain delay + grace period), before the
    #: supervisor has it print its stacks and kills it (and, if serving, restarts it); 0: never.
    #: Not under ``--reload``.
    worker_timeout: float = 30.0
    #: The event loop (``--loop``): ``asyncio``, ``uvloop``, ``trio``, or ``auto``: uvloop when it
    #: is installed, else asyncio. Read by :meth:`App.run_sync` and the CLI, which start the loop.
    loop: Literal["auto", "asyncio", "uvloop", "trio"] = "auto"

    # Field validators, not one model validator: pydantic then reports every bad field at once.
    @field_validator(
        "grace_period",
        "drain_delay",
        "forced_exit_unwind",
        "health_check_ttl",
        "worker_timeout",
        "reflection_max_requests_per_second",
        "reflection_max_response_bytes_per_second",
        "tls_reload_interval",
        "idle_timeout",
        "keepalive_time",
        "min_ping_interval",
    )
    @classmethod
    def _not_negative(cls, value: float, info: ValidationInfo) -> float:
        # nan passes every comparison below (each is false), and inf is never meant.
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        if value < 0:
            field = info.field_name or ""
            unlimited = " (0: no limit)" if field.startswith("reflection_") else ""
            unlimited = " (0: read once)" if field.startswith("tls_") else unlimited
            unlimited = " (0: never)" if field in ("idle_timeout", "keepalive_time") else unlimited
            raise ValueError(f"cannot be negative{unlimited}")
        return value

    @field_validator(
        "health_check_timeout",
        "worker_restart_delay",
        "worker_restart_max_delay",
        "handshake_timeout",
        "keepalive_timeout",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if not math.isfinite(value):  # nan would pass the test below
            raise ValueError("must be a finite number")
        if value <= 0:
            raise ValueError("must be positive")
        return value

    # Checked here, with the other fields, rather than by Configuration when the server is
    # built: that happens only after every resource has started.
    @field_validator(
        "max_receive_message_length",
        "max_send_message_length",
        "max_connection_receive_buffer",
        "max_connection_inflated_bytes",
        "max_server_receive_buffer",
        "max_concurrent_calls",
    )
    @classmethod
    def _positive_limit(cls, value: int | None) -> int | None:
        if value is not None and value < 1:  # (None: an optional limit, unset)
            raise ValueError("must be at least 1")
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        # APP_PATH= (as compose files and .env templates leave it) would be a socket at "", which
        # fails only once every resource has started; rejected, as APP_METRICS_PORT= is.
        if value == "":
            raise ValueError("cannot be empty (unset it to listen on TCP)")
        return value

    @field_validator("max_connection_age", "max_connection_age_grace")
    @classmethod
    def _optional_seconds(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None:
            return None
        unset = "never" if info.field_name == "max_connection_age" else "no limit"
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number (unset: {unset})")
        if info.field_name == "max_connection_age" and value <= 0:
            raise ValueError("must be positive (unset: never)")
        if value < 0:
            raise ValueError("cannot be negative (unset: no limit)")
        return value

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("port", "metrics_port")
    @classmethod
    def _port(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= 65535:
            raise ValueError("must be from 0 to 65535")
        return value

    @field_validator("log_level", "log_format", "loop", mode="before")
    @classmethod
    def _any_case(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            return value.upper() if info.field_name == "log_level" else value.lower()
        return value

    @field_validator("tls_key_file")
    @classmethod
    def _tls_pair(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # tls_cert_file is validated first (field order); if it was invalid, that is reported instead.
        if "tls_cert_file" in info.data and (info.data["tls_cert_file"] is None) != (value is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        return value

    @field_validator("tls_client_ca_file", "tls_key_password")
    @classmethod
    def _tls_needs_a_certificate(cls, value: Any, info: ValidationInfo) -> Any:
        # (Else ignored: a server meant for mutual TLS would serve plaintext to anyone.)
        if value is not None and info.data.get("tls_cert_file") is None and "tls_cert_file" in info.data:
            raise ValueError("needs tls_cert_file and tls_key_file (it only applies to TLS)")
        return value

    @field_validator("compression")
    @classmethod
    def _compression(cls, value: str | None) -> str | None:
        if value is not None:
            if not is_supported(value) and is_supported(value.lower()):
                value = value.lower()  # (any case, as the log level: "GZIP" is gzip)
            if not is_supported(value):
                known = ", ".join([*registered_encodings(), IDENTITY])
                raise ValueError(f"compression {value!r} is not a registered encoding ({known})")
        return value

    def server_config(self) -> Configuration:
        """The server's :class:`Configuration` these settings call for."""
        return Configuration(
            max_receive_message_length=self.max_receive_message_length,
            max_send_message_length=self.max_send_message_length,
            max_connection_receive_buffer=self.max_connection_receive_buffer,
            max_connection_inflated_bytes=self.max_connection_inflated_bytes,
            max_server_receive_buffer=self.max_server_receive_buffer,
            max_concurrent_calls=self.max_concurrent_calls,
            max_connection_age=self.max_connection_age,
            max_connection_age_grace=self.max_connection_age_grace,
            handshake_timeout=self.handshake_timeout,
            idle_timeout=self.idle_timeout or None,
            keepalive_time=self.keepalive_time or None,
            keepalive_timeout=self.keepalive_timeout,
            keepalive_permit_without_calls=self.keepalive_permit_without_calls,
            min_ping_interval=self.min_ping_interval,
            min_ping_interval_without_calls=(
                self.min_ping_interval if self.keepalive_permit_without_calls else _IDLE_PING_INTERVAL
            ),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server TLS context from the certificate files, or None."""
        if self.tls_cert_file is None or self.tls_key_file is None:
            return None
        try:
            return server_tls(
                certificate_chain=self.tls_cert_file,
                private_key=self.tls_key_file,
                password=None if self.tls_key_password is None else self.tls_key_password.get_secret_value(),
                client_ca=self.tls_client_ca_file,
                reload_interval=self.tls_reload_interval or None,
            )
        except ValueError as exc:
            if "encrypted" in str(exc):
                raise ValueError("tls_key_file is encrypted: set tls_key_password (APP_TLS_KEY_PASSWORD)") from exc
            raise


#: Between a client's PINGs without calls, unless permitted more often: gRPC's 2 hours.
_IDLE_PING_INTERVAL = Configuration().min_ping_interval_without_calls


def listen_address(settings: AppSettings) -> str:
    """Where ``settings`` say to listen (``host:port``, or the Unix socket's path), for messages."""
    if settings.path is not None:
        return settings.path
    return f"[{settings.host}]:{settings.port}" if ":" in settings.host else f"{settings.host}:{settings.port}"


def _where(settings_type: type[AppSettings], loc: tuple[int | str, ...], overrides: dict[str, object]) -> str:
    """How a settings error names what is wrong: the variable that was set (``APP_PORT``;
    of a field's alias choices, the one in the environment; ``APP_DB__PORT`` for a nested
    field with a nested delimiter), or the field, when an argument set it."""
    parts = [str(part) for part in loc]
    if not parts:
        return "settings"
    config = settings_type.model_config
    names: list[str] = []
    for name, field in settings_type.model_fields.items():
        alias = field.validation_alias
        choices = [alias] if isinstance(alias, str) else getattr(alias, "choices", None) or []
        spelled = [choice for choice in choices if isinstance(choice, str)]
        if parts[0] == name or parts[0] in spelled:
            if name in overrides:
                return ".".join(parts)
            names = spelled or [str(config.get("env_prefix") or "") + name]
            break
    if not names:
        return ".".join(parts)
    delimiter = config.get("env_nested_delimiter")
    present = {variable.lower() for variable in os.environ}
    candidates = [name + "".join(delimiter + part for part in parts[1:]) for name in names] if delimiter else []
    for candidate in [*candidates, *names]:
        if candidate.lower() in present:
            return ".".join([candidate.upper(), *([] if candidate in candidates else parts[1:])])
    return ".".join([names[0].upper(), *parts[1:]])


class SettingsError(Exception):
    """Settings failed validation; the message lists every bad field."""


S = TypeVar("S", bound=AppSettings)


def load_settings(settings_type: type[S], *, env_file: str | Path | None = None, **overrides: object) -> S:
    """Read ``settings_type`` from the environment (and ``env_file``), ``overrides`` winning.

    Raises :class:`SettingsError` with one line per invalid field.
    """
    try:
        return settings_type(_env_file=env_file, **overrides)  # type: ignore[call-arg, arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _where(settings_type, error["loc"], overrides)
            # Our validators' own words, without pydantic's "Value error, " prefix.
            cause = error.get("ctx", {}).get("error") if error["type"] == "value_error" else None
            problem = f"{where}: {cause if cause is not None else error['msg']}"
            value = error.get("input")
            if isinstance(value, str) and _SERVICE_LINK_VALUE.match(value):
                problem += (
                    f" ({value!r} is what Kubernetes sets for a Service named like the prefix:"
                    " set enableServiceLinks: false in the pod spec)"
                )
            problems.append(problem)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


# Kubernetes' service links: a Service named "app" sets APP_PORT=tcp://10.0.0.7:80,
# APP_SERVICE_HOST, APP_PORT_80_TCP_ADDR... in every pod of its namespace.
_SERVICE_LINK_VALUE = re.compile(r"^(tcp|udp|sctp)://")
_SERVICE_LINK_NAME = re.compile(r"^SERVICE_(HOST|PORT)(_\w+)?$|^PORT(_\d+_(TCP|UDP|SCTP)(_\w+)?)?$")


def unknown_variables(settings_type: type[AppSettings]) -> list[str]:
    """The environment's ``APP_*`` variables (the settings' prefix) that name no setting, each
    with the setting it may be a misspelling of: ``APP_DRAIN_DELAYS`` would be ignored
    silently. Kubernetes' service links (``APP_SERVICE_HOST``...) are not counted."""
    config = settings_type.model_config
    prefix = str(config.get("env_prefix") or "").upper()
    if not prefix:
        return []
    delimiter = str(config.get("env_nested_delimiter") or "").upper()
    known = set()
    for name, field in settings_type.model_fields.items():
        alias = field.validation_alias  # (read instead of the prefixed name, as _where says)
        choices = [alias] if isinstance(alias, str) else getattr(alias, "choices", None) or []
        spelled = [choice.upper() for choice in choices if isinstance(choice, str)]
        known.update(spelled or [prefix + name.upper()])
    found = []
    for variable in os.environ:
        name = variable.upper()
        if not name.startswith(prefix) or name in known or _SERVICE_LINK_NAME.match(name[len(prefix) :]):
            continue
        if delimiter and any(name.startswith(each + delimiter) for each in known):
            continue  # a nested field's part
        import difflib  # (only once something is misspelt: nothing to pay at each start)

        close = difflib.get_close_matches(name, known, n=1)
        found.append(f"{variable} (did you mean {close[0]}?)" if close else variable)
    return sorted(found)
