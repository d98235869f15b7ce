"""Session 16: README.md and docs/howto/deploy.md read top to bottom as a new user would, each
checkable claim held to the code, and behaviours run over real sockets (grpcio clients,
``python -m app_kit run`` processes, hand-made TLS clients).

Most claims were already covered by the suite (statuses of the "Stream" and "Requests the server
answers itself" tables, signals, workers, reload, TLS, floods); those that were not are here:
the two settings tables against ``AppSettings`` and ``Configuration``, the CLI's usage block,
CI's command, the interceptor and access-log examples, a client refused (not queued) until the
App listens, the deploy guide's manifest numbers and its "second copy shares the port" warning.
Four claims found false or misleading (each a strict xfail first) are mended in the README: the OS
packages for the tests (openssl), the App example (brew_step), the `open()` example (it left before
the status, cancelling its call), the Configuration table's handshake_timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
import yaml

from app_kit import AppSettings, Configuration, ServerInterceptor, Stream
from app_kit.aio.eventloop import LOOPS
from app_kit.app.settings import load_settings
from examples.cafe import cafe_pb2
from examples.cafe.app import CafeSettings
from examples.cafe.cafe_grpc import CoffeeMachineStub
from examples.cafe.service import CoffeeMachine

from .conftest import running_server
from .process import ROOT, AppProcess

pytestmark = pytest.mark.anyio

README = (Path(ROOT) / "README.md").read_text()
DEPLOY_GUIDE = (Path(ROOT) / "docs" / "howto" / "deploy.md").read_text()
KiB, MiB = 1024, 1024 * 1024
NO_DEFAULT = "\N{EN DASH}"  # (the settings table's "unset")


def readme_section(heading: str) -> str:
    """The README's text from ``heading`` (a line of its own) to the next heading of any level."""
    start = README.index(f"\n{heading}\n") + 1
    following = re.search(r"\n#{1,6} ", README[start + len(heading) :])
    return README[start : start + len(heading) + following.start()] if following else README[start:]


def code_block_after(text: str, marker: str, language: str = "python") -> str:
    """The first fenced ``language`` block after ``marker`` in ``text``."""
    found = re.search(rf"```{language}\n(.*?)```", text[text.index(marker) :], re.S)
    assert found is not None, marker
    return found.group(1)


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of each row of the Markdown table whose header row starts with ``header_start``."""
    lines = text[text.index(header_start) :].splitlines()
    rows = []
    for line in lines[2:]:  # (after the header and its |---| line)
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("APP_", "CAFE_")):
            monkeypatch.delenv(name)


# -- Getting started ----------------------------------------------------------------------


def test_the_readmes_two_first_commands_are_the_cafe_and_what_ci_runs() -> None:
    """README lines 5-13: the cafe's command, and "Install everything and run the tests" is
    exactly the command ``.ci/run`` ends with (the suite itself is not run here)."""
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert blocks[0] == "python3 -m pip install -e . && python3 -m app_kit run examples.cafe.app:app"
    assert blocks[1] == "python3 -m pip install -e '.[test]' && python3 -m pytest -q"
    ci_lines = [line for line in (Path(ROOT) / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == blocks[1]


def test_the_readme_names_every_os_package_ci_installs() -> None:
    ci = set(re.findall(r"missing\+=\((\w+)\)", (Path(ROOT) / ".ci" / "run").read_text()))
    assert {"haproxy", "nginx", "nodejs", "npm"} <= ci  # (what the parse should find)
    listed = re.search(r"`apt-get install ([\w ]+)`", README)
    assert listed is not None
    assert ci <= set(listed.group(1).split()), sorted(ci - set(listed.group(1).split()))


def test_the_cafe_listens_on_127_0_0_1_50051_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """README line 3: the cafe's first command listens on 127.0.0.1:50051 (not bound here: the
    machine is shared; tests/test_cafe.py serves the README's client script on port 0)."""
    clean_environment(monkeypatch)
    settings = load_settings(CafeSettings)
    assert (settings.host, settings.port) == ("127.0.0.1", 50051)


