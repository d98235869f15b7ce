from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest

from app_kit import Configuration, Server, ServerInterceptor, ServiceLike


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    # The server's transport is asyncio's; grpc.aio clients share that loop.
    return "asyncio"


@pytest.fixture(scope="session")
async def _one_event_loop_for_the_session() -> AsyncIterator[None]:
    """Hold anyio's test runner, so that every test runs on one event loop.

    grpc.aio binds process-wide state (its completion-queue poller) to the loop it first
    runs on; a new loop per test leaves it posting callbacks to a closed loop.
    """
    yield


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "backends: run the async test on asyncio and on trio (argument `backend`)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker("backends") is not None:
        metafunc.parametrize("backend", ["asyncio", "trio"])


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run the trio variant of a ``backends`` test under ``trio.run``.

    (anyio's plugin would run it on the session's asyncio runner: it reuses a runner held
    by a fixture whatever backend a test asks for.) The asyncio variant runs as any other.
    """
    callspec = getattr(pyfuncitem, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "trio" or not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    import trio

    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    trio.run(functools.partial(pyfuncitem.obj, **arguments))
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every async test (and only those) shares the session's loop.
    # (A module's anyio mark reaches its plain functions too: an async fixture would fail them
    # when one runs before any async test does, as with -k.)
    for item in items:
        function = getattr(item, "function", None)
        if item.get_closest_marker("anyio") is not None and inspect.iscoroutinefunction(function):
            item.fixturenames.insert(0, "_one_event_loop_for_the_session")  # type: ignore[attr-defined]
    # The run at the lowest versions (~70 s in a process of its own) starts now, beside the
    # rest of the suite, if it is among the tests selected (see tests/test_layers.py).
    if any(item.nodeid.endswith("::test_the_tests_pass_at_the_lowest_supported_versions") for item in items):
        from .test_layers import LowestVersionsRun

        LowestVersionsRun.start()


def pytest_sessionfinish() -> None:
    from .test_layers import LowestVersionsRun

    LowestVersionsRun.stop()


@contextlib.asynccontextmanager
async def running_server(
    services: Iterable[ServiceLike],
    *,
    config: Configuration | None = None,
    host: str = "127.0.0.1",
    interceptors: Sequence[ServerInterceptor] = (),
    **start_kwargs: Any,
) -> AsyncIterator[tuple[Server, str]]:
    """Start a server on a free port; yield it and its ``host:port`` target; close it."""
    server = Server(services, config=config, interceptors=interceptors)
    if "path" in start_kwargs or "sock" in start_kwargs:
        await server.start(**start_kwargs)
        target = ""
    else:
        await server.start(host, 0, **start_kwargs)
        address = server.sockets[0].getsockname()
        target = f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
    try:
        yield server, target
    finally:
        server.close(grace=1.0)
        await server.wait_closed()
