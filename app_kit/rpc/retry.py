"""Retry policies in the shape of gRPC's service config (gRFC A6), without the I/O.

A policy says how often a failed call may be tried again (``max_attempts`` in all, at most
5 as the spec caps it), on which status codes, and how long to wait between attempts:
``initial_backoff``, growing by ``backoff_multiplier`` per attempt up to ``max_backoff``, each
±20 % at random — or what the server asks for in ``grpc-retry-pushback-ms`` (a negative or
malformed value: do not retry; after it the backoff starts again from ``initial_backoff``).
A call is retried only while it is not committed: no response headers or messages came back
(a Trailers-Only answer does not commit it), and always within the call's original deadline.
Each attempt after the first says how many came before it (``grpc-previous-rpc-attempts``).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping
from typing import Any

from .status import Status

__all__ = ["RetryPolicy", "RetryPolicies", "pushback_delay"]

_MAX_ATTEMPTS_CAP = 5  # gRFC A6: larger values are treated as 5
_DURATION = re.compile(r"\A(\d+(?:\.\d*)?)s\Z")
_MAX_PUSHBACK_DIGITS = 9  # up to 999,999,999 ms (11.5 days): an int's digits, not a bignum's


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a call that failed with a retryable status is tried again (see the module)."""

    #: Attempts in all, the first included (2 to 5).
    max_attempts: int = 3
    #: Seconds: the waits before retries are random up to this, then grow.
    initial_backoff: float = 0.1
    #: Seconds: the cap on how much the waits grow.
    max_backoff: float = 1.0
    #: How much the cap on the wait grows per attempt.
    backoff_multiplier: float = 2.0
    #: Statuses that may be retried.
    retryable_status_codes: frozenset[Status] = frozenset({Status.UNAVAILABLE})

    def __post_init__(self) -> None:
        if self.max_attempts < 2:
            raise ValueError("max_attempts must be at least 2 (the first attempt and a retry)")
        if self.initial_backoff <= 0 or self.max_backoff <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("initial_backoff, max_backoff and backoff_multiplier must be positive")
        if not self.retryable_status_codes or Status.OK in self.retryable_status_codes:
            raise ValueError("retryable_status_codes must name at least one error status")
        object.__setattr__(self, "max_attempts", min(self.max_attempts, _MAX_ATTEMPTS_CAP))
        object.__setattr__(self, "retryable_status_codes", frozenset(map(Status, self.retryable_status_codes)))

    def backoff(self, retry: int) -> float:
        """The wait before retry number ``retry`` (1 for the first since the start or the
        server's last pushback): the growing backoff, jittered by ±20 % (gRFC A6 as updated
        in 2024, and grpc-core; before, a random time up to it, which could be next to none)."""
        backoff = min(self.initial_backoff * self.backoff_multiplier ** (retry - 1), self.max_backoff)
        return backoff * random.uniform(0.8, 1.2)

    @classmethod
    def from_json(cls, policy: Mapping[str, Any]) -> RetryPolicy:
        """A policy from a service config's ``retryPolicy`` object (durations as ``"0.1s"``)."""
        try:
            codes = frozenset(_status(code) for code in policy["retryableStatusCodes"])
            return cls(
                max_attempts=int(policy["maxAttempts"]),
                initial_backoff=_seconds(policy["initialBackoff"]),
                max_backoff=_seconds(policy["maxBackoff"]),
                backoff_multiplier=float(policy["backoffMultiplier"]),
                retryable_status_codes=codes,
            )
        except KeyError as exc:
            raise ValueError(f"retryPolicy needs {exc.args[0]}") from None


