"""deploy/: the Kubernetes manifest's numbers agree with the settings the container runs with.

The settings are read as the container reads them (the Dockerfile's ENV, then the manifest's
env, over the defaults), so changing a default in app_kit/app/settings.py without the manifest
fails here. Docker itself is never run.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from app_kit.app.settings import load_settings
from examples.cafe.app import CafeSettings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
#: Seconds the App's resources get to close after the drain (docs/howto/deploy.md).
TEARDOWN_MARGIN = 5


def manifest() -> dict[str, dict[str, Any]]:
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    return {document["kind"]: document for document in documents}


def container() -> dict[str, Any]:
    (only,) = manifest()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The final stage's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    instructions = [tuple(line.split(None, 1)) for line in lines]
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return [(keyword.upper(), rest) for keyword, rest in instructions[last_from:]]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in rest.split())
    return env


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> CafeSettings:
    """The cafe's settings inside the pod: the image's ENV, then the manifest's env."""
    for name in list(os.environ):
        if name.startswith(("APP_", "CAFE_")):
            monkeypatch.delenv(name)
    for name, value in dockerfile_env().items():
        monkeypatch.setenv(name, value)
    for variable in container()["env"]:
        monkeypatch.setenv(variable["name"], variable["value"])
    return load_settings(CafeSettings)


def test_termination_grace_covers_drain_delay_grace_period_and_teardown(settings: CafeSettings) -> None:
    pod = manifest()["Deployment"]["spec"]["template"]["spec"]
    assert settings.drain_delay > 0, "in Kubernetes, a drain delay lets the endpoints update"
    assert pod["terminationGracePeriodSeconds"] == math.ceil(
        settings.drain_delay + settings.grace_period + TEARDOWN_MARGIN
    )
    # The drain delay is the preStop sleep, done by the app (which also turns NOT_SERVING):
    # a preStop hook as well would only spend the termination grace period twice.
    assert "preStop" not in container().get("lifecycle", {})


def test_probes_are_native_grpc_on_the_served_port(settings: CafeSettings) -> None:
    spec = container()
    assert settings.host == "0.0.0.0"
    assert [port["containerPort"] for port in spec["ports"]] == [settings.port]
    readiness, liveness = spec["readinessProbe"], spec["livenessProbe"]
    for probe in (readiness, liveness):
        assert probe["grpc"] == {"port": settings.port}  # service "": the server's status
    # Readiness notices a drain (NOT_SERVING) within the drain delay.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.drain_delay
    # Liveness fails during a drain too: it must not restart the container before the drain ends.
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > settings.drain_delay + settings.grace_period


def test_resources_and_workers_agree(settings: CafeSettings) -> None:
    resources = container()["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    cpu = resources["requests"]["cpu"]
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert settings.workers == max(1, math.floor(cores))  # one worker per CPU requested


def test_the_service_is_headless_on_the_grpc_port(settings: CafeSettings) -> None:
    service = manifest()["Service"]
    deployment = manifest()["Deployment"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == settings.port
    assert port["targetPort"] in [p["name"] for p in container()["ports"]]


def test_the_image_is_slim_non_root_compiled_and_runs_the_cafe() -> None:
    instructions = dockerfile_instructions()
    keywords = dict(instructions)
    assert re.fullmatch(r"python:3\.\d+-slim", keywords["FROM"])
    assert keywords["USER"] not in ("root", "0")
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "compileall" in runs and "--compile" in runs
    command = json.loads(keywords["ENTRYPOINT"]) + json.loads(keywords["CMD"])
    assert command == ["python", "-m", "app_kit", "run", "examples.cafe.app:app"]
    assert dockerfile_env()["PYTHONDONTWRITEBYTECODE"] == "1"
