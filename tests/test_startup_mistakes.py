"""Newcomers' mistakes, run through the real CLI: one clear line on stderr and exit code 3, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from google.protobuf.wrappers_pb2 import BytesValue

from app_kit.app.lifecycle import EXIT_STARTUP_FAILED

from .process import ROOT, AppProcess, run_app_cli

APP = "tests.apps.mistakes_app:app"


def run_cli(*args: str, **env: str) -> list[str]:
    """Run ``python -m app_kit run ARGS``, expect exit code 3, and return its stderr lines."""
    done = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = done.stderr.splitlines()
    assert done.returncode == EXIT_STARTUP_FAILED, done.stderr
    assert len(lines) == 1, done.stderr  # one line, no traceback
    return lines


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (
            "duplicate",
            "app_kit: resources pool and other_pool both provide Pool: each type identifies one resource; "
            "to have several, name them: '-> AsyncIterator[Annotated[Pool, \"replica\"]]'",
        ),
        ("duplicate-name", 'app_kit: resources replica and other_replica both provide Pool named "replica"'),
        ("two-names", 'app_kit: resource replica: Annotated[Pool, "replica", "standby"] names a resource by one'),
        ("unannotated-resource-parameter", "app_kit: resource pool: annotate settings with the type to inject"),
        ("unannotated-service-parameter", "app_kit: service echo: annotate pool with the type to inject"),
        ("no-return-annotation", "app_kit: resource pool has no return annotation; annotate it with what it yields"),
        ("wrong-return-annotation", "app_kit: resource pool is annotated '-> Pool'; annotate it with what it yields"),
        ("sync-generator", "app_kit: resource pool is a plain generator, but resources are async: write 'async def"),
        ("iterator-annotation", "app_kit: resource pool is annotated '-> Iterator[Pool]', but resources are async"),
    ],
)
def test_declaration_mistakes_are_one_line(mistake: str, expected: str) -> None:
    [line] = run_cli(APP, "--port", "0", MISTAKE=mistake)
    assert line.startswith(expected), line
    assert "tests/apps/mistakes_app.py:" in line  # where the declaration is, instead of a traceback


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        ("not-a-service", "service echo returned NotAService, which is not a service: it has no __mapping__()"),
        ("sync-handler", "service echo handles /mistakes.Echo/Echo with SyncEcho.echo, which is not async"),
        ("protocol-without-provider", "service echo needs labelled: Labelled, which is neither the settings nor any"),
        (
            "unknown-name",
            'service echo needs replica: Annotated[Pool, "replcia"], but no resource is named "replcia"; '
            'resources of that type: replica (Annotated[Pool, "replica"]), pool (Pool)',
        ),
        (
            "named-only",
            "service echo needs pool: Pool, which is neither the settings nor any resource's type; "
            'only named resources provide it: replica (Annotated[Pool, "replica"])',
        ),
    ],
)
def test_service_mistakes_fail_startup_in_one_line(mistake: str, expected: str) -> None:
    [line] = run_cli(APP, "--port", "0", MISTAKE=mistake)
    assert "ERROR" in line and f"start-up failed: {expected}" in line, line


def test_declaration_mistake_with_debug_shows_the_traceback() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", APP, "--debug"],
        cwd=ROOT,
        env={**os.environ, "MISTAKE": "duplicate"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == EXIT_STARTUP_FAILED
    assert "Traceback" in done.stderr and done.stderr.splitlines()[-1].startswith("app_kit: resources pool and")


def test_factory_without_parentheses_gets_a_hint() -> None:
    [line] = run_cli("tests.apps.mistakes_app:create_app")
    assert line == (
        "app_kit: tests.apps.mistakes_app:create_app is a function, not an app_kit.App: "
        "did you mean tests.apps.mistakes_app:create_app()?"
    )


def test_a_module_the_app_imports_that_is_missing_shows_where(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A missing dependency of the app's module was reported as if the target were wrong,
    # in one line without a traceback (--debug included): which file imports it did not show.
    (tmp_path / "helper_module.py").write_text("import not_installed_anywhere\n")
    (tmp_path / "app_module.py").write_text("import helper_module\n")

    def run(target: str) -> subprocess.CompletedProcess[str]:
        return run_app_cli(target, tmp_path)

    done = run("app_module:app")
    assert done.returncode == EXIT_STARTUP_FAILED, done.stderr
    assert "Traceback" in done.stderr and 'helper_module.py", line 1' in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "app_kit: importing app_module failed: ModuleNotFoundError: No module named 'not_installed_anywhere'"
    )
    # A target that is not there is still one line: the mistake is the command's.
    typo = run("app_modul:app")
    assert typo.returncode == EXIT_STARTUP_FAILED
    assert typo.stderr.splitlines() == ["app_kit: cannot import app_modul: No module named 'app_modul'"]


def test_missing_env_file_is_an_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    missing = str(tmp_path / "nope.env")
    assert run_cli(APP, "--env-file", missing) == [f"app_kit: --env-file {missing}: no such file"]


def test_every_bad_setting_is_reported() -> None:
    [line] = run_cli(APP, APP_PORT="abc", APP_GRACE_PERIOD="-1", APP_HEALTH_CHECK_TIMEOUT="0")
    assert line.startswith("app_kit: invalid settings: APP_PORT: Input should be a valid integer"), line
    assert "APP_GRACE_PERIOD: cannot be negative" in line and "APP_HEALTH_CHECK_TIMEOUT: must be positive" in line


@pytest.mark.anyio
async def test_newtype_and_protocol_resources_are_injected() -> None:
    async with AppProcess(APP, "--port", "0", env={"MISTAKE": "good"}) as app:
        port = await app.ready()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            echo = channel.unary_unary("/mistakes.Echo/Echo", BytesValue.SerializeToString, BytesValue.FromString)
            assert (await echo(BytesValue(value=b"hi"))).value == b"hi"
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0
    assert "Traceback" not in app.log
