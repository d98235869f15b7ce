"""The package's folders are its layers: checked from the source, and by importing them.

wire (sans-IO HTTP/2) → rpc (sans-IO gRPC) → aio (asyncio adapter) → services → app. A module
imports only from its own layer and those below; no module imports itself back through
others; the sans-IO layers load neither asyncio nor pydantic; h2's internals are touched in
one module, whose tested version range pyproject pins, and the protocol tests also run at the
lowest versions of that range.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tomllib
import venv

import pytest

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


def _tests_pass_with(pins: list[str], tests: list[str], where: pathlib.Path) -> None:
    """Run ``tests`` in a virtual environment that sees everything installed here, with the
    packages ``pins`` names (``name==version``) at those versions in front of them."""
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(where)
    python = str(where / "bin" / "python")
    install = ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--ignore-installed"]
    subprocess.run([python, *install, *pins], check=True, capture_output=True)
    names = tuple(pin.split("==")[0] for pin in pins)
    check = f"import importlib.metadata as m; print([m.version(n) for n in {names!r}])"
    versions = subprocess.run([python, "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    assert versions == repr([pin.split("==")[1] for pin in pins])
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_protocol_tests_pass_at_the_lowest_supported_versions(tmp_path: pathlib.Path) -> None:
    # The lowest h2, hpack and hyperframe of the tested ranges.
    lowest = [f"{name}=={low[0]}.{low[1]}.0" for name, (low, _) in h2_internals.TESTED_VERSIONS.items()]
    _tests_pass_with(lowest, PROTOCOL_TESTS, tmp_path)


def test_trio_tests_pass_at_the_lowest_supported_anyio_and_trio(tmp_path: pathlib.Path) -> None:
    # The anyio transport and the trio runtime use what anyio and trio offer from the lowest
    # versions pyproject allows (anyio's SocketStream.from_socket is 4.10's, for one).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    anyio_pin = next(spec for spec in project["dependencies"] if spec.startswith("anyio>="))
    trio_pin = project["optional-dependencies"]["trio"][0]
    lowest = []
    for pin in (anyio_pin, trio_pin):
        name, bounds = pin.split(">=")
        lowest.append(f"{name}=={'.'.join([*bounds.split(',')[0].split('.'), '0'][:3])}")
    assert lowest == ["anyio==4.10.0", "trio==0.25.1"]
    _tests_pass_with(lowest, ["tests/test_trio.py", "tests/test_trio_review.py"], tmp_path)


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
