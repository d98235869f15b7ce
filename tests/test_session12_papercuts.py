"""Papercuts an operator's trial found (session 12): settings that are silently ignored, and
a Kubernetes habit that makes every pod of a namespace fail to start."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from app_kit import AppSettings, ServerInterceptor, Stream
from app_kit.app.settings import SettingsError, load_settings, unknown_variables

from .process import AppProcess

pytestmark = pytest.mark.anyio


async def test_a_misspelt_setting_is_named_in_a_warning_with_the_setting_it_may_mean() -> None:
    # pydantic-settings ignores APP_* variables that name no field: APP_DRAIN_DELAYS=5 left
    # the drain delay at its default without a word.
    env = {"APP_DRAIN_DELAYS": "5", "APP_SERVICE_HOST": "10.0.0.7", "APP_PORT_80_TCP": "tcp://10.0.0.7:80"}
    async with AppProcess("tests.apps.lifecycle_app:app", "--port", "0", env=env) as app:
        await app.ready()
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    warnings = [line for line in app.lines if "no setting is named" in line]
    assert len(warnings) == 1, app.log
    assert "APP_DRAIN_DELAYS (did you mean APP_DRAIN_DELAY?)" in warnings[0]
    assert "SERVICE_HOST" not in warnings[0] and "80_TCP" not in warnings[0]  # Kubernetes' own


def test_variables_of_settings_and_of_their_aliases_are_not_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import Field

    class Mine(AppSettings):
        db_url: str = Field("", validation_alias="MINE_DB_URL")

    monkeypatch.setenv("APP_PORT", "1")
    monkeypatch.setenv("app_host", "127.0.0.1")  # any case, as pydantic-settings reads them
    monkeypatch.setenv("MINE_DB_URL", "x")
    monkeypatch.setenv("APP_DB_URL", "x")  # the field's alias replaces its prefixed name
    assert unknown_variables(Mine) == ["APP_DB_URL (did you mean MINE_DB_URL?)"]


def test_a_kubernetes_service_link_in_app_port_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Service named "app" puts APP_PORT=tcp://10.0.0.7:80 in every pod of its namespace:
    # the settings error says where the value comes from and what turns it off.
    monkeypatch.setenv("APP_PORT", "tcp://10.0.0.7:80")
    with pytest.raises(SettingsError) as failed:
        load_settings(AppSettings)
    assert "APP_PORT" in str(failed.value)
    assert "enableServiceLinks: false" in str(failed.value)


async def test_how_long_handlers_unwind_on_a_forced_exit_is_a_setting(tmp_path: Any) -> None:
    # It was a constant (1 s). The handler's clean-up takes 0.3 s: with 0.05 s to unwind the
    # resources close under it (the operator asked for that); with the default it is waited for.
    from .test_session11_review import _events, _forced_exit

    short, default = str(tmp_path / "short"), str(tmp_path / "default")
    code, _, _ = await _forced_exit(short, "asyncio", {"APP_FORCED_EXIT_UNWIND": "0.05"}, 0.1, 0.1)
    assert code == 128 + signal.SIGTERM
    journal = _events(short)
    assert "exit cache" in journal and (
        "unwound" not in journal or journal.index("exit cache") < journal.index("unwound")
    ), journal
    code, _, _ = await _forced_exit(default, "asyncio", {}, 0.1, 0.1)
    journal = _events(default)
    assert journal.index("unwound") < journal.index("exit cache"), journal


@pytest.mark.parametrize("broken", [{"APP_PORT": "x"}, {"APP_LOOP": "nope"}])
def test_a_start_up_error_before_logging_is_a_json_line_when_json_logs_are_asked_for(broken: dict[str, str]) -> None:
    # Settings that do not load were said in plain text whatever APP_LOG_FORMAT asked for: a
    # log pipeline parsing JSON lines choked on the one line that mattered.
    import json
    import os
    import subprocess
    import sys

    from .process import ROOT

    env = {**os.environ, "APP_LOG_FORMAT": "json", **broken}
    done = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", "tests.apps.lifecycle_app:app"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 3, done.stderr
    lines = [json.loads(line) for line in done.stderr.strip().splitlines()]
    assert lines[-1]["level"] == "ERROR" and next(iter(broken)) in lines[-1]["message"], lines


class _Tenant(ServerInterceptor):
    """An application's own interceptor that adds a field to the call's access-log line."""

    async def intercept(self, call: Stream[Any, Any], proceed: Any) -> None:
        call.log_fields["tenant"] = call.metadata.get("x-tenant", "-")
        await proceed()


@pytest.mark.parametrize("tracing_outermost", [True, False])
async def test_the_access_log_line_carries_the_calls_trace_id_and_fields_interceptors_set(
    caplog: pytest.LogCaptureFixture, tracing_outermost: bool
) -> None:
    # An access line could not be joined with its trace: AccessLog wrote no trace id, and in an
    # App the tracing interceptor (the application's) runs inside the access log (the
    # settings'), so its span was over before the line was written. Now ServerTracing puts
    # trace_id and span_id in the call's log_fields, whatever the order, as OpenTelemetry's
    # log correlation spells them.
    import logging

    import grpc
    from google.protobuf.wrappers_pb2 import StringValue
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from app_kit.observe.access_log import AccessLog
    from app_kit.observe.otel import ServerTracing

    from .conftest import running_server
    from .services import EchoService, grpcio_method

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing, access = ServerTracing(tracer_provider=provider), AccessLog()
    chain = [tracing, access, _Tenant()] if tracing_outermost else [access, _Tenant(), tracing]
    caplog.set_level(logging.INFO, logger="app_kit.access")
    async with running_server([EchoService()], interceptors=chain) as (_, target):
        async with grpc.aio.insecure_channel(target) as channel:
            unary = grpcio_method(channel, "unary_unary", "/test.Echo/Unary", StringValue, StringValue)
            await unary(StringValue(value="x"), metadata=(("x-tenant", "acme"),))
    (span,) = exporter.get_finished_spans()
    (record,) = [r for r in caplog.records if r.name == "app_kit.access"]
    assert record.trace_id == format(span.context.trace_id, "032x")  # type: ignore[attr-defined]
    assert record.span_id == format(span.context.span_id, "016x")  # type: ignore[attr-defined]
    assert record.tenant == "acme"  # type: ignore[attr-defined]
    assert record.grpc_status == "OK"  # type: ignore[attr-defined]