# -- An App -------------------------------------------------------------------------------


async def test_the_app_example_starts_as_written() -> None:
    snippet = code_block_after(README, "`examples/cafe/app.py` is a complete one:")
    namespace: dict[str, Any] = {}
    prelude = (
        "from collections.abc import AsyncIterator\n"
        "from pydantic import Field\n"
        "from app_kit import App, AppSettings\n"
        "from examples.cafe.service import CoffeeMachine\n"
        "from examples.cafe.store import OrderStore\n"
    )
    exec(prelude + snippet, namespace)
    async with namespace["app"].serve(namespace["CafeSettings"](port=0)) as running, running.channel() as channel:
        latte = await CoffeeMachineStub(channel).MakeLatte(cafe_pb2.LatteOrder(shots=1, milk_ml=150))
    assert latte.description == "1-shot latte, 150 ml milk"


# -- Command line and settings ------------------------------------------------------------


def test_the_usage_block_lists_the_clis_options() -> None:
    """README lines 141-147 against ``python -m app_kit run --help``: the same options, and
    ``--loop``'s choices."""
    usage = code_block_after(README, "### Command line", language="")
    documented = set(re.findall(r"--[a-z][a-z-]*", usage))
    done = subprocess.run(
        [sys.executable, "-m", "app_kit", "run", "--help"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    actual = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", done.stdout)) - {"--help"}
    assert documented == actual
    choices = re.search(r"--loop \{([\w,]+)\}", usage)
    assert choices is not None and choices.group(1).split(",") == list(LOOPS)


def _readme_value(text: str) -> Any:
    """A default as the README's tables write it: ``4 MiB``, ``2 h``, ``10,000``, a dash (unset)..."""
    text = text.strip("`")
    if text in (NO_DEFAULT, "None"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    units = {"KiB": KiB, "MiB": MiB, "s": 1, "min": 60, "h": 3600}
    number = re.fullmatch(r"(\d[\d,]*(?:\.\d+)?)(?: (KiB|MiB|s|min|h))?", text)
    if number is None:
        return text  # (127.0.0.1, auto, INFO...)
    return float(number.group(1).replace(",", "")) * units.get(number.group(2) or "", 1)


def _documented_defaults(rows: list[list[str]], name_pattern: str) -> dict[str, Any]:
    """Each name of the table's first column with its default (the second column: one value
    for all its names, or one per name, comma-separated)."""
    defaults = {}
    for cells in rows:
        names = re.findall(name_pattern, cells[0])
        values = [cells[1]] * len(names)
        if len(names) > 1 and len(cells[1].split(", ")) == len(names):
            values = cells[1].split(", ")
        defaults.update({name: _readme_value(value) for name, value in zip(names, values, strict=True)})
    return defaults


def test_the_settings_table_has_every_setting_with_its_default() -> None:
    """README's settings table (lines 182-216) names every ``APP_*`` variable and its default."""
    documented = _documented_defaults(table_rows(README, "| variable | default |"), r"`(APP_\w+)`")
    fields = {f"APP_{name.upper()}": field.default for name, field in AppSettings.model_fields.items()}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        expected = documented[name]
        if name == "APP_WORKERS_SOCKET" or isinstance(default, str):
            assert str(default) == str(expected), name
        else:
            assert default == expected, (name, default, expected)


def test_the_configuration_table_has_every_limit_with_its_default() -> None:
    """README's Configuration table (lines 549-587) against the dataclass."""
    import dataclasses

    documented = _documented_defaults(table_rows(README, "| setting | default | meaning |"), r"`(\w+)`")
    fields = {field.name: field.default for field in dataclasses.fields(Configuration)}
    assert set(documented) == set(fields)
    for name, default in fields.items():
        assert default == documented[name], (name, default, documented[name])


async def test_a_client_is_refused_not_queued_until_the_app_listens(tmp_path: Path) -> None:
    """README lines 152-155: the port is bound before the first resource starts, "and until the
    server listens a client is refused rather than queued" (a connection the kernel queued
    would wait through the whole start-up, then be served, or reset if start-up failed)."""
    (tmp_path / "slow_app.py").write_text(
        textwrap.dedent(
            """
            import pathlib
            from collections.abc import AsyncIterator
            import anyio
            from app_kit import App, AppSettings

            app = App(AppSettings, name="slow")
            HERE = pathlib.Path(__file__).parent

            class Gate:
                pass

            @app.resource
            async def gate(settings: AppSettings) -> AsyncIterator[Gate]:
                (HERE / "starting").write_text("")
                while not (HERE / "go").exists():
                    await anyio.sleep(0.02)
                yield Gate()
            """
        )
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PYTHONPATH": ROOT}
    async with AppProcess("slow_app:app", "--port", str(port), env=env, cwd=str(tmp_path)) as app:
        deadline = time.monotonic() + 20
        while not (tmp_path / "starting").exists():
            assert time.monotonic() < deadline and app.process.returncode is None, app.log
            await asyncio.sleep(0.02)
        # The port is taken (bound by the App) ...
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        # ... and a client is refused at once, not queued.
        with pytest.raises(ConnectionRefusedError):
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            writer.close()
        (tmp_path / "go").write_text("")
        assert await app.ready() == port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert await check(b"", timeout=5) == b"\x08\x01"  # SERVING
        app.signal(signal.SIGTERM)
        assert await app.wait() == 0


# -- Observability ------------------------------------------------------------------------


class Ends(ServerInterceptor):
    """The final status of every call, as ``on_call_end`` sees it."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.ended = asyncio.Event()

    def on_call_end(self, call: Stream[Any, Any]) -> None:
        self.statuses.append(call.status.name if call.status is not None else "None")
        self.ended.set()


async def test_the_interceptor_example_runs_as_written() -> None:
    """README lines 845-860: without the token the call is UNAUTHENTICATED and "the handler
    never runs"; ``on_call_end`` is called once per call with its final status, CANCELLED for
    a call the client reset."""
    snippet = code_block_after(README, "Interceptors run around every call")
    snippet = snippet.replace("server = Server([Cafe()], interceptors=[RequireToken()])", "")
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    printed = io.StringIO()
    token = (("authorization", "Bearer let-me-in"),)
    machine = CoffeeMachine(brew_step=0.3)
    order = cafe_pb2.LatteOrder(shots=2, milk_ml=200)
    with contextlib.redirect_stdout(printed):
        async with (
            running_server([machine], interceptors=[namespace["RequireToken"]()]) as (_, target),
            grpc.aio.insecure_channel(target) as channel,
        ):
            make = channel.unary_unary(
                "/cafe.CoffeeMachine/MakeLatte", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.Latte.FromString
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await make(order, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert refused.value.details() == "no valid token"
            latte = await make(order, metadata=token, timeout=5)
            assert latte.order_id == 1  # the refused call's handler never ran: no order recorded
            brew = channel.unary_stream(
                "/cafe.CoffeeMachine/Brew", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.BrewStatus.FromString
            )
            call = brew(order, metadata=token, timeout=10)
            await call.read()  # the handler is running: reset it mid-way
            call.cancel()
            deadline = time.monotonic() + 5
            while printed.getvalue().count("\n") < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
    lines = printed.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["/cafe.CoffeeMachine/MakeLatte", "UNAUTHENTICATED"],
        ["/cafe.CoffeeMachine/MakeLatte", "OK"],
        ["/cafe.CoffeeMachine/Brew", "CANCELLED"],
    ], lines
    assert all(re.fullmatch(r"\S+ \w+ \d+\.\d ms \d+", line) for line in lines), lines


async def test_the_access_log_line_has_the_readmes_shape(caplog: pytest.LogCaptureFixture) -> None:
    """README line 871's example line, numbers aside, is what ``APP_ACCESS_LOG=true`` writes."""
    example = re.search(r"`(127\.0\.0\.1:\d+ \"/cafe[^`]*)`", readme_section("## Observability"))
    assert example is not None
    # Its numbers as patterns: the port, the duration (two decimals), messages and bytes.
    shape = re.escape(example.group(1))
    shape = re.sub(r":\d+", lambda _: r":\d+", shape, count=1)
    shape = re.sub(r"\d+\\\.\d+ms", lambda _: r"\d+\.\d\dms", shape)
    shape = re.sub(r"(?<=[=/])\d+", lambda _: r"\d+", shape)
    settings = CafeSettings(port=0, brew_step=0, access_log=True)  # type: ignore[call-arg]
    from examples.cafe.app import app

    with caplog.at_level("INFO", logger="app_kit.access"):
        async with app.serve(settings) as running, grpc.aio.insecure_channel(running.address) as channel:
            make = channel.unary_unary(
                "/cafe.CoffeeMachine/MakeLatte", cafe_pb2.LatteOrder.SerializeToString, cafe_pb2.Latte.FromString
            )
            await make(cafe_pb2.LatteOrder(shots=2, milk_ml=200), timeout=5)
    lines = [record.getMessage() for record in caplog.records if record.name == "app_kit.access"]
    assert len(lines) == 1 and re.fullmatch(shape, lines[0]), (shape, lines)


# -- Client -------------------------------------------------------------------------------


async def test_the_open_example_ends_its_call_ok() -> None:
    lines = readme_section("## Client").splitlines()
    first = next(i for i, line in enumerate(lines) if "async with stub.Taste.open(" in line)
    indent = len(lines[first]) - len(lines[first].lstrip())
    block = [lines[first]]
    for line in lines[first + 1 :]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    body = textwrap.indent(textwrap.dedent("\n".join(re.sub(r"\s+#.*$", "", line) for line in block)), "    ")
    namespace: dict[str, Any] = {"TastingNote": cafe_pb2.TastingNote}
    exec(f"async def snippet(stub):\n{body}\n", namespace)
    ends = Ends()
    async with running_server([CoffeeMachine()], interceptors=[ends]) as (_, target):
        from app_kit import Channel

        async with Channel(target) as channel:
            await namespace["snippet"](CoffeeMachineStub(channel))
        await asyncio.wait_for(ends.ended.wait(), 5)
    assert ends.statuses == ["OK"]


# -- Configuration: handshake_timeout -----------------------------------------------------


async def test_with_tls_each_handshake_gets_the_handshake_timeout() -> None:
    """Settings table (APP_HANDSHAKE_TIMEOUT) and deploy guide: "seconds a new connection has for
    its TLS handshake, then as long for its HTTP/2 one". A client that takes 0.6 s for its TLS
    handshake and never sends the HTTP/2 preface is closed 1 s (the timeout) after its TLS
    handshake, not 1 s after it connected."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2"])
    config = Configuration(handshake_timeout=1.0)
    async with running_server([CoffeeMachine()], config=config, ssl=server_context) as (server, _):
        port = server.sockets[0].getsockname()[1]
        connected = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.6)
        await writer.start_tls(client_context, server_hostname="127.0.0.1")
        secured = time.monotonic()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while await asyncio.wait_for(reader.read(65536), 10):
                pass  # (the server's SETTINGS, then its GOAWAY)
        closed = time.monotonic()
        writer.close()
    assert closed - secured > 0.8, f"closed {closed - secured:.2f} s after the TLS handshake"
    assert closed - connected > 1.3, f"closed {closed - connected:.2f} s after connecting"


def test_the_configuration_table_says_each_handshake_gets_the_timeout() -> None:
    (row,) = [
        cells for cells in table_rows(README, "| setting | default | meaning |") if cells[0] == "`handshake_timeout`"
    ]
    # What the settings table (APP_HANDSHAKE_TIMEOUT) and the deploy guide say of the same number.
    assert "then as long" in row[2], row[2]


# -- docs/howto/deploy.md -----------------------------------------------------------------


def test_the_deploy_guides_table_is_the_manifest() -> None:
    """docs/howto/deploy.md's table of the manifest's numbers (lines 125-134), and its text on
    the image, against deploy/kubernetes.yaml and deploy/Dockerfile (tests/test_deploy.py checks
    their agreement with the settings, not with the guide)."""
    documents = {d["kind"]: d for d in yaml.safe_load_all((Path(ROOT) / "deploy" / "kubernetes.yaml").read_text())}
    pod = documents["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    rows = {cells[0]: cells[1] for cells in table_rows(DEPLOY_GUIDE, "| setting | value | why |")}
    assert rows["`APP_DRAIN_DELAY`"] == env["APP_DRAIN_DELAY"] == "5"
    assert rows["`APP_GRACE_PERIOD`"] == "20 (the default)" and "APP_GRACE_PERIOD" not in env
    assert AppSettings.model_fields["grace_period"].default == 20
    assert rows["`terminationGracePeriodSeconds`"] == str(pod["terminationGracePeriodSeconds"]) == "30"
    for probe_name in ("readinessProbe", "livenessProbe"):
        period, failures = map(int, re.findall(r"\d+", rows[f"`{probe_name}`"]))
        probe = container[probe_name]
        assert "grpc" in probe and (probe["periodSeconds"], probe["failureThreshold"]) == (period, failures)
    cpu, memory = re.fullmatch(r"(\d+) CPU, (\d+) MiB", rows["`resources.requests`"]).groups()  # type: ignore[union-attr]
    assert container["resources"]["requests"] == {"cpu": cpu, "memory": f"{memory}Mi"}
    assert "cpu" not in container["resources"].get("limits", {})  # "No CPU limit"
    surge, unavailable = map(int, re.findall(r"\d+", rows["`strategy.rollingUpdate`"]))
    rolling = documents["Deployment"]["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (surge, unavailable)
    service = documents["Service"]["spec"]
    assert service["clusterIP"] == "None"
    assert service["ports"][0]["appProtocol"] == "kubernetes.io/h2c"
    assert pod["enableServiceLinks"] is False  # "the manifest sets enableServiceLinks: false"
    # "it runs as an unprivileged user (uid 10001)"
    assert "USER 10001" in (Path(ROOT) / "deploy" / "Dockerfile").read_text()
    assert pod["securityContext"]["runAsUser"] == 10001


async def test_a_second_copy_shares_a_reuse_port_port_and_fails_on_an_inherited_one() -> None:
    """docs/howto/deploy.md lines 70-72: "SO_REUSEPORT lets any process of the same user join the
    port: a second copy of the same command started by mistake would share the traffic instead
    of failing with 'address in use' (with ``inherit``, it fails)"."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ("tests.apps.workers_app:app", "--port", str(port), "--workers", "2")
    async with AppProcess(*command, env={"APP_WORKERS_SOCKET": "reuse_port"}) as first:
        assert await first.ready() == port
        async with AppProcess(*command, env={"APP_WORKERS_SOCKET": "reuse_port"}) as second:
            assert await second.ready() == port, second.log  # it serves too: no "address in use"
            second.signal(signal.SIGTERM)
            assert await second.wait() == 0
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
    async with AppProcess(*command, env={"APP_WORKERS_SOCKET": "inherit"}) as first:
        assert await first.ready() == port
        async with AppProcess(*command, env={"APP_WORKERS_SOCKET": "inherit"}) as second:
            assert await second.wait() == 3
            assert "Address already in use" in second.log
        first.signal(signal.SIGTERM)
        assert await first.wait() == 0
