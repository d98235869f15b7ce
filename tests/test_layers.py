"""The package's folders are its layers: checked from the source, and by importing them.

wire (sans-IO HTTP/2) → rpc (sans-IO gRPC) → aio (asyncio adapter) → services → app. A module
imports only from its own layer and those below; no module imports itself back through
others; the sans-IO layers load neither asyncio nor pydantic; h2's internals are touched in
one module, whose tested version range pyproject pins. Every third-party module app_kit
imports is declared in pyproject with an upper bound, and the tests run in one environment
with the lowest version of every range.
"""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import tomllib
import venv
from collections.abc import Callable
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from app_kit.wire import h2_internals

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "app_kit"
LAYERS = ["wire", "rpc", "aio", "observe", "services", "app"]


def _module(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every app_kit module and the app_kit modules it imports (lazily or not)."""
    modules = {_module(path) for path in PACKAGE.rglob("*.py")}
    paths = [path for path in PACKAGE.rglob("*.py") if "protos" not in path.parts and "plugin" not in path.parts]
    graph: dict[str, set[str]] = {}
    for path in paths:
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                submodules = {f"{target}.{alias.name}" for alias in node.names} & modules
                # "from . import module" imports the module, not the package's own names.
                found.update(submodules if len(submodules) == len(node.names) else {target, *submodules})
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {target for target in found if target in modules and target != name}
    for targets in graph.values():  # generated code (protos) is a leaf: it imports none of ours
        targets.intersection_update(graph)
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_nothing_imports_upward() -> None:
    upward = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if (mine := _layer(module)) is not None
        and (((theirs := _layer(target)) is not None and theirs > mine) or target in ("app_kit", "app_kit.client"))
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _imports()
    # Package __init__ modules that only hold a docstring are no part of a cycle.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target == "app_kit" or target.rpartition(".")[2] == "__init__":
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [module, target])
            elif not state.get(target):
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module) and module != "app_kit":
            visit(module, [module])
    assert cycles == []


def test_the_sans_io_layers_and_the_server_load_no_pydantic() -> None:
    # (Their own imports are checked above; importing app_kit.rpc runs app_kit/__init__ first.)
    code = (
        "import sys, app_kit.wire.guard, app_kit.rpc.server, app_kit.rpc.client\n"
        "print(sorted(m for m in ('pydantic', 'pydantic_settings', 'app_kit.app') if m in sys.modules))\n"
        "import app_kit\n"
        "print(sorted(m for m in ('pydantic', 'app_kit.app', 'app_kit.aio.client') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.split("\n")[:2] == ["[]", "[]"], result.stdout


def test_h2_internals_are_touched_in_one_module() -> None:
    private = ("._data_to_send", "._receive_frame", "._closed_streams", "._stream_closed_by", "dynamic_entries")
    offenders = [
        f"{path.relative_to(ROOT)}: {marker}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "h2_internals.py" and "protos" not in path.parts
        for marker in private
        if marker in path.read_text()
    ]
    assert offenders == []


def test_pyproject_pins_the_tested_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {spec.split(">=")[0]: spec for spec in project["dependencies"]}
    for name, (lowest, untested) in h2_internals.TESTED_VERSIONS.items():
        expected = f"{name}>={lowest[0]}.{lowest[1]},<{untested[0]}.{untested[1]}"
        assert pins[name] == expected


def test_versions_outside_the_range_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import h2

    monkeypatch.setattr(h2, "__version__", "4.5.0")
    with pytest.raises(ImportError, match=r"h2 4\.2 to before 4\.5, not 4\.5\.0"):
        h2_internals.check_versions()


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _requirements() -> list[tuple[str, Requirement]]:
    """Each requirement of pyproject, with the list it is in (``dependencies`` or an extra's name)."""
    project = _project()
    lists = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    return [(where, Requirement(spec)) for where, specs in lists.items() for spec in specs]


def _third_party_imports() -> dict[str, set[str]]:
    """Each top-level module outside the standard library that app_kit imports (at module level
    or in a function, generated code included), with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top != "app_kit":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared_with_an_upper_bound() -> None:
    # A module app_kit imports comes from a distribution that pyproject's dependencies or one
    # of its extras name, and each requirement naming it has an upper bound: the versions the
    # tests ran with, not whatever comes next.
    declared: dict[str, list[tuple[str, Requirement]]] = {}
    for where, requirement in _requirements():
        declared.setdefault(canonicalize_name(requirement.name), []).append((where, requirement))
    providers = importlib.metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"h2", "google", "pydantic", "pydantic_settings", "trio"} <= imports.keys()  # (the parse works)
    problems = []
    for module, files in sorted(imports.items()):
        names = {canonicalize_name(name) for name in providers.get(module, [])} & declared.keys()
        if not names:
            distributions = sorted(providers.get(module, [])) or "no installed distribution"
            problems.append(
                f"{module} ({', '.join(sorted(files))}): from {distributions}, which pyproject does not name"
            )
        for name in sorted(names):
            problems.extend(
                f"{module}: {where} has {requirement}, without an upper bound"
                for where, requirement in declared[name]
                if not any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier)
            )
    assert problems == []


def test_a_package_named_in_several_lists_has_one_range() -> None:
    ranges: dict[str, set[str]] = {}
    for _, requirement in _requirements():
        ranges.setdefault(canonicalize_name(requirement.name), set()).add(str(requirement.specifier))
    assert {name: specs for name, specs in ranges.items() if len(specs) > 1} == {}


def test_the_installed_versions_are_inside_the_ranges() -> None:
    # The suite runs with what is installed here (the newest): pyproject's ranges include it.
    outside = []
    for where, requirement in _requirements():
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            outside.append(f"{where}: {requirement}, installed {version}")
    assert outside == []


PROTOCOL_TESTS = [
    "tests/test_raw_h2.py",
    "tests/test_outbound.py",
    "tests/test_segmentation.py",
    "tests/test_units.py",
    "tests/test_call_ends.py",
    "tests/test_relay.py",
    "tests/test_client.py",
    "tests/test_header_limits.py",
]
TRIO_TESTS = ["tests/test_trio.py", "tests/test_trio_review.py"]
#: Long loops over the same calls (the main suite runs them): at the floors, what each call
#: does is what counts, not its 2,000th repetition. (About 25 s of the suite's budget.)
LONG_LOOPS = [
    "tests/test_client.py::test_five_hundred_concurrent_calls_on_one_channel",
    "tests/test_segmentation.py::test_frame_header_split_at_every_offset",
    "tests/test_relay.py::test_two_thousand_20k_unary_calls_fifty_in_flight",
]
#: A few tests of what the other floors are used for: settings (pydantic, pydantic-settings),
#: --env-file (python-dotenv), --reload (watchfiles), uvloop, metrics, tracing, the protoc
#: plugin (grpcio-tools) and a YAML logging configuration (pyyaml). (The protocol tests cover
#: protobuf, google.rpc's details and multidict.)
APP_TESTS = [
    "tests/test_app.py::test_every_bad_setting_is_reported",
    "tests/test_startup_mistakes.py::test_every_bad_setting_is_reported",
    "tests/test_startup_mistakes.py::test_missing_env_file_is_an_error",
    "tests/test_session11_review.py::test_a_settings_error_names_the_alias_choice_that_was_set",
    "tests/test_session11_review.py::test_a_settings_error_in_a_nested_field_names_the_variable_that_was_set",
    "tests/test_session11_review.py::test_a_settings_error_uses_the_subclass_prefix_and_an_alias_as_set",
    "tests/test_session11_review.py::test_the_environment_wins_over_the_env_file_whatever_case_the_file_spells_a_name_in",
    "tests/test_session11_review.py::test_reload_reads_the_env_file_again_for_each_new_child",
    "tests/test_session12_papercuts.py::test_variables_of_settings_and_of_their_aliases_are_not_unknown",
    "tests/test_lifecycle_trio.py::test_eventloop_run_on_each_loop[uvloop]",
    "tests/test_lifecycle_trio.py::test_sigterm_drains_the_calls_in_flight_within_the_grace[uvloop]",
    "tests/test_prometheus.py",
    "tests/test_otel.py",
    "tests/test_plugin.py::test_generated_bases",
    "tests/test_plugin.py::test_generated_service_is_served_and_proto3_optional_survives",
    "tests/test_logging.py::test_log_config_file",
]
#: The extras whose floors the lowest environment holds: those app_kit's code imports, and
#: codegen (protoc runs app_kit's plugin); of the test extra, the OpenTelemetry SDK, which must
#: match the API.
LOWEST_EXTRAS = ("uvloop", "trio", "codegen", "prometheus", "otel", "reload", "yaml")
LOWEST_OF_THE_TEST_EXTRA = ("opentelemetry-sdk",)
#: What those floors need that the newest installed here does not give them: pydantic 2.3's
#: core, the conventions of the SDK 1.20, and opentelemetry-api 1.20's own requirements. The
#: environment's `pip check` says when one of these no longer fits a floor.
COMPANIONS = [
    "pydantic-core==2.6.3",
    "opentelemetry-semantic-conventions==0.41b0",
    "deprecated==1.3.1",
    "importlib-metadata==6.11.0",
    "zipp==4.1.2",
]


def _lowest_pins() -> list[str]:
    """``name==floor`` for every range of the dependencies and of the extras above, from pyproject."""
    pins: dict[str, str] = {}
    for where, requirement in _requirements():
        if (
            where == "dependencies"
            or where in LOWEST_EXTRAS
            or (where == "test" and canonicalize_name(requirement.name) in LOWEST_OF_THE_TEST_EXTRA)
        ):
            floors = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            assert len(floors) == 1, f"{where}: {requirement} has no single lower bound"
            pins[canonicalize_name(requirement.name)] = f"{requirement.name}=={floors[0]}"
    return list(pins.values())


def _tests_pass_with(
    pins: list[str], tests: list[str], where: pathlib.Path, started: Callable[[subprocess.Popen[str]], None]
) -> None:
    """Run ``tests`` in a virtual environment that sees everything installed here, with the
    packages ``pins`` names (``name==version``) at those versions in front of them (``started``
    is given the process that runs them)."""
    # No pip of its own: the one installed here, run by the environment's python, installs into it.
    venv.EnvBuilder(system_site_packages=True).create(where)
    python = str(where / "bin" / "python")
    install = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--ignore-installed"]
    # Wheels only: a floor that has none for this Python would need a compiler to install.
    installed = subprocess.run([python, *install, "--only-binary", ":all:", *pins], capture_output=True, text=True)
    assert installed.returncode == 0, [line for line in installed.stderr.splitlines() if "ignored" not in line]
    names = [canonicalize_name(pin.split("==")[0]) for pin in pins]
    check = f"import importlib.metadata as m; print([m.version(n) for n in {names!r}])"
    found = subprocess.run([python, "-c", check], check=True, capture_output=True, text=True)
    versions = ast.literal_eval(found.stdout)
    assert [Version(version) for version in versions] == [Version(pin.split("==")[1]) for pin in pins], versions
    # The pinned versions fit together: what each of them requires is there, at a version it takes.
    checked = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True).stdout.splitlines()
    assert [line for line in checked if canonicalize_name(line.split(" ")[0]) in names] == []
    # Niced: it runs beside the rest of the suite (see LowestVersionsRun), which keeps its pace.
    command = ["nice", "-n", "10", python, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["--basetemp", str(where / "tmp"), *tests]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        started(process)
        try:
            output, _ = process.communicate(timeout=480)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output[-5000:]


class LowestVersionsRun:
    """The tests at the floors, in an environment of their own: ~70 s, nearly all of it in a
    process of its own. The suite starts it as soon as it is collected (tests/conftest.py), in a
    thread, so that it runs on the second core beside the rest of the suite; its test waits for
    it. Stopped with the session if still running (a run cut short)."""

    current: LowestVersionsRun | None = None

    def __init__(self) -> None:
        self._where = pathlib.Path(tempfile.mkdtemp(prefix="app_kit-lowest-"))
        self._process: subprocess.Popen[str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lowest versions", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls) -> LowestVersionsRun:
        if cls.current is None:
            cls.current = cls()
        return cls.current

    @classmethod
    def stop(cls) -> None:
        run = cls.current
        if run is not None and run._process is not None and run._process.poll() is None:
            run._process.kill()

    def _run(self) -> None:
        try:
            deselected = [argument for test in LONG_LOOPS for argument in ("--deselect", test)]
            tests = [*PROTOCOL_TESTS, *TRIO_TESTS, *APP_TESTS, *deselected]
            _tests_pass_with([*_lowest_pins(), *COMPANIONS], tests, self._where, self._started)
        except BaseException as exc:  # (told to the test)
            self._error = exc
        finally:
            shutil.rmtree(self._where, ignore_errors=True)

    def _started(self, process: subprocess.Popen[str]) -> None:
        self._process = process

    def result(self) -> None:
        """Wait for the run; raise what failed it."""
        self._thread.join()
        if self._error is not None:
            raise self._error


def test_the_tests_pass_at_the_lowest_supported_versions() -> None:
    # One environment with the floor of every range pyproject gives (moving a bound moves the
    # pin): the protocol tests, the trio tests, and a few of the rest.
    lowest = _lowest_pins()
    h2_floors = [f"{name}=={low[0]}.{low[1]}" for name, (low, _) in h2_internals.TESTED_VERSIONS.items()]
    assert set(h2_floors) <= {*lowest}, lowest
    named = {pin.split("==")[0] for pin in lowest}
    assert {"anyio", "trio", "protobuf", "pydantic", "pydantic-settings", "uvloop", "watchfiles"} <= named, lowest
    LowestVersionsRun.start().result()  # (started when the suite was collected, unless run alone)


def test_the_call_machinery_exists_once() -> None:
    # The server's Stream and the client's ClientStream take, queue and send messages with the
    # same functions (app_kit/aio/call.py): neither defines its own again, and no other module
    # of the asyncio layer acknowledges, inflates or queues a call's messages itself.
    from app_kit.aio.call import Call
    from app_kit.aio.client import ClientStream
    from app_kit.aio.stream import Stream

    shared = [
        "_on_messages",
        "_on_end",
        "_arrival",
        "_wait",
        "_take",
        "_inflate",
        "_put",
        "_raise_too_large",
        "_wake",
        "service",
        "method_name",
        "cardinality",
        "status",
        "status_message",
        "last_message_compressed",
        "elapsed",
        "messages_received",
        "bytes_sent",
    ]
    redefined = [f"{cls.__name__}.{name}" for cls in (Stream, ClientStream) for name in shared if name in vars(cls)]
    assert redefined == []
    assert all(getattr(Stream, name) is getattr(ClientStream, name) is getattr(Call, name) for name in shared)
    machinery = (".acknowledge(", ".inflate(", ".send_message(self._stream_id")
    elsewhere = [
        f"{path.name}: {marker}"
        for path in (PACKAGE / "aio").glob("*.py")
        if path.name != "call.py"
        for marker in machinery
        if marker in path.read_text()
    ]
    assert elsewhere == []