class RetryPolicies:
    """What a service config's ``methodConfig`` list says per method: its retry policy
    (``retryPolicy``), its timeout (``timeout``, the longest a call may take: a call's own
    shorter deadline wins) and whether its calls wait for a ready backend (``waitForReady``,
    unless a call says).

    Each entry names methods (``{"service": "pkg.Svc", "method": "M"}``, a whole service
    without ``method``, or every method with ``{}``); each of these settings comes from the
    most specific name that has it. What app_kit does not do (hedging, retry throttling,
    per-method message size limits, load-balancing choices) is listed in :attr:`ignored`.
    """

    def __init__(self, service_config: Mapping[str, Any] | None = None, *, default: RetryPolicy | None = None) -> None:
        self._methods: dict[str, dict[str, Any]] = {}
        self._services: dict[str, dict[str, Any]] = {}
        #: For methods no entry names: the retry policy given apart.
        self._everything: dict[str, Any] = {} if default is None else {"retry": default}
        #: The service config's settings app_kit leaves alone (for the channel to warn about).
        self.ignored: list[str] = [key for key in (service_config or {}) if key in _IGNORED_AT_TOP]
        balancing = _balancing(service_config or {})
        if balancing not in (None, "round_robin"):  # what the channel does anyway
            self.ignored.append(f"load balancing {balancing!r} (app_kit's channel balances round_robin)")
        for entry in (service_config or {}).get("methodConfig", []):
            settings: dict[str, Any] = {}
            raw = entry.get("retryPolicy")
            if raw is not None:
                settings["retry"] = RetryPolicy.from_json(raw)
            if "timeout" in entry:
                timeout = _seconds(entry["timeout"])
                if timeout <= 0:
                    raise ValueError(f"invalid timeout {entry['timeout']!r}: it must be positive")
                settings["timeout"] = timeout
            if "waitForReady" in entry:
                if not isinstance(entry["waitForReady"], bool):
                    raise ValueError(f"waitForReady must be true or false, not {entry['waitForReady']!r}")
                settings["wait_for_ready"] = entry["waitForReady"]
            self.ignored += [f"methodConfig {key}" for key in entry if key in _IGNORED_PER_METHOD]
            for name in entry.get("name", []):
                service, method = name.get("service", ""), name.get("method", "")
                if method:
                    self._methods.setdefault(f"/{service}/{method}", {}).update(settings)
                elif service:
                    self._services.setdefault(service, {}).update(settings)
                else:
                    self._everything.update(settings)
        #: Whether any method has a timeout or a waitForReady (else calls need not look).
        self.has_call_settings = any(
            "timeout" in settings or "wait_for_ready" in settings
            for settings in (*self._methods.values(), *self._services.values(), self._everything)
        )

    def _setting(self, path: str, key: str) -> Any:
        settings = self._methods.get(path)
        if settings is not None and key in settings:
            return settings[key]
        settings = self._services.get(path[1:].partition("/")[0])
        if settings is not None and key in settings:
            return settings[key]
        return self._everything.get(key)

    def for_method(self, path: str) -> RetryPolicy | None:
        """The retry policy of ``/package.Service/Method``, if any."""
        policy: RetryPolicy | None = self._setting(path, "retry")
        return policy

    def timeout_for(self, path: str) -> float | None:
        """The method's ``timeout`` in seconds, if the service config gives one."""
        timeout: float | None = self._setting(path, "timeout")
        return timeout

    def wait_for_ready_for(self, path: str) -> bool:
        """The method's ``waitForReady`` (False if the service config does not say)."""
        return bool(self._setting(path, "wait_for_ready"))


_IGNORED_AT_TOP = ("retryThrottling", "healthCheckConfig")
_IGNORED_PER_METHOD = ("hedgingPolicy", "maxRequestMessageBytes", "maxResponseMessageBytes")


def pushback_delay(value: str) -> float | None:
    """A ``grpc-retry-pushback-ms`` value as seconds to wait (0: at once); None: the server
    says do not retry.

    Only ASCII digits are a number here (``str.isdigit`` alone also takes "²" and other
    digits ``int`` refuses), and at most ``_MAX_PUSHBACK_DIGITS`` of them: more would be a
    wait of years, past any deadline, and a number ``int`` may refuse or a float not hold.
    Anything else is malformed: no retry, as gRFC A6 says. Never raises.
    """
    if not (0 < len(value) <= _MAX_PUSHBACK_DIGITS and value.isascii() and value.isdigit()):
        return None  # negative, malformed or absurdly long: no retry, as gRFC A6 says
    return int(value) / 1000


def _balancing(service_config: Mapping[str, Any]) -> str | None:
    """The load-balancing policy a service config asks for, if it names one."""
    configs = service_config.get("loadBalancingConfig")
    if isinstance(configs, list) and configs and isinstance(configs[0], dict) and configs[0]:
        return str(next(iter(configs[0])))
    policy = service_config.get("loadBalancingPolicy")
    return None if policy is None else str(policy).lower()


def _seconds(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError(f"invalid duration {value!r}: seconds with an s, as in 0.1s")
    return float(match.group(1))


def _status(code: object) -> Status:
    if isinstance(code, int):
        return Status(code)
    try:
        return Status[str(code).upper()]
    except KeyError:
        raise ValueError(f"unknown status code {code!r}") from None
