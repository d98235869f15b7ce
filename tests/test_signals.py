"""graceful_exit: the two stages, servers never started, handler restoration, misuse."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from google.protobuf.wrappers_pb2 import DoubleValue

from app_kit import Channel, Server, graceful_exit
from app_kit.aio.client import method_for
from app_kit.rpc.handlers import Cardinality

from .services import EchoService

pytestmark = pytest.mark.anyio


async def _wait_for(predicate, timeout: float = 2.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_first_signal_closes_second_exits() -> None:
    server = Server([EchoService()])
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    with graceful_exit([server]):
        os.kill(os.getpid(), signal.SIGTERM)
        await _wait_for(lambda: server.is_closing)
        await asyncio.wait_for(server.wait_closed(), 2)
        # The second signal's handler raises SystemExit(128 + signum). Raised for real it would
        # end this test process (the process tests check that); call the installed handler.
        handle = loop._signal_handlers[signal.SIGINT]  # type: ignore[attr-defined]
        with pytest.raises(SystemExit) as info:
            handle._callback(*handle._args)
        assert info.value.code == 128 + signal.SIGINT


async def test_server_closed_before_start_never_starts() -> None:
    server = Server([EchoService()])
    with graceful_exit([server]):
        os.kill(os.getpid(), signal.SIGINT)
        await _wait_for(lambda: server.is_closing)
        with pytest.raises(RuntimeError):
            await server.start("127.0.0.1", 0)
        assert server.sockets == ()
        await asyncio.wait_for(server.wait_closed(), 1)


async def test_in_flight_call_finishes_after_first_signal() -> None:
    service = EchoService()
    server = Server([service])
    await server.start("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with Channel("127.0.0.1", port) as channel:
        sleep = method_for(channel, "/test.Echo/Sleep", Cardinality.UNARY_UNARY, DoubleValue, DoubleValue)
        with graceful_exit([server]):
            call = asyncio.ensure_future(sleep(DoubleValue(value=0.3)))
            await asyncio.wait_for(service.started.wait(), 2)
            os.kill(os.getpid(), signal.SIGTERM)
            assert (await call).value == 0.3
            await asyncio.wait_for(server.wait_closed(), 2)


async def test_previous_handlers_are_restored() -> None:
    def mine(signum, frame):  # type: ignore[no-untyped-def]
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with graceful_exit([]):
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


async def test_only_in_the_main_thread() -> None:
    loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    def enter() -> None:
        try:
            with graceful_exit([], loop=loop):
                pass
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert errors and "main thread" in str(errors[0])


def test_loop_without_signal_support() -> None:
    class NoSignals(asyncio.SelectorEventLoop):
        def add_signal_handler(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    loop = NoSignals()
    try:
        with pytest.raises(RuntimeError, match="cannot handle signals"), graceful_exit([], loop=loop):
            pass
    finally:
        loop.close()
