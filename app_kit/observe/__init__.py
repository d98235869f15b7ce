"""Seeing what a running service does: access log, Prometheus metrics, OpenTelemetry tracing.

Each is an interceptor (:mod:`app_kit.aio.interceptors`) or reads a server's counters; the
Prometheus and OpenTelemetry parts need their extras (``app_kit[prometheus]``, ``app_kit[otel]``)
and import them only when used.
"""
