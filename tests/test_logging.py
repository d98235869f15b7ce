"""Logging stays the user's: ``python -m app_kit run`` as a subprocess, its stderr read.

A configuration made at import survives; ``--log-config`` (JSON, YAML) is applied; JSON lines
with ``APP_LOG_FORMAT=json``; the access log; DEBUG reaches app_kit's loggers only, so no header
value (an ``authorization`` token) is ever printed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import pytest

from examples.interop.messages_pb2 import SimpleRequest, SimpleResponse

from .process import AppProcess

pytestmark = pytest.mark.anyio

APP = "tests.apps.logging_app:app"
SECRET = "s3cr3t-token"


async def call_with_token(port: int) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        unary = channel.unary_unary(
            "/grpc.testing.TestService/UnaryCall",
            request_serializer=SimpleRequest.SerializeToString,
            response_deserializer=SimpleResponse.FromString,
        )
        await unary(
            SimpleRequest(response_size=3),
            metadata=(("authorization", f"Bearer {SECRET}"), ("cookie", "session=abc"), ("x-api-token", SECRET)),
        )


async def run_app(*args: str, env: dict[str, str] | None = None) -> AppProcess:
    async with AppProcess(APP, "--port", "0", *args, env=env) as app:
        port = await app.ready()
        await call_with_token(port)
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0, app.log
    return app


async def test_a_configuration_made_at_import_is_kept() -> None:
    app = await run_app(env={"LOGGING_APP_USER_CONFIG": "1", "APP_ACCESS_LOG": "true"})
    ours = [line for line in app.lines if line.strip()]
    assert ours and all(line.startswith("USER ") for line in ours), app.log
    assert any("USER INFO app_kit.app logging serving" in line for line in ours)
    assert any(line.startswith("USER INFO app_kit.access ") for line in ours)


async def test_debug_reaches_app_kit_only_and_never_prints_header_values() -> None:
    app = await run_app("--debug")
    assert " DEBUG " in app.log and " app_kit." in app.log  # app_kit's own debug lines are there
    assert SECRET not in app.log and "session=abc" not in app.log
    assert not any(" DEBUG " in line and (" hpack" in line or " h2." in line) for line in app.lines)


async def test_json_lines_and_the_access_log() -> None:
    app = await run_app("--log-level", "info", env={"APP_LOG_FORMAT": "JSON", "APP_ACCESS_LOG": "1"})
    records = [json.loads(line) for line in app.lines if line.strip()]
    access = [record for record in records if record["logger"] == "app_kit.access"]
    assert len(access) == 1, app.log
    entry = access[0]
    assert entry["grpc_method"] == "/grpc.testing.TestService/UnaryCall"
    assert entry["grpc_status"] == "OK"
    assert entry["peer"].startswith("127.0.0.1:")
    assert entry["messages_in"] == 1 and entry["messages_out"] == 1
    assert entry["bytes_out"] == len(SimpleResponse(payload={"body": b"\0" * 3}).SerializeToString())
    assert entry["duration_ms"] > 0 and "grpc-python" in entry["user_agent"]
    assert '"/grpc.testing.TestService/UnaryCall" OK ' in entry["message"]
    assert SECRET not in app.log


async def test_the_access_log_is_off_by_default() -> None:
    app = await run_app()
    assert "app_kit.access" not in app.log
    assert " INFO    app_kit.app: logging serving " in app.log


@pytest.mark.parametrize("kind", ["json", "yaml"])
async def test_log_config_file(tmp_path: Path, kind: str) -> None:
    config = {
        "version": 1,
        "formatters": {"f": {"format": "CONFIGURED %(name)s %(message)s"}},
        "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f", "stream": "ext://sys.stderr"}},
        "loggers": {"app_kit": {"handlers": ["h"], "level": "INFO"}},
    }
    if kind == "json":
        path = tmp_path / "logging.json"
        path.write_text(json.dumps(config))
    else:
        import yaml

        path = tmp_path / "logging.yaml"
        path.write_text(yaml.safe_dump(config))
    app = await run_app("--log-config", str(path))
    assert any(line.startswith("CONFIGURED app_kit.app logging serving") for line in app.lines), app.log


async def test_a_log_config_that_cannot_be_used_is_a_startup_failure(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    async with AppProcess(APP, "--port", "0", "--log-config", str(path)) as app:
        assert await app.wait() == 3
    assert app.lines[-1].startswith(f"app_kit: --log-config {path}: ")
